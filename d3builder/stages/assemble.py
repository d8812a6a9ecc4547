"""`assemble`: join records, real and generated shards by id into the final paired D3 shards."""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath

from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_unit_args,
    manifest_from_args,
    report,
)
from d3builder.recipe.manifest import SPLITS, Manifest
from d3builder.storage.card import write_dataset_card
from d3builder.storage.pairing import (
    GEN_META,
    REAL_META,
    InputError,
    ShardSource,
    paired_row,
    provenance_summary,
    read_records,
)
from d3builder.storage.runner import (
    BadInput,
    RunSummary,
    Unit,
    UnitContext,
    UnitJob,
    UnitWork,
)
from d3builder.storage.schema import d3_features
from d3builder.storage.shards import DEFAULT_ROW_GROUP_SIZE, ShardStream

logger = logging.getLogger(__name__)

STAGE = "assemble"


class AssembleJob(UnitJob):
    """assemble's unit k: records/{k} + real/{k} + gen/{g}/{k} -> d3/{split}/{split}-{k} (complete records only)."""

    stage = STAGE

    def __init__(self, manifest: Manifest, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
        super().__init__(manifest.layout)
        self.manifest, self.row_group_size = manifest, row_group_size

    def inputs(self, shard: int) -> dict[str, PurePath]:
        paths = {"records": self.layout.records(shard), "real": self.layout.real(shard)}
        paths.update({f"gen:{g}": self.layout.gen(g, shard) for g in self.manifest.generators})
        return paths

    def outputs(self, unit: Unit) -> list[PurePath]:
        return [self.layout.d3(split, unit.shard) for split in SPLITS]

    def input_units(self, unit: Unit) -> list[Unit]:
        return [Unit("fetch-real", unit.shard), *(Unit("generate", unit.shard, g) for g in self.manifest.generators)]

    def size(self, unit: Unit) -> int:
        path = self.layout.records(unit.shard)
        return self.store.parquet_file(path).metadata.num_rows if self.store.isfile(path) else 0

    def compute(self, ctx: UnitContext) -> UnitWork:
        """Write the shard's complete records by split; count the rest by reason."""
        layout, store, shard, started = self.layout, self.store, ctx.unit.shard, time.time()
        inputs = self.inputs(shard)
        missing = [layout.url(p) for p in inputs.values() if not store.isfile(p)]
        if missing:
            raise BadInput(f"missing input: {', '.join(missing)}")
        try:
            real = ShardSource(inputs["real"], REAL_META, store)
            gens = {g: ShardSource(inputs[f"gen:{g}"], GEN_META, store) for g in self.manifest.generators}
            records = read_records(inputs["records"], store)
        except InputError as exc:
            raise BadInput(str(exc)) from exc
        features = d3_features(len(self.manifest.generators))
        streams: dict[str, ShardStream] = {}
        reasons: Counter = Counter()
        seen: set[str] = set()
        try:
            for record in records:
                row, why = (None, ["duplicate_id"]) if record["id"] in seen else paired_row(record, real, gens)
                seen.add(record["id"])
                if row is None:
                    reasons.update(why)
                    continue
                split = row["split"]
                if split not in streams:
                    streams[split] = ctx.stream(layout.d3(split, shard), features, self.row_group_size)
                streams[split].write(row)
            outputs = {split: ctx.commit(stream) for split, stream in sorted(streams.items())}
        except BaseException:
            for stream in streams.values():
                stream.abort()
            raise
        for split in set(SPLITS) - set(outputs):
            ctx.remove(layout.d3(split, shard))  # a stale file of an earlier, different run of this unit
        written = Counter({split: streams[split].rows for split in outputs})
        ctx.advance(len(records))
        return UnitWork({
            "shard": shard,
            "records": len(records),
            "written": dict(written),
            "dropped": len(records) - sum(written.values()),
            "dropped_by_reason": dict(sorted(reasons.items())),
            "outputs": {split: store.relative(path) for split, path in outputs.items()},
            "inputs": {name: store.relative(path) for name, path in inputs.items()},
            "generators": list(self.manifest.generators),
            "provenance": provenance_summary(gens),
            "seconds": round(time.time() - started, 3),
        }, records=len(records), reasons=reasons, counts=written)


def assemble_dataset(manifest: Manifest, shards: Sequence[int] | None = None, progress: bool = True,
                     wait: bool = True, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                     wait_inputs: bool = False) -> RunSummary:
    """Assemble every records shard (or `shards`) not yet done, then write the dataset card.

    `wait_inputs` waits for input units nobody has started yet (a worker beside fetch-real's and generate's).
    Raises UsageError when there is no records shard at all (run select first): no empty card is written."""
    wanted = manifest.layout.wanted_shards(shards)
    runner = manifest.runner(progress=progress, wait=wait, wait_inputs=wait_inputs)
    summary = runner.run(AssembleJob(manifest, row_group_size), [Unit(STAGE, k) for k in wanted])
    write_dataset_card(manifest)
    return summary


def _run(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    summary = assemble_dataset(manifest, args.shards, progress=args.progress, wait=args.wait)
    code = report(summary)
    print("written: " + (", ".join(f"{s}={n}" for s, n in sorted(summary.counts.items())) or "nothing"))
    card = manifest.layout.d3_dir() / "README.md"
    if manifest.layout.store.isfile(card):
        print(f"dataset card: {manifest.layout.url(card)}")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder assemble`."""
    parser = subparsers.add_parser(
        "assemble",
        help="join records, real and generated shards into paired d3/{split}/ shards",
        description="Join records/{k}, real/{k} and gen/{g}/{k} by id into d3/{split}/{split}-{k}.parquet "
        "(complete records only; the rest counted by reason in stats/assemble/{k}.json), then write the "
        "dataset card d3/README.md. Resumable; any number of processes may share it.",
    )
    add_manifest_args(parser)
    add_unit_args(parser)
    parser.set_defaults(func=_run)
