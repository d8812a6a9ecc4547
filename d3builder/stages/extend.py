"""`extend`: render the test records with further generators into extended/{g}/test-{k}.parquet.

The same machinery as the D3 generators: `generate_shards` (restricted to the test split) writes the
gen/{g}/{k}.parquet intermediate, then each records shard's test records are joined by id with
real/{k}.parquet exactly as `assemble` joins them, into the final shard format with one generator slot
(gen0 = the new generator). Both are units of the unit runner (stats under stats/generate/{g}/ and
stats/extend/{g}/). Readers handle these shards like D3 test shards. Adding a generator is one registry
entry (manifests/extended.yaml) and its name under the manifest's extended.generators; the entry may be of
any kind (diffusers, python, http, folder), and every named entry must be ready to run here before any
work starts.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePath

from d3builder.core.commandline import UsageError
from d3builder.generators.backends import availability, check_ready, describe
from d3builder.generators.backends.folder import unmatched_files
from d3builder.generators.registry import Entry, FolderEntry, RegistryError
from d3builder.generators.render import (
    STAGE as GENERATE,
)
from d3builder.generators.render import (
    SpeedOptions,
    covers,
    generate_shards,
    manifest_registry,
    registry_entry,
)
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_speed_args,
    add_unit_args,
    manifest_from_args,
    report,
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
from d3builder.storage.runner import (
    BadInput,
    RunSummary,
    Unit,
    UnitContext,
    UnitJob,
    UnitWork,
    shards_for_process,
)
from d3builder.storage.schema import d3_features

logger = logging.getLogger(__name__)

STAGE = "extend"
SPLIT = "test"


class JoinJob(UnitJob):
    """extend's unit (g, k): the test records of records/{k} joined with real/{k} and gen/{g}/{k}."""

    stage = STAGE

    def __init__(self, manifest: Manifest, generator: str) -> None:
        super().__init__(manifest.layout)
        self.generator = generator

    def outputs(self, unit: Unit) -> list[PurePath]:
        return [self.layout.extended(self.generator, unit.shard)]

    def input_units(self, unit: Unit) -> list[Unit]:
        return [Unit("fetch-real", unit.shard), Unit(GENERATE, unit.shard, self.generator)]

    def compute(self, ctx: UnitContext) -> UnitWork:
        layout, store, shard, started = self.layout, self.store, ctx.unit.shard, time.time()
        output = self.outputs(ctx.unit)[0]
        inputs = {"records": layout.records(shard), "real": layout.real(shard), "gen": layout.gen(self.generator, shard)}
        missing = [layout.url(p) for p in inputs.values() if not store.isfile(p)]
        if missing:
            raise BadInput(f"missing input: {', '.join(missing)}")
        gen_stats = layout.stats(GENERATE, shard, self.generator)
        if not store.isfile(gen_stats) or not covers(store.read_json(gen_stats), [SPLIT]):
            raise BadInput(f"{layout.url(inputs['gen'])}: not complete for the test split (no stats)")
        try:
            records = [r for r in read_records(inputs["records"], store) if r["split"] == SPLIT]
            real = ShardSource(inputs["real"], REAL_META, store)
            gens = {self.generator: ShardSource(inputs["gen"], GEN_META, store)}
        except InputError as exc:
            raise BadInput(str(exc)) from exc
        reasons: Counter = Counter()
        stream = ctx.stream(output, d3_features(1))
        try:
            for record in records:
                row, why = paired_row(record, real, gens)
                if row is None:
                    reasons.update(why)
                else:
                    stream.write(row)
            written = ctx.commit(stream)
        except BaseException:
            stream.abort()
            raise
        if written is None:
            ctx.remove(output)  # a stale file of an earlier, different run of this unit
        rows = stream.rows if written else 0
        ctx.advance(len(records))
        return UnitWork({
            "shard": shard,
            "generator": self.generator,
            "records": len(records),
            "written": rows,
            "dropped": len(records) - rows,
            "dropped_by_reason": dict(sorted(reasons.items())),
            "outputs": {SPLIT: store.relative(output)} if written else {},
            "inputs": {k: store.relative(p) for k, p in inputs.items()},
            "seconds": round(time.time() - started, 3),
        }, records=len(records), reasons=reasons, counts=Counter({SPLIT: rows}))


