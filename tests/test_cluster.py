"""Cluster engines: workers that pull units, started by local processes, submitit (its local executor: the SLURM
code path on this machine) and a local Ray instance; a worker killed (or preempted) mid-unit is restarted and
the assembled shards are byte-identical to a one-process run; the recipe's stages run side by side."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from genkit import one_thread  # noqa: F401 - fixture
from slowserver import slow_server

from d3builder.cluster.executor import Executor, make_executor
from d3builder.cluster.launch import launch_stage
from d3builder.cluster.pipeline import build_phase, run_phases
from d3builder.cluster.worker import WorkerTask, run_worker
from d3builder.core.yamlconfig import ConfigError
from d3builder.embedded.photos import default_photo_folder, prepare_photos
from d3builder.generators.render import generate_shards
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.recipe.plan import ClusterSize
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.fetch_real import fetch_real
from d3builder.stages.select import select_records
from d3builder.storage.lease import current
from d3builder.storage.runner import ExitCode

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = "sd14-tiny"
LEASE_S = 4.0
"""Leases of the test recipes: workers poll for busy units and inputs every second."""


def write_recipe(root: Path, *, records: int = 12, shard_size: int = 6, **overrides: object) -> Path:
    """The tiny recipe cut down: one tiny generator, `records` embedded photos in shards of `shard_size`."""
    recipe = yaml.safe_load((ROOT / "manifests" / "tiny.yaml").read_text())
    recipe.update(
        output_root=str(root / "data"), generators=[GENERATOR], shard_size=shard_size,
        sampling={"fraction": 1.0, "max_records": records},
        registry=[str(ROOT / "manifests" / "generators.yaml")],
        extended={"registry": str(ROOT / "manifests" / "extended.yaml"), "generators": []},
        units={"lease_seconds": LEASE_S},
        executor={"kind": "local", "gpus_per_generation_worker": 0, "log_dir": str(root / "logs"),
                  "local": {"max_restarts": 2},
                  "slurm": {"cluster": "local", "time_min": 30},
                  "ray": {"address": None, "cpus_per_cpu_worker": 0.5, "cpus_per_gpu_worker": 0.5}},
    )
    recipe["fetch"].update(threads=4)
    recipe.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def assembled(manifest: Manifest) -> dict[str, str]:
    """sha256 of every assembled shard, by its path under d3/."""
    d3 = Path(manifest.layout.root) / "d3"
    return {str(p.relative_to(d3)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d3.rglob("*.parquet"))}


def unit_stats(manifest: Manifest, stage: str, group: str | None = None) -> dict[int, dict]:
    layout = manifest.layout
    return {k: json.loads(Path(layout.stats(stage, k, group)).read_text()) for k in layout.record_shards()}


@pytest.fixture(scope="module")
def photos() -> Path:
    prepare_photos()
    return default_photo_folder()


@pytest.fixture(scope="module")
def served(photos: Path) -> Iterator[str]:
    """The embedded photos on 127.0.0.1, each answered after 0.8 s (a shard's download takes a while)."""
    with slow_server(photos, delay_s=0.8) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, served: str, one_thread: None) -> dict[str, str]:  # noqa: F811
    """The recipe run in this one process, stage after stage: the assembled shards' hashes."""
    manifest = load_manifest(write_recipe(tmp_path_factory.mktemp("reference")))
    select_records(manifest, served, progress=False)
    assert fetch_real(manifest, progress=False).exit_code == 0
    assert generate_shards(manifest, GENERATOR, progress=False).exit_code == 0
    assert assemble_dataset(manifest, progress=False).exit_code == 0
    hashes = assembled(manifest)
    assert len(manifest.layout.record_shards()) == 2 and len(hashes) >= 2
    return hashes


@dataclass
class Killer:
    """Watches the generate lease of the last shard and signals the worker process holding it, once (mid-unit)."""

    manifest: Manifest
    signum: int
    killed: list[tuple[int, int]] = field(default_factory=list)
    """(shard, pid) of the unit whose owner was signalled."""
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        layout = self.manifest.layout
        shard = layout.record_shards()[-1]
        folder = layout.leases("generate", f"{GENERATOR}/{shard:05d}")
        while not self.stop.is_set():
            holder = current(layout.store, folder, LEASE_S)
            if holder is not None and not holder.free() and not layout.store.isfile(
                    layout.stats("generate", shard, GENERATOR)):
                os.kill(holder.pid, self.signum)
                self.killed.append((shard, holder.pid))
                return
            time.sleep(0.05)


