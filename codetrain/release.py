"""The authors' CoDE release (`aimagelab/CoDE` on the hub) as a baseline: `--baseline code-release:PATH_OR_REPO`.

The release is a transformers `ViTModel` checkpoint of ViT-Tiny (config.json with
model.safetensors or pytorch_model.bin; keys `embeddings.*`, `encoder.layer.{i}.attention.
attention.{query,key,value}`, `...attention.output.dense`, `...intermediate.dense`,
`...output.dense`, `...layernorm_before/after`, `layernorm.*`, `pooler.*`) whose embedding
is the final-norm CLS token (`last_hidden_state[:, 0]`), plus scikit-learn classifiers
pickled as `sklearn/*.sav` / `*.joblib`. Only the backbone weights are read -- safetensors,
or `torch.load(weights_only=True)` -- into the same timm ViT-Tiny as our model (query, key
and value fused into timm's qkv; the pooler dropped; LayerNorm eps from config.json), and
its embedding is L2-normalised like ours. The pickled classifiers are never opened (nor
downloaded): the harness refits its three classifiers on our fit split. Checkpoints in
timm's own key layout load too, bare or under a `module.`, `model.`, `backbone.` or `vit.`
prefix, or nested under a `state_dict` / `model` entry of a torch file.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from codetrain.model import CoDEEmbedder, load_state, strip_prefix
from d3builder.storage.hub import local_folder

BASELINE_PREFIX = "code-release:"
DISPLAY_NAME = "CoDE release"
ARCHITECTURE = "vit_tiny_patch16_224"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
"""The only files read: safetensors, or torch files loaded with weights_only=True."""
PREFERRED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = ["config.json", *(f"*{suffix}" for suffix in WEIGHT_SUFFIXES)]
"""What is downloaded from a hub repo: never the pickled classifiers."""
PREFIXES = ("module.", "model.", "backbone.", "vit.")

TRANSFORMERS_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
TRANSFORMERS_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def weights_file(source: Path) -> Path:
    """The backbone weights of a release folder (model.safetensors, pytorch_model.bin, or its only weights file)."""
    if source.is_file():
        if source.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{source}: not read: only {', '.join(WEIGHT_SUFFIXES)} weights files are (never pickles)")
        return source
    for name in PREFERRED_WEIGHTS:
        if (source / name).is_file():
            return source / name
    found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise FileNotFoundError(f"{source}: expected one weights file ({', '.join(WEIGHT_SUFFIXES)}), found {[p.name for p in found]}")
    return found[0]


def _tensors(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded torch file: the dict itself, or its `state_dict` / `model` entry."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if not isinstance(obj, dict):
            break
        obj = obj.get("state_dict", obj.get("model"))
    raise ValueError(f"{path}: no state dict of tensors found (expected one at the top or under 'state_dict' / 'model')")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a torch file loaded with weights_only=True; ValueError naming the file."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        return _tensors(torch.load(path, map_location="cpu", weights_only=True), path)
    except (safetensors.SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable weights file: {str(exc).splitlines()[0]}") from exc


def transformers_to_timm(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A transformers ViTModel state dict under timm's VisionTransformer names (qkv fused, pooler dropped)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("pooler."):
            continue
        if key in TRANSFORMERS_TOP:
            out[TRANSFORMERS_TOP[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None or (match[2] not in TRANSFORMERS_BLOCK and match[2] not in QKV):
            raise ValueError(f"{path}: unexpected tensor {key!r} for a transformers ViTModel checkpoint")
        layer, name, kind = int(match[1]), match[2], match[3]
        if name in QKV:
            qkv.setdefault((layer, kind), {})[name] = tensor
        else:
            out[f"blocks.{layer}.{TRANSFORMERS_BLOCK[name]}.{kind}"] = tensor
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != set(QKV):
            raise ValueError(f"{path}: layer {layer} lacks {sorted(set(QKV) - set(parts))} ({kind})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[name] for name in QKV])
    return out


def _layer_norm_eps(weights: Path) -> float | None:
    """`layer_norm_eps` of the transformers config.json beside the weights, if any."""
    config = weights.parent / "config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text(encoding="utf-8")).get("layer_norm_eps")
    return float(value) if value is not None else None


def load_release(path_or_repo: str | Path, **download: Any) -> CoDEEmbedder:
    """The released backbone as a CoDE embedder named 'CoDE release' (a folder, a weights file or a hub repo id)."""
    weights = weights_file(local_folder(path_or_repo, allow_patterns=HUB_FILES, **download))
    tensors = read_state_dict(weights)
    for prefix in PREFIXES:
        tensors = strip_prefix(tensors, prefix)
    model = CoDEEmbedder(ARCHITECTURE)
    if "embeddings.cls_token" in tensors:
        tensors = transformers_to_timm(tensors, weights)
        eps = _layer_norm_eps(weights)
        for module in model.modules() if eps is not None else ():
            if isinstance(module, nn.LayerNorm):
                module.eps = eps
    load_state(model, tensors, weights)
    model.display_name = DISPLAY_NAME
    return model.eval()


def parse_release_baseline(spec: str) -> CoDEEmbedder:
    """The baseline of 'code-release:PATH_OR_REPO' (a local folder or weights file, or a hub repo id such as aimagelab/CoDE)."""
    if not spec.startswith(BASELINE_PREFIX) or len(spec) == len(BASELINE_PREFIX):
        raise ValueError(f"baseline {spec!r} must look like {BASELINE_PREFIX}PATH_OR_REPO (e.g. {BASELINE_PREFIX}aimagelab/CoDE)")
    return load_release(spec[len(BASELINE_PREFIX):])
