"""`select`: stream LAION-format metadata, filter, sample deterministically, split, and write record shards.

Every choice comes from hashes of (SAMPLE_ID, seed), never from file order:

- selection_hash = blake2b(f"{id}:{seed}") as a float in [0, 1); a row is sampled when
  selection_hash < sampling.fraction. Under fraction-only sampling, adding metadata files never
  changes whether an already chosen record is chosen (unless a new file holds a duplicate of it
  with a smaller hash), and its split never changes.
- with sampling.max_records, the max_records smallest hashes win, so added files can displace
  records chosen before.
- duplicates (same SAMPLE_ID, or same URL) are resolved greedily in hash order: the row with the
  smallest (selection_hash, content digest) is kept, later ones are dropped. The URLs of a kept
  record's dropped same-id rows stay with it as `alternate_urls` (in that order; never a URL another
  record uses, each URL given to one record only, at most MAX_ALTERNATE_URLS), for `fetch-real` to
  try when the first fails.
- a row holding a value that cannot be read as its LAION type (text in a number column, a fraction
  or infinity in an integer column, invalid UTF-8, a negative SAMPLE_ID) is dropped as `bad_value`;
  NaN in an integer column is a missing value, as pandas writes it.
- split = an independent hash of (id, seed, "split") against the cumulative split fractions, in
  SPLITS order (train, fit, validation, test): a recipe that adds `fit` by taking its share from
  train's moves train records only.

Records are ordered by selection hash and cut into `records/{k}.parquet` shards of shard_size.
Input is streamed batch by batch; memory holds only sampled candidates: with max_records a heap of
max_records plus headroom for duplicates (a pass with too many duplicates is rerun with more room),
without it every sampled row (the size of the output).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from d3builder.core.commandline import UsageError
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_progress_arg,
    manifest_from_args,
)
from d3builder.recipe.manifest import EMBEDDED_SOURCE, SPLITS, Manifest
from d3builder.storage.runner import Unit, UnitContext, UnitJob, UnitOutcome, UnitWork
from d3builder.storage.schema import LAION_COLUMNS, MAX_ALTERNATE_URLS, RECORD_FEATURES
from d3builder.storage.sources import (
    URL_PATTERN,
    InputFile,
    SourceError,
    open_parquet_inputs,
)

log = logging.getLogger(__name__)

STAGE = "select"
FILTER_REASONS = (
    "bad_value",
    "null_sample_id",
    "bad_url",
    "nsfw",
    "too_small",
    "low_similarity",
    "empty_caption",
    "caption_too_short",
    "caption_too_long",
)
"""Row filters, in the order they are checked: a row is counted under the first one it fails."""

REASONS = (*FILTER_REASONS, "not_sampled", "duplicate_id", "duplicate_url", "over_max_records")
"""Every reason a row can be dropped, as counted in the stats."""

BATCH_ROWS = 65_536
HASH_BITS = 53
"""Selection hashes keep 53 bits so that hash / 2**53 is an exact float in [0, 1)."""

DEDUPE_HEADROOM = 0.1
MIN_DEDUPE_HEADROOM = 1024
"""With max_records, the heap keeps this many candidates beyond the cap to absorb duplicates."""

LAION_ORDER = list(LAION_COLUMNS)
ID, URL, TEXT = 0, 1, 2
INT64_RANGE = (-(2**63), 2**63)


class SelectError(UsageError, ValueError):
    """The metadata cannot be selected from (the message names the file and the column)."""


@dataclass
class SelectStats:
    """What one `select` run read, kept and dropped."""

    rows_read: int
    kept: int
    dropped: dict[str, int]
    splits: dict[str, int]
    shards: int
    input_files: list[str]
    source: str
    release: str
    duration_s: float
    passes: int = 1
    alternate_urls: int = 0
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stats file payload."""
        payload = asdict(self)
        payload.pop("skipped")
        payload.update(payload.pop("extra"))
        return payload

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> SelectStats:
        """Read back the stats of a previous run (marked as skipped)."""
        names = {f for f in cls.__dataclass_fields__ if f not in ("skipped", "extra")}
        known = {k: v for k, v in payload.items() if k in names}
        return cls(**known, skipped=True, extra={k: v for k, v in payload.items() if k not in names})


