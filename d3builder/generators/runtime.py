"""Runtime of the generate stage, where the model stack (torch, diffusers, transformers, Accelerate) loads: a registry
entry loaded as diffusers pipelines that render batches, and the process state they run under."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch
import transformers
from accelerate import PartialState
from diffusers.utils import deprecation_utils, is_bs4_available, is_ftfy_available
from PIL import Image

from d3builder.generators.registry import TINY_SCHEME, Entry, GeneratorEntry, StageEntry
from d3builder.generators.results import NAN_OUTPUT, GenerationResult, fit, short_error
from d3builder.generators.tiny import TINY_VERSION, tiny_model_path

# Pipelines whose "pt" output is the raw [-1, 1] sample and whose image input is taken as [-1, 1] as is
# (others postprocess "pt" output to [0, 1] and expect [0, 1] image tensors).
RAW_RANGE_PIPELINES = ("IFPipeline", "IFSuperResolutionPipeline")
# diffusers renamed from_pretrained's `torch_dtype` to `dtype`; older releases only know the former.
DTYPE_ARG = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def resolve_model_path(entry: GeneratorEntry | StageEntry) -> str:
    """Where from_pretrained loads the entry: the built tiny twin's folder, or the hub id / local path."""
    if entry.model.startswith(TINY_SCHEME):
        return str(tiny_model_path(entry.model[len(TINY_SCHEME):]))
    return entry.model


def negative_argument(negatives: list[str]) -> list[str] | None:
    """The negative prompts to pass, or None (pass none: the pipeline's own default) when every one is empty.

    SDXL (force_zeros_for_empty_prompt) zeroes the negative embedding only for its default None; "" would be
    encoded as text. PixArt's default is "" itself."""
    return None if not any(negatives) else list(negatives)


def _accepts(pipe: Any, name: str) -> bool:
    """Whether the pipeline's __call__ takes argument `name` explicitly."""
    return name in inspect.signature(type(pipe).__call__).parameters


def _denoiser_name(pipe: Any) -> str | None:
    """Attribute holding the pipeline's denoising network ("unet" or "transformer")."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    return None


def _as_dtype(value: str | torch.dtype) -> torch.dtype:
    """torch dtype from its registry name (or a dtype)."""
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{value}'")
    return dtype


def _load_pipeline(spec: GeneratorEntry | StageEntry, dtype: torch.dtype, shared: dict[str, Any]) -> Any:
    """from_pretrained with safety checker and watermarks off; the same call for tiny twins and real models."""
    cls = getattr(diffusers, spec.pipeline)
    init = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {DTYPE_ARG: dtype, **shared}
    if spec.revision is not None and not spec.model.startswith(TINY_SCHEME):
        kwargs["revision"] = spec.revision
    if spec.variant is not None:
        kwargs["variant"] = spec.variant
    for off in ("safety_checker", "feature_extractor", "watermarker"):
        if off in init:
            kwargs[off] = None
    if "requires_safety_checker" in init:
        kwargs["requires_safety_checker"] = False
    if "add_watermarker" in init:
        kwargs["add_watermarker"] = False
    if spec.call_kwargs.get("clean_caption") and not (is_bs4_available() and is_ftfy_available()):
        raise RuntimeError(f"{spec.model}: clean_caption=true needs beautifulsoup4 and ftfy installed "
                           "(diffusers would silently skip caption cleaning)")
    pipe = cls.from_pretrained(resolve_model_path(spec), **kwargs)
    denoiser = _denoiser_name(pipe)
    if denoiser is not None and getattr(pipe, denoiser).dtype != dtype:
        raise RuntimeError(f"{spec.model}: {denoiser} loaded as {getattr(pipe, denoiser).dtype}, expected {dtype}")
    for attr in ("safety_checker", "watermarker", "watermark"):
        if getattr(pipe, attr, None) is not None:
            setattr(pipe, attr, None)
    if spec.scheduler is not None:
        pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tune(pipe: Any, *, sdpa: bool, compile: bool, channels_last: bool, vae_slicing: bool,
          vae_tiling: bool) -> dict[str, bool]:
    """Apply the speed switches to one pipeline and return which ones took effect."""
    denoiser_name = _denoiser_name(pipe)
    denoiser = getattr(pipe, denoiser_name) if denoiser_name else None
    vae = getattr(pipe, "vae", None)
    applied = {"sdpa": sdpa, "compile": False, "channels_last": False, "vae_slicing": False, "vae_tiling": False}
    if not sdpa:  # diffusers defaults to torch's scaled_dot_product_attention; fall back to the classic path
        for module in (denoiser, vae):
            if module is not None and hasattr(module, "set_default_attn_processor"):
                module.set_default_attn_processor()
    if channels_last:
        for module in (getattr(pipe, "unet", None), vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
                applied["channels_last"] = True
    if vae is not None and vae_slicing:
        vae.enable_slicing()
        applied["vae_slicing"] = True
    if vae is not None and vae_tiling:
        vae.enable_tiling()
        applied["vae_tiling"] = True
    if compile and denoiser_name is not None:
        setattr(pipe, denoiser_name, torch.compile(denoiser))
        applied["compile"] = True
    return applied


def _canonical(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """A stage's "pt" output as float in [0, 1]."""
    if type(pipe).__name__ in RAW_RANGE_PIPELINES:
        images = images / 2 + 0.5
    return images.clamp(0, 1)


