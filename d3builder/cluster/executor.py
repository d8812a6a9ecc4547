"""The one small interface every engine implements: start tasks, report their exit codes as they finish.

    executor = make_executor(manifest.executor, "slurm")     # local | slurm | ray
    launch = executor.start(tasks, "generate-sd14")          # WorkerTasks or CommandTasks with equal resources
    launch.ids                                               # the engine's job / task ids
    launch.poll()                                            # exit code per task, None while it runs
    executor.close()

An engine restarts what it can (a local worker killed by a signal, a SLURM task preempted or timed out, a Ray
task whose worker or node died); a task that ends without an exit code of its own counts as failed (1).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from d3builder.cluster.worker import Task
from d3builder.core.commandline import UsageError
from d3builder.recipe.manifest import EXECUTOR_KINDS, ExecutorConfig
from d3builder.storage.runner import ExitCode

LOST = int(ExitCode.FAILED)
"""The exit code of a task that ended without one (killed and not restarted, cancelled, lost with its node)."""


class Launch(abc.ABC):
    """The tasks one engine started together: their ids and, as they finish, their exit codes."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)

    @abc.abstractmethod
    def poll(self) -> list[int | None]:
        """Each task's exit code (0-3 as the runner defines them, 1 when it ended without one), None while running."""

    @abc.abstractmethod
    def cancel(self) -> None:
        """Stop every task still running (their units in flight are redone by the next worker)."""

    def finished(self) -> bool:
        return all(code is not None for code in self.poll())


class Executor(abc.ABC):
    """An engine that starts tasks: one worker per GPU (or per CPU slot), each a process of its own."""

    kind = ""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def start(self, tasks: Sequence[Task], name: str) -> Launch:
        """Start `tasks` (all needing the same resources) as one group called `name`."""

    def close(self) -> None:  # noqa: B027 - engines with nothing of their own to release keep this one
        """Release what the executor itself started (a local Ray instance); running tasks are not touched."""


def make_executor(config: ExecutorConfig, kind: str | None = None) -> Executor:
    """The executor of `kind` (default: the manifest's `executor.kind`), configured by the manifest's block."""
    kind = kind or config.kind
    if kind == "local":
        from d3builder.cluster.local import LocalExecutor

        return LocalExecutor(config)
    if kind == "slurm":
        from d3builder.cluster.slurm import SlurmExecutor

        return SlurmExecutor(config)
    if kind == "ray":
        from d3builder.cluster.raytasks import RayExecutor

        return RayExecutor(config)
    raise UsageError(f"unknown executor {kind!r} (one of {', '.join(EXECUTOR_KINDS)})")
