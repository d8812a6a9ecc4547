"""Tiny, randomly initialised, offline twins of the D3 generators, built with the real diffusers classes."""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from d3builder.generators.checker import TINY_PIPELINES

# Bump when a builder changes, so stale cached twins are rebuilt rather than reused.
TINY_VERSION = "v1"
CACHE_ENV = "D3CODE_TINY_CACHE"
CLIP_MERGES = 4096  # first BPE merges of open_clip's vocabulary kept: 4,610 tokens, still tokenises any text
T5_WORDS = 2048  # whole-word pieces kept for the tiny T5 unigram vocabulary
HIDDEN = 32  # text-encoder width of every twin
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _seeded(seed: int) -> None:
    """Seed torch's CPU generator so that the next module gets deterministic weights."""
    torch.manual_seed(seed)


def _bpe_merges() -> list[str]:
    """BPE merges ("a b" lines, in priority order) of the vocabulary file shipped inside open_clip."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        return handle.read().split("\n")[1:]  # line 0 is a version header


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP BPE tokenizer from open_clip's bundled vocabulary, converted to vocab.json + merges.txt."""
    merges = _bpe_merges()[:CLIP_MERGES]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=pad_token)


def t5_tokenizer() -> T5Tokenizer:
    """Deterministic unigram T5 tokenizer: whole words from the CLIP vocabulary plus ASCII fallback pieces."""
    words: list[str] = []
    for line in _bpe_merges():
        token = "".join(line.split())
        if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalnum():
            words.append(token[:-4])
            if len(words) == T5_WORDS:
                break
    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - math.log1p(i)) for i, w in enumerate(words)]
    seen = {p for p, _ in pieces}
    for c in chars:  # every printable ASCII character, word-initial and word-internal
        pieces += [(p, -20.0) for p in ("▁" + c, c) if p not in seen]
        seen.update({"▁" + c, c})
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=128)


def clip_text_encoder(tokenizer: CLIPTokenizer, seed: int, *, act: str = "quick_gelu",
                      projection: bool = False) -> CLIPTextModel:
    """Two-layer, 32-wide CLIP text encoder sized to `tokenizer`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=HIDDEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    """Two-layer, 32-wide T5 encoder sized to `tokenizer`."""
    config = T5Config(
        vocab_size=len(tokenizer), d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed)
    return T5EncoderModel(config)


def vae(seed: int, levels: int, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Small AutoencoderKL whose scale factor is 2**(levels-1), as the pipelines compute it."""
    channels = (16, 16, 32, 32)[-levels:]
    _seeded(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
    )


def sd_unet(seed: int, cross_dim: int = HIDDEN, **extra) -> UNet2DConditionModel:
    """Two-level latent UNet (32, 64 channels) with cross-attention in the inner level."""
    options = {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
        "layers_per_block": 1, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": cross_dim,
        "attention_head_dim": 8,
    }
    options.update(extra)
    _seeded(seed)
    return UNet2DConditionModel(**options)


def if_unet(seed: int, in_channels: int, **extra) -> UNet2DConditionModel:
    """Two-level pixel-space UNet in the style of DeepFloyd IF (T5 text embedding, learned variance)."""
    options = {
        "sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
        "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "in_channels": in_channels, "out_channels": 6, "cross_attention_dim": HIDDEN, "encoder_hid_dim": HIDDEN,
        "attention_head_dim": 8, "addition_embed_type": "text", "addition_embed_type_num_heads": 2,
        "cross_attention_norm": "group_norm", "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu",
    }
    options.update(extra)
    _seeded(seed)
    return UNet2DConditionModel(**options)