def _stage_input(pipe: Any, images01: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] mapped to the range the next stage expects ([-1, 1] for IF, else [0, 1])."""
    if type(pipe).__name__ in RAW_RANGE_PIPELINES:
        return images01 * 2 - 1
    return images01


def _to_pil(array: np.ndarray) -> Image.Image | None:
    """float HWC [0, 1] -> RGB PIL image, or None for NaN/inf or all-black output."""
    if not np.isfinite(array).all():
        return None
    pixels = (array.clip(0, 1) * 255).round().astype(np.uint8)
    if not pixels.any():
        return None
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return Image.fromarray(pixels[..., :3], mode="RGB")


@dataclass
class LoadedGenerator:
    """A registry entry loaded on a device: the base pipeline plus its cascade stages."""

    entry: GeneratorEntry
    pipe: Any
    stages: list[Any]
    device: torch.device
    dtype: torch.dtype
    switches: dict[str, bool] = field(default_factory=dict)

    def _call(self, pipe: Any, spec: GeneratorEntry | StageEntry, prompts: list[str], negatives: list[str] | None,
              generators: list[torch.Generator], output_type: str, **extra: Any) -> Any:
        """Run one pipeline on the batch with the entry's sampling settings."""
        kwargs: dict[str, Any] = {
            "prompt": prompts, "num_inference_steps": spec.steps, "guidance_scale": spec.guidance,
            "generator": generators, "output_type": output_type, **spec.call_kwargs, **extra,
        }
        if negatives is not None and _accepts(pipe, "negative_prompt"):
            kwargs["negative_prompt"] = negatives
        return pipe(**kwargs).images

    def _render(self, prompts: list[str], negatives: list[str] | None, width: int, height: int,
                seeds: list[int]) -> tuple[np.ndarray, int]:
        """Run the cascade; return float NHWC images in [0, 1] and the number of pipelines run."""
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        base_w, base_h = self.entry.native_size or (width, height)
        todo = [(self.pipe, self.entry, {"width": base_w, "height": base_h})]
        size = (base_w, base_h)
        for pipe, spec in zip(self.stages, self.entry.stages, strict=True):
            if size[0] >= width and size[1] >= height:
                break  # the cascade already reached the target size
            size = (size[0] * spec.upscale, size[1] * spec.upscale)
            todo.append((pipe, spec, {"width": size[0], "height": size[1]}))
        images: torch.Tensor | None = None
        for index, (pipe, spec, dims) in enumerate(todo):
            last = index == len(todo) - 1
            extra = {k: v for k, v in dims.items() if _accepts(pipe, k)}
            if images is not None:
                extra["image"] = _stage_input(pipe, images)
            out = self._call(pipe, spec, prompts, negatives, generators, "np" if last else "pt", **extra)
            if not last:
                images = _canonical(pipe, out)
        return np.asarray(out, dtype=np.float32), len(todo)

    def generate(self, prompts: list[str], negative_prompts: list[str], width: int, height: int,
                 seeds: list[int]) -> list[GenerationResult]:
        """Render one batch at one size; image i depends only on (prompts[i], negative_prompts[i], seeds[i]).

        Images without a negative prompt are rendered apart from those with one, so that each gets
        negative_prompt=None or its own text whatever else shares its batch."""
        if not (len(prompts) == len(negative_prompts) == len(seeds)) or not prompts:
            raise ValueError(f"need equal, non-zero numbers of prompts ({len(prompts)}), negative prompts "
                             f"({len(negative_prompts)}) and seeds ({len(seeds)})")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63 for s in seeds):
            raise ValueError(f"seeds must be integers in [0, 2**63), got {seeds}")
        results: list[GenerationResult | None] = [None] * len(prompts)
        for has_negative in (False, True):
            group = [i for i, n in enumerate(negative_prompts) if bool(n) == has_negative]
            if group:
                rendered = self._generate_group([prompts[i] for i in group], [negative_prompts[i] for i in group],
                                                width, height, [seeds[i] for i in group])
                for i, result in zip(group, rendered, strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    def _generate_group(self, prompts: list[str], negatives: list[str], width: int, height: int,
                        seeds: list[int]) -> list[GenerationResult]:
        """Render images that all have a negative prompt, or all have none."""
        try:
            arrays, stages_run = self._render(prompts, negative_argument(negatives), width, height, seeds)
        except Exception as exc:  # a failed batch is recorded per image; the caller goes on with the next one
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return [GenerationResult(seed=s, width=width, height=height, error=short_error(exc)) for s in seeds]
        pipeline = "+".join([self.entry.pipeline, *(s.pipeline for s in self.entry.stages)][:stages_run])
        results = []
        for seed, array in zip(seeds, arrays, strict=True):
            image = _to_pil(array)
            if image is None:
                results.append(GenerationResult(seed=seed, width=width, height=height, error=NAN_OUTPUT,
                                                stages_run=stages_run, pipeline=pipeline))
                continue
            image, native = fit(image, width, height)
            results.append(GenerationResult(seed=seed, width=width, height=height, image=image, stages_run=stages_run,
                                            resized_from=native, pipeline=pipeline))
        return results

    def provenance(self) -> dict[str, Any]:
        """JSON-able description of how images are made: model, revision, sampler and the switches."""
        return {
            "generator": self.entry.name,
            **_spec_provenance(self.entry, self.pipe),
            "native_size": list(self.entry.native_size) if self.entry.native_size else None,
            "stages": [{**_spec_provenance(spec, pipe), "upscale": spec.upscale}
                       for spec, pipe in zip(self.entry.stages, self.stages, strict=True)],
            "safety_checker": False,
            "watermark": False,
            "generator_device": "cpu",
            "resize": "centre crop to the target aspect + LANCZOS, only where the native size differs",
            **self.switches,
            **stack_versions(),
        }


def stack_versions() -> dict[str, str]:
    """Versions of the model stack that renders (stored with every generated shard)."""
    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _spec_provenance(spec: GeneratorEntry | StageEntry, pipe: Any) -> dict[str, Any]:
    """Provenance fields shared by the base pipeline and each stage."""
    tiny = spec.model.startswith(TINY_SCHEME)
    return {
        "pipeline": spec.pipeline,
        "model": spec.model,
        "revision": f"tiny-{TINY_VERSION}" if tiny else spec.revision,
        "variant": spec.variant,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "steps": spec.steps,
        "guidance": spec.guidance,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "negative_prompt": _accepts(pipe, "negative_prompt"),
        "call_kwargs": dict(spec.call_kwargs),
    }


def load_generator(entry: GeneratorEntry, device: str | torch.device, *, dtype: str | torch.dtype | None = None,
                   sdpa: bool = True, compile: bool = False, channels_last: bool = False,
                   vae_slicing: bool = False, vae_tiling: bool = False) -> LoadedGenerator:
    """Load an entry (base pipeline + cascade stages) on `device`; `dtype` overrides the entry's dtypes."""
    device = torch.device(device)
    base_dtype = _as_dtype(dtype or entry.dtype)
    options = {"sdpa": sdpa, "compile": compile, "channels_last": channels_last,
               "vae_slicing": vae_slicing, "vae_tiling": vae_tiling}
    pipe = _load_pipeline(entry, base_dtype, {}).to(device)
    switches = _tune(pipe, **options)
    stages = []
    for spec in entry.stages:
        missing = [n for n in spec.share_components if getattr(pipe, n, None) is None]
        if missing:
            raise ValueError(f"{entry.source}: entry '{entry.name}': stage {spec.pipeline} shares "
                             f"{missing}, which the base pipeline lacks")
        shared = {n: getattr(pipe, n) for n in spec.share_components}
        stage = _load_pipeline(spec, _as_dtype(dtype or spec.dtype), shared).to(device)
        _tune(stage, **options)
        stages.append(stage)
    return LoadedGenerator(entry=entry, pipe=pipe, stages=stages, device=device, dtype=base_dtype,
                           switches=switches)


def prepare_weights(entry: Entry, state: PartialState) -> None:
    """Build tiny twins on the main process first: under torch.distributed, transformers saves weights on rank 0 only."""
    if not isinstance(entry, GeneratorEntry):
        return
    with state.main_process_first():
        for spec in (entry, *entry.stages):
            resolve_model_path(spec)


def process_state() -> PartialState:
    """This process's Accelerate state (CPU processes with gloo when there is no CUDA)."""
    return PartialState(cpu=not torch.cuda.is_available())