def extend(
    manifest: Manifest,
    registry_file: str | Path | None = None,
    names: Sequence[str] | None = None,
    *,
    shards: Sequence[int] | None = None,
    batch_size: int | None = None,
    speed: SpeedOptions | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    wait: bool = True,
    wait_inputs: bool = False,
) -> list[RunSummary]:
    """Render and join the test records for each extended generator (default: manifest.extended.generators).

    Returns the generate and the extend summary of each generator, in order. `registry_file` defaults to
    the manifest's extended.registry; it is loaded together with the manifest's own registry files. Every
    name is checked before any work starts (RegistryError); no records shard is a UsageError. `wait_inputs`
    waits for fetch-real units nobody has started yet (a worker beside fetch-real's)."""
    speed = speed or SpeedOptions()
    path = Path(registry_file) if registry_file is not None else manifest.extended_registry_path()
    registry = manifest_registry(manifest, path)
    names = list(names) if names else list(manifest.extended.generators)
    if not names:
        raise RegistryError(f"{manifest.path}: extended.generators is empty and no generator was named")
    entries = [registry_entry(registry, name) for name in names]
    for entry in entries:
        check_ready(entry)
    every = manifest.layout.wanted_shards(shards)
    # runtime holds the model stack: it loads here, not when the command line starts
    from d3builder.generators.runtime import process_state

    state = process_state()
    summaries = []
    for entry in entries:
        summaries.append(generate_shards(
            manifest, entry.name, registry=registry, shards=every, batch_size=batch_size, speed=speed,
            splits=[SPLIT], progress=progress, retry_failed=retry_failed, wait=wait, wait_inputs=wait_inputs,
        ))
        state.wait_for_everyone()  # every gen shard is written before any process joins
        runner = manifest.runner(progress=progress and state.is_main_process, wait=wait, wait_inputs=wait_inputs,
                                 rank=state.process_index, world=state.num_processes)
        mine = shards_for_process(every, state.process_index, state.num_processes)
        join = runner.run(JoinJob(manifest, entry.name), [Unit(STAGE, k, entry.name) for k in mine], group=entry.name)
        if isinstance(entry, FolderEntry) and state.is_main_process:
            files = record_unmatched(manifest, entry)
            if files:
                join.notes.append(f"{len(files)} image(s) match no test record: {', '.join(files[:10])}"
                                  + (" ..." if len(files) > 10 else ""))
        summaries.append(join)
    return summaries


def record_unmatched(manifest: Manifest, entry: FolderEntry) -> list[str]:
    """The folder's images that match no test record, also written to stats/extend/{g}/unmatched.json."""
    layout = manifest.layout
    test_ids = [r["id"] for k in layout.record_shards() for r in read_records(layout.records(k), layout.store)
                if r["split"] == SPLIT]
    unmatched = unmatched_files(entry, test_ids)
    layout.store.write_json(layout.stats(STAGE, 0, entry.name).parent / "unmatched.json",
                            {"generator": entry.name, "folder": entry.folder, "index": entry.index,
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


def _print_list(manifest: Manifest, registry_file: str | None) -> int:
    path = Path(registry_file) if registry_file is not None else manifest.extended_registry_path()
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
            return _print_list(manifest, args.registry)
        summaries = extend(manifest, args.registry, args.only, shards=args.shards, batch_size=args.batch_size,
                           speed=speed_from_args(args), progress=args.progress, retry_failed=args.retry_failed,
                           wait=args.wait)
    except (RegistryError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return report(*summaries)


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
    parser.add_argument("--registry", help="registry file of the further generators (default: the manifest's "
                        "extended.registry, e.g. manifests/extended.yaml)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these generators (default: the manifest's "
                        "extended.generators)")
    parser.add_argument("--list", action="store_true", help="list every registered generator with its kind, what it "
                        "runs and whether it can run here (weights, API key, importable callable, folder); runs nothing")
    add_unit_args(parser, retry=True)
    add_speed_args(parser)
    parser.set_defaults(func=_run)
