"""The unit runner shared by every stage: busy is not failure, exit codes, no work without input, no temporary
file surviving a rerun, "done" checked again under the lease, stage times and history recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from genkit import make_records
from stagekit import make_stage_inputs

import d3builder.storage.runner as runner_module
from d3builder import cli
from d3builder.stages.assemble import AssembleJob, assemble_dataset
from d3builder.storage.lease import acquire
from d3builder.storage.runner import (
    ExitCode,
    RunSummary,
    Unit,
    UnitOutcome,
    UnitResult,
    UnitRunner,
)

REPO = Path(__file__).resolve().parents[1]


def history(layout, stage: str) -> dict[str, list[dict]]:
    """Every recorded event of a stage, by unit."""
    events: dict[str, list[dict]] = {}
    for path in sorted((layout.root / "history" / stage).rglob("*.json")):
        event = json.loads(path.read_text())
        events.setdefault(event["unit"], []).append(event)
    return events


def test_two_processes_sharing_a_stage_both_exit_0(tmp_path: Path) -> None:
    """Busy is not failure: two `assemble` processes split the units, wait for each other, and both exit 0."""
    inputs = make_stage_inputs(tmp_path / "data", 24, 2)
    command = [sys.executable, "-m", "d3builder", "assemble", "-m", str(inputs.manifest.path), "--no-progress"]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert all("exit 0: all good" in out for out in outputs)
    events = history(inputs.layout, "assemble")
    assert sorted(events) == [f"{k:05d}" for k in range(12)]
    assert all([e["outcome"] for e in unit] == ["done"] for unit in events.values())  # each computed once
    stats = [json.loads(inputs.layout.stats("assemble", k).read_text()) for k in range(12)]
    assert all(s["lease"]["token"] == events[f"{k:05d}"][0]["token"] for k, s in enumerate(stats))
    assert all(s["started_at"] <= s["finished_at"] for s in stats)
    assert not list((inputs.layout.root / "leases").rglob("*.json"))  # finished units leave no lease


def test_units_left_busy_exit_3_naming_the_lease(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = make_stage_inputs(tmp_path / "data", 4, 2)
    layout = inputs.layout
    lease = acquire(layout.store, layout.leases("assemble", "00001"), "assemble", "00001", 3600.0)
    assert cli.main(["assemble", "-m", str(inputs.manifest.path), "--no-wait", "--no-progress"]) == 3
    out = capsys.readouterr().out
    assert "1 unit(s) done, 0 already done, 1 busy" in out and "exit 3: units left busy by other live owners" in out
    assert "assemble shard 1: busy, leased by" in out and str(lease.path) in out
    lease.release(finished=False)
    assert cli.main(["assemble", "-m", str(inputs.manifest.path), "--no-progress"]) == 0
    assert "1 unit(s) done, 1 already done" in capsys.readouterr().out


@pytest.mark.parametrize("command, first", [
    (["fetch-real"], "select"), (["generate", "-g", "sd14-tiny"], "select"), (["assemble"], "select"),
    (["extend"], "select"), (["transform-test"], "assemble"),
])
def test_stages_without_input_exit_2_naming_the_stage_to_run_first(command: list[str], first: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    manifest = make_records(tmp_path / "data", 0, 2)  # a recipe with registries, and no records shard
    assert cli.main([command[0], "-m", str(manifest.path), *command[1:], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"run `d3builder {first}` first" in err
    assert not (manifest.layout.d3_dir() / "README.md").exists()  # no empty dataset card
    assert not (manifest.layout.root / "leases").exists()


KILL_AFTER_FIRST_ROW_GROUP = """
import os, signal, sys
from d3builder.storage import shards
flush = shards.ShardStream._flush
def flush_then_die(self):
    flush(self)
    if self._writer is not None:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: a temporary file holds one row group