def _hash53(text: str) -> int:
    """A stable 53-bit hash (blake2b), never Python's salted hash()."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - HASH_BITS)


def _selection_hashes(sample_ids: list[int], seed: int) -> np.ndarray:
    """`_hash53(f"{id}:{seed}")` for many ids at once (the hot loop of `select`)."""
    blake2b, from_bytes, suffix, shift = hashlib.blake2b, int.from_bytes, b":%d" % seed, 64 - HASH_BITS
    hashes = [from_bytes(blake2b(b"%d%s" % (i, suffix), digest_size=8).digest(), "big") >> shift for i in sample_ids]
    return np.array(hashes, dtype=np.uint64)


def selection_hash(sample_id: int, seed: int) -> float:
    """The hash in [0, 1) that decides sampling and order."""
    return _hash53(f"{sample_id}:{seed}") / 2**HASH_BITS


def split_of(sample_id: int, seed: int, splits: dict[str, float]) -> str:
    """The split of a record: an independent hash against the cumulative fractions (in SPLITS order)."""
    u = _hash53(f"{sample_id}:{seed}:split") / 2**HASH_BITS
    named = [(name, splits.get(name, 0.0)) for name in SPLITS if splits.get(name, 0.0) > 0]
    total = 0.0
    for name, fraction in named:
        total += fraction
        if u < total:
            return name
    return named[-1][0]


def _content_digest(row: tuple) -> int:
    """A 64-bit digest of a whole row: the tie-break between rows sharing a SAMPLE_ID."""
    return int.from_bytes(hashlib.blake2b(repr(row).encode(), digest_size=8).digest(), "big")


def resolve_source(manifest: Manifest, embedded_base_url: str | None) -> str:
    """The metadata location: a path/glob/folder/URL, or the embedded set written under the output root."""
    source = manifest.metadata.source
    if source == EMBEDDED_SOURCE:
        if not embedded_base_url:
            raise SelectError(
                f"{manifest.path}: metadata.source is {EMBEDDED_SOURCE!r}, which needs the URL where the embedded "
                "photos are served: start `d3builder serve-embedded` and pass the URL it prints with "
                "--embedded-base-url"
            )
        from d3builder.embedded.photos import write_metadata

        layout = manifest.layout
        folder = Path(layout.root) / "embedded" if layout.store.local else layout.store.scratch("embedded")
        write_metadata(folder, embedded_base_url)
        return str(folder)
    return source if "://" in source else str(manifest.resolve(source))


def open_inputs(source: str) -> list[InputFile]:
    """Every input file, each checked for every LAION column (error names file and column)."""
    try:
        return open_parquet_inputs(source, LAION_ORDER, "LAION")
    except SourceError as exc:
        raise SelectError(f"metadata source {exc}") from exc


def _convert(value: Any, want: pa.DataType) -> tuple[Any, bool]:
    """One value as a Python value of Arrow type `want`: (value, True), or (None, False) when it cannot be read.

    NaN in an integer column is a missing value (pandas writes missing integers as NaN floats), not a bad one.
    """
    if value is None:
        return None, True
    if isinstance(value, float) and math.isnan(value) and not pa.types.is_floating(want):
        return None, True
    try:
        if pa.types.is_integer(want):
            if isinstance(value, (bytes, str)):
                value = value.strip()
                value = int(value) if value.lstrip("+-").isdigit() else float(value)
            if isinstance(value, float) and not value.is_integer():
                return None, False
            number = int(value)
            return (number, True) if INT64_RANGE[0] <= number < INT64_RANGE[1] else (None, False)
        if pa.types.is_floating(want):
            return float(value), True
        if isinstance(value, bytes):
            return value.decode("utf-8"), True
        return (value, True) if isinstance(value, str) else (str(value), True)
    except (TypeError, ValueError, OverflowError, UnicodeDecodeError):
        return None, False


def cast_column(column: pa.Array, want: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """A column cast to its LAION type and the mask of values that could not be (read as null)."""
    try:
        return pc.cast(column, want), np.zeros(len(column), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    converted = [_convert(value, want) for value in column.to_pylist()]
    return pa.array([value for value, _ in converted], want), np.array([not ok for _, ok in converted], dtype=bool)


def _read_batches(source: InputFile) -> Iterator[tuple[dict[str, pa.Array], np.ndarray]]:
    """Stream one file's LAION columns, each cast to its LAION type, with the mask of rows holding a bad value."""
    schema = LAION_COLUMNS.arrow_schema
    try:
        for batch in source.fragment.to_batches(columns=LAION_ORDER, batch_size=BATCH_ROWS):
            columns, bad = {}, np.zeros(batch.num_rows, dtype=bool)
            for name in LAION_ORDER:
                columns[name], unreadable = cast_column(batch.column(name), schema.field(name).type)
                bad |= unreadable
            bad |= _true(pc.less(columns["SAMPLE_ID"], 0)) & ~_true(pc.is_null(columns["SAMPLE_ID"]))
            yield columns, bad
    except (OSError, pa.ArrowInvalid) as exc:
        raise SelectError(f"{source.name}: cannot read: {exc}") from exc


