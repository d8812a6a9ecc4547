"""The `ray` engine: each task a Ray task on an existing Ray cluster (`executor.ray.address`).

A worker task reserves one GPU (`num_gpus=1`; Ray sets its CUDA_VISIBLE_DEVICES) or none, and some CPUs; a
task whose worker process or node dies is run again (`max_retries`), and its unit in flight is redone by
whichever worker takes it next. With `address: null` a local Ray instance is started (and stopped by
`close`); Ray is an optional extra: `pip install 'd3code[ray]'`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from d3builder.cluster.executor import LOST, Executor, Launch
from d3builder.cluster.worker import Task
from d3builder.core.commandline import UsageError
from d3builder.recipe.manifest import ExecutorConfig

log = logging.getLogger(__name__)


def _ray() -> Any:
    """The ray module, or a UsageError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError("the ray executor needs Ray: pip install 'd3code[ray]'") from exc
    return ray


def run_task(task: Task) -> int:
    """What a Ray task runs: the worker (or command) in the Ray worker process."""
    return task()


class RayLaunch(Launch):
    """Ray object refs, one per task."""

    def __init__(self, refs: Sequence[Any]) -> None:
        self.refs = list(refs)
        self.codes: list[int | None] = [None] * len(self.refs)
        super().__init__([ref.task_id().hex() for ref in self.refs])

    def poll(self) -> list[int | None]:
        ray = _ray()
        waiting = [ref for ref, code in zip(self.refs, self.codes, strict=True) if code is None]
        if waiting:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in ready:
                index = self.refs.index(ref)
                try:
                    self.codes[index] = int(ray.get(ref))
                except ray.exceptions.RayError as exc:
                    log.error("Ray task %s ended without an exit code: %s", self.ids[index], type(exc).__name__)
                    self.codes[index] = LOST
        return list(self.codes)

    def cancel(self) -> None:
        ray = _ray()
        for ref, code in zip(self.refs, self.codes, strict=True):
            if code is None:
                ray.cancel(ref, force=True)


class RayExecutor(Executor):
    """Ray tasks: connects to the cluster at `executor.ray.address` (or starts a local instance)."""

    kind = "ray"

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        ray, options = _ray(), config.ray
        self.started = not ray.is_initialized()
        if self.started:
            if options.address is not None:
                ray.init(address=options.address, runtime_env=options.runtime_env or None)
            else:
                memory = options.object_store_memory_mb * 2**20 if options.object_store_memory_mb else None
                ray.init(include_dashboard=False, object_store_memory=memory, runtime_env=options.runtime_env or None)

    def start(self, tasks: Sequence[Task], name: str) -> Launch:
        ray, options = _ray(), self.config.ray
        remote = ray.remote(run_task)
        refs = [remote.options(name=f"{name}-{i}", num_gpus=task.gpus, max_retries=options.max_retries,
                               num_cpus=options.cpus_per_gpu_worker if task.gpus else options.cpus_per_cpu_worker)
                .remote(task) for i, task in enumerate(tasks)]
        return RayLaunch(refs)

    def close(self) -> None:
        if self.started:
            _ray().shutdown()
