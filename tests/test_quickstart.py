"""The README's main job, end to end: the quickstart on the embedded default (slow)."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image
from scriptkit import run_script

from codetrain import Detector
from d3builder.recipe.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
GENERATORS = ["if-tiny", "sd14-tiny", "sd21-tiny", "sdxl-tiny"]


def rows(folder: Path) -> int:
    """Records in every Parquet shard of a folder."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))


@pytest.mark.slow
def test_quickstart_end_to_end_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "tiny"
    assert run_script("pipelines/quickstart.py", ["--output-root", str(root), "--train-steps", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    manifest = load_manifest(ROOT / "manifests" / "tiny.yaml")
    shards = len(list((root / "records").glob("*.parquet")))
    assert shards == -(-rows(root / "records") // manifest.shard_size) >= 2
    for stage in ("real", *(f"gen/{g}" for g in GENERATORS)):
        assert len(list((root / stage).glob("*.parquet"))) == shards, stage
        assert rows(root / stage) == rows(root / "records"), stage

    d3 = root / "d3"
    counts = {split: rows(d3 / split) for split in ("train", "fit", "validation", "test", "test_augm", "fit_augm")}
    assert all(counts.values()) and counts["test_augm"] == counts["test"] and counts["fit_augm"] == counts["fit"]
    assert sum(counts[s] for s in ("train", "fit", "validation", "test")) <= rows(root / "records")
    dataset = load_dataset(str(d3), split="train")
    assert isinstance(dataset[0]["image_real"], Image.Image)
    assert [dataset[0][f"generator_gen{i}"] for i in range(4)] == GENERATORS
    assert rows(root / "extended" / "pixart-tiny") == counts["test"]

    run = root / "runs" / "code"
    assert (run / "model.safetensors").is_file() and (run / "loss_curve.png").is_file()
    eval_dir = run / "eval"
    report = (eval_dir / "report.md").read_text()
    assert report.strip() in out, "the report is printed at the end"
    assert "Fit split: `fit_augm`, the held-out, transformed fit subset, as in the paper." in report
    for split in ("test", "test_augm", "extended"):
        for plot in ("acc", "roc", "map"):
            assert Image.open(eval_dir / f"{plot}_{split}.png").size[0] > 100
    assert Image.open(eval_dir / "robustness.png").size[0] > 100
    with open(eval_dir / "results.csv", newline="") as fh:
        results = list(csv.DictReader(fh))
    for classifier in ("linear", "knn", "ocsvm"):
        for split in ("test", "test_augm"):
            subsets = [r["subset"] for r in results if r["classifier"] == classifier and r["split"] == split]
            assert sorted(subsets) == sorted(["all", "real", *GENERATORS]), (classifier, split)
            assert f"| CoDE | {classifier} | {split} |" in report
    assert str(eval_dir / "report.md") in out

    dataset_dir, model_dir = root / "publish" / "dataset", root / "publish" / "model"
    assert f"Publishable dataset: {dataset_dir}" in out and f"Hub-ready detector:  {model_dir}" in out
    published = load_dataset(str(dataset_dir), split="train")
    assert "image_real" not in published.column_names and len(published) == counts["train"]
    assert (dataset_dir / "LICENSE.md").is_file() and (dataset_dir / "test_augm").is_dir()
    assert {"README.md", "config.json", "model.safetensors", "model.onnx"} <= {p.name for p in model_dir.iterdir()}
    predictions = Detector.from_pretrained(model_dir).predict([dataset[0]["image_real"], dataset[0]["image_gen0"]])
    assert [p.classifier for p in predictions] == ["linear", "linear"]

    before = {p: p.stat().st_mtime_ns for p in (root / "gen").rglob("*.parquet")}
    assert run_script("pipelines/quickstart.py", ["--output-root", str(root), "--train-steps", "6", "--no-progress"]) == 0
    rerun = capsys.readouterr().out
    assert "train: already done" in rerun
    assert {p: p.stat().st_mtime_ns for p in (root / "gen").rglob("*.parquet")} == before, "a rerun reuses what is done"
