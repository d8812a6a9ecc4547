"""Tiny offline twins really run through the diffusers pipelines via load_generator(...).generate(...)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.utils import is_bs4_available, is_ftfy_available
from PIL import Image

from d3builder.generators.registry import GeneratorEntry, load_registries
from d3builder.generators.results import NAN_OUTPUT, seed_for, size_for
from d3builder.generators.runtime import (
    LoadedGenerator,
    load_generator,
    resolve_model_path,
)
from d3builder.generators.tiny import (
    TINY_VERSION,
    build_tiny,
    clip_tokenizer,
    t5_tokenizer,
)

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
TWINS = ["sd14-tiny", "sd21-tiny", "sdxl-tiny", "if-tiny", "pixart-tiny", "lcm-tiny"]
PROMPTS = ["a photo of a tabby cat on a red sofa", "A vintage car parked by the sea, 35mm film"]
NEGATIVES = ["", "blurry, low quality"]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and threads spin badly on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def registry() -> dict[str, GeneratorEntry]:
    """Both manifests (the tiny twins are built once per session: tests/conftest.py)."""
    return load_registries(MANIFESTS / "generators.yaml", MANIFESTS / "extended.yaml")


@pytest.fixture(scope="session")
def loaded(registry: dict[str, GeneratorEntry]) -> dict[str, LoadedGenerator]:
    """Each tiny twin loaded once on the CPU, through the same from_pretrained path as a real model."""
    return {name: load_generator(registry[name], "cpu") for name in TWINS}


def _pixels(image: Image.Image | None) -> np.ndarray:
    """uint8 pixels of a generated image (fails if there is none)."""
    assert image is not None
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("name", TWINS)
def test_twin_renders_every_size_it_declares(loaded: dict[str, LoadedGenerator], name: str) -> None:
    """A batch of two at each declared size gives RGB images of exactly that size, not constant."""
    gen = loaded[name]
    for width, height in gen.entry.sizes:
        results = gen.generate(PROMPTS, NEGATIVES, width, height, [11, 12])
        assert [r.error for r in results] == [None, None]
        for result in results:
            assert result.ok and result.image is not None
            assert result.image.mode == "RGB" and result.image.size == (width, height)
            assert (result.width, result.height) == (width, height)
            assert _pixels(result.image).std() > 1.0


@pytest.mark.parametrize("name", TWINS)
def test_seeds_reproduce_and_batches_match_single_images(loaded: dict[str, LoadedGenerator], name: str) -> None:
    """Same seed -> identical pixels; other seed -> other pixels; image i of a batch == image i alone."""
    gen = loaded[name]
    width, height = gen.entry.sizes[-1]
    batch = gen.generate(PROMPTS, NEGATIVES, width, height, [101, 202])
    alone = [gen.generate([PROMPTS[i]], [NEGATIVES[i]], width, height, [batch[i].seed])[0] for i in range(2)]
    again = gen.generate(PROMPTS[:1], NEGATIVES[:1], width, height, [101])[0]
    other = gen.generate(PROMPTS[:1], NEGATIVES[:1], width, height, [303])[0]
    assert np.array_equal(_pixels(alone[0].image), _pixels(again.image))
    assert np.abs(_pixels(alone[0].image) - _pixels(other.image)).mean() > 1.0
    for i in range(2):
        diff = np.abs(_pixels(batch[i].image) - _pixels(alone[i].image))
        # CPU kernels differ by ~1e-6 between batch sizes, so a rare pixel rounds one level apart.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_if_cascade_stops_at_the_target_and_fits_the_rest(loaded: dict[str, LoadedGenerator]) -> None:
    """IF runs stage III only below the target size and records the native size it resized from."""
    gen = loaded["if-tiny"]
    small = gen.generate(PROMPTS[:1], NEGATIVES[:1], 32, 32, [5])[0]
    assert (small.stages_run, small.resized_from) == (2, None)  # 16 px x2 = 32 px: no stage III, no resize
    large = gen.generate(PROMPTS[:1], NEGATIVES[:1], 64, 48, [5])[0]
    assert (large.stages_run, large.resized_from) == (3, (128, 128))
    assert large.image is not None and large.image.size == (64, 48)


def test_provenance_records_model_sampler_and_switches(loaded: dict[str, LoadedGenerator]) -> None:
    """Provenance is JSON-able and says which model, sampler and safety/watermark switches made the image."""
    prov = loaded["sdxl-tiny"].provenance()
    json.dumps(prov)
    assert prov["generator"] == "sdxl-tiny" and prov["model"] == "tiny://sdxl"
    assert prov["revision"] == f"tiny-{TINY_VERSION}" and prov["scheduler"] == "EulerDiscreteScheduler"
    assert (prov["steps"], prov["guidance"], prov["dtype"]) == (2, 5.0, "float32")
    assert prov["safety_checker"] is False and prov["watermark"] is False
    assert loaded["sdxl-tiny"].pipe.watermark is None
    assert {"diffusers", "torch", "transformers"} <= set(prov)
    cascade = loaded["if-tiny"].provenance()
    assert [s["pipeline"] for s in cascade["stages"]] == ["IFSuperResolutionPipeline",
                                                          "StableDiffusionUpscalePipeline"]
    assert [s["upscale"] for s in cascade["stages"]] == [2, 4]
    assert loaded["if-tiny"].stages[0].text_encoder is loaded["if-tiny"].pipe.text_encoder  # shared, not reloaded
    assert loaded["lcm-tiny"].provenance()["negative_prompt"] is False


def test_scheduler_swap_and_speed_switches(registry: dict[str, GeneratorEntry]) -> None:
    """An entry's scheduler replaces the pipeline default; the speed switches are applied and recorded."""
    entry = dataclasses.replace(registry["sd14-tiny"], scheduler="EulerDiscreteScheduler")
    gen = load_generator(entry, "cpu", sdpa=False, channels_last=True, vae_slicing=True, vae_tiling=True)
    prov = gen.provenance()
    assert prov["scheduler"] == "EulerDiscreteScheduler"
    assert {k: prov[k] for k in ("sdpa", "channels_last", "vae_slicing", "vae_tiling", "compile")} == {
        "sdpa": False, "channels_last": True, "vae_slicing": True, "vae_tiling": True, "compile": False}
    assert gen.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    result = gen.generate(PROMPTS[:1], NEGATIVES[:1], 64, 64, [1])[0]
    assert result.ok and result.image is not None and result.image.size == (64, 64)


