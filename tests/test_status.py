"""`d3builder status` and `d3builder unlock`: units done, running (owner, heartbeat), failed (reasons), pending."""

from __future__ import annotations

from pathlib import Path

import pytest
from stagekit import make_stage_inputs

from d3builder import cli
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.status import recipe_status, unlock_units
from d3builder.storage.lease import LeaseLost, acquire
from d3builder.storage.runner import UnitOutcome


def test_status_and_unlock(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_stage_inputs(tmp_path / "data", 6, 2, skip=[("sd21-tiny", 1)], fail={"1000": "real_failed"})
    layout, manifest = inputs.layout, inputs.manifest
    held = acquire(layout.store, layout.leases("assemble", "00002"), "assemble", "00002", 3600.0)
    summary = assemble_dataset(manifest, progress=False, wait=False)
    assert summary.shards() == [0, 1, 2] and summary.exit_code == 1
    rows = {row.name: row for row in recipe_status(manifest)}
    assemble = rows["assemble"]
    assert (assemble.units, assemble.done, len(assemble.running), len(assemble.failed), assemble.pending) == (3, 1, 1, 1, 0)
    assert assemble.failed["00001"].startswith("bad_input: missing input: ") and "sd21-tiny" in assemble.failed["00001"]
    assert assemble.records == {"real_failed": 1}
    assert (rows["fetch-real"].units, rows["fetch-real"].done, rows["fetch-real"].pending) == (3, 3, 0)  # stagekit
    assert cli.main(["status", "-m", str(manifest.path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["stage", "units", "done", "running", "failed", "pending"]
    assert "assemble" in out and f"running: assemble 00002 leased by {held.record.owner()}" in out
    assert str(held.path) in out and "failed: assemble 00001: bad_input: missing input" in out
    assert "records failed or left out in assemble: real_failed 1" in out

    assert unlock_units(manifest, "assemble", [2], confirm=lambda held: False) == []  # refused: nothing broken
    held.ensure()
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli.main(["unlock", "-m", str(manifest.path), "--stage", "assemble"]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert cli.main(["unlock", "-m", str(manifest.path), "--stage", "assemble", "--shards", "2", "--yes"]) == 0
    assert "unlocked 1 unit(s) of assemble" in capsys.readouterr().out
    with pytest.raises(LeaseLost):
        held.ensure()  # its owner finds out at the next heartbeat or commit
    assert assemble_dataset(manifest, progress=False, wait=False).shards(UnitOutcome.DONE) == [2]
    assert {row.name: row.done for row in recipe_status(manifest)}["assemble"] == 2
