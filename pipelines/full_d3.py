"""The full D3 recipe on a GPU cluster: every stage in order, each resumable; `--dry-run` prints the plan.

    python pipelines/full_d3.py --dry-run                      # the plan: stages, shards, images, GPU-hours
    python pipelines/full_d3.py                                # run it (one node, every GPU)
    python pipelines/full_d3.py --accelerate-config pipelines/accelerate/multi_node.yaml --machine-rank $SLURM_NODEID

Each stage skips the (stage, shard) units already done, so rerunning after a crash or a
preemption only redoes the units in flight. Downloads use img2dataset's distributor from the
manifest (`fetch.distributor: pyspark` for a Spark cluster).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from d3builder.recipe.manifest import load_manifest
from d3builder.recipe.plan import load_throughput, make_plan

ROOT = Path(__file__).resolve().parents[1]


def stage_commands(manifest_path: str, output_root: str | None, accelerate: list[str], train_config: str) -> list[list[str]]:
    """The command line of every stage, in order."""
    manifest = load_manifest(manifest_path, output_root=output_root)
    common = ["--manifest", manifest_path] + (["--output-root", output_root] if output_root else [])
    d3 = str(manifest.layout.d3_dir())
    run = str(Path(manifest.output_root) / "runs" / "code")
    d3builder = [sys.executable, "-m", "d3builder"]
    commands = [d3builder + ["select", *common], d3builder + ["fetch-real", *common]]
    for name in manifest.generators:
        commands.append(accelerate + ["-m", "d3builder", "generate", *common, "--generator", name])
    commands += [
        d3builder + ["assemble", *common],
        d3builder + ["transform-test", *common],
        accelerate + ["-m", "d3builder", "extend", *common],
        d3builder + ["validate", str(manifest.output_root)],
        accelerate + ["-m", "codetrain", "train", "--config", train_config, "--data", d3, "--run", run],
        [sys.executable, "-m", "codetrain", "evaluate", "--run", run, "--data", d3, "--extended", str(manifest.output_root)],
    ]
    return commands


def main(argv: list[str] | None = None) -> int:
    """Print the plan, or run every stage in order (stopping at the first failure)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(ROOT / "manifests" / "d3.yaml"))
    parser.add_argument("--output-root", help="override the manifest's output_root")
    parser.add_argument("--throughput", default=str(ROOT / "manifests" / "throughput-h100.yaml"),
                        help="seconds per image per generator (from benchmarks/generate_gpu.py)")
    parser.add_argument("--accelerate-config", default=str(ROOT / "pipelines" / "accelerate" / "multi_gpu.yaml"))
    parser.add_argument("--machine-rank", type=int, help="this node's rank (multi-node)")
    parser.add_argument("--train-config", default=str(ROOT / "configs" / "code_d3.yaml"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.manifest, output_root=args.output_root)
    plan = make_plan(manifest, load_throughput(args.throughput))
    print(plan.table())
    accelerate = ["accelerate", "launch", "--config_file", args.accelerate_config]
    if args.machine_rank is not None:
        accelerate += ["--machine_rank", str(args.machine_rank)]
    commands = stage_commands(args.manifest, args.output_root, accelerate, args.train_config)
    print("\nCommands, in order:")
    for command in commands:
        print("  " + shlex.join(command))
    if args.dry_run:
        return 0
    for command in commands:
        print(f"\n==> {shlex.join(command)}", flush=True)
        code = subprocess.call(command)
        if code != 0:
            print(f"stage failed with exit code {code}: fix it and rerun; finished units are kept", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
