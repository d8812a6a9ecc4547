"""Leases: takeover after SIGKILL within two lease periods, heartbeats keep a live owner's lease, fencing,
race-free breaking of an expired lease, and a reused pid that does not block a unit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from stagekit import make_stage_inputs

from d3builder.stages.assemble import AssembleJob
from d3builder.storage.layout import DataLayout
from d3builder.storage.lease import (
    Lease,
    LeaseLost,
    LeaseRecord,
    acquire,
    host_key,
    process_start,
    unlock,
)
from d3builder.storage.runner import Unit, UnitOutcome, UnitRunner

REPO = Path(__file__).resolve().parents[1]
TTL = 1.5

HOLDER = """
import sys, time
from d3builder.storage.layout import DataLayout
from d3builder.storage.lease import acquire
root, ttl, hold = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
layout = DataLayout(root)
lease = acquire(layout.store, layout.leases("generate", "g/00000"), "generate", "g/00000", ttl)
print("held", lease.path, flush=True)
with lease.heartbeat():
    time.sleep(hold)
lease.ensure()
print("still mine", flush=True)
"""


def holder(root: Path, ttl: float, hold: float) -> tuple[subprocess.Popen, Path]:
    """A process holding unit g/00000's lease for `hold` seconds (then it exits, checking it still holds it)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(ttl), str(hold)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True)
    word, path = process.stdout.readline().split()
    assert word == "held"
    return process, Path(path)


def try_take(layout: DataLayout) -> Lease | LeaseRecord:
    return acquire(layout.store, layout.leases("generate", "g/00000"), "generate", "g/00000", TTL)


def test_sigkilled_owner_is_taken_over_within_two_lease_periods(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    process, path = holder(tmp_path, TTL, 60)
    assert isinstance(try_take(layout), LeaseRecord)  # live: busy
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = time.time()
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "host_key": "another-node"}))  # as if it ran on another node
    assert isinstance(try_take(layout), LeaseRecord)  # not expired yet: its last heartbeat is recent
    while isinstance(taken := try_take(layout), LeaseRecord):
        assert time.time() - killed < 2 * TTL, "not taken over within two lease periods"
        time.sleep(0.05)
    assert time.time() - killed >= TTL / 3  # waited for the expiry, not taken at once
    taken.release(finished=True)
    same_host, _ = holder(tmp_path, TTL, 60)  # on this host a dead owner is known dead at once
    same_host.send_signal(signal.SIGKILL)
    same_host.wait()
    assert isinstance(try_take(layout), Lease)


