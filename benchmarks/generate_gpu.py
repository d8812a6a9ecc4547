"""GPU images/s of full-size SD 1.4 and SDXL (random weights) with our generate settings against a naive loop.

The architectures are built offline from the published configs (values written below, no model hub):
UNet2DConditionModel, AutoencoderKL and the CLIP text encoders with SD 1.4's and SDXL base 1.0's
sizes, randomly initialised on the GPU and saved once as a local diffusers folder (fp16). Then, at
50 steps and the same output size:

- ours: `load_generator` on that folder as a registry entry, fp16, SDPA, channels_last (optionally
  torch.compile), batches of 8 through `LoadedGenerator.generate`, as the generate stage runs them;
- naive: the same folder loaded by the diffusers pipeline class in fp32, one image per call.

Random weights render noise (maybe NaN in fp16); the arithmetic is that of the real models, which is
what throughput measures. Needs CUDA (an H100 takes a few minutes); exits with a clear message otherwise.

    python benchmarks/generate_gpu.py [--models sd14 sdxl] [--size 512] [--steps 50] [--batch 8]
                                      [--batches 2] [--naive-images 2] [--compile] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from d3builder.generators.registry import GeneratorEntry
from d3builder.generators.runtime import DTYPE_ARG, load_generator
from d3builder.generators.tiny import clip_tokenizer

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
VAE = {  # AutoencoderKL of SD 1.x and SDXL (same architecture, different scaling factor)
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "act_fn": "silu",
}
CLIP_L = {  # CLIP ViT-L/14 text tower: SD 1.4's encoder and SDXL's first encoder
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
OPENCLIP_BIGG = {  # OpenCLIP ViT-bigG/14 text tower: SDXL's second encoder (with projection)
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}
SD14_UNET = {  # CompVis/stable-diffusion-v1-4 unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
DEVICE = "cuda"
PROMPTS = ["a red bicycle leaning on a brick wall", "portrait of an old fisherman, oil painting",
           "aerial view of a river delta at sunset", "a bowl of ramen on a wooden table"]


def build_sd14(device: str) -> StableDiffusionPipeline:
    """SD 1.4 with random weights initialised on `device`."""
    with torch.device(device):
        vae = AutoencoderKL(**VAE, sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        unet = UNet2DConditionModel(**SD14_UNET)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl(device: str) -> StableDiffusionXLPipeline:
    """SDXL base 1.0 with random weights initialised on `device`."""
    with torch.device(device):
        vae = AutoencoderKL(**VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG))
        unet = UNet2DConditionModel(**SDXL_UNET)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )


MODELS: dict[str, tuple[Callable[[str], diffusers.DiffusionPipeline], float]] = {
    "sd14": (build_sd14, 7.5),
    "sdxl": (build_sdxl, 5.0),
}


def save_random(name: str, folder: Path) -> Path:
    """Build `name` with random weights on the GPU and save it as an fp16 diffusers folder."""
    torch.manual_seed(0)
    pipe = MODELS[name][0](DEVICE)
    pipe.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
    del pipe
    release()
    return folder / name


def synchronize() -> None:
    """Wait for queued GPU work (timings end here)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    """Free cached GPU memory between models."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def ours(path: Path, name: str, args: argparse.Namespace) -> tuple[float, int]:
    """Images/s of our settings (fp16, SDPA, channels_last, batches) and how many outputs were NaN/black."""
    entry = GeneratorEntry(
        name=f"{name}-random", pipeline="StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline",
        model=str(path), dtype="float16", steps=args.steps, guidance=MODELS[name][1],
        sizes=((args.size, args.size),), source=__file__,
    )
    loaded = load_generator(entry, DEVICE, sdpa=True, channels_last=True, compile=args.compile)
    prompts, negatives = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)], [""] * args.batch
    failed = 0
    for index in range(-1, args.batches):  # batch -1 is the warm-up (and compilation)
        if index == 0:
            synchronize()
            started = time.perf_counter()
        seeds = list(range((index + 1) * args.batch, (index + 2) * args.batch))
        results = loaded.generate(prompts, negatives, args.size, args.size, seeds)
        failed += sum(not r.ok for r in results) if index >= 0 else 0
    synchronize()
    seconds = time.perf_counter() - started
    del loaded
    release()
    return args.batch * args.batches / seconds, failed


def naive(path: Path, name: str, args: argparse.Namespace) -> float:
    """Images/s of the plain diffusers pipeline in fp32, one image per call."""
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path, **{DTYPE_ARG: torch.float32}).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    for index in range(-1, args.naive_images):  # image -1 is the warm-up
        if index == 0:
            synchronize()
            started = time.perf_counter()
        pipe(PROMPTS[index % len(PROMPTS)], num_inference_steps=args.steps, guidance_scale=MODELS[name][1],
             width=args.size, height=args.size, generator=torch.Generator(DEVICE).manual_seed(index + 1))
    synchronize()
    seconds = time.perf_counter() - started
    del pipe
    release()
    return args.naive_images / seconds


def main() -> int:
    """Build, save and time each model; print images/s, ratios and the machine."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd14", "sdxl"])
    parser.add_argument("--size", type=int, default=512, help="square output size in pixels (multiple of 8)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="our batch size")
    parser.add_argument("--batches", type=int, default=2, help="timed batches of ours (after one warm-up batch)")
    parser.add_argument("--naive-images", type=int, default=2, help="timed naive images (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in ours")
    parser.add_argument("--workdir", help="where the random-weight folders are saved (default: a temp dir)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("generate_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use benchmarks/generate.py on a CPU", file=sys.stderr)
        return 2
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="d3-bench-gpu-"))
    rows = []
    try:
        for name in args.models:
            path = save_random(name, folder)
            fast, failed = ours(path, name, args)
            slow = naive(path, name, args)
            rows.append((name, fast, slow, failed))
            print(f"{name}: ours {fast:.3f} images/s ({failed} NaN/black of {args.batch * args.batches}), "
                  f"naive {slow:.3f} images/s, ratio {fast / slow:.2f}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{args.size}x{args.size}, {args.steps} steps; ours: fp16, SDPA, channels_last, batch {args.batch}"
          f"{', torch.compile' if args.compile else ''}; naive: fp32, batch 1")
    print(f"{'model':6} {'ours img/s':>11} {'naive img/s':>12} {'ratio':>7}")
    for name, fast, slow, _ in rows:
        print(f"{name:6} {fast:11.3f} {slow:12.3f} {fast / slow:7.2f}")
    print(f"machine: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, {platform.node()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
