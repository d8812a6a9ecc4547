"""The full D3 recipe on a cluster: workers that pull units, started by the manifest's engine (local, SLURM, Ray).

    python pipelines/full_d3.py --dry-run --nodes 4 --gpus-per-node 8 --cpu-workers 16   # plan, wall-clock, tasks
    python pipelines/full_d3.py --executor slurm --nodes 4 --gpus-per-node 8 --cpu-workers 16
    python pipelines/full_d3.py --executor ray --nodes 2 --gpus-per-node 8 --cpu-workers 8

Run it where the engine is reachable (a SLURM login node, a Ray head node, or the machine itself for
`local`): select runs once; fetch-real (CPU workers), generation (one worker per GPU) and assemble run side
by side, generation of shard k starting as soon as fetch-real has done shard k; then extend and
transform-test; validate; training on one node under Accelerate; evaluation. After a preemption, a crash
or a cancelled job, run the same command again: done units are skipped and expired leases taken over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d3builder.cluster.executor import make_executor
from d3builder.cluster.launch import absolute
from d3builder.cluster.pipeline import (
    Phase,
    Step,
    command_task,
    describe,
    recipe_phases,
    run_phases,
)
from d3builder.core.commandline import UsageError
from d3builder.core.yamlconfig import ConfigError
from d3builder.recipe.manifest import EXECUTOR_KINDS, Manifest, load_manifest
from d3builder.recipe.plan import ClusterSize, load_throughput, make_plan

ROOT = Path(__file__).resolve().parents[1]


def training_phases(manifest: Manifest, cluster: ClusterSize, train_config: str, accelerate_config: str) -> list[Phase]:
    """CoDE training on one node (every GPU of it, under Accelerate), then the evaluation on one GPU."""
    root = (absolute(manifest) or manifest.output_root).rstrip("/")  # an absolute local path or the URL
    d3, run = f"{root}/d3", f"{root}/runs/code"
    gpus = cluster.gpus_per_node if manifest.executor.gpus_per_generation_worker else 0
    train = ["-m", "accelerate.commands.launch", "--config_file", accelerate_config, "--num_processes",
             str(max(gpus, 1)), "-m", "codetrain", "train", "--config", train_config, "--data", d3, "--run", run]
    evaluate = ["-m", "codetrain", "evaluate", "--run", run, "--data", d3, "--extended", root]
    return [Phase("train", [Step("train", [command_task("train", train, gpus)])]),
            Phase("evaluate", [Step("evaluate", [command_task("evaluate", evaluate, min(gpus, 1))])])]


def main(argv: list[str] | None = None) -> int:
    """Print the plan and the phases; unless --dry-run, run them with the engine."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default=str(ROOT / "manifests" / "d3.yaml"))
    parser.add_argument("--output-root", help="override the manifest's output_root")
    parser.add_argument("--executor", choices=EXECUTOR_KINDS, help="the engine (default: the manifest's executor.kind)")
    parser.add_argument("--nodes", type=int, default=1, help="GPU nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node: one generation worker each")
    parser.add_argument("--cpu-workers", type=int, default=8, help="CPU workers (fetch-real, transform-test)")
    parser.add_argument("--throughput", default=str(ROOT / "manifests" / "throughput-h100.yaml"),
                        help="seconds per image per generator (from benchmarks/generate_gpu.py)")
    parser.add_argument("--accelerate-config", default=str(ROOT / "pipelines" / "accelerate" / "multi_gpu.yaml"),
                        help="Accelerate configuration of training (one node)")
    parser.add_argument("--train-config", default=str(ROOT / "configs" / "code_d3.yaml"))
    parser.add_argument("--no-train", action="store_true", help="stop after validate (the dataset alone)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between status lines (default 60)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the tasks; run nothing")
    args = parser.parse_args(argv)
    try:
        cluster = ClusterSize(args.nodes, args.gpus_per_node, args.cpu_workers)
        manifest = load_manifest(args.manifest, output_root=args.output_root)
        plan = make_plan(manifest, load_throughput(args.throughput))
    except (ConfigError, ValueError, KeyError) as exc:
        print(f"full_d3.py: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    print()
    print(plan.wall_clock_table(cluster))
    phases = recipe_phases(manifest, args.manifest, cluster)
    if not args.no_train:
        phases += training_phases(manifest, cluster, args.train_config, args.accelerate_config)
    print(f"\nPhases, in order (engine: {args.executor or manifest.executor.kind}):")
    print(describe(phases))
    if args.dry_run:
        return 0
    try:
        executor = make_executor(manifest.executor, args.executor)
        try:
            return run_phases(manifest, phases, executor, args.interval)
        finally:
            executor.close()
    except UsageError as exc:  # no Ray installed, more GPU workers than this machine has (local), ...
        print(f"full_d3.py: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