def if_scheduler() -> DDPMScheduler:
    """DeepFloyd IF's DDPM sampler: cosine schedule, learned-range variance, dynamic thresholding."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True,
        dynamic_thresholding_ratio=0.95, sample_max_value=1.5, variance_type="learned_range",
        prediction_type="epsilon",
    )


def build_sd14() -> StableDiffusionPipeline:
    """Stable Diffusion 1.4 twin: CLIP (quick-GELU) text encoder, PNDM sampler."""
    tok = clip_tokenizer()
    return StableDiffusionPipeline(
        vae=vae(1, levels=4), text_encoder=clip_text_encoder(tok, 2), tokenizer=tok, unet=sd_unet(3),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sd21() -> StableDiffusionPipeline:
    """Stable Diffusion 2.1-base twin: OpenCLIP-style (GELU) encoder, linear-projection attention."""
    tok = clip_tokenizer(pad_token="!")
    return StableDiffusionPipeline(
        vae=vae(11, levels=4), text_encoder=clip_text_encoder(tok, 12, act="gelu"), tokenizer=tok,
        unet=sd_unet(13, use_linear_projection=True, attention_head_dim=(2, 4)),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl() -> StableDiffusionXLPipeline:
    """SDXL base twin: two text encoders (second with projection), text-time conditioning, Euler sampler."""
    tok, tok2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    unet = sd_unet(
        23, cross_dim=2 * HIDDEN, use_linear_projection=True, attention_head_dim=(2, 4),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + HIDDEN,
    )
    return StableDiffusionXLPipeline(
        vae=vae(21, levels=4), text_encoder=clip_text_encoder(tok, 22), tokenizer=tok,
        text_encoder_2=clip_text_encoder(tok2, 24, act="gelu", projection=True), tokenizer_2=tok2, unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )


def build_if() -> IFPipeline:
    """DeepFloyd IF stage I twin: T5 encoder, pixel-space UNet (3 -> 6 channels), DDPM sampler."""
    tok = t5_tokenizer()
    return IFPipeline(
        tokenizer=tok, text_encoder=t5_encoder(tok, 31), unet=if_unet(32, in_channels=3),
        scheduler=if_scheduler(), safety_checker=None, feature_extractor=None, watermarker=None,
        requires_safety_checker=False,
    )


def build_if_ii() -> IFSuperResolutionPipeline:
    """DeepFloyd IF stage II twin: the same T5 encoder and a super-resolution UNet conditioned on noise level."""
    tok = t5_tokenizer()
    unet = if_unet(
        42, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu", time_embedding_dim=32,
    )
    return IFSuperResolutionPipeline(
        tokenizer=tok, text_encoder=t5_encoder(tok, 31), unet=unet, scheduler=if_scheduler(),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )


def build_x4_upscaler() -> StableDiffusionUpscalePipeline:
    """Stable Diffusion x4 upscaler twin: latent UNet fed the low-res image, VAE with scale factor 4."""
    tok = clip_tokenizer(pad_token="!")
    unet = sd_unet(53, in_channels=7, use_linear_projection=True, num_class_embeds=1000)
    return StableDiffusionUpscalePipeline(
        vae=vae(51, levels=3, scaling_factor=0.08333), text_encoder=clip_text_encoder(tok, 52, act="gelu"),
        tokenizer=tok, unet=unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=DDIMScheduler(**SD_SCHEDULE, prediction_type="v_prediction", set_alpha_to_one=False,
                                steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, watermarker=None, max_noise_level=350,
    )


def build_lcm() -> LatentConsistencyModelPipeline:
    """Latent consistency model twin: SD 1.x layout with a guidance-embedding UNet and the LCM sampler."""
    tok = clip_tokenizer()
    return LatentConsistencyModelPipeline(
        vae=vae(61, levels=4), text_encoder=clip_text_encoder(tok, 62), tokenizer=tok,
        unet=sd_unet(63, time_cond_proj_dim=HIDDEN), scheduler=LCMScheduler(**SD_SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_pixart() -> PixArtAlphaPipeline:
    """PixArt-alpha twin: T5 encoder, two-block DiT with adaLN-single, DPM-Solver++ sampler."""
    tok = t5_tokenizer()
    _seeded(73)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
        caption_channels=HIDDEN, in_channels=4, out_channels=8, cross_attention_dim=32, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=t5_encoder(tok, 72), vae=vae(71, levels=4), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SD_SCHEDULE),
    )


BUILDERS: dict[str, Callable[[], DiffusionPipeline]] = {
    "sd14": build_sd14,
    "sd21": build_sd21,
    "sdxl": build_sdxl,
    "if": build_if,
    "if-ii": build_if_ii,
    "x4-upscaler": build_x4_upscaler,
    "lcm": build_lcm,
    "pixart": build_pixart,
}


def tiny_cache_root() -> Path:
    """Folder holding built twins: $D3CODE_TINY_CACHE or ~/.cache/d3code/tiny."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "d3code" / "tiny").expanduser()


def build_tiny(kind: str) -> DiffusionPipeline:
    """Build (in memory) the tiny twin `kind` with deterministic random weights."""
    if kind not in BUILDERS:
        raise KeyError(f"unknown tiny model kind '{kind}' (known: {', '.join(sorted(BUILDERS))})")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        pipe = BUILDERS[kind]()
    assert type(pipe).__name__ == TINY_PIPELINES[kind]
    return pipe


def _is_complete(folder: Path) -> bool:
    """A saved twin is complete when every component with a model config has its weights."""
    if not (folder / "model_index.json").is_file():
        return False
    for config in folder.glob("*/config.json"):
        has_weights = any(config.parent.glob("*.safetensors"))
        is_model = "_class_name" in config.read_text() or "architectures" in config.read_text()
        if is_model and not has_weights:
            return False
    return True


def tiny_model_path(kind: str) -> Path:
    """Local folder of the tiny twin `kind`, built and saved with save_pretrained on first use.

    Concurrent builders (several processes or nodes) are serialised by a lock file, and a twin is
    published (renamed into place) only once every component's weights are written.
    """
    if kind not in BUILDERS:
        raise KeyError(f"unknown tiny model kind '{kind}' (known: {', '.join(sorted(BUILDERS))})")
    root = tiny_cache_root()
    final = root / f"{kind}-{TINY_VERSION}"
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(final):
            return final
        shutil.rmtree(final, ignore_errors=True)  # an incomplete twin left by a killed build
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            build_tiny(kind).save_pretrained(tmp, safe_serialization=True)
            if not _is_complete(tmp):
                raise RuntimeError(f"tiny twin {kind!r}: save_pretrained wrote an incomplete folder {tmp}")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
