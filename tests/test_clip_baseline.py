"""Tests for the CLIP linear-probe baseline: a tiny random open_clip model through the evaluation harness."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from shardkit import GENERATORS, make_d3_shards
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from codetrain.clip_baseline import load_clip_embedder, parse_baseline
from codetrain.config import EvalConfig
from codetrain.evaluate import evaluate
from codetrain.model import create_embedder, save_weights

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 112, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip config (112 px input, so the wrapper must resize) written as JSON."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Validation and test shards and a run folder with a fresh tiny CoDE embedder."""
    root = tmp_path_factory.mktemp("clipdata")
    make_d3_shards(root / "d3", 8, "validation", seed=1)
    make_d3_shards(root / "d3", 6, "test", seed=2)
    save_weights(create_embedder("test_vit"), root / "run" / "model.safetensors")
    return {"d3": root / "d3", "run": root / "run"}


def test_wrapper_renormalises_resizes_and_returns_unit_vectors(config: Path) -> None:
    clip = load_clip_embedder(str(config))
    assert clip.display_name == "CLIP tiny-clip" and clip.embed_dim == 32 and clip.image_size == 112
    pixels = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    imagenet = (pixels - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    clip_in = (pixels - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    clip_in = F.interpolate(clip_in, size=(112, 112), mode="bicubic", align_corners=False, antialias=True)
    with torch.inference_mode():
        out = clip(imagenet)
        expected = F.normalize(clip.visual(clip_in), dim=-1)
    assert out.shape == (2, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_local_weights_round_trip_and_refusals(config: Path, tmp_path: Path) -> None:
    model = open_clip.create_model(config.stem, pretrained=None)
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    clip = parse_baseline(f"clip:{config}:{weights}")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = load_clip_embedder(str(config), weights)(x)
        torch.testing.assert_close(clip(x), expected)
        assert not torch.allclose(load_clip_embedder(str(config))(x), expected)
    with pytest.raises(FileNotFoundError, match="not a local file"):
        parse_baseline(f"clip:{config}:openai")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        parse_baseline("clip:no-such-model")
    with pytest.raises(ValueError, match="clip:MODEL"):
        parse_baseline("dino:ViT-S")


def test_clip_runs_through_the_harness(config: Path, data: dict[str, Path], tmp_path: Path) -> None:
    clip = load_clip_embedder(str(config))
    result = evaluate(EvalConfig(run=str(data["run"]), data=str(data["d3"]), eval_dir=str(tmp_path / "clip"),
                                 fit_split="validation", classifiers=["linear"], robustness=False), embedder=clip)
    assert [(r["detector"], r["classifier"], r["split"]) for r in result.results] == [("CLIP tiny-clip", "linear", "test")]
    assert set(result.results[0]["per_generator"]) == set(GENERATORS)
    assert (result.results[0]["n_real"], result.results[0]["n_fake"]) == (6, 24)
    assert (tmp_path / "clip" / "classifiers" / "linear.skops").is_file()
    assert "| CLIP tiny-clip | linear | test |" in result.report


def test_baseline_rows_join_the_code_table(config: Path, data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "both"
    result = evaluate(EvalConfig(run=str(data["run"]), data=str(data["d3"]), eval_dir=str(out), fit_split="validation",
                                 classifiers=["linear", "knn"], robustness=False, baselines=[f"clip:{config}"]))
    assert [(r["detector"], r["classifier"]) for r in result.results] == [("CoDE", "linear"), ("CoDE", "knn"), ("CLIP tiny-clip", "linear")]
    assert (out / "baselines" / "clip-tiny-clip" / "classifiers" / "linear.skops").is_file()
    assert sorted(p.name for p in (out / "classifiers").glob("*.skops")) == ["knn.skops", "linear.skops"]
    report = (out / "report.md").read_text()
    assert "| CLIP tiny-clip | linear | test | 6 | 24 |" in report and "| CoDE | knn | test | 6 | 24 |" in report
    roc = json.loads((out / "roc.json").read_text())
    assert set(roc["test"]) == {"CoDE linear", "CoDE knn", "CLIP tiny-clip linear"}
