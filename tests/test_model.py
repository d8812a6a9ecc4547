"""Tests for the CoDE embedder and its safetensors checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from codetrain.model import (
    CONFIG_KEY,
    CoDEEmbedder,
    create_embedder,
    load_embedder,
    load_weights,
    save_weights,
)


@pytest.fixture(scope="module")
def vit() -> CoDEEmbedder:
    """A randomly initialised ViT-Tiny embedder in eval mode."""
    torch.manual_seed(0)
    return create_embedder().eval()


@pytest.mark.parametrize("size", [224, 96])
def test_vit_tiny_gives_unit_192d_embeddings_at_224_and_96(vit: CoDEEmbedder, size: int) -> None:
    with torch.no_grad():
        out = vit(torch.randn(3, 3, size, size))
    assert out.shape == (3, 192)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_vit_tiny_on_96_px_uses_36_patches(vit: CoDEEmbedder) -> None:
    with torch.no_grad():
        tokens = vit.backbone.forward_features(torch.randn(1, 3, 96, 96))
    assert tokens.shape[1] == 36 + vit.backbone.num_prefix_tokens


def test_vit_tiny_size_and_config(vit: CoDEEmbedder) -> None:
    n_params = sum(p.numel() for p in vit.parameters())
    assert 5.4e6 < n_params < 5.6e6
    assert vit.embed_dim == 192 and vit.model_name == "vit_tiny_patch16_224" and vit.dynamic_img_size
    cfg = json.loads(json.dumps(vit.config()))
    assert cfg["img_size"] == 224 and cfg["embed_dim"] == 192
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["std"] == pytest.approx([0.229, 0.224, 0.225])
    rebuilt = CoDEEmbedder.from_config(cfg)
    assert rebuilt.config() == vit.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in vit.state_dict().items()}


def test_from_config_refuses_foreign_or_inconsistent_configs(vit: CoDEEmbedder) -> None:
    with pytest.raises(ValueError, match="not a"):
        CoDEEmbedder.from_config({"model_name": "vit_tiny_patch16_224"})
    with pytest.raises(ValueError, match="embed_dim"):
        CoDEEmbedder.from_config({**vit.config(), "embed_dim": 384})


def test_other_timm_models_work() -> None:
    resnet = create_embedder("resnet18").eval()
    assert resnet.embed_dim == 512 and not resnet.dynamic_img_size
    small_vit = create_embedder("vit_tiny_patch16_224", img_size=96).eval()
    assert small_vit.config()["img_size"] == 96
    with torch.no_grad():
        for model, size in ((resnet, 64), (small_vit, 96), (small_vit, 224)):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, model.embed_dim)
            assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_safetensors_round_trip_gives_identical_outputs(vit: CoDEEmbedder, tmp_path: Path) -> None:
    path = save_weights(vit, tmp_path / "ckpt" / "code.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert json.loads(fh.metadata()[CONFIG_KEY]) == vit.config()
    x = torch.randn(2, 3, 224, 224)
    loaded = load_embedder(path)
    torch.manual_seed(99)
    into = load_weights(create_embedder().eval(), path)
    with torch.no_grad():
        expected = vit(x)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(into(x), expected)
    assert not list(path.parent.glob(".*tmp*"))


def test_weights_use_timm_key_names_and_load_through_timm_alone(vit: CoDEEmbedder, tmp_path: Path) -> None:
    path = save_weights(vit, tmp_path / "model.safetensors")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == set(plain.state_dict())
    loaded = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(F.normalize(loaded(x), dim=-1), vit(x))
        assert not torch.allclose(F.normalize(plain.eval()(x), dim=-1), vit(x))


def test_old_files_with_the_wrapper_prefix_convert_on_read(vit: CoDEEmbedder, tmp_path: Path) -> None:
    old = tmp_path / "old.safetensors"
    tensors = {k: v.contiguous() for k, v in vit.state_dict().items()}
    assert all(k.startswith("backbone.") for k in tensors)
    save_file(tensors, str(old), metadata={CONFIG_KEY: json.dumps(vit.config())})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = vit(x)
        assert torch.equal(load_embedder(old)(x), expected)
        assert torch.equal(load_weights(create_embedder().eval(), old)(x), expected)


def test_corrupt_file_is_refused_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x80\x04this is a pickle, not safetensors" * 10)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_embedder(bad)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_weights(create_embedder("resnet18"), bad)


def test_foreign_or_mismatched_tensors_are_refused(vit: CoDEEmbedder, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors.*metadata"):
        load_embedder(foreign)
    with pytest.raises(ValueError, match="foreign.safetensors.*do not match"):
        load_weights(vit, foreign)
    small = save_weights(create_embedder(img_size=96), tmp_path / "vit96.safetensors")
    with pytest.raises(ValueError, match="vit96.safetensors.*do not match"):
        load_weights(create_embedder(), small)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_embedder(tmp_path / "nope.safetensors")
