"""`d3builder worker` (one worker, in this process) and `d3builder launch` (many, started by an engine)."""

from __future__ import annotations

import argparse

from d3builder.cluster.launch import launch_stage
from d3builder.cluster.worker import GPU_STAGES, STAGES, WorkerTask, run_worker
from d3builder.core.commandline import shard_list
from d3builder.recipe.cliargs import add_manifest_args
from d3builder.recipe.manifest import EXECUTOR_KINDS


def _stage_args(parser: argparse.ArgumentParser) -> None:
    add_manifest_args(parser)
    parser.add_argument("--stage", required=True, choices=STAGES, help="the stage whose units to run")
    parser.add_argument("--generator", "-g", action="append", default=[], metavar="NAME",
                        help=f"{' and '.join(GPU_STAGES)}: a generator to render (repeat for several, rendered one "
                        "after the other; default: the manifest's)")
    parser.add_argument("--shards", type=shard_list, metavar="LIST", help="only these shards, e.g. 0-99")


def _worker(args: argparse.Namespace) -> int:
    task = WorkerTask(args.manifest, args.stage, tuple(args.generator), args.output_root,
                      tuple(args.shards) if args.shards is not None else None,
                      embedded_base_url=args.embedded_base_url)
    return run_worker(task)


def _launch(args: argparse.Namespace) -> int:
    return launch_stage(args.manifest, args.stage, args.workers, generators=args.generator, kind=args.executor,
                        output_root=args.output_root, shards=args.shards, gpus=args.gpus_per_worker,
                        interval=args.interval)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder worker` and `d3builder launch`."""
    worker = subparsers.add_parser(
        "worker", help="run one worker: take the next pending unit of a stage by lease, run it, until none is left",
        description="One worker of a stage, in this process: it takes the stage's pending units by lease and runs "
        "them until none is left, waiting for the input units earlier stages' workers are making (generation of "
        "shard k starts once fetch-real has done shard k). Start as many as you like on any number of nodes (one "
        "per GPU for generate and extend); they cooperate through the storage alone. Exit codes as every stage's.",
    )
    _stage_args(worker)
    worker.add_argument("--embedded-base-url", help="select: where the embedded photos are served")
    worker.set_defaults(func=_worker)
    launch = subparsers.add_parser(
        "launch", help="start a stage's workers with local processes, a SLURM job array or Ray, and follow them",
        description="Start --workers workers of a stage with an engine (the manifest's executor.kind, or "
        "--executor): local processes (one per GPU for generation), a SLURM job array through submitit (one "
        "single-GPU or CPU task per worker, requeued after preemption or timeout), or Ray tasks (num_gpus=1 each, "
        "retried when a node dies). Prints the engine's ids, then the stage's status line every --interval "
        "seconds, and exits with the stage's exit code (0 all good, 1 work failed, 2 user error, 3 units busy).",
    )
    _stage_args(launch)
    launch.add_argument("--workers", type=int, required=True, help="how many workers (one per GPU for generation)")
    launch.add_argument("--executor", choices=EXECUTOR_KINDS, help="the engine (default: the manifest's executor.kind)")
    launch.add_argument("--gpus-per-worker", type=int, choices=(0, 1),
                        help="default: executor.gpus_per_generation_worker for generate/extend, 0 for the others")
    launch.add_argument("--interval", type=float, default=30.0, help="seconds between status lines (default 30)")
    launch.set_defaults(func=_launch)
