"""Export a run for deployment: the embedder as ONNX (checked against onnxruntime) and a self-contained bundle.

A bundle folder (names in `codetrain.runlayout.BundleFiles`) holds model.safetensors (timm
key names), model.onnx, classifiers/ (skops files and classifiers.json), config.json (timm's
hub config -- architecture, num_classes 0, model_args, pretrained_cfg with input size, crop and
mean/std -- plus the embedder config, classifier thresholds, the preprocessing detection
applies, ONNX input/output names and file hashes) and, when the run has one, the training
config as train_config.yaml. `codetrain detect --bundle BUNDLE` loads it; timm alone loads its
backbone (`timm.create_model("local-dir:BUNDLE", pretrained=True)`, or "hf-hub:user/name" once
pushed). The run and the bundle may be fsspec URLs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from codetrain.embed import model_fingerprint
from codetrain.errors import OutputExistsError, reports_user_errors
from codetrain.evaluate import load_fitted_classifiers, read_classifier_manifest
from codetrain.model import CoDEEmbedder, load_embedder, weights_bytes
from codetrain.runlayout import BundleFiles, ClassifierFiles, RunLayout
from codetrain.timmconfig import timm_config
from d3builder.storage.layout import safe_name
from d3builder.storage.store import (
    Location,
    atomic_write_bytes,
    atomic_write_json,
    open_store,
)

BUNDLE_FORMAT = "codetrain.bundle/1"
INPUT_NAME, OUTPUT_NAME = "image", "embedding"
DEFAULT_OPSET = 17
ONNX_ATOL = 1e-4
"""Largest allowed |onnxruntime - torch| difference of any embedding component."""


def _weights(run_or_file: str | Path) -> str:
    """The model.safetensors of a run folder, or the file itself (local path or URL)."""
    store = open_store(run_or_file, writable=False)
    return store.url() if store.isfile(store.root) else store.url(store.root / RunLayout.MODEL)


def to_onnx_bytes(model: CoDEEmbedder, opset: int = DEFAULT_OPSET) -> bytes:
    """Trace the embedder at its image size with a dynamic batch axis and return the ONNX model.

    Uses the TorchScript exporter (`dynamo=False`): the torch.export-based one needs
    onnxscript, which the toolkit does not depend on.
    """
    buffer = io.BytesIO()
    dummy = torch.zeros(1, 3, model.img_size, model.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and legacy-exporter notices about the fixed image size
        torch.onnx.export(
            model.eval().cpu(), (dummy,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    return buffer.getvalue()


def check_onnx(model: CoDEEmbedder, onnx_path: str | Path, atol: float = ONNX_ATOL, batch: int = 3) -> float:
    """Run torch and onnxruntime on the same random batch; returns the max difference, ValueError above `atol`."""
    x = torch.randn(batch, 3, model.img_size, model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.eval().cpu()(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not diff <= atol:
        raise ValueError(f"{onnx_path}: onnxruntime output {got.shape} differs from torch {expected.shape} by {diff:.3g} > {atol}")
    return diff


def export_onnx(run_dir: str | Path, path: str | Path, opset: int = DEFAULT_OPSET, atol: float = ONNX_ATOL) -> Path:
    """Export a run's embedder (RUN/model.safetensors, or that file) to ONNX at `path`, checked against onnxruntime."""
    model = load_embedder(_weights(run_dir))
    path = atomic_write_bytes(path, to_onnx_bytes(model, opset))
    check_onnx(model, path, atol)
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_bundle(
    run_dir: str | Path, out_dir: str | Path, eval_dir: str | Path | None = None, overwrite: bool = False, opset: int = DEFAULT_OPSET
) -> Location:
    """Assemble a bundle from a run and its fitted classifiers (EVAL/classifiers, default RUN/eval).

    A local bundle is built in a temporary sibling folder and renamed into place, so
    `out_dir` is either the complete bundle or untouched; a remote one is uploaded file by
    file, config.json (which lists every file with its hash) last.
    """
    run, out = RunLayout.open(run_dir, writable=False), open_store(out_dir)
    if out.exists(out.root) and not overwrite:
        raise OutputExistsError(f"{out.url()} already exists (use overwrite / --force to replace it)")
    model = load_embedder(_weights(run_dir))
    fingerprint = model_fingerprint(model)
    source = (open_store(eval_dir, writable=False) if eval_dir is not None else run.eval_store()).child(BundleFiles.CLASSIFIERS)
    load_fitted_classifiers(source, None, fingerprint)  # refuses missing, foreign or stale classifiers
    manifest = read_classifier_manifest(source)
    parent = Path(out.root).parent if out.local else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.root.name}.tmp-", dir=parent))
    try:
        atomic_write_bytes(tmp / BundleFiles.MODEL, weights_bytes(model))  # timm key names, whatever the run's file has
        atomic_write_bytes(tmp / BundleFiles.ONNX, to_onnx_bytes(model, opset))
        diff = check_onnx(model, tmp / BundleFiles.ONNX)
        names = [ClassifierFiles.MANIFEST, *(safe_name(c["file"], "classifier file") for c in manifest["classifiers"].values())]
        for name in names:
            atomic_write_bytes(tmp / BundleFiles.CLASSIFIERS / name, source.read_bytes(source.root / name))
        if run.store.exists(run.path(RunLayout.CONFIG)):
            atomic_write_bytes(tmp / BundleFiles.TRAIN_CONFIG, run.store.read_bytes(run.path(RunLayout.CONFIG)))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        config = {**timm_config(model), **_config(model, fingerprint, manifest, diff, opset, files, tmp)}
        atomic_write_json(tmp / BundleFiles.CONFIG, config)
        out.remove_tree(out.root)
        if out.local:
            os.replace(tmp, out.root)
        else:
            out.upload(tmp, last=[BundleFiles.CONFIG])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.location()


