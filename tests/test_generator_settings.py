"""The registry's settings reach the pipelines exactly: each D3 tiny twin runs with its real entry's call arguments."""

from __future__ import annotations

import dataclasses
import functools

import diffusers
import numpy as np
import pytest
import torch
from genkit import MANIFESTS, one_thread  # noqa: F401 - fixtures

from d3builder.generators.registry import GeneratorEntry, load_registry
from d3builder.generators.runtime import load_generator

D3_TWINS = {"deepfloyd-if": "if-tiny", "sd14": "sd14-tiny", "sd21": "sd21-tiny", "sdxl": "sdxl-tiny"}
PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline", "StableDiffusionUpscalePipeline", "StableDiffusionPipeline",
             "StableDiffusionXLPipeline")


def real_settings(real: GeneratorEntry, twin: GeneratorEntry) -> GeneratorEntry:
    """The twin (its weights and cascade shape) with the real entry's steps, guidance, scheduler and call_kwargs."""
    def settings(spec):  # noqa: ANN001, ANN202
        return {"steps": spec.steps, "guidance": spec.guidance, "scheduler": spec.scheduler,
                "call_kwargs": dict(spec.call_kwargs)}

    stages = tuple(dataclasses.replace(t, **settings(r)) for t, r in zip(twin.stages, real.stages, strict=True))
    return dataclasses.replace(twin, **settings(real), stages=stages)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Every pipeline __call__ as (class name, keyword arguments); the real __call__ still runs."""
    seen: list[tuple[str, dict]] = []
    for name in PIPELINES:
        cls = getattr(diffusers, name)
        original = cls.__call__

        @functools.wraps(original)
        def spy(self, *args, __original=original, **kwargs):  # noqa: ANN001, ANN202
            assert not args, "the runtime passes keyword arguments only"
            seen.append((type(self).__name__, kwargs))
            return __original(self, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return seen


@pytest.mark.parametrize("name", [
    pytest.param("deepfloyd-if", marks=pytest.mark.slow),  # 225 steps through three pipelines: about 15 s
    "sd14", "sd21", "sdxl"])
def test_each_d3_twin_receives_exactly_the_registry_call_arguments(calls: list, name: str) -> None:
    """Steps, guidance and call_kwargs of every stage as the registry has them, sizes and seeds per image, no
    negative_prompt for records without one (the pipeline default, None), nothing else."""
    registry = load_registry(MANIFESTS / "generators.yaml")
    real, twin = registry[name], registry[D3_TWINS[name]]
    generator = load_generator(real_settings(real, twin), "cpu")
    width, height = twin.sizes[-1]
    results = generator.generate(["a red bicycle"], [""], width, height, [3])
    assert [r.error for r in results] == [None]
    specs = [real, *real.stages][: len(calls)]
    assert [c[0] for c in calls] == [s.pipeline for s in specs] and len(calls) == results[0].stages_run
    size = twin.native_size or (width, height)
    for index, ((pipeline, kwargs), spec) in enumerate(zip(calls, specs, strict=True)):
        if index:
            size = (size[0] * twin.stages[index - 1].upscale, size[1] * twin.stages[index - 1].upscale)
        expected = {"prompt": ["a red bicycle"], "num_inference_steps": spec.steps,
                    "guidance_scale": spec.guidance, "output_type": "np" if index == len(calls) - 1 else "pt",
                    **spec.call_kwargs}
        if pipeline != "StableDiffusionUpscalePipeline":  # the upscaler takes its size from the image
            expected.update(width=size[0], height=size[1])
        received = {k: v for k, v in kwargs.items() if k not in ("generator", "image")}
        assert received == expected, pipeline
        assert [g.initial_seed() for g in kwargs["generator"]] == [3]
        assert ("image" in kwargs) == (index > 0)


def test_negative_prompts_are_passed_only_where_there_are_some(calls: list) -> None:
    """Images without a negative prompt are rendered without the argument, the others with their own text."""
    generator = load_generator(load_registry(MANIFESTS / "generators.yaml")["sd14-tiny"], "cpu")
    generator.generate(["a cat", "a dog", "a cow"], ["", "blurry", ""], 64, 64, [1, 2, 3])
    assert [(c[1]["prompt"], c[1].get("negative_prompt", "absent")) for c in calls] == [
        (["a cat", "a cow"], "absent"), (["a dog"], ["blurry"])]


def test_sdxl_without_negative_prompt_is_the_diffusers_default() -> None:
    """SDXL zeroes the negative embedding only for negative_prompt=None: our image equals the pipeline's own
    default call and differs from the one conditioned on an empty string."""
    entry = load_registry(MANIFESTS / "generators.yaml")["sdxl-tiny"]
    generator = load_generator(entry, "cpu")
    ours = np.asarray(generator.generate(["a lighthouse at dusk"], [""], 64, 64, [7])[0].image, dtype=np.int16)

    def direct(**negative: object) -> np.ndarray:
        output = generator.pipe(prompt=["a lighthouse at dusk"], num_inference_steps=entry.steps,
                                guidance_scale=entry.guidance, width=64, height=64, output_type="np",
                                generator=[torch.Generator("cpu").manual_seed(7)], **negative).images[0]
        return (output.clip(0, 1) * 255).round().astype(np.int16)

    assert np.array_equal(ours, direct())
    assert np.abs(ours - direct(negative_prompt=[""])).mean() > 1.0
