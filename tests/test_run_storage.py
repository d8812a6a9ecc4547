"""codetrain on fsspec URLs: run folders on memory:// and on a local S3 server (moto), atomic writes, resume, URL errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from s3kit import S3Server, s3_server
from shardkit import make_d3_shards
from test_detect import GOOD, write_images

from codetrain import checkpoint as ckpt
from codetrain.cli import main
from codetrain.config import EvalConfig, TrainConfig
from codetrain.detect import detect
from codetrain.evaluate import evaluate
from codetrain.runlayout import CheckpointFiles, EvalFiles, RunLayout
from codetrain.runlog import read_metrics
from codetrain.storage import StorageError, Store, local_folder
from codetrain.train import train

SMALL = dict(model="test_vit", img_size=32, local_size=16, batch_size=4, log_every=1, progress=False, tensorboard=False,
             precision="fp32", val_split=None, max_steps=4, epochs=4, checkpoint_every=2, keep_checkpoints=0,
             warmup_epochs=0.5)


@pytest.fixture(scope="module")
def d3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train records (2 shards), 8 validation and 8 test records, local."""
    root = tmp_path_factory.mktemp("d3")
    make_d3_shards(root, 16, "train", shard_size=8)
    make_d3_shards(root, 8, "validation", seed=1)
    make_d3_shards(root, 8, "test", seed=2)
    return root