def test_nan_and_black_outputs_are_errors(registry: dict[str, GeneratorEntry]) -> None:
    """A decoder producing NaN, or an all-black image, yields error 'nan_output' instead of an image."""
    gen = load_generator(registry["sd14-tiny"], "cpu")
    conv_out = gen.pipe.vae.decoder.conv_out
    with torch.no_grad():
        conv_out.weight.fill_(float("nan"))
    results = gen.generate(PROMPTS, NEGATIVES, 64, 48, [1, 2])
    assert [(r.error, r.image) for r in results] == [(NAN_OUTPUT, None), (NAN_OUTPUT, None)]
    with torch.no_grad():
        conv_out.weight.zero_()
        conv_out.bias.fill_(-5.0)  # decodes to -5 everywhere: black after clamping
    assert gen.generate(PROMPTS[:1], NEGATIVES[:1], 64, 48, [1])[0].error == NAN_OUTPUT


def test_a_failing_batch_reports_every_image_and_the_next_batch_runs(loaded: dict[str, LoadedGenerator]) -> None:
    """An exception inside the pipeline becomes each image's error; the generator stays usable."""
    gen = loaded["sd14-tiny"]
    failed = gen.generate(PROMPTS, NEGATIVES, 60, 64, [1, 2])  # 60 is not on the 8 px latent grid
    assert all(r.image is None and r.error and r.error.startswith("ValueError") for r in failed)
    assert "divisible by 8" in (failed[0].error or "")
    assert all(r.ok for r in gen.generate(PROMPTS, NEGATIVES, 64, 64, [1, 2]))
    with pytest.raises(ValueError, match="equal"):
        gen.generate(PROMPTS, NEGATIVES[:1], 64, 64, [1, 2])


def test_clean_caption_requires_its_packages(registry: dict[str, GeneratorEntry]) -> None:
    """clean_caption=true loads only where beautifulsoup4 and ftfy exist, instead of silently not cleaning."""
    entry = dataclasses.replace(registry["pixart-tiny"],
                                call_kwargs={"use_resolution_binning": False, "clean_caption": True})
    if is_bs4_available() and is_ftfy_available():
        assert load_generator(entry, "cpu").provenance()["call_kwargs"]["clean_caption"] is True
    else:
        with pytest.raises(RuntimeError, match="beautifulsoup4"):
            load_generator(entry, "cpu")


def test_seed_and_size_are_stable_hashes() -> None:
    """Seeds and sizes are pinned functions of (record, generator, global seed), not of the process."""
    assert seed_for("1275001022128", "sd14", 0) == 2208162419
    seeds = {seed_for(str(i), "sd14", 0) for i in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)
    assert seed_for("1", "sd14", 0) != seed_for("1", "sdxl", 0) != seed_for("1", "sdxl", 1)
    sizes = [(256, 256), (512, 512), (640, 480), (640, 360)]
    assert size_for("1275001022128", "sd14", 0, sizes) == (256, 256)
    drawn = [size_for(str(i), "sdxl", 0, sizes) for i in range(400)]
    assert set(drawn) == set(sizes) and min(drawn.count(s) for s in sizes) > 60
    assert [size_for(str(i), "sdxl", 0, sizes) for i in range(400)] == drawn


def test_twins_are_deterministic_and_cached(registry: dict[str, GeneratorEntry]) -> None:
    """A twin is rebuilt bit-identically, saved once, and loaded from its cache folder."""
    first, second = build_tiny("sd21"), build_tiny("sd21")
    for key, value in first.unet.state_dict().items():
        assert torch.equal(value, second.unet.state_dict()[key])
    path = Path(resolve_model_path(registry["sd21-tiny"]))
    assert path.name == f"sd21-{TINY_VERSION}" and (path / "model_index.json").is_file()
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert resolve_model_path(registry["sd21-tiny"]) == str(path)
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert resolve_model_path(registry["sd14"]) == "CompVis/stable-diffusion-v1-4"


def test_offline_tokenizers_handle_real_captions() -> None:
    """The CLIP BPE tokenizer (from open_clip's vocabulary) and the T5 unigram tokenizer split real captions."""
    caption = "Vintage Poster: 'Visit Paris!' -- 1920s Art Deco, 24x36 in."
    clip = clip_tokenizer()
    ids = clip(caption).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and len(ids) > 10
    assert clip.decode(ids, skip_special_tokens=True).replace(" ", "") == caption.lower().replace(" ", "")
    assert clip(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0][:5] != [0] * 5
    t5 = t5_tokenizer()
    pieces = t5(caption).input_ids
    assert t5.unk_token_id not in pieces and pieces[-1] == t5.eos_token_id
    assert t5.decode(pieces, skip_special_tokens=True) == caption
