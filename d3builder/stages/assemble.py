"""`assemble`: join records, real and generated shards by id into the final paired D3 shards."""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import SPLITS, Manifest
from d3builder.storage.layout import DataLayout
from d3builder.storage.pairing import (
    GEN_META,
    REAL_META,
    InputError,
    ShardSource,
    paired_row,
    provenance_summary,
    read_records,
)
from d3builder.storage.schema import d3_features
from d3builder.storage.shards import DEFAULT_ROW_GROUP_SIZE, ShardStream
from d3builder.storage.units import claim, unit_done, write_stats

logger = logging.getLogger(__name__)

STAGE = "assemble"
@dataclass
class ShardResult:
    """What assembling one records shard did."""

    shard: int
    state: str  # assembled | done | busy | missing_input | bad_input
    written: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass
class AssembleSummary:
    """Totals of one `assemble` run over every records shard."""

    assembled: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    missing_inputs: dict[int, list[str]] = field(default_factory=dict)
    bad_inputs: dict[int, list[str]] = field(default_factory=dict)
    written: Counter = field(default_factory=Counter)
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)
    card: Path | None = None

    @property
    def complete(self) -> bool:
        """True when every records shard is assembled (now or before)."""
        return not self.missing_inputs and not self.bad_inputs and not self.busy

    def add(self, result: ShardResult) -> None:
        """Fold one shard's result into the totals."""
        if result.state == "assembled":
            self.assembled.append(result.shard)
        elif result.state == "done":
            self.already_done.append(result.shard)
        elif result.state == "busy":
            self.busy.append(result.shard)
        elif result.state == "missing_input":
            self.missing_inputs[result.shard] = result.problems
        else:
            self.bad_inputs[result.shard] = result.problems
        self.written.update(result.written)
        self.dropped += result.dropped
        self.reasons.update(result.reasons)


def _inputs(layout: DataLayout, shard: int, generators: list[str]) -> dict[str, Path]:
    paths = {"records": layout.records(shard), "real": layout.real(shard)}
    paths.update({f"gen:{g}": layout.gen(g, shard) for g in generators})
    return paths


def assemble_shard(manifest: Manifest, shard: int, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> ShardResult:
    """Assemble records shard `shard` into d3/{split}/{split}-{shard}.parquet (skipped when done)."""
    layout = manifest.layout
    stats = layout.stats(STAGE, shard)
    if unit_done(stats, layout.root):
        return ShardResult(shard, "done")
    inputs = _inputs(layout, shard, manifest.generators)
    missing = [str(p) for p in inputs.values() if not p.is_file()]
    if missing:
        logger.error("shard %d not assembled: missing input %s", shard, ", ".join(missing))
        return ShardResult(shard, "missing_input", problems=missing)
    with claim(stats) as ours:
        if not ours:
            return ShardResult(shard, "busy")
        try:
            real = ShardSource(inputs["real"], REAL_META)
            gens = {g: ShardSource(inputs[f"gen:{g}"], GEN_META) for g in manifest.generators}
            records = read_records(inputs["records"])
            return _assemble_claimed(manifest, shard, inputs, records, real, gens, row_group_size)
        except InputError as exc:
            logger.error("shard %d not assembled: %s", shard, exc)
            return ShardResult(shard, "bad_input", problems=[str(exc)])


def _assemble_claimed(
    manifest: Manifest,
    shard: int,
    inputs: dict[str, Path],
    records: list[dict],
    real: ShardSource,
    gens: dict[str, ShardSource],
    row_group_size: int,
) -> ShardResult:
    layout, started = manifest.layout, time.time()
    features = d3_features(len(manifest.generators))
    streams: dict[str, ShardStream] = {}
    result = ShardResult(shard, "assembled")
    seen: set[str] = set()
    try:
        for record in records:
            row, reasons = (None, ["duplicate_id"]) if record["id"] in seen else paired_row(record, real, gens)
            seen.add(record["id"])
            if row is None:
                result.dropped += 1
                result.reasons.update(reasons)
                continue
            split = row["split"]
            if split not in streams:
                streams[split] = ShardStream(layout.d3(split, shard), features, row_group_size)
            streams[split].write(row)
        outputs = {split: stream.commit() for split, stream in sorted(streams.items())}
    except BaseException:
        for stream in streams.values():
            stream.abort()
        raise
    for split in set(SPLITS) - set(outputs):
        layout.d3(split, shard).unlink(missing_ok=True)  # a stale file of an earlier, different run of this unit
    result.written = {split: streams[split].rows for split in outputs}
    write_stats(
        layout.stats(STAGE, shard),
        {
            "shard": shard,
            "records": len(records),
            "written": result.written,
            "dropped": result.dropped,
            "dropped_by_reason": dict(sorted(result.reasons.items())),
            "outputs": {split: str(path.relative_to(layout.root)) for split, path in outputs.items()},
            "inputs": {name: str(path.relative_to(layout.root)) for name, path in inputs.items()},
            "generators": list(manifest.generators),
            "provenance": provenance_summary(gens),
            "seconds": round(time.time() - started, 3),
        },
    )
    return result


def assemble_dataset(manifest: Manifest, progress: bool = True) -> AssembleSummary:
    """Assemble every records shard not yet done, then write the dataset card."""
    from d3builder.storage.card import write_dataset_card

    summary = AssembleSummary()
    shards = manifest.layout.record_shards()
    if not shards:
        logger.error("no records shards under %s: run `select` first", manifest.layout.root / "records")
    bar = tqdm(shards, desc="assemble", unit="shard", disable=not progress)
    for shard in bar:
        summary.add(assemble_shard(manifest, shard))
        bar.set_postfix(written=sum(summary.written.values()), dropped=summary.dropped)
    summary.card = write_dataset_card(manifest)
    return summary


def _run(args: argparse.Namespace) -> int:
    summary = assemble_dataset(manifest_from_args(args))
    print(f"assembled {len(summary.assembled)} shard(s), {len(summary.already_done)} already done")
    print("written: " + (", ".join(f"{s}={n}" for s, n in sorted(summary.written.items())) or "nothing"))
    print(f"dropped {summary.dropped} incomplete record(s)")
    for reason, count in sorted(summary.reasons.items()):
        print(f"  {reason}: {count}")
    for shard, missing in sorted(summary.missing_inputs.items()):
        print(f"shard {shard}: NOT assembled, missing input: {', '.join(missing)}")
    for shard, problems in sorted(summary.bad_inputs.items()):
        print(f"shard {shard}: NOT assembled, {'; '.join(problems)}")
    if summary.busy:
        print(f"shards being assembled by another process: {summary.busy}")
    print(f"dataset card: {summary.card}")
    return 0 if summary.complete else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder assemble`."""
    parser = subparsers.add_parser(
        "assemble",
        help="join records, real and generated shards into paired d3/{split}/ shards",
        description="Join records/{k}, real/{k} and gen/{g}/{k} by id into d3/{split}/{split}-{k}.parquet "
        "(complete records only; the rest counted by reason in stats/assemble/{k}.json). Resumable.",
    )
    add_manifest_args(parser)
    parser.set_defaults(func=_run)
