"""The CoDE embedder: a timm backbone trained from scratch, L2-normalised output, safetensors I/O.

Weights are saved under timm's own key names (the backbone's state dict), so timm alone loads
them; files written with the wrapper's `backbone.` prefix (before that change) convert on read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from d3builder.storage.shards import atomic_write_bytes

DEFAULT_MODEL = "vit_tiny_patch16_224"
"""The paper's backbone: ViT-Tiny, 192-d CLS embedding, about 5.5M parameters."""

CONFIG_KEY = "codetrain_embedder"
"""Safetensors metadata key holding the embedder config as JSON."""

CONFIG_FORMAT = "codetrain.CoDEEmbedder/1"
"""Format tag written into every config, checked when rebuilding."""

WRAPPER_PREFIX = "backbone."
"""Key prefix of the wrapper's own state dict, found in weights files written before timm key names."""


def _create_backbone(model_name: str, img_size: int) -> tuple[nn.Module, bool]:
    """Build a randomly initialised timm model without head; dynamic image size where supported."""
    try:
        return timm.create_model(
            model_name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True
        ), True
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(model_name, pretrained=False, num_classes=0), False


class CoDEEmbedder(nn.Module):
    """A timm backbone whose pooled (CLS) feature is returned as a unit vector."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        img_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        """Create the backbone (random weights, never downloaded)."""
        super().__init__()
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.model_name = model_name
        self.img_size = int(img_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.backbone, self.dynamic_img_size = _create_backbone(model_name, self.img_size)
        self.embed_dim = int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a normalised image batch [B,3,H,W] into unit vectors [B,embed_dim]."""
        return F.normalize(self.backbone(x), dim=-1)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description from which `from_config` rebuilds this model."""
        return {
            "format": CONFIG_FORMAT,
            "model_name": self.model_name,
            "img_size": self.img_size,
            "embed_dim": self.embed_dim,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CoDEEmbedder:
        """Rebuild an (untrained) embedder from a `config()` dict."""
        if not isinstance(cfg, dict) or cfg.get("format") != CONFIG_FORMAT:
            raise ValueError(f"not a {CONFIG_FORMAT} config: {cfg!r}")
        missing = {"model_name", "img_size", "embed_dim", "mean", "std"} - cfg.keys()
        if missing:
            raise ValueError(f"embedder config lacks {sorted(missing)}: {cfg!r}")
        model = cls(cfg["model_name"], int(cfg["img_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))
        if model.embed_dim != int(cfg["embed_dim"]):
            raise ValueError(
                f"config says embed_dim {cfg['embed_dim']} but {cfg['model_name']} gives {model.embed_dim}"
            )
        return model


def create_embedder(model_name: str = DEFAULT_MODEL, img_size: int = 224) -> CoDEEmbedder:
    """Create a randomly initialised CoDE embedder from any timm model name."""
    return CoDEEmbedder(model_name, img_size)


def save_weights(model: CoDEEmbedder, path: str | Path) -> Path:
    """Write the backbone's weights (timm key names) atomically as safetensors, the config JSON in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    data = safetensors.torch.save(state, metadata={CONFIG_KEY: json.dumps(model.config())})
    return atomic_write_bytes(path, data)


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a safetensors file; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (safetensors.SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc
    return tensors, metadata


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors without `prefix` when every key carries it, else unchanged."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_state(model: CoDEEmbedder, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Copy timm-keyed (or old `backbone.`-prefixed) tensors into the backbone; any missing, extra or misshapen one is refused."""
    try:
        model.backbone.load_state_dict(strip_prefix(tensors, WRAPPER_PREFIX), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"tensors in {path} do not match {model.model_name}: {exc}") from exc


def load_weights(model: CoDEEmbedder, path: str | Path) -> CoDEEmbedder:
    """Load safetensors weights into an existing embedder (strict: every tensor must match)."""
    tensors, _ = _read(path)
    load_state(model, tensors, Path(path))
    return model


def load_embedder(path: str | Path) -> CoDEEmbedder:
    """Rebuild an embedder from the config in a safetensors file's metadata and load its weights."""
    tensors, metadata = _read(path)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} carries no '{CONFIG_KEY}' metadata: not saved by codetrain.save_weights")
    try:
        cfg = json.loads(metadata[CONFIG_KEY])
        model = CoDEEmbedder.from_config(cfg)
    except (json.JSONDecodeError, ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path} has an unusable embedder config: {exc}") from exc
    load_state(model, tensors, Path(path))
    return model.eval()
