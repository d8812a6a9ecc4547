"""codetrain on fsspec URLs: run folders on memory:// and on a local S3 server (moto), atomic writes, resume, URL errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from s3kit import S3Server
from test_detect import GOOD, write_images

from codetrain import checkpoint as ckpt
from codetrain.cli import main
from codetrain.config import EvalConfig, TrainConfig
from codetrain.detect import detect
from codetrain.errors import MissingInputError, read_input
from codetrain.evaluate import evaluate
from codetrain.runlayout import CheckpointFiles, EvalFiles, RunLayout
from codetrain.runlog import read_metrics
from codetrain.train import train
from d3builder.storage.store import StorageError, open_store

SMALL = dict(model="test_vit", img_size=32, local_size=16, batch_size=4, log_every=1, progress=False, tensorboard=False,
             precision="fp32", val_split=None, max_steps=4, epochs=4, checkpoint_every=2, keep_checkpoints=0,
             warmup_epochs=0.5)


def no_url_named_folders(folder: Path) -> None:
    """Nothing was written to a local folder named after a URL scheme."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(":")], sorted(folder.rglob("*"))


def test_store_writes_reads_and_lists_on_memory(tmp_path: Path) -> None:
    store = open_store("memory://store-test/run")
    assert not store.local and not store.exists(store.root)
    written = store.write_bytes(store.root / "a" / "b.json", b"{}")
    assert store.location(written) == "memory://store-test/run/a/b.json"
    store.write_text(store.root / "c.txt", "hello")
    assert store.read_bytes(store.root / "a" / "b.json") == b"{}" and store.read_text(store.root / "c.txt") == "hello"
    assert [p.name for p in store.listdir(store.root)] == ["a", "c.txt"]
    assert [store.relative(p) for p in store.find()] == ["a/b.json", "c.txt"]
    child = store.child("a")
    assert [child.relative(p) for p in child.find()] == ["b.json"] and child.location() == "memory://store-test/run/a"
    with pytest.raises(FileNotFoundError, match="memory://store-test/run/missing.bin"):
        store.read_bytes(store.root / "missing.bin")
    with pytest.raises(MissingInputError, match="memory://store-test/run/missing.bin does not exist"):
        read_input("memory://store-test/run/missing.bin")
    store.remove_tree(store.root / "a")
    assert [store.relative(p) for p in store.find()] == ["c.txt"]
    with pytest.raises(RuntimeError), store.child("out").local_workspace() as scratch:
        (scratch / "x.txt").write_text("never uploaded")
        raise RuntimeError("the block failed")
    assert not store.exists(store.root / "out")
    with store.child("out").local_workspace(last=["last.json"]) as scratch:
        (scratch / "last.json").write_text("{}")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "x.txt").write_text("x")
    out = store.child("out")
    assert [out.relative(p) for p in out.find()] == ["last.json", "sub/x.txt"]
    local = open_store(f"file://{tmp_path}/run")
    assert local.local and local.location(local.write_bytes(local.root / "m.bin", b"1")) == tmp_path / "run" / "m.bin"
    assert not list((tmp_path / "run").glob(".*tmp*"))


def missing_filesystem_scheme() -> tuple[str, str]:
    """A scheme fsspec knows whose package is not installed here, and that package."""
    for scheme, package in (("oci", "ocifs"), ("oss", "ossfs"), ("dropbox", "dropboxdrivefs"), ("webdav", "webdav4")):
        if importlib.util.find_spec(package) is None:
            return scheme, package
    raise AssertionError("every candidate filesystem package is installed")


def test_unsupported_schemes_fail_in_one_line_naming_scheme_and_package(
    small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    scheme, package = missing_filesystem_scheme()
    with pytest.raises(StorageError, match=f"{scheme}:// filesystem is not installed: pip install {package}"):
        open_store(f"{scheme}://bucket/run")
    with pytest.raises(StorageError, match="unknown storage scheme nosuch://"):
        open_store("nosuch://bucket/run")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(small_d3), "--run", f"{scheme}://bucket/run", "--model", "test_vit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err and "Traceback" not in err
    assert main(["detect", "--run", "nosuch://bucket/run", str(tmp_path)]) == 2
    assert "unknown storage scheme nosuch://" in capsys.readouterr().err
    no_url_named_folders(tmp_path)


def test_train_resume_and_evaluate_on_memory(small_d3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data, run = "memory://codetrain-test/d3", "memory://codetrain-test/run"
    open_store(data).upload(small_d3)
    full = train(TrainConfig(**SMALL, data=data, run=run))
    assert sorted(full.losses) == [1, 2, 3, 4] and full.run_dir == run and full.model_path == f"{run}/model.safetensors"
    layout = RunLayout.open(run)
    names = [layout.store.relative(p) for p in layout.store.find()]
    for name in (RunLayout.CONFIG, RunLayout.MODEL, RunLayout.METRICS, RunLayout.LOSS_CURVE):
        assert name in names, name
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    step4 = layout.checkpoint(4)
    assert step4.read_json(step4.root / CheckpointFiles.COMPLETE)["files"] == sorted(
        step4.relative(p) for p in step4.find() if p.name != CheckpointFiles.COMPLETE)
    assert not [n for n in names if "tmp" in n or "partial" in n]
    assert [r["step"] for r in read_metrics(f"{run}/{RunLayout.METRICS}") if r["kind"] == "train"] == [1, 2, 3, 4]
    # A crash while step 4 was being saved: its folder lacks the marker, so step 2 is where a resume starts.
    step4.remove(step4.root / CheckpointFiles.COMPLETE)
    assert ckpt.latest_checkpoint(run) == f"{run}/checkpoints/step-2"
    resumed = train(TrainConfig(**SMALL, data=data, run=run, resume=True))
    assert resumed.losses == {k: full.losses[k] for k in (3, 4)}
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2, 4]
    result = evaluate(EvalConfig(run=run, data=data, fit_split="validation", classifiers=["linear"],
                                 robustness_levels={"jpeg": [50.0]}, progress=False))
    assert result.out_dir == f"{run}/eval" and result.files[EvalFiles.REPORT] == f"{run}/eval/{EvalFiles.REPORT}"
    evaluation = layout.eval_store()
    eval_files = [evaluation.relative(p) for p in evaluation.find()]
    for name in (EvalFiles.REPORT, EvalFiles.RESULTS_JSON, "classifiers/classifiers.json", "classifiers/linear.skops",
                 EvalFiles.cache_file("code", "validation")):
        assert name in eval_files, name
    assert evaluation.read_json(evaluation.root / EvalFiles.RESULTS_JSON)["results"] == json.loads(json.dumps(result.results))
    write_images(tmp_path / "images")
    found = detect(run, [tmp_path / "images"], out_csv=f"{run}/detections.csv", progress=False)
    assert len(found.detections) == len(GOOD) and found.csv_path == f"{run}/detections.csv"
    assert layout.store.read_text(layout.path("detections.csv")).count("\n") == 1 + len(GOOD) + 2
    no_url_named_folders(tmp_path)


@pytest.mark.slow
def test_cli_trains_evaluates_detects_and_exports_on_a_local_s3_server(
    s3: S3Server, small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bucket = s3.bucket("codetrain")
    data, run = f"{bucket}/d3", f"{bucket}/runs/code"
    s3.upload(small_d3, data)
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