def run_build(recipe: Path, served: str, executor_for: Callable[[Manifest], Executor], signum: int,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Manifest, Killer, int]:
    """select in this process, then the pipelined build phase (one fetch-real, one generate and one assemble
    worker) with the engine, the generate worker signalled mid-unit on the last shard (only its restarted self
    can finish it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers render on one thread, as the reference did
    manifest = load_manifest(recipe)
    select_records(manifest, served, progress=False)
    phase = build_phase(manifest, str(recipe), ClusterSize(nodes=1, gpus_per_node=1, cpu_workers=1))
    killer = Killer(manifest, signum)
    watcher = threading.Thread(target=killer.watch, daemon=True)
    watcher.start()
    executor = executor_for(manifest)
    try:
        code = run_phases(manifest, [phase], executor, interval=5.0)
    finally:
        killer.stop.set()
        executor.close()
    return manifest, killer, code


def check_build(manifest: Manifest, killer: Killer, code: int, reference: dict[str, str]) -> None:
    """Every task ended 0 (a task killed and not restarted counts 1), the signalled worker's unit was finished
    by a later lease, and the assembled shards are the one-process run's, byte for byte."""
    assert code == 0
    assert killer.killed, "no generate unit was seen in flight"
    shard, pid = killer.killed[0]
    stats = unit_stats(manifest, "generate", GENERATOR)[shard]
    assert stats["lease"]["pid"] != pid and stats["lease"]["epoch"] >= 2
    assert assembled(manifest) == reference