def no_url_named_folders(folder: Path) -> None:
    """Nothing was written to a local folder named after a URL scheme."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(":")], sorted(folder.rglob("*"))


def test_store_writes_reads_and_lists_on_memory(tmp_path: Path) -> None:
    store = Store.open("memory://store-test/run")
    assert not store.is_local and not store.exists()
    assert store.write_bytes("a/b.json", b"{}") == "memory://store-test/run/a/b.json"
    store.write_text("c.txt", "hello")
    assert store.read_bytes("a/b.json") == b"{}" and store.read_text("c.txt") == "hello"
    assert store.names() == ["a", "c.txt"] and store.files() == ["a/b.json", "c.txt"]
    assert store.child("a").files() == ["b.json"] and store.child("a").location() == "memory://store-test/run/a"
    with pytest.raises(FileNotFoundError, match="memory://store-test/run/missing.bin"):
        store.read_bytes("missing.bin")
    store.remove("a", recursive=True)
    assert store.files() == ["c.txt"]
    with pytest.raises(RuntimeError), local_folder(store.child("out")) as scratch:
        (scratch / "x.txt").write_text("never uploaded")
        raise RuntimeError("the block failed")
    assert not store.exists("out")
    with local_folder(store.child("out"), last=["last.json"]) as scratch:
        (scratch / "last.json").write_text("{}")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "x.txt").write_text("x")
    assert store.child("out").files() == ["last.json", "sub/x.txt"]
    local = Store.open(f"file://{tmp_path}/run")
    assert local.is_local and local.write_bytes("m.bin", b"1") == tmp_path / "run" / "m.bin"
    assert not list((tmp_path / "run").glob(".*tmp*"))


def missing_filesystem_scheme() -> tuple[str, str]:
    """A scheme fsspec knows whose package is not installed here, and that package."""
    for scheme, package in (("oci", "ocifs"), ("oss", "ossfs"), ("dropbox", "dropboxdrivefs"), ("webdav", "webdav4")):
        if importlib.util.find_spec(package) is None:
            return scheme, package
    raise AssertionError("every candidate filesystem package is installed")


def test_unsupported_schemes_fail_in_one_line_naming_scheme_and_package(
    d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheme, package = missing_filesystem_scheme()
    with pytest.raises(StorageError, match=f"{scheme}:// scheme needs a package that is not installed: pip install {package}"):
        Store.open(f"{scheme}://bucket/run")
    with pytest.raises(StorageError, match="unsupported URL scheme nosuch://"):
        Store.open("nosuch://bucket/run")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(d3), "--run", f"{scheme}://bucket/run", "--model", "test_vit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err and "Traceback" not in err
    assert main(["detect", "--run", "nosuch://bucket/run", str(tmp_path)]) == 2
    assert "unsupported URL scheme nosuch://" in capsys.readouterr().err
    no_url_named_folders(tmp_path)


def test_train_resume_and_evaluate_on_memory(d3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data, run = "memory://codetrain-test/d3", "memory://codetrain-test/run"
    Store.open(data).upload(d3)
    full = train(TrainConfig(**SMALL, data=data, run=run))
    assert sorted(full.losses) == [1, 2, 3, 4] and full.run_dir == run and full.model_path == f"{run}/model.safetensors"
    layout = RunLayout.open(run)
    names = layout.store.files()
    for name in (RunLayout.CONFIG, RunLayout.MODEL, RunLayout.METRICS, RunLayout.LOSS_CURVE):
        assert name in names, name
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    assert json.loads(layout.checkpoint(4).read_text(CheckpointFiles.COMPLETE))["files"] == sorted(
        n for n in layout.checkpoint(4).files() if n != CheckpointFiles.COMPLETE)
    assert not [n for n in names if "tmp" in n or "partial" in n]
    assert [r["step"] for r in read_metrics(f"{run}/{RunLayout.METRICS}") if r["kind"] == "train"] == [1, 2, 3, 4]
    # A crash while step 4 was being saved: its folder lacks the marker, so step 2 is where a resume starts.
    layout.checkpoint(4).remove(CheckpointFiles.COMPLETE)
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step-2"
    resumed = train(TrainConfig(**SMALL, data=data, run=run, resume=True))
    assert resumed.losses == {k: full.losses[k] for k in (3, 4)}
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    result = evaluate(EvalConfig(run=run, data=data, fit_split="validation", classifiers=["linear"],
                                 robustness_levels={"jpeg": [50.0]}, progress=False))
    assert result.out_dir == f"{run}/eval" and result.files[EvalFiles.REPORT] == f"{run}/eval/{EvalFiles.REPORT}"
    eval_files = layout.eval_store().files()
    for name in (EvalFiles.REPORT, EvalFiles.RESULTS_JSON, "classifiers/classifiers.json", "classifiers/linear.skops",
                 EvalFiles.cache_file("code", "validation")):
        assert name in eval_files, name
    assert json.loads(layout.eval_store().read_text(EvalFiles.RESULTS_JSON))["results"] == json.loads(json.dumps(result.results))
    write_images(tmp_path / "images")
    found = detect(run, [tmp_path / "images"], out_csv=f"{run}/detections.csv", progress=False)
    assert len(found.detections) == len(GOOD) and found.csv_path == f"{run}/detections.csv"
    assert layout.store.read_text("detections.csv").count("\n") == 1 + len(GOOD) + 2
    no_url_named_folders(tmp_path)


@pytest.fixture(scope="module")
def s3() -> S3Server:
    """A local S3 server for this module."""
    with s3_server() as server:
        yield server


@pytest.mark.slow
def test_cli_trains_evaluates_detects_and_exports_on_a_local_s3_server(
    s3: S3Server, d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket("codetrain")
    data, run = f"{bucket}/d3", f"{bucket}/runs/code"
    s3.upload(d3, data)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**SMALL, "val_split": "validation", "data": data, "run": run,
                                      "storage_options": s3.storage_options}))
    assert main(["train", "-c", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_dir"] == run and summary["steps"] == 4
    fs = s3.filesystem()
    keys = sorted(k[len("codetrain/runs/code/"):] for k in fs.find(run))
    assert {"config.yaml", "model.safetensors", "metrics.jsonl", "loss_curve.png", "checkpoints/step-4/complete.json"} <= set(keys)
    assert not [k for k in keys if "tmp" in k or "partial" in k], keys
    assert "storage_options" not in yaml.safe_load(fs.cat_file(f"{run}/config.yaml")), "credentials stay out of the run"
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(yaml.safe_dump({"run": run, "data": data, "fit_split": "validation", "classifiers": ["linear", "knn"], "robustness": False,
                                           "progress": False, "storage_options": s3.storage_options}))
    assert main(["evaluate", "-c", str(eval_config)]) == 0
    assert "## Summary" in capsys.readouterr().out
    assert fs.exists(f"{run}/eval/classifiers/knn.skops") and fs.exists(f"{run}/eval/results.json")
    for name, value in s3.env.items():  # detect and export find the server through the standard AWS variables
        monkeypatch.setenv(name, value)
    write_images(tmp_path / "images")
    assert main(["detect", "--run", run, str(tmp_path / "images"), "--csv", "d.csv", "--classifier", "knn", "--no-progress"]) == 0
    assert f"{len(GOOD)} images scored with knn" in capsys.readouterr().out
    assert main(["export", "--run", run, "--bundle", f"{bucket}/bundle"]) == 0
    assert main(["detect", "--bundle", f"{bucket}/bundle", str(tmp_path / "images"), "--csv", "b.csv", "--classifier", "knn",
                 "--no-progress"]) == 0
    scores = [np.loadtxt(tmp_path / name, delimiter=",", skiprows=1, usecols=1, max_rows=len(GOOD)) for name in ("d.csv", "b.csv")]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5)
    assert sorted(k[len("codetrain/bundle/"):] for k in fs.find(f"{bucket}/bundle")) == [
        "classifiers/classifiers.json", "classifiers/knn.skops", "classifiers/linear.skops", "config.json", "model.onnx",
        "model.safetensors", "train_config.yaml"]
    no_url_named_folders(tmp_path)
    assert not fsspec.config.conf.get("s3"), "storage options do not outlive the command"
