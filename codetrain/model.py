"""The CoDE embedder: a timm backbone trained from scratch, L2-normalised output, safetensors I/O.

The embedder carries its input preprocessing (`preprocessing`): the size from timm's data
config for the model unless set (224 for the paper's ViT-Tiny), the mean/std ImageNet's (the
paper) or timm's data config's. Both are saved with the weights, so evaluation, detection and
bundles preprocess exactly as training did. Weights are read from local paths or fsspec URLs.
They are saved under timm's own key names (the backbone's state dict), so timm alone loads
them; files written with the wrapper's `backbone.` prefix (before that change) convert on read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from codetrain.errors import InvalidInputError, read_input
from codetrain.preprocessing import NORMALISATIONS, PAPER, Preprocessing
from d3builder.storage.store import atomic_write_bytes

DEFAULT_MODEL = "vit_tiny_patch16_224"
"""The paper's backbone: ViT-Tiny, 192-d CLS embedding, about 5.5M parameters."""

CONFIG_KEY = "codetrain_embedder"
"""Safetensors metadata key holding the embedder config as JSON."""

CONFIG_FORMAT = "codetrain.CoDEEmbedder/1"
"""Format tag written into every config, checked when rebuilding."""

WRAPPER_PREFIX = "backbone."
"""Key prefix of the wrapper's own state dict, found in weights files written before timm key names."""


def _create_backbone(model_name: str, img_size: int | None) -> tuple[nn.Module, bool]:
    """Build a randomly initialised timm model without head (at `img_size` if given); dynamic image size where supported."""
    size = {} if img_size is None else {"img_size": img_size}
    try:
        return timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, **size), True
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    return timm.create_model(model_name, pretrained=False, num_classes=0), False


class CoDEEmbedder(nn.Module):
    """A timm backbone whose pooled (CLS) feature is returned as a unit vector."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        img_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> None:
        """Create the backbone (random weights, never downloaded).

        `img_size` None: the input size of timm's data config for the model; `mean`/`std`
        None: ImageNet's (the paper's).
        """
        super().__init__()
        if img_size is not None and img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.model_name = model_name
        self.backbone, self.dynamic_img_size = _create_backbone(model_name, img_size)
        self.img_size = int(img_size if img_size is not None else self.data_config()["input_size"][-1])
        self.mean = tuple(float(v) for v in (mean if mean is not None else PAPER.mean))
        self.std = tuple(float(v) for v in (std if std is not None else PAPER.std))
        self.embed_dim = int(self.backbone.num_features)

    def data_config(self) -> dict[str, Any]:
        """timm's data config of the backbone (input size, mean, std, ...)."""
        return resolve_model_data_config(self.backbone)

    @property
    def preprocessing(self) -> Preprocessing:
        """The input this embedder expects: size and normalisation."""
        return Preprocessing(self.img_size, self.mean, self.std)

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


def create_embedder(model_name: str = DEFAULT_MODEL, img_size: int | None = None, normalisation: str = "imagenet") -> CoDEEmbedder:
    """Create a randomly initialised CoDE embedder from any timm model name.

    `img_size` None takes the model's input size from timm's data config; `normalisation`
    is `imagenet` (the paper) or `model` (the mean/std of timm's data config).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    model = CoDEEmbedder(model_name, img_size)
    if normalisation == "model":
        cfg = model.data_config()
        model.mean, model.std = tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    return model


def weights_bytes(model: CoDEEmbedder) -> bytes:
    """The backbone's weights (timm key names) as safetensors bytes, with the config JSON in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    return safetensors.torch.save(state, metadata={CONFIG_KEY: json.dumps(model.config())})


def save_weights(model: CoDEEmbedder, path: str | Path) -> Path:
    """Write the weights atomically to a local safetensors file."""
    return atomic_write_bytes(path, weights_bytes(model))


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def _read(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata from a safetensors file (local path or URL); ValueError if it is not one."""
    data = read_input(path, storage_options)
    try:
        tensors = safetensors.torch.load(data)
        metadata = _header_metadata(data)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} is not a valid safetensors file: {exc}") from exc
    return tensors, metadata


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors without `prefix` when every key carries it, else unchanged."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def load_state(model: CoDEEmbedder, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copy timm-keyed (or old `backbone.`-prefixed) tensors into the backbone; any missing, extra or misshapen one is refused."""
    try:
        model.backbone.load_state_dict(strip_prefix(tensors, WRAPPER_PREFIX), strict=True)
    except RuntimeError as exc:
        raise InvalidInputError(f"tensors in {path} do not match {model.model_name}: {exc}") from exc


def load_weights(model: CoDEEmbedder, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> CoDEEmbedder:
    """Load safetensors weights (local path or URL) into an existing embedder (strict: every tensor must match)."""
    tensors, _ = _read(path, storage_options)
    load_state(model, tensors, path)
    return model


def load_embedder(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> CoDEEmbedder:
    """Rebuild an embedder from the config in a safetensors file's metadata (local path or URL) and load its weights."""
    tensors, metadata = _read(path, storage_options)
    if CONFIG_KEY not in metadata:
        raise InvalidInputError(f"{path} carries no '{CONFIG_KEY}' metadata: not saved by codetrain.save_weights")
    try:
        cfg = json.loads(metadata[CONFIG_KEY])
        model = CoDEEmbedder.from_config(cfg)
    except (json.JSONDecodeError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidInputError(f"{path} has an unusable embedder config: {exc}") from exc
    load_state(model, tensors, path)
    return model.eval()
