"""`extend`: render the test records with further generators into extended/{g}/test-{k}.parquet.

The same machinery as the D3 generators: `generate_shards` (restricted to the test split) writes the
gen/{g}/{k}.parquet intermediate, then each records shard's test records are joined by id with
real/{k}.parquet exactly as `assemble` joins them, into the final shard format with one generator slot
(gen0 = the new generator). Readers handle these shards like D3 test shards. Adding a generator is one
registry entry (manifests/extended.yaml) and its name under the manifest's extended.generators; the entry
may be of any kind (diffusers, python, http, folder), and every named entry must be ready to run here
before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from d3builder.generators.backends import availability, check_ready, describe
from d3builder.generators.backends.folder import unmatched_files
from d3builder.generators.registry import Entry, FolderEntry, RegistryError
from d3builder.generators.render import (
    GenerateSummary,
    SpeedOptions,
    done,
    generate_shards,
    manifest_registry,
    print_summary,
    process_state,
    registry_entry,
)
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_speed_args,
    manifest_from_args,
    speed_from_args,
)
from d3builder.recipe.manifest import Manifest
from d3builder.storage.pairing import (
    GEN_META,
    REAL_META,
    InputError,
    ShardSource,
    paired_row,
    read_records,
)
from d3builder.storage.schema import d3_features
from d3builder.storage.shards import ShardStream, atomic_write_json
from d3builder.storage.units import claim, shards_for_process, unit_done, write_stats

logger = logging.getLogger(__name__)

STAGE = "extend"
SPLIT = "test"


@dataclass
class ExtendSummary:
    """What one process of an `extend` run did, per generator."""

    generate: dict[str, GenerateSummary] = field(default_factory=dict)
    joined: dict[str, list[int]] = field(default_factory=dict)
    already_done: dict[str, list[int]] = field(default_factory=dict)
    not_joined: dict[str, dict[int, str]] = field(default_factory=dict)
    written: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=dict)
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    """Per folder generator: its images that match no test record id."""

    @property
    def complete(self) -> bool:
        """True when every generator rendered and joined every shard of this process."""
        return all(s.complete for s in self.generate.values()) and not any(self.not_joined.values())


def join_shard(manifest: Manifest, generator: str, shard: int) -> tuple[str, int, Counter]:
    """Join shard k's test records with real/{k} and gen/{g}/{k}; returns (state, rows written, drops by reason).

    state is joined, done, busy, or a problem (missing or unreadable input) naming the file."""
    layout = manifest.layout
    stats, output = layout.stats(STAGE, shard, generator), layout.extended(generator, shard)
    if unit_done(stats, layout.root):
        return "done", 0, Counter()
    inputs = {"records": layout.records(shard), "real": layout.real(shard), "gen": layout.gen(generator, shard)}
    missing = [str(p) for p in inputs.values() if not p.is_file()]
    if missing:
        return f"missing input: {', '.join(missing)}", 0, Counter()
    if not done(layout, generator, shard, [SPLIT]):
        return f"{inputs['gen']}: not complete for the test split (no stats)", 0, Counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    with claim(output) as ours:
        if not ours:
            return "busy", 0, Counter()
        started = time.time()
        try:
            records = [r for r in read_records(inputs["records"]) if r["split"] == SPLIT]
            real = ShardSource(inputs["real"], REAL_META)
            gens = {generator: ShardSource(inputs["gen"], GEN_META)}
        except InputError as exc:
            return str(exc), 0, Counter()
        reasons: Counter = Counter()
        stream = ShardStream(output, d3_features(1))
        try:
            for record in records:
                row, why = paired_row(record, real, gens)
                if row is None:
                    reasons.update(why)
                else:
                    stream.write(row)
            written = stream.commit()
        except BaseException:
            stream.abort()
            raise
        if written is None:
            output.unlink(missing_ok=True)  # a stale file of an earlier, different run of this unit
        write_stats(stats, {
            "shard": shard,
            "generator": generator,
            "records": len(records),
            "written": stream.rows if written else 0,
            "dropped": sum(reasons.values()),
            "dropped_by_reason": dict(sorted(reasons.items())),
            "outputs": {SPLIT: str(output.relative_to(layout.root))} if written else {},
            "inputs": {k: str(p.relative_to(layout.root)) for k, p in inputs.items()},
            "seconds": round(time.time() - started, 3),
        })
        return "joined", stream.rows if written else 0, reasons


def extend(
    manifest: Manifest,
    generators_file: str | Path | None = None,
    names: Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    speed: SpeedOptions | None = None,
    progress: bool = True,
) -> ExtendSummary:
    """Render and join the test records for each extended generator (default: manifest.extended.generators).

    `generators_file` defaults to the manifest's extended.registry; it is loaded together with the
    manifest's own registry files. Every name is checked before any work starts (RegistryError)."""
    speed = speed or SpeedOptions()
    path = Path(generators_file) if generators_file is not None else manifest.extended_registry_path()
    registry = manifest_registry(manifest, path)
    names = list(names) if names else list(manifest.extended.generators)
    if not names:
        raise RegistryError(f"{manifest.path}: extended.generators is empty and no generator was named")
    entries = [registry_entry(registry, name) for name in names]
    for entry in entries:
        check_ready(entry)
    state = process_state()
    summary = ExtendSummary()
    for entry in entries:
        summary.generate[entry.name] = generate_shards(
            manifest, entry.name, registry=registry, batch_size=batch_size, speed=speed, splits=[SPLIT],
            progress=progress,
        )
        state.wait_for_everyone()  # every gen shard is written before any process joins
        joined, already, problems, reasons = [], [], {}, Counter()
        mine = shards_for_process(manifest.layout.record_shards(), state.process_index, state.num_processes)
        for shard in mine:
            result, written, dropped = join_shard(manifest, entry.name, shard)
            if result == "joined":
                joined.append(shard)
            elif result == "done":
                already.append(shard)
            else:
                logger.error("extended shard %d of %s not written: %s", shard, entry.name, result)
                problems[shard] = result
            summary.written[entry.name] += written
            summary.dropped[entry.name] += sum(dropped.values())
            reasons.update(dropped)
        summary.joined[entry.name], summary.already_done[entry.name] = joined, already
        summary.not_joined[entry.name], summary.reasons[entry.name] = problems, reasons
        if isinstance(entry, FolderEntry) and state.is_main_process:
            summary.unmatched[entry.name] = _record_unmatched(manifest, entry)
    return summary


