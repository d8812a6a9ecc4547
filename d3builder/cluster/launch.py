"""Launch a stage's workers with an engine and follow them: the engine's ids, then the stage's status line as it
progresses, then the stage's exit code (0 all good, 1 work failed, 2 user error, 3 units left busy)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from d3builder.cluster.executor import Executor, Launch, make_executor
from d3builder.cluster.worker import GPU_STAGES, WorkerTask, worker_tasks
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.stages.status import StageStatus, stage_status, transform_units
from d3builder.storage.runner import ExitCode


def status_rows(manifest: Manifest, stage: str, generators: Sequence[str] = ()) -> list[StageStatus]:
    """The `d3builder status` rows a stage's workers move forward."""
    shards = len(manifest.layout.record_shards())
    if stage == "select":
        return [stage_status(manifest, "select", None, 1)]
    if stage == "generate":
        return [stage_status(manifest, "generate", g, shards) for g in generators or manifest.generators]
    if stage == "extend":
        return [stage_status(manifest, command, g, shards) for g in generators or manifest.extended.generators
                for command in ("generate", "extend")]
    if stage == "transform-test":
        return [stage_status(manifest, stage, None, transform_units(manifest))]
    return [stage_status(manifest, stage, None, shards)]


def status_line(row: StageStatus) -> str:
    """`generate sd14: 12/40 units done, 8 running, 0 failed, 20 pending`."""
    return (f"{row.name}: {row.done}/{row.units} units done, {len(row.running)} running, {len(row.failed)} failed, "
            f"{row.pending} pending")


@dataclass
class Group:
    """Tasks started together, and the status rows they move forward."""

    name: str
    launch: Launch
    rows: Callable[[], list[StageStatus]]


def follow(groups: Sequence[Group], interval: float = 30.0, out: Callable[[str], None] = print) -> int:
    """Print the status lines every `interval` seconds until every task ended; returns their worst exit code."""
    last = 0.0
    while True:
        finished = all(group.launch.finished() for group in groups)
        if finished or time.time() - last >= interval:
            last = time.time()
            stamp = time.strftime("%H:%M:%S")
            for group in groups:
                for row in group.rows():
                    out(f"[{stamp}] {status_line(row)}")
        if finished:
            break
        time.sleep(min(interval, 1.0))
    codes = []
    for group in groups:
        ended = [int(code) for code in group.launch.poll() if code is not None]
        out(f"{group.name}: {len(ended)} task(s) ended, exit codes {', '.join(map(str, ended))}")
        codes += [code if code in iter(ExitCode) else int(ExitCode.FAILED) for code in ended]  # a command may exit 127
    return int(ExitCode.worst(codes))


def absolute(manifest: Manifest) -> str | None:
    """The output root as workers elsewhere see it: an absolute path for a local root (workers may start in
    other folders), the URL itself otherwise."""
    store = manifest.layout.store
    return str(Path(store.root).resolve()) if store.local else manifest.output_root


def launch_stage(manifest_path: str | Path, stage: str, workers: int, *, generators: Sequence[str] = (),
                 executor: Executor | None = None, kind: str | None = None, output_root: str | None = None,
                 shards: Sequence[int] | None = None, gpus: int | None = None, interval: float = 30.0,
                 out: Callable[[str], None] = print) -> int:
    """Start `workers` workers of `stage` with an engine (default: the manifest's executor, or `kind`), follow
    them, and return the stage's exit code. `gpus` per worker defaults to the manifest's
    executor.gpus_per_generation_worker for generate and extend, 0 for the other stages."""
    manifest = load_manifest(manifest_path, output_root=output_root)
    own = executor is None
    executor = executor or make_executor(manifest.executor, kind)
    if gpus is None:
        gpus = manifest.executor.gpus_per_generation_worker if stage in GPU_STAGES else 0
    tasks: list[WorkerTask] = worker_tasks(str(Path(manifest_path).resolve()), stage, workers, generators=generators,
                                           output_root=absolute(manifest), shards=shards, gpus=gpus)
    name = tasks[0].name
    try:
        launch = executor.start(tasks, name)
        out(f"{executor.kind}: started {len(tasks)} worker(s) of {name} ({gpus} GPU each): {', '.join(launch.ids)}")
        try:
            return follow([Group(name, launch, lambda: status_rows(manifest, stage, generators))], interval, out)
        except KeyboardInterrupt:
            if executor.kind == "local":
                launch.cancel()
                out(f"{name}: interrupted; the workers were stopped (their units in flight are redone next time)")
            else:
                out(f"{name}: stopped following; the {executor.kind} tasks go on (see `d3builder status`)")
            return int(ExitCode.BUSY)
    finally:
        if own:
            executor.close()
