"""Completeness of an output root: every unit of every stage finished, every selected record accounted for.

A record is accounted for when it is in its d3/ split, or the stage that lost it recorded why (its
real image or a generated image failed with a reason). Everything else is a gap, named by file and
record: a unit never finished (its output or stats file missing), a record some stage wrote no row
for, a complete record that is in no d3/ shard, a d3/ row that is no selected record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import pyarrow as pa

from d3builder.storage.layout import TRANSFORM_STAGE, DataLayout, safe_name
from d3builder.storage.schema import AUGM_SPLIT, AUGM_SPLITS
from d3builder.storage.shards import Defect
from d3builder.storage.store import Store

SELECT, FETCH, GENERATE, ASSEMBLE, TRANSFORM = "select", "fetch-real", "generate", "assemble", TRANSFORM_STAGE
"""The stats folder of each stage (as each stage names it)."""
SUCCESS = "success"


@dataclass
class Completeness:
    """What comparing records/ with the outputs and stats of every stage found."""

    root: str
    """The output root as the user gave it (a local path or a URL)."""
    generators: list[str]
    shards: int = 0
    selected: int = 0
    fetched: Counter = field(default_factory=Counter)
    generated: dict[str, Counter] = field(default_factory=dict)
    assembled: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    transformed: Counter = field(default_factory=Counter)
    """Records written per transformed split (test_augm, and fit_augm where the recipe has a fit split)."""
    transform_ran: bool = False
    """Whether transform-test ran at all (an optional stage: only a partial run is a gap)."""
    lost: set[tuple[int, str]] = field(default_factory=set)
    """(shard, id) of every record that is neither in d3/ nor dropped for a recorded reason."""
    gaps: list[Defect] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The completeness summary, one stage per line."""
        def counts(counter: Counter) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        def outcome(counter: Counter) -> str:
            return f"{counter['ok']} ok, {counter['failed']} failed"

        generated = "; ".join(f"{g} {outcome(self.generated.get(g, Counter()))}" for g in self.generators)
        return [
            f"completeness of {self.root} (records/ against every stage's outputs and stats):",
            f"  selected     {self.selected} records in {self.shards} shards",
            f"  fetched      {outcome(self.fetched)}",
            f"  generated    {generated or 'no generator'}",
            f"  assembled    {sum(self.assembled.values())} ({counts(self.assembled)})",
            f"  dropped      {sum(self.dropped.values())} ({counts(self.dropped)})",
            *(f"  {augm:<12} {self.transformed[augm] if self.transform_ran else 'not built (transform-test never ran)'}"
              for augm in AUGM_SPLITS.values() if augm == AUGM_SPLIT or augm in self.transformed),
            f"  unaccounted  {len(self.lost)} record(s); {len(self.gaps)} gap(s)",
        ]


def has_records(layout: DataLayout) -> bool:
    """Whether `layout` is an output root (holds the records/ that completeness is checked against)."""
    store, root = layout.store, layout.root
    return store.isdir(root / "records") or store.isdir(root / "stats" / SELECT)


def infer_generators(layout: DataLayout) -> list[str]:
    """The generators of a root without its manifest: those assemble recorded, else the folders under gen/."""
    store = layout.store
    for path in store.glob(layout.root / "stats" / ASSEMBLE / "[0-9]*.json"):
        named = _json(store, path).get("generators")
        if named:
            return list(named)
    return [p.name for p in store.listdir(layout.root / "gen") if not p.name.startswith(".") and store.isdir(p)]


def _json(store: Store, path: PurePath) -> dict[str, Any]:
    """A stats file's object, or {} when it is absent or unreadable."""
    try:
        data = store.read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _rows(store: Store, path: PurePath, columns: list[str]) -> list[dict[str, Any]] | None:
    """Some columns of a shard as rows, or None when it is unreadable."""
    try:
        return store.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return None


