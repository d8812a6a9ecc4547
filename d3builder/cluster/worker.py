"""Workers: "take the next pending unit of a stage by lease, run it, until none is left".

A worker is a `WorkerTask`: a small frozen (picklable) description of what to run, whose call runs the stage's
library function with a runner that waits for input units made by the workers of earlier stages (so the stages
of a pipeline run side by side: generation of shard k starts once fetch-real has done shard k). Any number of
workers on any number of nodes cooperate through the storage alone; a dead worker loses only its unit in
flight. Engines ship the task as it is (submitit pickles it, Ray too) or as its command line (`argv()`), and
submitit requeues it after a preemption or a timeout (`checkpoint`).

    task = WorkerTask("manifests/d3.yaml", "generate", ("sd14",), gpus=1)
    task()            # the same as `d3builder worker -m manifests/d3.yaml --stage generate -g sd14`
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from d3builder.core.commandline import UsageError, setup_logging
from d3builder.core.yamlconfig import ConfigError
from d3builder.recipe.cliargs import report
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.storage.runner import ExitCode, RunSummary

log = logging.getLogger(__name__)

STAGES = ("select", "fetch-real", "generate", "extend", "assemble", "transform-test")
"""Every stage a worker runs, in pipeline order."""
GPU_STAGES = ("generate", "extend")
"""Stages whose workers render images (one GPU each on a GPU cluster); the others run on CPUs."""


def _select(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.stages.select import select_records

    stats = select_records(manifest, task.embedded_base_url, progress=False)
    print(f"select: {stats.kept} records in {stats.shards} shards{' (already done)' if stats.skipped else ''}",
          flush=True)
    return []


def _fetch(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.stages.fetch_real import fetch_real

    return [fetch_real(manifest, task.shards, progress=False)]


def _generate(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.generators.render import generate_shards

    return [generate_shards(manifest, name, shards=task.shards, progress=False, wait_inputs=True)
            for name in task.generators or manifest.generators]


def _extend(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.stages.extend import extend

    return extend(manifest, names=task.generators or None, shards=task.shards, progress=False, wait_inputs=True)


def _assemble(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.stages.assemble import assemble_dataset

    return [assemble_dataset(manifest, task.shards, progress=False, wait_inputs=True)]


def _transform(manifest: Manifest, task: WorkerTask) -> list[RunSummary]:
    from d3builder.stages.transform_test import transform_test

    return [transform_test(manifest, task.shards, progress=False)]


RUNS: dict[str, Callable[[Manifest, WorkerTask], list[RunSummary]]] = {
    "select": _select, "fetch-real": _fetch, "generate": _generate, "extend": _extend, "assemble": _assemble,
    "transform-test": _transform,
}


@dataclass(frozen=True)
class WorkerTask:
    """One worker of one stage: `task()` runs the stage's units until none is left and returns the exit code."""

    manifest: str
    stage: str
    generators: tuple[str, ...] = ()
    """generate/extend: the generators to render, one after the other (default: the manifest's)."""
    output_root: str | None = None
    shards: tuple[int, ...] | None = None
    gpus: int = 0
    """GPUs the worker needs (0 or 1): what the engine reserves for it."""
    embedded_base_url: str | None = None
    """select: where the embedded photos are served (metadata.source: embedded)."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise UsageError(f"unknown stage {self.stage!r} (workers run: {', '.join(STAGES)})")
        if self.generators and self.stage not in GPU_STAGES:
            raise UsageError(f"--generator applies to {' and '.join(GPU_STAGES)} only, not {self.stage}")

    @property
    def name(self) -> str:
        """`generate-sd14`, for job names and log files."""
        return "-".join([self.stage, *self.generators])

    def __call__(self, *_: Any) -> int:
        return run_worker(self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption or timeout: requeue the same worker (it resumes from the storage)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def argv(self) -> list[str]:
        """The worker as a command line (`python -m d3builder worker ...`)."""
        args = [sys.executable, "-m", "d3builder", "worker", "--manifest", self.manifest, "--stage", self.stage]
        for name in self.generators:
            args += ["--generator", name]
        if self.output_root:
            args += ["--output-root", self.output_root]
        if self.shards is not None:
            args += ["--shards", ",".join(map(str, self.shards))]
        if self.embedded_base_url:
            args += ["--embedded-base-url", self.embedded_base_url]
        return args


def run_worker(task: WorkerTask) -> int:
    """Run a worker in this process: the stage's units until none is left; returns the stage's exit code
    (0 all good, 1 work failed, 2 user error: one line, 3 units left busy)."""
    if not logging.getLogger().handlers:
        setup_logging(False)
    try:
        manifest = load_manifest(task.manifest, output_root=task.output_root)
        summaries = RUNS[task.stage](manifest, task)
    except ConfigError as exc:
        print(f"d3builder worker: invalid configuration: {exc}", file=sys.stderr, flush=True)
        return int(ExitCode.USAGE)
    except (UsageError, ValueError) as exc:  # RegistryError is a ValueError: an unknown or broken generator
        print(f"d3builder worker {task.stage}: {exc}", file=sys.stderr, flush=True)
        return int(ExitCode.USAGE)
    return report(*summaries)


@dataclass(frozen=True)
class CommandTask:
    """A command run once by an engine with the resources it needs (validate, training under Accelerate)."""

    name: str
    command: tuple[str, ...]
    gpus: int = 0

    def __call__(self, *_: Any) -> int:
        return subprocess.call(list(self.command))

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue after preemption: the command resumes (training from its last checkpoint with --resume)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)

    def argv(self) -> list[str]:
        return list(self.command)


Task = WorkerTask | CommandTask


def worker_tasks(manifest_path: str, stage: str, workers: int, *, generators: Sequence[str] = (),
                 output_root: str | None = None, shards: Sequence[int] | None = None, gpus: int = 0,
                 embedded_base_url: str | None = None) -> list[WorkerTask]:
    """`workers` identical workers of one stage (a generate worker renders `generators` one after the other)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    task = WorkerTask(manifest_path, stage, tuple(generators), output_root,
                      tuple(sorted(set(shards))) if shards is not None else None, gpus, embedded_base_url)
    return [task] * workers