def _true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls read as True (the row fails the check)."""
    return np.asarray(pc.fill_null(mask, True).to_numpy(zero_copy_only=False), dtype=bool)


def filter_masks(columns: dict[str, pa.Array], bad: np.ndarray, manifest: Manifest) -> list[tuple[str, np.ndarray]]:
    """One 'fails' mask per filter reason, in FILTER_REASONS order (`bad`: rows with an unreadable value)."""
    filters = manifest.filters
    caption = pc.utf8_trim_whitespace(columns["TEXT"])
    length = pc.utf8_length(caption)
    return [
        ("bad_value", bad),
        ("null_sample_id", _true(pc.is_null(columns["SAMPLE_ID"]))),
        ("bad_url", _true(pc.invert(pc.match_substring_regex(columns["URL"], URL_PATTERN, ignore_case=True)))),
        ("nsfw", _true(pc.invert(pc.is_in(columns["NSFW"], pa.array(filters.nsfw, pa.string()))))),
        (
            "too_small",
            _true(pc.or_(pc.less(columns["WIDTH"], filters.min_width), pc.less(columns["HEIGHT"], filters.min_height))),
        ),
        ("low_similarity", _true(pc.invert(pc.greater_equal(columns["similarity"], filters.min_similarity)))),
        ("empty_caption", _true(pc.equal(length, 0))),
        ("caption_too_short", _true(pc.less(length, filters.min_caption_chars))),
        ("caption_too_long", _true(pc.greater(length, filters.max_caption_chars))),
    ]


class Candidates:
    """The sampled rows with the smallest keys: all of them, or a bounded heap when max_records is set."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.items: list[tuple[int, int, tuple]] = []
        """(-key, arrival, row); a min-heap on -key (largest key first) when capacity is set."""
        self.discarded = 0
        self._seq = 0

    def add(self, key: int, row: tuple) -> None:
        """Offer one row; keeps at most `capacity` rows, those with the smallest keys."""
        self._seq += 1
        item = (-key, self._seq, row)
        if self.capacity is None:
            self.items.append(item)
        elif len(self.items) < self.capacity:
            heapq.heappush(self.items, item)
        elif item > self.items[0]:
            heapq.heapreplace(self.items, item)
            self.discarded += 1
        else:
            self.discarded += 1

    def in_order(self) -> list[tuple[int, tuple]]:
        """The kept rows as (key, row), smallest key first."""
        return sorted(((-neg, row) for neg, _, row in self.items), key=lambda item: item[0])


@dataclass
class _Scan:
    """The result of one pass over the input."""

    rows_read: int
    dropped: Counter
    candidates: Candidates


def scan(inputs: Sequence[InputFile], manifest: Manifest, capacity: int | None, progress: bool) -> _Scan:
    """One pass: filter every batch, hash the eligible rows, keep the sampled ones with the smallest keys."""
    seed, fraction = manifest.seed, manifest.sampling.fraction
    limit = fraction * 2**HASH_BITS
    dropped: Counter = Counter()
    candidates = Candidates(capacity)
    rows_read = 0
    total = sum(source.fragment.count_rows() for source in inputs)
    with tqdm(total=total, unit="rows", unit_scale=True, desc="select", disable=not progress) as bar:
        for source in inputs:
            for columns, bad in _read_batches(source):
                n = len(columns["SAMPLE_ID"])
                rows_read += n
                keep = np.ones(n, dtype=bool)
                for reason, fails in filter_masks(columns, bad, manifest):
                    hit = keep & fails
                    dropped[reason] += int(hit.sum())
                    keep &= ~hit
                index = np.flatnonzero(keep)
                ids = pc.take(columns["SAMPLE_ID"], index).to_pylist()
                hashes = _selection_hashes(ids, seed)
                sampled = hashes < limit
                dropped["not_sampled"] += int((~sampled).sum())
                rows = pc.take(pa.table(columns), index[sampled]).to_pylist()
                for h, row in zip(hashes[sampled].tolist(), rows, strict=True):
                    values = tuple(row[name] for name in LAION_ORDER)
                    candidates.add((h << 64) | _content_digest(values), values)
                bar.update(n)
    return _Scan(rows_read, dropped, candidates)


