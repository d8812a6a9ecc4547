"""`validate`: check a finished dataset folder: schemas, counts, pairing, decoding, duplicate ids and leaks.

Given an output root (or a manifest), it also checks completeness: d3/ against records/ and the stats
of every stage, naming each unfinished unit and each record that is neither in d3/ nor dropped for a
recorded reason. A bare d3/ folder has no records to compare with: its output says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from datasets import Features
from tqdm import tqdm

from d3builder.core.commandline import UsageError
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_progress_arg,
    manifest_from_args,
)
from d3builder.storage.card import card_split_counts, in_split_order
from d3builder.storage.completeness import Completeness, check_completeness, has_records
from d3builder.storage.layout import TRANSFORM_STAGE, DataLayout, split_prefix
from d3builder.storage.schema import (
    AUGM_SPLITS,
    SOURCE_SPLIT,
    augm_features,
    d3_features,
    elsa_features,
    generator_slots,
)
from d3builder.storage.shards import (
    DEFAULT_ROW_GROUP_SIZE,
    Defect,
    ShardReport,
    check_rows,
    open_parquet,
    schema_defects,
)
from d3builder.storage.store import Store, open_store

SOURCE_OF = {augm: split for split, augm in AUGM_SPLITS.items()}
"""The split each transformed split copies (test_augm: test, fit_augm: fit): the only one its ids may also be in."""


@dataclass
class ShardCheck(ShardReport):
    """What checking one shard of a dataset found: the shard report, its group, and its model id per generator column."""

    group: str = ""
    models: dict[str, str] = field(default_factory=dict)


@dataclass
class GroupSummary:
    """One line of the summary table: a split (or an extended-test generator)."""

    shards: int = 0
    records: int = 0
    images: int = 0
    defects: int = 0


@dataclass
class ValidationReport:
    """Everything `validate_dataset` found."""

    data_dir: Path
    groups: dict[str, GroupSummary] = field(default_factory=dict)
    defects: list[Defect] = field(default_factory=list)
    completeness: Completeness | None = None
    """None when `data_dir` holds no records/ to compare with (a bare d3/ folder)."""

    @property
    def ok(self) -> bool:
        return not self.defects

    def table(self) -> str:
        """A readable summary table (split, shards, records, images, defects) with a total line."""
        header = ("split", "shards", "records", "images", "defects")
        rows = [(name, g.shards, g.records, g.images, g.defects) for name, g in self.groups.items()]
        rows.append(("total", *(sum(r[i] for r in rows) for i in range(1, 4)), len(self.defects)))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            f"{r[0]:<{widths[0]}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
            for r in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join(lines)

    def completeness_lines(self) -> list[str]:
        """The completeness summary, or why it was not checked."""
        if self.completeness is not None:
            return self.completeness.lines()
        return [
            f"completeness: not checked: {self.data_dir} holds no records/ to compare with (validate the output "
            "root, or pass --manifest, to check every selected record against every stage)"
        ]


def expected_features(names: list[str], group: str) -> tuple[Features, str]:
    """The schema a shard must have, from its columns: ours (d3, test_augm) or the published ELSA one."""
    count = len(generator_slots(names))
    if "image_real" not in names:
        return elsa_features(count), "ELSA_D3"
    if group in SOURCE_OF or "augm_real" in names:
        return augm_features(count), "test_augm"
    return d3_features(count), "d3"


def _slot_defects(check: ShardCheck, names: list[str]) -> None:
    slots = generator_slots(names)
    if slots != list(range(len(slots))):
        check.add(f"generator slots {slots} are not numbered 0..{len(slots) - 1}")
    if not slots:
        check.add("no image_gen{i} column: not a D3 shard")


def check_shard(path: str, group: str, batch_size: int = DEFAULT_ROW_GROUP_SIZE,
                storage_options: dict[str, Any] | None = None) -> ShardCheck:
    """Check one shard alone: schema, pairing, ids unique, one model per generator column, every image decodes.

    `path` is a local path or a URL (opened with `storage_options`)."""
    check = ShardCheck(path, group=group)
    store = open_store(path, storage_options, writable=False)
    parquet = open_parquet(check, store.root, store)
    if parquet is None:
        return check
    names = parquet.schema_arrow.names
    _slot_defects(check, names)
    schema_defects(check, parquet.schema_arrow, *expected_features(names, group))
    slots = generator_slots(names)
    image_columns = (["image_real"] if "image_real" in names else []) + [f"image_gen{s}" for s in slots]
    model_columns = [f"model_gen{s}" for s in slots if f"model_gen{s}" in names]
    split_column = ["split"] if "split" in names and not group.startswith("extended/") else []
    models: dict[str, set[str]] = {c: set() for c in model_columns}

    def pairing(report: ShardReport, row: dict, record: str | None) -> None:
        if split_column and row["split"] != group:
            report.add(f"split is {row['split']!r} in a {group!r} shard", record, "split")
        for column, values in models.items():
            if row[column] is None:
                report.add("no model id", record, column)
            else:
                values.add(row[column])

    check_rows(check, parquet, image_columns, require_images=True, columns=[*split_column, *model_columns],
               row_check=pairing, batch_size=batch_size)
    for column, values in models.items():
        if len(values) > 1:
            check.add(f"not constant within the shard: {sorted(values)}", column=column)
        elif values:
            check.models[column] = next(iter(values))
    return check


def _group_of(path: PurePath, d3_dir: PurePath) -> str:
    return split_prefix(path.stem) or (path.parent.name if path.parent != d3_dir else "data")


def find_shards(store: Store, output_root: bool = False) -> tuple[PurePath, dict[str, list[PurePath]]]:
    """The d3 folder and its shards by group: each split, and `extended/{generator}` beside d3/.

    The store's root is the d3 folder itself unless it holds d3/ or is an output root (`output_root`: records/,
    real/ and gen/ beside d3/ are stage inputs, never checked as splits)."""
    data_dir = store.root
    d3_dir = data_dir / "d3" if output_root or store.isdir(data_dir / "d3") else data_dir
    groups: dict[str, list[PurePath]] = {}
    found = [*store.glob(d3_dir / "*.parquet"), *store.glob(d3_dir / "**" / "*.parquet")]
    for path in sorted(set(found)):
        if not any(part.startswith(".") for part in path.relative_to(d3_dir).parts):
            groups.setdefault(_group_of(path, d3_dir), []).append(path)
    if d3_dir != data_dir:
        for path in store.glob(data_dir / "extended" / "*" / "*.parquet"):
            if not path.parent.name.startswith(".") and not path.name.startswith("."):
                groups.setdefault(f"extended/{path.parent.name}", []).append(path)
    return d3_dir, in_split_order(groups)


def _namespace(group: str) -> str:
    """Ids must be unique within a namespace: the d3 splits together, each transformed split alone, each extended generator."""
    return group if group in SOURCE_OF or group.startswith("extended/") else "d3"


def _source_split(group: str) -> str:
    """The d3 split whose records a group outside the d3 namespace copies: the test split for the extended set."""
    return SOURCE_OF.get(group, SOURCE_SPLIT)


def _cross_shard_defects(checks: list[ShardCheck]) -> list[Defect]:
    """Duplicate ids across shards, copies of records from another split than their source, model columns that change."""
    defects = []
    owner: dict[tuple[str, str], ShardCheck] = {}
    for check in checks:
        for record in check.ids:
            first = owner.setdefault((_namespace(check.group), record), check)
            if first is not check and first.group == check.group:
                defects.append(Defect(check.path, f"duplicate id, also in {first.path}", record, "id"))
            elif first is not check:
                defects.append(
                    Defect(check.path, f"id also in {first.group} ({first.path}): leak between splits", record, "id")
                )
    for check in checks:
        if _namespace(check.group) != "d3":
            d3_owners = ((r, owner.get(("d3", r))) for r in check.ids)
            defects += [
                Defect(check.path, f"held-out record also in {first.path} (leak)", r, "id")
                for r, first in d3_owners
                if first is not None and first.group != _source_split(check.group)
            ]
    reference: dict[str, tuple[str, str]] = {}
    for check in checks:
        if check.group.startswith("extended/"):
            continue
        for column, model in check.models.items():
            first = reference.setdefault(column, (model, check.path))
            if first[0] != model:
                defects.append(Defect(check.path, f"holds {model!r} but {first[1]} holds {first[0]!r}", column=column))
    return defects


def _augm_pairing_defects(checks: list[ShardCheck]) -> list[Defect]:
    """test_augm must hold exactly the test records, fit_augm exactly the fit records (when present)."""
    defects = []
    for split, augm_split in AUGM_SPLITS.items():
        source = {r: c.path for c in checks if c.group == split for r in c.ids}
        augm = {r: c.path for c in checks if c.group == augm_split for r in c.ids}
        if not augm:
            continue
        defects += [
            Defect(path, f"not a record of the {split} split", r, "id") for r, path in augm.items() if r not in source
        ]
        defects += [
            Defect(path, f"has no transformed copy in {augm_split}", r, "id") for r, path in source.items() if r not in augm
        ]
    return defects


def _count_defects(store: Store, d3_dir: PurePath, checks: list[ShardCheck]) -> list[Defect]:
    """Row counts against the dataset card and the stats files of assemble and transform-test."""
    defects = []

    def key(location: str) -> str:
        return str(Path(location).resolve()) if store.local else location

    rows = {key(c.path): c.rows for c in checks}
    per_split: dict[str, int] = {}
    for check in checks:
        per_split[check.group] = per_split.get(check.group, 0) + check.rows
    card = d3_dir / "README.md"
    if store.isfile(card):
        try:
            declared = card_split_counts(card, store)
        except Exception as exc:  # noqa: BLE001 - an unparsable card is a defect
            return [Defect(store.url(card), f"dataset card does not parse: {exc}")]
        for split in sorted(set(declared) | {g for g in per_split if not g.startswith("extended/")}):
            if declared.get(split) != per_split.get(split):
                defects.append(
                    Defect(
                        store.url(card),
                        f"split {split!r}: card says {declared.get(split)} records, shards hold {per_split.get(split)}",
                    )
                )
    root = d3_dir.parent
    covered: set[str] = set()
    assembled = store.glob(root / "stats" / "assemble" / "[0-9]*.json")
    transform_folder = root / "stats" / TRANSFORM_STAGE  # test units' stats; each other split's in a sub-folder
    transformed = [path for split in AUGM_SPLITS for path in store.glob(
        (transform_folder if split == SOURCE_SPLIT else transform_folder / split) / "[0-9]*.json")]
    for stats_path in [*assembled, *transformed]:
        stats = store.read_json(stats_path)
        written = stats.get("written", {})
        written = written if isinstance(written, dict) else dict.fromkeys(stats.get("outputs", {}), written)
        for split, relative in stats.get("outputs", {}).items():
            target = key(store.url(root / relative))
            covered.add(target)
            if target not in rows:
                defects.append(Defect(store.url(root / relative),
                                      f"shard missing, though {store.url(stats_path)} names it"))
            elif rows[target] != written.get(split):
                defects.append(
                    Defect(
                        store.url(root / relative),
                        f"{store.url(stats_path)} says {written.get(split)} records, the shard holds {rows[target]}",
                    )
                )
    if assembled:
        for check in checks:
            if (
                check.group not in ("data",)
                and not check.group.startswith("extended/")
                and key(check.path) not in covered
            ):
                defects.append(Defect(check.path, "no stats file names this shard (unit unfinished?)"))
    return defects


def validate_dataset(
    data_dir: str | Path, workers: int = 1, progress: bool = True, generators: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ValidationReport:
    """Validate a dataset folder or URL (d3/, or the output root holding d3/ and optionally extended/).

    An output root (with records/, on any store) is also checked for completeness; `generators`: the manifest's
    (default: those its stats name).
    """
    store = open_store(data_dir, storage_options, writable=False)
    if not store.isdir(store.root):
        raise FileNotFoundError(f"{data_dir}: no such dataset folder")
    layout = DataLayout(store)
    output_root = has_records(layout)
    d3_dir, groups = find_shards(store, output_root)
    report = ValidationReport(Path(data_dir) if store.local else data_dir)
    if output_root:
        report.completeness = check_completeness(layout, generators)
    gaps = report.completeness.gaps if report.completeness else []
    jobs = [(store.url(path), group) for group, paths in groups.items() for path in paths]
    if not jobs:
        report.defects += [Defect(store.url(d3_dir), "no Parquet shards found"), *gaps]
        return report
    with tqdm(desc=f"validate ({len(jobs)} shards)", unit="record", disable=not progress) as bar:
        checks = []
        for check in _run_checks(jobs, workers, store.storage_options):
            checks.append(check)
            bar.update(check.rows)
    report.defects = [d for c in checks for d in c.defects]
    report.defects += (_cross_shard_defects(checks) + _augm_pairing_defects(checks)
                       + _count_defects(store, d3_dir, checks))
    report.defects += gaps
    group_of = {c.path: c.group for c in checks}
    for check in checks:
        summary = report.groups.setdefault(check.group, GroupSummary())
        summary.shards += 1
        summary.records += check.rows
        summary.images += check.images
    for defect in report.defects:
        if defect.file in group_of:
            report.groups[group_of[defect.file]].defects += 1
    return report


def _run_checks(jobs: list[tuple[str, str]], workers: int,
                storage_options: dict[str, Any] | None) -> Iterable[ShardCheck]:
    if workers <= 1:
        return (check_shard(path, group, storage_options=storage_options) for path, group in jobs)
    executor = ProcessPoolExecutor(max_workers=workers)
    paths, groups = zip(*jobs, strict=True)
    sizes = [DEFAULT_ROW_GROUP_SIZE] * len(paths)
    return _closing(executor, executor.map(check_shard, paths, groups, sizes, [storage_options] * len(paths)))


def _closing(executor: ProcessPoolExecutor, results: Iterable[ShardCheck]) -> Iterable[ShardCheck]:
    with executor:
        yield from results


def _run(args: argparse.Namespace) -> int:
    if args.data is None and args.manifest is None:
        raise UsageError("give the dataset folder (DATA) or --manifest M")
    manifest = manifest_from_args(args) if args.manifest else None
    data = args.data if args.data is not None else manifest.output_root
    try:
        report = validate_dataset(data, workers=args.workers, progress=args.progress,
                                  generators=manifest.generators if manifest else None,
                                  storage_options=manifest.storage_options if manifest else None)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    print(report.table())
    print("\n".join(report.completeness_lines()))
    for defect in report.defects:
        print(f"DEFECT {defect}")
    print("OK: no defect" if report.ok else f"FAILED: {len(report.defects)} defect(s)")
    return 0 if report.ok else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder validate`."""
    parser = subparsers.add_parser(
        "validate",
        help="check a finished dataset folder (schemas, counts, pairing, decoding, duplicate ids, leaks)",
        description="Check every shard of a dataset folder (d3/, or the output root holding d3/ and extended/); "
        "on an output root (or --manifest) also check completeness: d3/ against records/ and every stage's "
        "stats, naming each unfinished unit and unaccounted record. Prints a summary table and each defect "
        "(file, record, column); exits 1 on any defect.",
    )
    parser.add_argument("data", nargs="?", help="the output root (complete check), or a d3/ folder alone "
                        "(a local path or a storage URL; credentials from the environment)")
    add_manifest_args(parser, required=False)
    parser.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel")
    add_progress_arg(parser)
    parser.set_defaults(func=_run)
