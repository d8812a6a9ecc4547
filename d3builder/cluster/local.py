"""The `local` engine: each task a process on this machine, GPUs handed out one per worker (CUDA_VISIBLE_DEVICES).

A worker killed by a signal (OOM killer, SIGKILL) is started again, at most `executor.local.max_restarts`
times: it loses only its unit in flight, which its next life (or another worker) takes over. Each worker's
output goes to `{log_dir}/{name}-{i}.log`.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from d3builder.cluster.executor import LOST, Executor, Launch
from d3builder.cluster.worker import Task
from d3builder.core.commandline import UsageError

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """The GPU ids this machine offers: CUDA_VISIBLE_DEVICES when set, else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class LocalLaunch(Launch):
    """Worker processes, restarted after a death by signal."""

    def __init__(self, tasks: Sequence[Task], envs: list[dict[str, str]], logs: list[Path], max_restarts: int) -> None:
        self.tasks, self.envs, self.logs, self.max_restarts = list(tasks), envs, logs, max_restarts
        self.processes = [self._spawn(i) for i in range(len(self.tasks))]
        self.restarts = [0] * len(self.tasks)
        self.codes: list[int | None] = [None] * len(self.tasks)
        super().__init__([str(p.pid) for p in self.processes])

    def _spawn(self, index: int) -> subprocess.Popen:
        with open(self.logs[index], "ab") as out:
            return subprocess.Popen(self.tasks[index].argv(), env=self.envs[index], stdout=out,
                                    stderr=subprocess.STDOUT)

    @property
    def pids(self) -> list[int]:
        """The current process of each worker."""
        return [p.pid for p in self.processes]

    def poll(self) -> list[int | None]:
        for index, process in enumerate(self.processes):
            if self.codes[index] is not None:
                continue
            code = process.poll()
            if code is None:
                continue
            if code < 0 and self.restarts[index] < self.max_restarts:
                self.restarts[index] += 1
                log.warning("worker %s (pid %d) was killed by signal %d: starting it again (%d/%d)",
                            self.tasks[index].name, process.pid, -code, self.restarts[index], self.max_restarts)
                self.processes[index] = self._spawn(index)
                continue
            self.codes[index] = code if code >= 0 else LOST
        return list(self.codes)

    def cancel(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait()


class LocalExecutor(Executor):
    """Tasks as processes on this machine."""

    kind = "local"

    def start(self, tasks: Sequence[Task], name: str) -> Launch:
        log_dir = Path(self.config.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        wanted = sum(task.gpus for task in tasks)
        gpus = [str(g) for g in self.config.local.gpus] if self.config.local.gpus is not None else (
            visible_gpus() if wanted else [])
        if wanted > len(gpus):
            raise UsageError(f"{name}: {len(tasks)} worker(s) need {wanted} GPU(s), this machine offers {len(gpus)}: "
                             "one GPU per worker (start fewer workers, or set executor.gpus_per_generation_worker: 0 "
                             "for generators that run on CPUs)")
        envs, taken = [], 0
        for task in tasks:
            envs.append({**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus[taken:taken + task.gpus])})
            taken += task.gpus
        logs = [log_dir / f"{name}-{i}.log" for i in range(len(tasks))]
        return LocalLaunch(tasks, envs, logs, self.config.local.max_restarts)
