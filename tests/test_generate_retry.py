"""Failed generation is retried, not stamped done: out-of-memory batches rendered in halves, failed records
redone by --retry-failed (generate and extend), big shards split into parts that merge into the same shard; only
fetched reals are rendered, and records fetch-real recovers later are topped up."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from genkit import make_records, one_thread, save_manifest  # noqa: F401 - fixtures

from d3builder import cli
from d3builder.generators.render import generate_shards
from d3builder.generators.runtime import LoadedGenerator
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.extend import extend
from d3builder.stages.regenerate import regenerate
from d3builder.storage.runner import UnitOutcome

GENERATOR = "sd14-tiny"


class Renders:
    """Wraps LoadedGenerator._render: records each batch's record ids, raises for the batches `fail` picks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail=lambda ids: None) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail
        real = LoadedGenerator._render

        def render(generator, prompts, negatives, width, height, seeds):
            ids = [p.rsplit(" ", 1)[-1] for p in prompts]  # stagekit captions end with the record id
            self.batches.append(ids)
            error = self.fail(ids)
            if error is not None:
                raise error
            return real(generator, prompts, negatives, width, height, seeds)

        monkeypatch.setattr(LoadedGenerator, "_render", render)

    @property
    def ids(self) -> list[str]:
        return sorted(i for batch in self.batches for i in batch)


def rows(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(path).to_pylist()}


