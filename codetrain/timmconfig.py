"""timm's hub config (`config.json`) of a CoDE embedder: what `timm.create_model("hf-hub:user/name")` reads.

With it beside `model.safetensors` (timm key names), timm alone rebuilds the backbone without
a head (`num_classes: 0`) and resolves the embedder's own preprocessing (`timm.data.resolve_data_config`):
shorter side to size x 248/224 (crop_pct 224/248), bilinear, size x size centre crop, its
mean/std (248 -> 224 px and ImageNet's for the paper's ViT-Tiny). The CoDE embedding is the
L2-normalised output of that model.
"""

from __future__ import annotations

from typing import Any

from codetrain.model import CoDEEmbedder

TAG = "code"
"""The pretrained tag written into the config: these weights are CoDE's, not timm's ImageNet ones."""


def timm_config(model: CoDEEmbedder) -> dict[str, Any]:
    """The config.json timm reads: architecture, num_classes 0, model_args and the preprocessing in pretrained_cfg."""
    source, pre = model.backbone.pretrained_cfg, model.preprocessing
    pretrained_cfg = {
        "tag": TAG,
        "custom_load": False,
        "input_size": [3, pre.size, pre.size],
        "fixed_input_size": bool(source.get("fixed_input_size", False)) and not model.dynamic_img_size,
        "interpolation": "bilinear",
        "crop_pct": pre.size / pre.resize,
        "crop_mode": "center",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "num_classes": 0,
        "first_conv": source.get("first_conv"),
        "classifier": source.get("classifier"),
    }
    config: dict[str, Any] = {
        "architecture": model.model_name,
        "num_classes": 0,
        "num_features": model.embed_dim,
        "pretrained_cfg": pretrained_cfg,
    }
    if model.dynamic_img_size:
        config["model_args"] = {"img_size": model.img_size, "dynamic_img_size": True}
    return config