shards.ShardStream._flush = flush_then_die
from d3builder import cli
cli.main(sys.argv[1:])
"""


def test_no_temporary_file_survives_a_rerun_after_sigkill(tmp_path: Path) -> None:
    """assemble is SIGKILLed with a half-written shard on disk; the rerun removes it and finishes the unit."""
    inputs = make_stage_inputs(tmp_path / "data", 80, 80, split_cycle=("train",))
    layout = inputs.layout
    args = ["assemble", "-m", str(inputs.manifest.path), "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_ROW_GROUP, *args], cwd=REPO, timeout=300)
    assert killed.returncode == -9
    leftovers = [p for p in layout.root.rglob("*") if ".tmp-" in p.name]
    assert [p.parent for p in leftovers] == [layout.d3("train", 0).parent]
    assert not layout.d3("train", 0).exists() and not layout.stats("assemble", 0).exists()
    summary = assemble_dataset(inputs.manifest, progress=False)
    assert summary.shards(UnitOutcome.DONE) == [0] and summary.counts == {"train": 80}
    assert not [p for p in layout.root.rglob("*") if ".tmp-" in p.name]


def test_done_is_checked_again_under_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit finished by another owner between our first check and our lease is skipped, not redone."""
    inputs = make_stage_inputs(tmp_path / "data", 4, 4)
    other = make_stage_inputs(tmp_path / "other", 4, 4)
    assemble_dataset(other.manifest, progress=False)  # "another owner": its files are copied in at lease time
    real_acquire = runner_module.acquire

    def acquire_after_the_other_finished(store, folder, *args):
        for path in other.layout.root.rglob("*"):
            if path.is_file() and ("d3" in path.parts or "stats" in path.parts):
                target = inputs.layout.root / path.relative_to(other.layout.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        return real_acquire(store, folder, *args)

    monkeypatch.setattr(runner_module, "acquire", acquire_after_the_other_finished)
    computed = []
    monkeypatch.setattr(AssembleJob, "compute", lambda self, ctx: computed.append(ctx.unit))
    summary = assemble_dataset(inputs.manifest, progress=False)
    assert summary.shards(UnitOutcome.SKIPPED) == [0] and computed == []
    assert not (inputs.layout.root / "leases" / "assemble" / "00000").exists() or not list(
        (inputs.layout.root / "leases" / "assemble" / "00000").iterdir())


def test_a_redone_input_redoes_the_unit(tmp_path: Path) -> None:
    """When an input unit is redone after this one (e.g. fetch-real --retry-failed), this one runs again."""
    inputs = make_stage_inputs(tmp_path / "data", 6, 2)
    layout = inputs.layout
    for k in range(3):
        layout.stats("fetch-real", k).parent.mkdir(parents=True, exist_ok=True)
        layout.stats("fetch-real", k).write_text(json.dumps({"finished_at": 1.0}))
    assert assemble_dataset(inputs.manifest, progress=False).shards(UnitOutcome.DONE) == [0, 1, 2]
    layout.stats("fetch-real", 1).write_text(json.dumps({"finished_at": time.time()}))
    again = assemble_dataset(inputs.manifest, progress=False)
    assert (again.shards(UnitOutcome.DONE), again.shards(UnitOutcome.SKIPPED)) == ([1], [0, 2])


def test_summary_exit_codes_and_line() -> None:
    unit = Unit("generate", 0, "g")
    ok = RunSummary("generate", "g", [UnitResult(unit, UnitOutcome.DONE, records=200, failed=2)])
    assert ok.exit_code is ExitCode.OK  # 1% is not above max_failed_fraction 0.01
    assert "200 record(s), 2 failed (1.0%, max 1%)" in ok.describe() and "exit 0: all good" in ok.describe()
    over = RunSummary("generate", "g", [UnitResult(unit, UnitOutcome.DONE, records=200, failed=3)])
    assert over.exit_code is ExitCode.FAILED and "exit 1:" in over.describe()
    busy = RunSummary("assemble", None, [UnitResult(unit, UnitOutcome.BUSY, "leased by x")])
    assert busy.exit_code is ExitCode.BUSY and not busy.complete
    bad = RunSummary("assemble", None, [UnitResult(unit, UnitOutcome.BAD_INPUT, "missing input: x")])
    assert bad.exit_code is ExitCode.FAILED and bad.problems == {0: "missing input: x"}
    assert ExitCode.worst([0, 3, 1]) is ExitCode.FAILED and ExitCode.worst([0, 3]) is ExitCode.BUSY
    assert ExitCode.worst([1, 2]) is ExitCode.USAGE and ExitCode.worst([]) is ExitCode.OK


def test_runner_records_times_and_history_for_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_stage_inputs(tmp_path / "data", 4, 2)

    def broken(self, ctx):
        if ctx.unit.shard == 1:
            raise RuntimeError("disk on fire")
        return real(self, ctx)

    real = AssembleJob.compute
    monkeypatch.setattr(AssembleJob, "compute", broken)
    runner = UnitRunner(inputs.layout, progress=False)
    summary = runner.run(AssembleJob(inputs.manifest), [Unit("assemble", 0), Unit("assemble", 1)])
    assert summary.shards(UnitOutcome.DONE) == [0] and summary.problems == {1: "RuntimeError: disk on fire"}
    assert summary.exit_code is ExitCode.FAILED
    events = history(inputs.layout, "assemble")
    assert [e["outcome"] for e in events["00001"]] == ["failed"] and events["00001"][0]["reason"] == "RuntimeError"
    lease_files = list((inputs.layout.root / "leases" / "assemble" / "00001").iterdir())
    assert [json.loads(p.read_text())["released"] for p in lease_files] == [True]  # free for the next worker