def test_out_of_memory_batches_are_rendered_in_halves(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = make_records(tmp_path / "data", 8, 8, batch_size=4)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    renders = Renders(monkeypatch, lambda ids: oom if len(ids) > 1 else None)
    summary = generate_shards(manifest, GENERATOR, progress=False)
    assert (summary.counts["success"], summary.failed) == (8, 0)
    assert max(len(b) for b in renders.batches) == 4 and renders.ids.count("1000") >= 2  # tried whole, then halved
    stats = json.loads(manifest.layout.stats("generate", 0, GENERATOR).read_text())
    halved = sorted({i for batch in renders.batches if len(batch) > 1 for i in batch})
    assert sorted(i for group in stats["rebatched"] for i in group) == halved and len(halved) >= 6
    assert all(len(group) == 1 for group in stats["rebatched"])  # each rendered alone in the end
    monkeypatch.undo()
    stored = rows(manifest.layout.gen(GENERATOR, 0))
    (again,) = regenerate(manifest, GENERATOR, ["1005"], out_dir=tmp_path / "again")
    assert again.match and again.path.read_bytes() == stored["1005"]["image"]["bytes"]  # rendered alone, replayed alone


def test_failed_records_are_done_exit_1_and_retry_failed_redoes_exactly_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    manifest = make_records(tmp_path / "data", 8, 4, batch_size=2)
    layout = manifest.layout
    argv = ["generate", "-m", str(manifest.path), "-g", GENERATOR, "--no-progress"]
    unlucky = {"1001", "1006"}
    Renders(monkeypatch, lambda ids: RuntimeError("device lost") if unlucky & set(ids) else None)
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "2 unit(s) done" in out and "exit 1: work failed" in out and "exception:RuntimeError" in out
    before = {k: rows(layout.gen(GENERATOR, k)) for k in (0, 1)}
    failed = {i for shard in before.values() for i, r in shard.items() if r["status"] == "failed"}
    assert unlucky <= failed and len(failed) < 8  # the batches holding them, after one more try each
    stats = json.loads(layout.stats("generate", 0, GENERATOR).read_text())
    assert stats["failed"] + stats["success"] == 4 and stats["failures_by_reason"] == {
        "exception:RuntimeError": stats["failed"]}
    assert cli.main(argv) == 0 and "0 unit(s) done, 2 already done" in capsys.readouterr().out  # done, not redone
    monkeypatch.undo()
    fixed = Renders(monkeypatch)
    assert cli.main([*argv, "--retry-failed"]) == 0
    assert fixed.ids == sorted(failed)  # exactly the failed records, nothing else
    after = {k: rows(layout.gen(GENERATOR, k)) for k in (0, 1)}
    assert all(r["status"] == "success" for shard in after.values() for r in shard.values())
    assert [list(after[k]) for k in (0, 1)] == [list(before[k]) for k in (0, 1)]  # rows replaced in place
    assert all(after[k][i] == before[k][i] for k in (0, 1) for i in before[k] if i not in failed)  # others untouched
    stats = json.loads(layout.stats("generate", 0, GENERATOR).read_text())
    assert stats["failed"] == 0 and sorted(stats["retries"][0]["retried"]) == sorted(failed & {"1000", "1001",
                                                                                               "1002", "1003"})
    (again,) = regenerate(manifest, GENERATOR, ["1001"], out_dir=tmp_path / "again")
    assert again.match  # rendered in a retry batch, replayed in the same one


def test_extend_retry_failed_renders_and_joins_the_failed_test_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = make_records(tmp_path / "data", 8, 4)  # test records: 1003 and 1007
    Renders(monkeypatch, lambda ids: RuntimeError("boom") if "1007" in ids else None)
    render, join = extend(manifest, progress=False)
    assert render.failed == 1 and join.counts["test"] == 1 and join.reasons == {"gen_failed:sd15-tiny": 1}
    monkeypatch.undo()
    fixed = Renders(monkeypatch)
    render, join = extend(manifest, progress=False, retry_failed=True)
    assert fixed.ids == ["1007"] and render.shards(UnitOutcome.RETRIED) == [1]
    assert join.shards(UnitOutcome.DONE) == [1] and join.counts["test"] == 1  # shard 1 joined again, not shard 0
    assert [r["id"] for r in pq.read_table(manifest.layout.extended("sd15-tiny", 1)).to_pylist()] == ["1007"]


def test_big_shards_go_by_parts_and_merge_into_the_same_shard(tmp_path: Path) -> None:
    whole = make_records(tmp_path / "whole", 12, 12, batch_size=2)
    parted = make_records(tmp_path / "parted", 12, 12, batch_size=2)
    table = tmp_path / "throughput.yaml"
    table.write_text(f"gpu: test\ngenerators:\n  {GENERATOR}: {{seconds_per_image: 60}}\n")
    parted.generate.throughput, parted.generate.max_unit_minutes = str(table), 4.0  # 12 images x 1 min: 3 parts
    parted = save_manifest(parted, parted.path)
    reference = generate_shards(whole, GENERATOR, progress=False)
    summary = generate_shards(parted, GENERATOR, progress=False)
    assert [u.part for u in summary.units()] == [(0, 3), (1, 3), (2, 3), None]  # the parts, then their merge
    assert summary.counts["success"] == reference.counts["success"] == 12
    ours, theirs = (pq.read_table(m.layout.gen(GENERATOR, 0)).drop_columns(["seconds"]) for m in (parted, whole))
    assert ours.equals(theirs)  # same rows, same order, same image bytes: the same batches were rendered
    stats = json.loads(parted.layout.stats("generate", 0, GENERATOR).read_text())
    assert [p["part"] for p in stats["parts"]] == [[0, 3], [1, 3], [2, 3]] and stats["success"] == 12
    assert not (parted.layout.root / "gen" / GENERATOR / "parts").exists() or not list(
        (parted.layout.root / "gen" / GENERATOR / "parts").iterdir())  # merged parts are removed
    (again,) = regenerate(parted, GENERATOR, ["1009"], out_dir=tmp_path / "again")
    assert again.match
    rerun = generate_shards(parted, GENERATOR, progress=False)  # merged parts are not rendered again
    assert rerun.shards(UnitOutcome.SKIPPED) == [0] and not rerun.units(UnitOutcome.DONE)


def test_only_fetched_reals_are_rendered_and_records_recovered_later_are_topped_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = {"1001": "real_failed", "1004": "real_failed"}  # sizes: 1003, 1004, 1006 and 1007 are 64x48
    manifest = make_records(tmp_path / "data", 8, 8, batch_size=2, **failed)
    layout = manifest.layout
    renders = Renders(monkeypatch)
    first = generate_shards(manifest, GENERATOR, progress=False)
    fetched = ["1000", "1002", "1003", "1005", "1006", "1007"]
    assert renders.ids == fetched and first.counts["success"] == 6  # no GPU time for fakes assemble would drop
    planned = list(renders.batches)
    before = rows(layout.gen(GENERATOR, 0))
    assert sorted(before) == fetched
    assert sum(assemble_dataset(manifest, progress=False).counts.values()) == 6
    # fetch-real --retry-failed recovers 1004: its unit is redone (a newer finished_at), so generate's is stale
    make_records(tmp_path / "data", 8, 8, batch_size=2, **{"1001": "real_failed"})
    stats_path = layout.stats("fetch-real", 0)
    stats_path.write_text(json.dumps({**json.loads(stats_path.read_text()), "finished_at": time.time()}))
    renders.batches.clear()
    topped = generate_shards(manifest, GENERATOR, progress=False)
    assert renders.ids == ["1004"] and topped.shards(UnitOutcome.DONE) == [0] and topped.counts["success"] == 1
    after = rows(layout.gen(GENERATOR, 0))
    assert list(after) == [*before, "1004"] and all(after[i] == before[i] for i in before)  # appended, rest untouched
    stats = json.loads(layout.stats("generate", 0, GENERATOR).read_text())
    assert (stats["added"], stats["records"], stats["success"]) == (["1004"], 7, 7) and ["1004"] in stats["rebatched"]
    assert generate_shards(manifest, GENERATOR, progress=False).shards(UnitOutcome.SKIPPED) == [0]  # up to date now
    renders.batches.clear()
    again = regenerate(manifest, GENERATOR, [*fetched, "1004"], out_dir=tmp_path / "again")
    assert all(r.match for r in again)
    assert sorted(renders.batches) == sorted([*planned, ["1004"]])  # 1007 alone as planned, not beside 1004
    assembled = assemble_dataset(manifest, progress=False)
    assert assembled.shards(UnitOutcome.DONE) == [0] and sum(assembled.counts.values()) == 7  # picked up


def test_render_failed_reals_renders_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = make_records(tmp_path / "data", 4, 4, batch_size=2, **{"1001": "real_failed"})
    manifest.generate.render_failed_reals = True
    manifest = save_manifest(manifest, manifest.path)
    renders = Renders(monkeypatch)
    assert generate_shards(manifest, GENERATOR, progress=False).counts["success"] == 4
    assert renders.ids == ["1000", "1001", "1002", "1003"]