def _config(model: CoDEEmbedder, fingerprint: str, manifest: dict, diff: float, opset: int, files: list[Path], root: Path) -> dict[str, Any]:
    """config.json of a bundle."""
    return {
        "format": BUNDLE_FORMAT,
        "embedder": model.config(),
        "embedder_sha256": fingerprint,
        "classifiers": manifest,
        "preprocessing": model.preprocessing.describe(),
        "onnx": {
            "file": BundleFiles.ONNX, "input": INPUT_NAME, "output": OUTPUT_NAME, "opset": opset,
            "input_shape": ["batch", 3, model.img_size, model.img_size], "output_shape": ["batch", model.embed_dim],
            "max_abs_diff_vs_torch": diff,
        },
        "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in files},
        "usage": "codetrain detect --bundle BUNDLE IMAGES_OR_FOLDERS... [--classifier linear]",
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain export`."""
    parser = subparsers.add_parser(
        "export",
        help="export a run as ONNX plus a detection bundle (weights, classifiers, preprocessing)",
        description="Write BUNDLE with model.safetensors, model.onnx (checked against onnxruntime), classifiers/ and "
        "config.json; `codetrain detect --bundle BUNDLE` loads it. Folders may be fsspec URLs.",
    )
    parser.add_argument("--run", required=True, help="run folder (model.safetensors, eval/classifiers)")
    parser.add_argument("--bundle", required=True, help="bundle folder to create")
    parser.add_argument("--eval-dir", help="evaluation folder holding classifiers/ (default RUN/eval)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.set_defaults(func=_run)


@reports_user_errors
def _run(args: argparse.Namespace) -> int:
    """Run `codetrain export`."""
    out = make_bundle(args.run, args.bundle, args.eval_dir, args.force, args.opset)
    bundle = open_store(out)
    config = bundle.read_json(bundle.root / BundleFiles.CONFIG)
    print(f"bundle written to {out}: {', '.join(sorted(config['files']))} "
          f"(ONNX max |diff| vs torch {config['onnx']['max_abs_diff_vs_torch']:.2g})")
    return 0