@pytest.mark.slow
def test_local_workers_pipelined_survive_a_kill(tmp_path: Path, served: str, reference: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Local processes; the generate worker is SIGKILLed mid-unit and started again. Generation of shard 0 starts
    before fetch-real has finished the last shard (the stages run side by side)."""
    manifest, killer, code = run_build(write_recipe(tmp_path), served, lambda m: make_executor(m.executor, "local"),
                                       signal.SIGKILL, monkeypatch)
    check_build(manifest, killer, code, reference)
    assert "was killed by signal 9: starting it again (1/2)" in caplog.text
    fetched = unit_stats(manifest, "fetch-real")
    generated = unit_stats(manifest, "generate", GENERATOR)
    assert generated[0]["started_at"] < fetched[1]["finished_at"]  # shard 0 rendered while shard 1 downloads
    for shard, stats in generated.items():  # and never before its own real shard was fetched
        assert stats["started_at"] >= fetched[shard]["finished_at"]


@pytest.mark.slow
def test_submitit_workers_requeued_after_preemption(tmp_path: Path, served: str, reference: dict[str, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's local executor (the SLURM path: pickled task, job array, USR2 = preemption): the preempted
    worker checkpoints, is requeued and resumes from the storage."""
    manifest, killer, code = run_build(write_recipe(tmp_path), served, lambda m: make_executor(m.executor, "slurm"),
                                       signal.SIGUSR2, monkeypatch)
    check_build(manifest, killer, code, reference)
    outputs = "".join(p.read_text() for p in (tmp_path / "logs" / "submitit").rglob("*_log.*"))
    assert "Requeued job" in outputs


@pytest.mark.slow
def test_ray_tasks_retried_after_a_worker_dies(tmp_path: Path, served: str, reference: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A local Ray instance (2 CPUs, no dashboard, a small object store, 127.0.0.1): the Ray worker process of
    a generate task is SIGKILLed mid-unit, Ray runs the task again."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 2**20, _node_ip_address="127.0.0.1")
    try:
        manifest, killer, code = run_build(write_recipe(tmp_path), served,
                                           lambda m: make_executor(m.executor, "ray"), signal.SIGKILL, monkeypatch)
    finally:
        ray.shutdown()
    check_build(manifest, killer, code, reference)


@pytest.mark.slow
def test_workers_pull_different_units_and_a_late_worker_exits_0(tmp_path: Path, served: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two fetch-real workers share three units (each does some, none twice) and exit 0; one started after the
    work is done finds nothing left and exits 0."""
    recipe = write_recipe(tmp_path, records=18)
    manifest = load_manifest(recipe)
    select_records(manifest, served, progress=False)
    assert launch_stage(recipe, "fetch-real", 2, kind="local", interval=5.0) == 0
    stats = unit_stats(manifest, "fetch-real")
    assert sorted(stats) == [0, 1, 2]
    by_worker: dict[int, list[int]] = {}
    for shard, payload in stats.items():
        by_worker.setdefault(payload["lease"]["pid"], []).append(shard)
        history = list(Path(manifest.layout.history("fetch-real", f"{shard:05d}")).glob("*.json"))
        assert len(history) == 1  # done once
    assert len(by_worker) == 2, by_worker
    capsys.readouterr()
    assert run_worker(WorkerTask(str(recipe), "fetch-real")) == 0
    assert "0 unit(s) done, 3 already done" in capsys.readouterr().out


@pytest.mark.parametrize(("block", "key"), [
    ({"kind": "pbs"}, "executor: kind must be one of local, slurm, ray, got 'pbs'"),
    ({"gpus_per_generation_worker": 2}, "executor: gpus_per_generation_worker must be 0 or 1"),
    ({"slurm": {"cluster": "aws"}}, "executor.slurm: cluster must be slurm or local, got 'aws'"),
    ({"slurm": {"time_min": "long"}}, "executor.slurm.time_min"),
    ({"ray": {"adress": "auto"}}, "executor.ray.adress"),
])
def test_executor_block_errors_name_file_and_key(tmp_path: Path, block: dict, key: str) -> None:
    recipe = write_recipe(tmp_path)
    mapping = yaml.safe_load(recipe.read_text())
    mapping["executor"] = block
    recipe.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError) as caught:
        load_manifest(recipe)
    assert str(recipe) in str(caught.value) and key in str(caught.value)


def test_worker_exit_codes_for_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stage run before the one it needs, an unknown generator: one line, exit code 2."""
    recipe = write_recipe(tmp_path)
    assert run_worker(WorkerTask(str(recipe), "fetch-real")) == ExitCode.USAGE
    assert run_worker(WorkerTask(str(recipe), "generate", ("no-such-generator",))) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "select" in err[0] and "no-such-generator" in err[1]


@pytest.mark.slow
def test_launch_exit_codes(tmp_path: Path, served: str) -> None:
    """launch returns the stage's code: 2 for a user error, 1 when a worker died and was not restarted, 3 when
    following is interrupted (the workers are stopped); 0 once done: see the test above."""
    recipe = write_recipe(tmp_path, executor={"kind": "local", "log_dir": str(tmp_path / "logs"),
                                              "local": {"max_restarts": 0}})
    manifest = load_manifest(recipe)
    lines: list[str] = []
    assert launch_stage(recipe, "fetch-real", 1, interval=60.0, out=lines.append) == ExitCode.USAGE
    assert "exit codes 2" in lines[-1]
    select_records(manifest, served, progress=False)

    def interrupt(line: str) -> None:  # Ctrl-C at the first status line
        if line.startswith("["):
            raise KeyboardInterrupt

    assert launch_stage(recipe, "fetch-real", 1, interval=60.0, out=interrupt) == ExitCode.BUSY

    def kill_first_worker(line: str) -> None:
        lines.append(line)
        if line.startswith("local: started"):
            os.kill(int(line.rsplit(": ", 1)[1]), signal.SIGKILL)

    assert launch_stage(recipe, "fetch-real", 1, interval=60.0, out=kill_first_worker) == ExitCode.FAILED
    assert lines[-1] == "fetch-real: 1 task(s) ended, exit codes 1"


def test_fetch_distributor_is_refused_or_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """img2dataset's pyspark/ray distributors never worked here: refused naming file and key; multiprocessing
    (what every fetch-real unit uses) is ignored with a warning."""
    recipe = write_recipe(tmp_path)
    mapping = yaml.safe_load(recipe.read_text())
    mapping["fetch"]["distributor"] = "pyspark"
    recipe.write_text(yaml.safe_dump(mapping))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: fetch: distributor: 'pyspark' is no longer supported"):
        load_manifest(recipe)
    mapping["fetch"]["distributor"] = "multiprocessing"
    recipe.write_text(yaml.safe_dump(mapping))
    assert load_manifest(recipe).fetch.distributor == "multiprocessing"
    assert "fetch.distributor is deprecated and ignored" in caplog.text
