"""The `slurm` engine: one SLURM job array per group of tasks, through submitit.

Each task is one array element with one GPU (`{gpu_gres}:1`; training asks for more) or none, the partition,
account, QOS, time limit, CPUs and memory of the manifest's `executor.slurm` block, and at most
`array_parallelism` elements running at once. A task that times out or is preempted receives submitit's
signal (USR2), is checkpointed (`WorkerTask.checkpoint`: the same worker again) and requeued; its unit in
flight is released and redone by whichever worker takes it next, the rest resumes from the storage.
`executor.slurm.cluster: local` runs the same path with submitit's local executor (processes on this machine).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d3builder.cluster.executor import LOST, Executor, Launch
from d3builder.cluster.worker import Task
from d3builder.recipe.manifest import ExecutorConfig

log = logging.getLogger(__name__)


class SlurmLaunch(Launch):
    """submitit jobs (array elements)."""

    def __init__(self, jobs: Sequence[Any]) -> None:
        self.jobs = list(jobs)
        self.codes: list[int | None] = [None] * len(self.jobs)
        super().__init__([str(job.job_id) for job in self.jobs])

    def poll(self) -> list[int | None]:
        for index, job in enumerate(self.jobs):
            if self.codes[index] is None and job.done():
                try:
                    self.codes[index] = int(job.result())
                except Exception as exc:  # noqa: BLE001 - a failed or cancelled job: submitit says why
                    log.error("job %s ended without an exit code: %s", job.job_id, str(exc).strip().splitlines()[-1:])
                    self.codes[index] = LOST
        return list(self.codes)

    def cancel(self) -> None:
        for job in self.jobs:
            if not job.done():
                job.cancel(check=False)


class SlurmExecutor(Executor):
    """Job arrays through submitit's AutoExecutor."""

    kind = "slurm"

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        self.slurm = config.slurm

    def parameters(self, gpus: int, name: str) -> dict[str, Any]:
        """submitit parameters of one array of tasks needing `gpus` GPUs each."""
        slurm = self.slurm
        partition = slurm.partition if gpus else (slurm.cpu_partition or slurm.partition)
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": slurm.time_min,
            "cpus_per_task": slurm.cpus_per_gpu_worker if gpus else slurm.cpus_per_cpu_worker,
            "slurm_array_parallelism": slurm.array_parallelism,
            "slurm_setup": list(slurm.setup),
            "slurm_additional_parameters": dict(slurm.additional),
        }
        optional = {"slurm_partition": partition, "slurm_account": slurm.account, "slurm_qos": slurm.qos,
                    "mem_gb": slurm.mem_gb, "slurm_gres": f"{slurm.gpu_gres}:{gpus}" if gpus else None}
        params.update({key: value for key, value in optional.items() if value is not None})
        return params

    def start(self, tasks: Sequence[Task], name: str) -> Launch:
        import submitit

        gpus = {task.gpus for task in tasks}
        if len(gpus) != 1:
            raise ValueError(f"{name}: the tasks of one array need the same resources, got GPUs {sorted(gpus)}")
        folder = Path(self.config.log_dir) / "submitit" / name
        executor = submitit.AutoExecutor(folder=folder, cluster=self.slurm.cluster,
                                         slurm_max_num_timeout=self.slurm.max_requeues)
        executor.update_parameters(**self.parameters(gpus.pop(), name))
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        return SlurmLaunch(jobs)