def deduplicate(ordered: list[tuple[int, tuple]], max_records: int | None, dropped: Counter) -> list[tuple[int, tuple]]:
    """Greedy in key order: keep a row unless a kept row has its SAMPLE_ID or URL; stop at max_records."""
    ids, urls = set(), set()
    kept = []
    for position, (key, row) in enumerate(ordered):
        if max_records is not None and len(kept) == max_records:
            dropped["over_max_records"] += len(ordered) - position
            break
        if row[ID] in ids:
            dropped["duplicate_id"] += 1
        elif row[URL] in urls:
            dropped["duplicate_url"] += 1
        else:
            kept.append((key, row))
            ids.add(row[ID])
            urls.add(row[URL])
    return kept


def alternate_urls(ordered: list[tuple[int, tuple]], kept: list[tuple[int, tuple]]) -> dict[int, list[str]]:
    """Each kept SAMPLE_ID's other URLs, from its dropped rows in key order.

    Never a URL that a kept record uses (it would be the same image twice), each URL given to one
    record only, none twice, at most MAX_ALTERNATE_URLS per record.
    """
    primary = {row[ID]: row[URL] for _, row in kept}
    taken = set(primary.values())
    alternates: dict[int, list[str]] = {}
    for _, row in ordered:
        full = len(alternates.get(row[ID], ())) >= MAX_ALTERNATE_URLS
        if row[ID] in primary and row[URL] not in taken and not full:
            alternates.setdefault(row[ID], []).append(row[URL])
            taken.add(row[URL])
    return alternates


def record_rows(
    kept: Sequence[tuple[int, tuple]], shard: int, manifest: Manifest, alternates: dict[int, list[str]]
) -> list[dict]:
    """The RECORD_FEATURES rows of one shard, from its (key, LAION values) in selection order."""
    prompts = manifest.prompts
    rows = []
    for key, values in kept:
        laion = dict(zip(LAION_ORDER, values, strict=True))
        caption = laion["TEXT"].strip()
        rows.append(
            {
                "id": str(laion["SAMPLE_ID"]),
                "url": laion["URL"],
                "alternate_urls": alternates.get(laion["SAMPLE_ID"], []),
                "original_prompt": caption,
                "positive_prompt": prompts.positive_template.format(caption=caption),
                "negative_prompt": prompts.negative,
                "split": split_of(laion["SAMPLE_ID"], manifest.seed, manifest.splits),
                "shard": shard,
                "selection_hash": (key >> 64) / 2**HASH_BITS,
                **laion,
            }
        )
    return rows


def _check_template(manifest: Manifest) -> None:
    """Fail early on a positive template with placeholders other than {caption}."""
    try:
        manifest.prompts.positive_template.format(caption="")
    except (KeyError, IndexError, ValueError) as exc:
        raise SelectError(f"{manifest.path}: prompts.positive_template: only {{caption}} may be used: {exc}") from exc


