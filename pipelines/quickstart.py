"""The quickstart: the whole D3 + CoDE job on the embedded default, on a CPU, in a few minutes.

Serves the embedded photos on 127.0.0.1, then runs select, fetch-real, generate with the four
tiny generators, assemble, transform-test, extend, validate, trains CoDE, evaluates it, prints
the results table, and ends by writing a publishable dataset folder (no real image bytes) and
a hub-ready model folder. A second run reuses every finished stage (the two folders are rewritten).

    python pipelines/quickstart.py [--output-root runs/tiny] [--train-steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from codetrain.checkpoint import list_checkpoints
from codetrain.config import EvalConfig, load_config
from codetrain.evaluate import evaluate
from codetrain.publish import publish_model
from codetrain.runlayout import EvalFiles, RunLayout
from codetrain.train import train
from d3builder.embedded.photos import embedded_server
from d3builder.generators.render import generate_shards
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.extend import extend
from d3builder.stages.fetch_real import fetch_real
from d3builder.stages.publish import publish_dataset
from d3builder.stages.select import select_records
from d3builder.stages.transform_test import transform_test
from d3builder.stages.validate import validate_dataset

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_PORT = 8765
"""Preferred port of the embedded photo server, so record URLs stay valid across reruns."""


def stage(name: str, work: Callable[[], Any]) -> Any:
    """Run one stage with a banner and its duration."""
    print(f"\n=== {name}", flush=True)
    start = time.time()
    result = work()
    print(f"=== {name}: done in {time.time() - start:.1f} s", flush=True)
    return result


def build_dataset(manifest: Manifest, progress: bool) -> None:
    """Every d3builder stage on the embedded recipe; raises on a stage that leaves work undone."""
    with embedded_server(port=EMBEDDED_PORT) as base_url:
        stage("select", lambda: select_records(manifest, embedded_base_url=base_url, progress=progress))
        fetched = stage("fetch-real", lambda: fetch_real(manifest, progress=progress))
        if not fetched.complete:
            raise RuntimeError(f"fetch-real left shards undone: {fetched.describe()}")
    for name in manifest.generators:
        stage(f"generate {name}", lambda name=name: generate_shards(manifest, name, progress=progress))
    assembled = stage("assemble", lambda: assemble_dataset(manifest, progress=progress))
    if not assembled.complete:
        raise RuntimeError(f"assemble left shards unassembled: {assembled.describe()}")
    stage("transform-test", lambda: transform_test(manifest, progress=progress))
    stage("extend", lambda: extend(manifest, progress=progress))
    report = stage("validate", lambda: validate_dataset(manifest.output_root, progress=progress))
    print(report.table())
    if not report.ok:
        raise RuntimeError(f"validate found {len(report.defects)} defects")


def train_detector(manifest: Manifest, run_dir: Path, train_steps: int, progress: bool) -> None:
    """Train CoDE on the assembled shards (skipped when this run already finished)."""
    done_marker = run_dir / "quickstart_train.json"
    if done_marker.is_file() and json.loads(done_marker.read_text()).get("max_steps") == train_steps:
        print(f"\n=== train: already done ({run_dir})")
        return
    config = load_config(
        ROOT / "configs" / "code_tiny.yaml",
        {"data": str(manifest.layout.d3_dir()), "run": str(run_dir), "max_steps": train_steps,
         "epochs": train_steps, "patience": 0, "checkpoint_every": max(1, train_steps // 4),
         "resume": bool(list_checkpoints(run_dir)), "progress": progress},
    )
    result = stage("train CoDE", lambda: train(config))
    losses = list(result.losses.values())
    if losses:
        print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} over {result.steps} steps; curve {run_dir / RunLayout.LOSS_CURVE}")
    done_marker.write_text(json.dumps({"max_steps": train_steps, "steps": result.steps}))


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(ROOT / "manifests" / "tiny.yaml"))
    parser.add_argument("--output-root", help="write under this folder (default: the manifest's, runs/tiny)")
    parser.add_argument("--train-steps", type=int, default=60, help="CoDE optimizer steps (default 60: a few minutes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    args = parser.parse_args(argv)
    progress = not args.no_progress

    manifest = load_manifest(args.manifest, output_root=args.output_root)
    root = Path(manifest.output_root)
    run_dir = root / "runs" / "code"
    start = time.time()
    try:
        build_dataset(manifest, progress)
        train_detector(manifest, run_dir, args.train_steps, progress)
        result = stage(
            "evaluate",
            lambda: evaluate(EvalConfig(run=str(run_dir), data=str(manifest.layout.d3_dir()), extended=str(root / "extended"),
                                        progress=progress)),
        )
        dataset = stage("publish dataset", lambda: publish_dataset(manifest, root / "publish" / "dataset", overwrite=True,
                                                                   progress=progress))
        detector = stage("publish detector", lambda: publish_model(run_dir, root / "publish" / "model", overwrite=True))
    except RuntimeError as exc:
        print(f"\nquickstart stopped: {exc}\nFix the cause and rerun: finished stages are kept.", file=sys.stderr)
        return 1
    print("\n" + result.report)
    print(f"\nQuickstart finished in {time.time() - start:.0f} s.")
    print(f"Dataset:  {manifest.layout.d3_dir()} (load it with datasets.load_dataset(\"{manifest.layout.d3_dir()}\"))")
    print(f"Detector: {run_dir / RunLayout.MODEL}")
    print(f"Report:   {Path(result.out_dir) / EvalFiles.REPORT} (plots beside it)")
    print(f"Publishable dataset: {dataset.out} (no real image bytes; `d3builder publish ... --repo user/name` uploads it)")
    print(f"Hub-ready detector:  {detector.folder} (Detector.from_pretrained(\"{detector.folder}\"); "
          "`codetrain publish ... --repo user/name` uploads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