class _Shard:
    """One records shard checked through every stage."""

    def __init__(self, report: Completeness, layout: DataLayout, shard: int) -> None:
        self.report, self.layout, self.shard = report, layout, shard
        self.store = layout.store

    def gap(self, path: PurePath, message: str, record: str | None = None) -> None:
        self.report.gaps.append(Defect(self.layout.url(path), message, record))

    def lost(self, record: str) -> None:
        self.report.lost.add((self.shard, record))

    def unit(self, output: PurePath, stats: PurePath, command: str) -> list[dict[str, Any]] | None:
        """A finished unit's rows (id, status), or None after naming what is missing."""
        if not self.store.isfile(output):
            self.gap(output, f"missing: the unit never finished (run `{command}`)")
            return None
        if not self.store.isfile(stats):
            self.gap(stats, f"missing: {output.name} was written but its unit never finished (run `{command}`)")
            return None
        rows = _rows(self.store, output, ["id", "status"])
        if rows is None:
            self.gap(output, "unreadable")
        return rows

    def statuses(self, rows: list[dict[str, Any]] | None, path: PurePath, wanted: list[str], stage: str,
                 real: dict[str, str | None] | None = None) -> dict[str, str | None] | None:
        """id -> status (None: no row) in a stage's shard; a missing row is a gap unless the real image failed."""
        if rows is None:
            for record in wanted:
                self.lost(record)
            return None
        found = {r["id"]: r["status"] for r in rows}
        status = {record: found.get(record) for record in wanted}
        for record, value in status.items():
            if value is None and (real is None or real.get(record) == SUCCESS):
                self.lost(record)
                self.gap(path, f"no row for this record: {stage} lost it", record)
        return status

    def check(self) -> None:
        report, layout, k = self.report, self.layout, self.shard
        records = _rows(self.store, layout.records(k), ["id", "split"])
        if records is None:
            self.gap(layout.records(k), "records shard missing or unreadable, though select counted it")
            return
        report.selected += len(records)
        ids = [r["id"] for r in records]
        rows = self.unit(layout.real(k), layout.stats(FETCH, k), "d3builder fetch-real")
        real = self.statuses(rows, layout.real(k), ids, "fetch-real")
        report.fetched.update(("ok" if s == SUCCESS else "failed") for s in (real or {}).values() if s)
        gens: dict[str, dict[str, str | None] | None] = {}
        for g in report.generators:
            stats = layout.stats(GENERATE, k, g)
            rows = self.unit(layout.gen(g, k), stats, f"d3builder generate --generator {g}")
            covered = _json(self.store, stats).get("splits") if rows is not None else None
            wanted = [r["id"] for r in records if covered is None or r["split"] in covered]
            if len(wanted) < len(ids):
                self.gap(stats, f"rendered splits {covered} only: {len(ids) - len(wanted)} records of other splits "
                         f"never rendered (run `d3builder generate --generator {g}` for every split)")
                for record in set(ids) - set(wanted):
                    self.lost(record)
            gens[g] = self.statuses(rows, layout.gen(g, k), wanted, f"generate {g}", real)
            if gens[g] is not None:
                report.generated.setdefault(g, Counter()).update(
                    ("ok" if s == SUCCESS else "failed") for s in gens[g].values() if s
                )
        self.assembled(records, real, gens)

    def assembled(self, records: list[dict[str, Any]], real: dict | None, gens: dict[str, dict | None]) -> None:
        """Each record in its d3/ split or dropped for a recorded reason; assemble's stats agree."""
        report, layout, k = self.report, self.layout, self.shard
        stats_path = layout.stats(ASSEMBLE, k)
        if not self.store.isfile(stats_path):
            self.gap(stats_path, "missing: the shard was never assembled (run `d3builder assemble`)")
            for record in records:
                self.lost(record["id"])
            return
        in_d3: dict[str, str] = {}
        for split in sorted({r["split"] for r in records if _safe(r["split"])}):
            path = layout.d3(split, k)
            # an unreadable d3/ shard adds no ids here: the shard checks name it
            rows = _rows(self.store, path, ["id"]) if self.store.isfile(path) else None
            for row in rows or []:
                in_d3.setdefault(row["id"], split)
        inputs_complete = real is not None and all(g is not None for g in gens.values())
        dropped = 0
        for record in records:
            rid, split = record["id"], record["split"]
            reasons = _reasons(rid, real, gens)
            if rid in in_d3:
                report.lost.discard((k, rid))  # whatever an input lacks now, the record made it into d3/
                if in_d3[rid] != split:
                    self.gap(layout.d3(in_d3[rid], k), f"in split {in_d3[rid]!r}, but records/ says {split!r}", rid)
                elif reasons:
                    self.gap(layout.d3(split, k), f"in d3/ although {', '.join(reasons)}", rid)
                else:
                    report.assembled[split] += 1
            elif reasons:
                dropped += 1
                report.dropped.update(reasons)
            elif inputs_complete:
                self.lost(rid)
                self.gap(layout.records(k), f"complete (real and {len(gens)} generated images) but in no d3/ "
                         "shard: assembled before its inputs changed? (assemble it again)", rid)
            else:
                self.lost(rid)  # an input unit never finished (named above)
        ids = {r["id"] for r in records}
        for rid, split in in_d3.items():
            if rid not in ids:
                self.gap(layout.d3(split, k), f"not a record of {layout.url(layout.records(k))}", rid)
        declared = _json(self.store, stats_path).get("dropped")
        if inputs_complete and declared not in (None, dropped):
            self.gap(stats_path, f"says {declared} records dropped, the inputs explain {dropped}")
        for split, augm in AUGM_SPLITS.items():
            if self.store.isfile(layout.d3(split, k)) and report.transform_ran:
                self.transformed(split, augm)

    def transformed(self, split: str, augm: str) -> None:
        """The transformed copy (`augm`) of this shard's `split` was written: its transform-test unit finished."""
        stats_path = self.layout.transform_stats(split, self.shard)
        self.report.transformed[augm] += 0  # listed in the summary even when no unit finished
        if not self.store.isfile(stats_path):
            self.gap(stats_path, f"missing: the {split} shard was never transformed (run `d3builder transform-test`)")
        else:
            self.report.transformed[augm] += int(_json(self.store, stats_path).get("written", 0))


