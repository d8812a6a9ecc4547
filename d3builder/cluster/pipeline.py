"""A recipe as phases of workers started by one engine, each phase followed until its tasks end.

    select                                   once, one CPU task
    fetch-real | generate | assemble         side by side: a unit waits for its input units, so generation of
                                             shard k starts as soon as fetch-real has done shard k
    extend | transform-test                  once every shard is assembled
    validate                                 one CPU task

Nothing runs once per node: every phase is workers pulling units (or one task). A phase that does not end
with exit code 0 stops the recipe; rerunning it skips the done units and takes over the expired leases.
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d3builder.cluster.executor import Executor
from d3builder.cluster.launch import Group, absolute, follow, status_rows
from d3builder.cluster.worker import CommandTask, Task, WorkerTask
from d3builder.recipe.manifest import Manifest
from d3builder.recipe.plan import ClusterSize
from d3builder.storage.runner import ExitCode


@dataclass
class Step:
    """Tasks needing the same resources, started as one engine group; `stage` names the status rows they move."""

    name: str
    tasks: list[Task]
    stage: str | None = None


@dataclass
class Phase:
    """Steps started together and followed until every task ended."""

    name: str
    steps: list[Step] = field(default_factory=list)


def rotated(names: Sequence[str], start: int) -> tuple[str, ...]:
    """`names` starting at position `start` (generation workers begin on different generators)."""
    if not names:
        return ()
    start %= len(names)
    return tuple(names[start:]) + tuple(names[:start])


def workers(manifest_path: str, stage: str, count: int, *, output_root: str | None, gpus: int = 0,
            generators: Sequence[str] = (), embedded_base_url: str | None = None) -> Step:
    """`count` workers of `stage`; generation workers render every generator in turn, each starting on another."""
    tasks: list[Task] = [WorkerTask(manifest_path, stage, rotated(generators, i), output_root, None, gpus,
                                    embedded_base_url) for i in range(count)]
    return Step(stage, tasks, stage)


def build_phase(manifest: Manifest, manifest_path: str, cluster: ClusterSize) -> Phase:
    """fetch-real on the CPU workers, generation on one worker per GPU, assemble on one CPU worker: side by side."""
    root, gpus = absolute(manifest), manifest.executor.gpus_per_generation_worker
    return Phase("build", [
        workers(manifest_path, "fetch-real", cluster.cpu_workers, output_root=root),
        workers(manifest_path, "generate", cluster.gpu_workers, output_root=root, gpus=gpus,
                generators=manifest.generators),
        workers(manifest_path, "assemble", 1, output_root=root),
    ])


def recipe_phases(manifest: Manifest, manifest_path: str | Path, cluster: ClusterSize,
                  embedded_base_url: str | None = None) -> list[Phase]:
    """Every phase of the recipe, from select to validate."""
    path, root = str(Path(manifest_path).resolve()), absolute(manifest)
    finish = Phase("finish", [workers(path, "transform-test", cluster.cpu_workers, output_root=root)])
    if manifest.extended.generators:
        finish.steps.insert(0, workers(path, "extend", cluster.gpu_workers, output_root=root,
                                       gpus=manifest.executor.gpus_per_generation_worker))
    validate = ["-m", "d3builder", "validate", "--manifest", path, "--no-progress"] + (
        ["--output-root", root] if root else [])
    return [
        Phase("select", [workers(path, "select", 1, output_root=root, embedded_base_url=embedded_base_url)]),
        build_phase(manifest, path, cluster),
        finish,
        Phase("validate", [Step("validate", [command_task("validate", validate)])]),
    ]


def command_task(name: str, module_args: Sequence[str], gpus: int = 0) -> CommandTask:
    """A command run with this Python (`python -m ...`) as one task."""
    return CommandTask(name, (sys.executable, *module_args), gpus)


def describe(phases: Sequence[Phase]) -> str:
    """The phases as text: each step's task count, GPUs and command lines (identical ones counted once)."""
    lines = []
    for number, phase in enumerate(phases, 1):
        lines.append(f"phase {number}, {phase.name}: {' | '.join(step.name for step in phase.steps)}")
        for step in phase.steps:
            commands = Counter(shlex.join(task.argv()) for task in step.tasks)
            gpus = step.tasks[0].gpus
            lines.append(f"  {step.name}: {len(step.tasks)} task(s), {gpus} GPU each")
            lines += [f"    {count} x {command}" for command, count in commands.items()]
    return "\n".join(lines)


def run_phases(manifest: Manifest, phases: Sequence[Phase], executor: Executor, interval: float = 30.0,
               out: Callable[[str], None] = print) -> int:
    """Start each phase's steps with `executor`, follow them to their end; stop at the first phase that did not
    end with exit code 0 and return that code."""
    for phase in phases:
        groups: list[Group] = []
        try:
            for step in phase.steps:
                launch = executor.start(step.tasks, step.name)
                out(f"{executor.kind}: phase {phase.name}: started {len(step.tasks)} task(s) of {step.name}: "
                    f"{', '.join(launch.ids)}")
                groups.append(Group(step.name, launch, _rows(manifest, step)))
        except BaseException:  # a step the engine refused: the phase's other steps do not run half a phase
            for group in groups:
                group.launch.cancel()
            raise
        code = follow(groups, interval, out)
        if code != ExitCode.OK:
            out(f"phase {phase.name} ended with exit code {code}: fix what it names and rerun the same command "
                "(done units are skipped)")
            return code
    return int(ExitCode.OK)


def _rows(manifest: Manifest, step: Step) -> Callable[[], list]:
    """The status rows a step moves forward (none for a command)."""
    stage = step.stage
    return (lambda: []) if stage is None else (lambda: status_rows(manifest, stage, ()))
