"""CLIP linear-probe baseline: an open_clip image tower behind the CoDE embedder's interface.

`ClipEmbedder` takes the paper's CoDE input (`codetrain.preprocessing.PAPER`:
[B,3,224,224], ImageNet-normalised; its `preprocessing`), re-normalises it with CLIP's own
mean/std, resizes when the tower expects another size, and returns unit image embeddings, so
`evaluate(..., embedder=clip)` runs the unchanged harness. Weights are only ever read
from a local file (never downloaded); without weights the tower is randomly
initialised (tests, smoke runs).
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from codetrain.preprocessing import PAPER

BASELINE_PREFIX = "clip:"


class ClipEmbedder(nn.Module):
    """An open_clip image encoder mapping the paper's preprocessed crops to unit embeddings."""

    preprocessing = PAPER
    """The input it takes (as the CoDE embedder's); CLIP's own normalisation and size are applied inside."""

    baseline_classifiers = ("linear",)
    """A CLIP baseline is a linear probe, as in the paper (other baselines get every classifier)."""

    def __init__(self, visual: nn.Module, model_name: str, mean: tuple[float, ...], std: tuple[float, ...], image_size: int) -> None:
        """Wrap `visual` (an open_clip image tower) with CLIP's normalisation and input size."""
        super().__init__()
        self.visual = visual
        self.model_name = model_name
        self.display_name = f"CLIP {model_name}"
        self.image_size = int(image_size)
        shift = torch.tensor(self.preprocessing.mean) - torch.tensor(mean)
        # x_clip = (x_in * std_in + mean_in - mean_clip) / std_clip, per channel
        self.register_buffer("scale", (torch.tensor(self.preprocessing.std) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("offset", (shift / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.embed_dim = int(self.forward(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch [B,3,H,W] preprocessed as `preprocessing` says into unit vectors [B,embed_dim]."""
        x = x * self.scale + self.offset
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True)
        return F.normalize(self.visual(x), dim=-1)


def _model_name(model: str) -> str:
    """An open_clip model name; a path to a config .json is registered first (its stem becomes the name)."""
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; give a name from open_clip.list_models() or a config .json")
    return model


def load_clip_embedder(model: str, weights: str | Path | None = None) -> ClipEmbedder:
    """Build an open_clip model (random init, or weights from a local .safetensors/.pt file) as a ClipEmbedder."""
    name = _model_name(model)
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP weights {weights} is not a local file (nothing is downloaded)")
    with torch.device("cpu"):
        clip, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=str(weights) if weights is not None else None, weights_only=True
        )
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]
    return ClipEmbedder(clip.visual, name, tuple(cfg["mean"]), tuple(cfg["std"]), int(size)).eval()


def parse_baseline(spec: str) -> ClipEmbedder:
    """A baseline from 'clip:MODEL[:WEIGHTS]' (MODEL an open_clip name or config .json; WEIGHTS a local file)."""
    if not spec.startswith(BASELINE_PREFIX) or len(spec) == len(BASELINE_PREFIX):
        raise ValueError(f"baseline {spec!r} must look like clip:MODEL[:WEIGHTS] (e.g. clip:ViT-B-32:/weights/vitb32.safetensors)")
    model, _, weights = spec[len(BASELINE_PREFIX):].partition(":")
    return load_clip_embedder(model, weights or None)