def test_a_live_owner_keeps_its_lease_for_many_periods(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    process, _ = holder(tmp_path, TTL, 4 * TTL)
    polls = 0
    while process.poll() is None:
        taken = try_take(layout)
        assert isinstance(taken, LeaseRecord) or process.poll() is not None, "took a live owner's lease"
        polls += 1
        time.sleep(0.1)
    assert process.returncode == 0 and "still mine" in process.stdout.read() and polls > 20


class _WaitingJob(AssembleJob):
    """assemble, but the unit waits for `go` before computing (so the test can take the lease away)."""

    def __init__(self, manifest, started: threading.Event, go: threading.Event) -> None:
        super().__init__(manifest)
        self.started, self.go = started, go

    def compute(self, ctx):
        self.started.set()
        assert self.go.wait(30)
        return super().compute(ctx)


@pytest.mark.parametrize("how", ["unlocked", "expired and taken over"])
def test_an_owner_that_lost_its_lease_does_not_commit(how: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_stage_inputs(tmp_path / "data", 4, 4)
    layout = inputs.layout
    started, go = threading.Event(), threading.Event()
    runner = UnitRunner(layout, lease_seconds=TTL, progress=False, wait=False)
    if how != "unlocked":
        monkeypatch.setattr(Lease, "renew", lambda self: None)  # a stalled owner: no heartbeat gets through
    results = []
    worker = threading.Thread(target=lambda: results.append(
        runner.run_unit(_WaitingJob(inputs.manifest, started, go), Unit("assemble", 0))))
    worker.start()
    assert started.wait(30)
    folder = layout.leases("assemble", "00000")
    if how == "unlocked":
        assert unlock(layout.store, folder, "assemble", "00000", "test") is not None
    else:
        time.sleep(TTL * 1.1)
        stolen = acquire(layout.store, folder, "assemble", "00000", 60.0)  # the owner looks alive: waits for expiry
        assert isinstance(stolen, Lease)
    go.set()
    worker.join(30)
    (result,) = results
    assert result.outcome is UnitOutcome.BUSY and "lost its lease" in result.message
    assert not list((layout.d3_dir()).rglob("*.parquet")) and not layout.stats("assemble", 0).exists()
    assert not [p for p in layout.root.rglob("*") if ".tmp-" in p.name]


def test_ensure_raises_once_the_lease_is_gone(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    lease = try_take(layout)
    lease.ensure()
    unlock(layout.store, layout.leases("generate", "g/00000"), "generate", "g/00000", "test")
    with pytest.raises(LeaseLost, match="taken over or unlocked"):
        lease.ensure()
    with pytest.raises(LeaseLost):
        lease.check()  # remembered: no I/O needed any more


BREAKER = """
import sys, time
from d3builder.storage.layout import DataLayout
from d3builder.storage.lease import Lease, acquire
root, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
layout = DataLayout(root)
for round_ in range(rounds):
    time.sleep(max(0.0, start + round_ * 0.5 - time.time()))
    got = acquire(layout.store, layout.leases("fetch-real", f"{round_:05d}"), "fetch-real", f"{round_:05d}", 30.0)
    print(int(isinstance(got, Lease)), flush=True)
"""


def test_breaking_an_expired_lease_is_race_free(tmp_path: Path) -> None:
    """Four processes break the same expired lease at the same moment: exactly one gets it, every round."""
    layout = DataLayout(tmp_path)
    rounds = 4
    for round_ in range(rounds):
        folder = layout.leases("fetch-real", f"{round_:05d}")
        folder.mkdir(parents=True)
        expired = {"epoch": 3, "token": "dead", "stage": "fetch-real", "unit": f"{round_:05d}", "host": "gone",
                   "host_key": "another-node", "pid": 1, "process_start": None, "rank": 0, "acquired_at": 0.0,
                   "renewed_at": 0.0, "ttl_s": 30.0}
        (folder / "00000003.json").write_text(json.dumps(expired))
    start = time.time() + 3.0
    racers = [subprocess.Popen([sys.executable, "-c", BREAKER, str(tmp_path), str(start), str(rounds)],
                               stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(4)]
    results = [racer.communicate(timeout=120)[0].split() for racer in racers]
    assert [sum(int(r[i]) for r in results) for i in range(rounds)] == [1] * rounds, results
    for round_ in range(rounds):
        epochs = sorted(p.name for p in layout.leases("fetch-real", f"{round_:05d}").iterdir())
        assert epochs == ["00000004.json"]  # the winner's epoch; the expired one cleaned up


def test_a_reused_pid_does_not_block_the_unit(tmp_path: Path) -> None:
    """A lease whose pid now belongs to another live process (start times differ) is free at once; a lease of
    a live process is busy, and the message names the lease file."""
    layout = DataLayout(tmp_path)
    other = subprocess.Popen(["sleep", "30"])
    try:
        folder = layout.leases("generate", "g/00000")
        folder.mkdir(parents=True)
        record = {"epoch": 1, "token": "old", "stage": "generate", "unit": "g/00000", "host": "here",
                  "host_key": host_key(), "pid": other.pid, "rank": 0, "acquired_at": time.time(),
                  "renewed_at": time.time(), "ttl_s": 3600.0}
        (folder / "00000001.json").write_text(json.dumps({**record, "process_start": process_start(other.pid)}))
        busy = try_take(layout)
        assert isinstance(busy, LeaseRecord) and str(folder / "00000001.json") in busy.describe()
        assert f"here:{other.pid}" in busy.describe()
        reused = {**record, "process_start": str(int(process_start(other.pid)) + 1)}  # same pid, another process
        (folder / "00000001.json").write_text(json.dumps(reused))
        taken = try_take(layout)
        assert isinstance(taken, Lease) and taken.record.epoch == 2
    finally:
        other.kill()
        other.wait()


def test_lease_records_its_owner(tmp_path: Path) -> None:
    lease = try_take(DataLayout(tmp_path))
    record = json.loads(lease.path.read_text())
    assert record["pid"] == os.getpid() and record["host_key"] == host_key() and record["ttl_s"] == TTL
    assert record["process_start"] == process_start(os.getpid()) and len(record["token"]) == 32
