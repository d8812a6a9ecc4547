"""Tests for `codetrain export`: ONNX export checked against onnxruntime, and the detection bundle round trip."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_detect import GOOD, fit_run, write_images

from codetrain.bundle import check_onnx, export_onnx, make_bundle
from codetrain.cli import main
from codetrain.detect import detect, load_detector
from codetrain.embed import open_image_file
from codetrain.model import CONFIG_KEY, create_embedder, load_embedder, save_weights
from codetrain.views import center_crop, eval_transform, resize_short, to_uint8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run with fitted classifiers, its training config, and a folder of images."""
    root = tmp_path_factory.mktemp("export")
    fit_run(root / "run")
    (root / "run" / "config.yaml").write_text("model: test_vit\n")
    write_images(root / "images")
    return {"root": root, "run": root / "run", "images": root / "images"}


@pytest.fixture(scope="module")
def bundle(setup: dict[str, Path]) -> Path:
    """The bundle of the fixture run."""
    return make_bundle(setup["run"], setup["root"] / "bundle")


@pytest.mark.slow
def test_onnx_export_of_vit_tiny_matches_torch_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_embedder().eval()
    save_weights(model, tmp_path / "run" / "model.safetensors")
    path = export_onnx(tmp_path / "run", tmp_path / "vit.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].name == "image" and graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(["embedding"], {"image": x.numpy()})[0]
        assert got.shape == (batch, 192)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="differs from torch"):
        check_onnx(create_embedder().eval(), path)


def test_bundle_holds_everything_and_detects_like_the_run(setup: dict[str, Path], bundle: Path) -> None:
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == ["classifiers/classifiers.json", "classifiers/knn.skops", "classifiers/linear.skops", "classifiers/ocsvm.skops",
                     "config.json", "model.onnx", "model.safetensors", "train_config.yaml"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["format"] == "codetrain.bundle/1" and config["embedder"]["model_name"] == "test_vit"
    assert config["preprocessing"]["resize_shorter_side"] == 177 and config["preprocessing"]["center_crop"] == 160  # test_vit
    assert config["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    assert set(config["classifiers"]["classifiers"]) == {"linear", "knn", "ocsvm"}
    for name, digest in config["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    from_run = detect(setup["run"], [setup["images"]])
    from_bundle = detect(bundle, [setup["images"]])
    assert [d.path for d in from_bundle.detections] == [d.path for d in from_run.detections]
    np.testing.assert_allclose([d.score for d in from_bundle.detections], [d.score for d in from_run.detections], rtol=1e-6)
    assert len(from_bundle.detections) == len(GOOD) and len(from_bundle.unscored) == 2


def test_bundle_onnx_alone_reproduces_the_scores(setup: dict[str, Path], bundle: Path) -> None:
    _, clf = load_detector(bundle, "linear")
    x = torch.stack([eval_transform(open_image_file(setup["images"] / name), 160) for name in GOOD]).numpy()
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    emb = session.run(["embedding"], {"image": x})[0]
    expected = detect(bundle, [setup["images"] / name for name in GOOD])
    np.testing.assert_allclose(clf.score(emb), [d.score for d in expected.detections], rtol=1e-3, atol=1e-4)


def test_bundle_refusals_and_overwrite(setup: dict[str, Path], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    save_weights(create_embedder("test_vit"), bare / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="codetrain evaluate"):
        make_bundle(bare, tmp_path / "b1")
    assert not (tmp_path / "b1").exists() and not list(tmp_path.glob(".b1*"))
    target = tmp_path / "b2"
    make_bundle(setup["run"], target)
    with pytest.raises(FileExistsError):
        make_bundle(setup["run"], target)
    (target / "model.onnx").unlink()
    assert make_bundle(setup["run"], target, overwrite=True) == target
    assert (target / "model.onnx").is_file()
    assert load_embedder(target / "model.safetensors").embed_dim == 64


def test_cli_export(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["root"] / "cli-bundle"
    assert main(["export", "--run", str(setup["run"]), "--bundle", str(out)]) == 0
    assert "model.onnx" in capsys.readouterr().out
    assert (out / "model.onnx").is_file() and (out / "classifiers" / "linear.skops").is_file()


def test_bundle_loads_through_timm_alone(setup: dict[str, Path], bundle: Path) -> None:
    backbone = timm.create_model(f"local-dir:{bundle}", pretrained=True).eval()
    assert backbone.num_classes == 0
    ours = load_embedder(setup["run"] / "model.safetensors")
    pre = ours.preprocessing
    assert (pre.size, pre.resize) == (160, 177), "test_vit's input size, from timm's data config"
    data = timm.data.resolve_data_config({}, model=backbone)
    assert tuple(data["input_size"]) == (3, 160, 160) and data["crop_pct"] == pytest.approx(160 / 177)
    assert data["interpolation"] == "bilinear" and data["crop_mode"] == "center"
    assert tuple(data["mean"]) == pytest.approx((0.485, 0.456, 0.406)) and tuple(data["std"]) == pytest.approx((0.229, 0.224, 0.225))
    x = torch.stack([pre.transform(open_image_file(setup["images"] / name)) for name in GOOD])
    with torch.inference_mode():
        assert torch.equal(F.normalize(backbone(x), dim=-1), ours(x))


def test_a_run_in_the_old_key_layout_exports_timm_keys(setup: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "old-run"
    shutil.copytree(setup["run"], run)
    model = load_embedder(run / "model.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"),
              metadata={CONFIG_KEY: json.dumps(model.config())})
    out = make_bundle(run, tmp_path / "bundle")
    backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(F.normalize(backbone(x), dim=-1), model(x))


def test_bundle_preprocessing_block_is_what_detection_applies_for_another_size_and_normalisation(tmp_path: Path) -> None:
    run, images = tmp_path / "run", tmp_path / "images"
    model = create_embedder("test_vit", img_size=96, normalisation="model")  # timm's data config: mean = std = 0.5
    fit_run(run, model=model)
    write_images(images)
    bundle = make_bundle(run, tmp_path / "bundle")
    block = json.loads((bundle / "config.json").read_text())["preprocessing"]
    assert (block["center_crop"], block["resize_shorter_side"]) == (96, 106)
    assert block["mean"] == block["std"] == [0.5, 0.5, 0.5] and block["layout"] == "float32 NCHW, batch of [3, 96, 96]"
    files = [images / name for name in GOOD]
    detected = detect(bundle, files)
    # Rebuild the input from the block's numbers alone and score it with the bundle's ONNX model and classifier.
    mean, std = np.array(block["mean"]).reshape(3, 1, 1), np.array(block["std"]).reshape(3, 1, 1)
    x = np.stack([(center_crop(resize_short(to_uint8(open_image_file(f)), block["resize_shorter_side"]), block["center_crop"])[:3]
                   .numpy() / 255 - mean) / std for f in files]).astype(np.float32)
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    _, clf = load_detector(bundle, "linear")
    np.testing.assert_allclose(clf.score(session.run(["embedding"], {"image": x})[0]), [d.score for d in detected.detections],
                               rtol=1e-3, atol=1e-4)