def _safe(split: Any) -> bool:
    try:
        safe_name(str(split), "split")
    except ValueError:
        return False
    return split is not None


def _reasons(record: str, real: dict | None, gens: dict[str, dict | None]) -> list[str]:
    """Why a record cannot be complete, by the names assemble counts them under (empty: nothing recorded failed)."""
    reasons = []
    real_ok = real is None or real.get(record) == SUCCESS
    if not real_ok:
        reasons.append("real_missing" if real.get(record) is None else "real_failed")
    for g, statuses in gens.items():
        if statuses is None:
            continue
        status = statuses.get(record)
        if status is None and real_ok:
            reasons.append(f"gen_missing:{g}")
        elif status is not None and status != SUCCESS:
            reasons.append(f"gen_failed:{g}")
    return reasons


def check_completeness(layout: DataLayout, generators: list[str] | None = None) -> Completeness:
    """Compare an output root's records/ with the outputs and stats of every stage (`generators`: the manifest's)."""
    named = list(generators) if generators is not None else infer_generators(layout)
    report = Completeness(layout.url(layout.root), named)
    select_stats = layout.stats(SELECT, 0)
    shards = layout.record_shards()
    if layout.store.isfile(select_stats):
        declared = int(_json(layout.store, select_stats).get("shards", len(shards)))
        shards = sorted(set(shards) | set(range(declared)))
    else:
        report.gaps.append(Defect(layout.url(select_stats), "missing: select never finished (run `d3builder select`)"))
    report.shards = len(shards)
    report.transform_ran = layout.store.isdir(layout.root / "stats" / TRANSFORM)
    for shard in shards:
        _Shard(report, layout, shard).check()
    kept = _json(layout.store, select_stats).get("kept")
    if kept is not None and kept != report.selected:
        report.gaps.append(Defect(layout.url(select_stats),
                                  f"says {kept} records selected, records/ holds {report.selected}"))
    return report