class SelectJob(UnitJob):
    """select's one unit: every records shard and stats/select/00000.json."""

    stage = STAGE

    def __init__(self, manifest: Manifest, inputs: Sequence[InputFile], progress: bool) -> None:
        super().__init__(manifest.layout)
        self.manifest, self.inputs, self.progress = manifest, inputs, progress
        self.result: SelectStats | None = None

    def cleanup(self, unit: Unit) -> None:
        self.store.remove_temporaries(self.layout.root / "records")

    def compute(self, ctx: UnitContext) -> UnitWork:
        manifest, layout, started = self.manifest, self.layout, time.monotonic()
        ctx.remove(self.stats_path(ctx.unit))  # under --force: the old run is not done while shards are rewritten
        max_records = manifest.sampling.max_records
        capacity = None
        if max_records is not None:
            capacity = max_records + max(MIN_DEDUPE_HEADROOM, int(max_records * DEDUPE_HEADROOM))
        passes = 0
        while True:
            passes += 1
            result = scan(self.inputs, manifest, capacity, self.progress)
            dropped = Counter(result.dropped)
            ordered = result.candidates.in_order()
            kept = deduplicate(ordered, max_records, dropped)
            if capacity is None or len(kept) == max_records or not result.candidates.discarded:
                break
            log.info(
                "select: %d duplicates among the %d best candidates; rescanning with room for %d",
                capacity - len(kept), capacity, capacity * 2,
            )
            capacity *= 2
        dropped["over_max_records"] += result.candidates.discarded
        alternates = alternate_urls(ordered, kept)
        size = manifest.shard_size
        num_shards = -(-len(kept) // size)
        split_counts: Counter = Counter()
        for shard in tqdm(range(num_shards), desc="write records", unit="shard", disable=not self.progress):
            rows = record_rows(kept[shard * size : (shard + 1) * size], shard, manifest, alternates)
            split_counts.update(row["split"] for row in rows)
            ctx.write_shard(rows, layout.records(shard), RECORD_FEATURES)
        for stale in layout.record_shards():
            if stale >= num_shards:
                ctx.remove(layout.records(stale))
        self.result = SelectStats(
            rows_read=result.rows_read,
            kept=len(kept),
            dropped={reason: dropped[reason] for reason in REASONS},
            splits={name: split_counts[name] for name in SPLITS},
            shards=num_shards,
            input_files=[source.name for source in self.inputs],
            source=manifest.metadata.source,
            release=manifest.metadata.release,
            duration_s=round(time.monotonic() - started, 3),
            passes=passes,
            alternate_urls=sum(len(urls) for urls in alternates.values()),
            extra={
                "manifest": manifest.name,
                "seed": manifest.seed,
                "fraction": manifest.sampling.fraction,
                "max_records": max_records,
                "shard_size": manifest.shard_size,
            },
        )
        return UnitWork(self.result.to_dict(), records=len(kept), reasons=Counter(self.result.dropped))


def select_records(
    manifest: Manifest, embedded_base_url: str | None = None, progress: bool = True, force: bool = False
) -> SelectStats:
    """Run `select` for a manifest (skipped when already done unless `force`); returns its stats.

    Raises SelectError (a UsageError) naming the file and column when the metadata cannot be used."""
    runner = manifest.runner(progress=False, force=force)
    unit = Unit(STAGE, 0)
    done = None if force else runner.read_done(SelectJob(manifest, [], progress), unit)
    if done is not None:
        return SelectStats.from_payload(done)
    _check_template(manifest)
    job = SelectJob(manifest, open_inputs(resolve_source(manifest, embedded_base_url)), progress)
    result = runner.run(job, [unit]).results[0]
    if job.result is not None:
        return job.result
    if result.outcome is UnitOutcome.SKIPPED:  # another process selected meanwhile
        return SelectStats.from_payload(manifest.layout.store.read_json(job.stats_path(unit)))
    raise RuntimeError(f"select did not finish: {result.message}")


def _run(args: argparse.Namespace) -> int:
    """`d3builder select`."""
    manifest = manifest_from_args(args)
    stats = select_records(manifest, args.embedded_base_url, progress=args.progress, force=args.force)
    records = manifest.layout.url(manifest.layout.root / "records")
    if stats.skipped:
        print(f"select: already done ({stats.kept} records in {stats.shards} shards under {records}); --force redoes it")
        return 0
    dropped = ", ".join(f"{reason} {count}" for reason, count in stats.dropped.items() if count)
    splits = ", ".join(f"{name} {count}" for name, count in stats.splits.items())
    print(f"select: kept {stats.kept} of {stats.rows_read} rows in {stats.shards} shards under {records} ({splits})")
    print(f"select: dropped: {dropped or 'none'}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `select`."""
    parser = subparsers.add_parser(
        "select",
        help="choose LAION records (filter, sample, split) and write records/{k}.parquet",
        description="Stream LAION-format metadata (path, glob, folder or fsspec URL; or the embedded set), "
        "filter it, sample and split it deterministically from hashes of (SAMPLE_ID, seed), and write "
        "the record shards. A finished run is skipped unless --force.",
    )
    add_manifest_args(parser)
    parser.add_argument("--embedded-base-url", help="base URL printed by `d3builder serve-embedded` (for metadata.source: embedded)")
    parser.add_argument("--force", action="store_true", help="redo the selection even if it is done")
    add_progress_arg(parser)
    parser.set_defaults(func=_run)