def _record_unmatched(manifest: Manifest, entry: FolderEntry) -> list[str]:
    """The folder's images that match no test record, also written to stats/extend/{g}/unmatched.json."""
    layout = manifest.layout
    test_ids = [r["id"] for k in layout.record_shards() for r in read_records(layout.records(k)) if r["split"] == SPLIT]
    unmatched = unmatched_files(entry, test_ids)
    stats = layout.stats(STAGE, 0, entry.name).parent / "unmatched.json"
    atomic_write_json(stats, {"generator": entry.name, "folder": entry.folder, "index": entry.index,
                              "unmatched": unmatched})
    return unmatched


def list_generators(registry: dict[str, Entry]) -> list[dict[str, str]]:
    """One row per registered generator: name, kind, what it runs, and whether it can run here (and why)."""
    rows = []
    for name, entry in sorted(registry.items()):
        ok, why = availability(entry)
        rows.append({"name": name, "kind": entry.kind, "runs": describe(entry), "here": "yes" if ok else "no",
                     "why": why})
    return rows


def _print_list(manifest: Manifest, generators_file: str | None) -> int:
    path = Path(generators_file) if generators_file is not None else manifest.extended_registry_path()
    rows = list_generators(manifest_registry(manifest, path))
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("name", "kind", "runs", "here")}
    print("  ".join(k.upper().ljust(widths[k]) for k in widths) + "  WHY")
    for row in rows:
        print("  ".join(row[k].ljust(widths[k]) for k in widths) + f"  {row['why']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    try:
        if args.list:
            return _print_list(manifest, args.generators)
        summary = extend(manifest, args.generators, args.only, batch_size=args.batch_size, speed=speed_from_args(args))
    except (RegistryError, ValueError) as exc:
        print(f"d3builder extend: {exc}")
        return 2
    for name, gen in summary.generate.items():
        print_summary(gen)
        print(f"{name}: joined {len(summary.joined[name])} shard(s), {len(summary.already_done[name])} already done; "
              f"{summary.written[name]} test record(s) written, {summary.dropped[name]} dropped")
        for reason, count in sorted(summary.reasons[name].items()):
            print(f"  dropped {reason}: {count}")
        for shard, problem in sorted(summary.not_joined[name].items()):
            print(f"  shard {shard}: NOT written: {problem}")
        if summary.unmatched.get(name):
            files = summary.unmatched[name]
            print(f"  {len(files)} image(s) match no test record: {', '.join(files[:10])}"
                  + (" ..." if len(files) > 10 else ""))
    return 0 if summary.complete else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder extend`."""
    parser = subparsers.add_parser(
        "extend",
        help="render the test records with further generators into extended/{g}/test-{k}.parquet",
        description="For each extended generator: render the test-split records (gen/{g}/{k}.parquet, as "
        "`generate` does) and join them with real/{k}.parquet into extended/{g}/test-{k}.parquet, the final "
        "shard format with one generator slot (gen0). A generator is any registry entry: a diffusers pipeline, a "
        "Python function, an HTTP API or a folder of images made elsewhere (see --list). Resumable; runs under "
        "accelerate launch like generate.",
    )
    add_manifest_args(parser)
    parser.add_argument("--generators", help="registry of the further generators (default: the manifest's "
                        "extended.registry, e.g. manifests/extended.yaml)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these generators (default: the manifest's "
                        "extended.generators)")
    parser.add_argument("--list", action="store_true", help="list every registered generator with its kind, what it "
                        "runs and whether it can run here (weights, API key, importable callable, folder); runs nothing")
    add_speed_args(parser)
    parser.set_defaults(func=_run)
