"""`select`: stream LAION-format metadata, filter, sample deterministically, split, and write record shards.

Every choice comes from hashes of (SAMPLE_ID, seed), never from file order:

- selection_hash = blake2b(f"{id}:{seed}") as a float in [0, 1); a row is sampled when
  selection_hash < sampling.fraction. Under fraction-only sampling, adding metadata files never
  changes whether an already chosen record is chosen (unless a new file holds a duplicate of it
  with a smaller hash), and its split never changes.
- with sampling.max_records, the max_records smallest hashes win, so added files can displace
  records chosen before.
- duplicates (same SAMPLE_ID, or same URL) are resolved greedily in hash order: the row with the
  smallest (selection_hash, content digest) is kept, later ones are dropped.
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
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import EMBEDDED_SOURCE, SPLITS, Manifest
from d3builder.storage.layout import DataLayout
from d3builder.storage.schema import LAION_COLUMNS, RECORD_FEATURES
from d3builder.storage.shards import write_shard
from d3builder.storage.units import read_stats, write_stats

log = logging.getLogger(__name__)

STAGE = "select"
FILTER_REASONS = (
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

URL_PATTERN = r"^https?://([^\s/?#@]*@)?(\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]]+)(:[0-9]*)?([/?#]|$)"
"""A usable URL: http or https, a non-empty host (name, IPv4 or [IPv6]), an optional numeric port."""

BATCH_ROWS = 65_536
HASH_BITS = 53
"""Selection hashes keep 53 bits so that hash / 2**53 is an exact float in [0, 1)."""

DEDUPE_HEADROOM = 0.1
MIN_DEDUPE_HEADROOM = 1024
"""With max_records, the heap keeps this many candidates beyond the cap to absorb duplicates."""

LAION_ORDER = list(LAION_COLUMNS)
ID, URL, TEXT = 0, 1, 2


class SelectError(ValueError):
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
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The stats file payload."""
        payload = asdict(self)
        payload.pop("skipped")
        payload.update(payload.pop("extra"))
        return payload

    @classmethod
    def from_file(cls, path: Path) -> SelectStats:
        """Read back a stats file written by a previous run (marked as skipped)."""
        payload = read_stats(path)
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

        folder = manifest.layout.root / "embedded"
        write_metadata(folder, embedded_base_url)
        return str(folder)
    return source if "://" in source else str(manifest.resolve(source))


def list_input_files(source: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and sorted parquet files of a path, glob, folder or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(source)
    if any(c in path for c in "*?["):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(".parquet")]
    elif fs.isfile(path):
        files = [path]
    else:
        raise SelectError(f"metadata source {source!r} does not exist")
    files = sorted(files)
    if not files:
        raise SelectError(f"metadata source {source!r} holds no parquet files")
    return fs, files


@dataclass(frozen=True)
class InputFile:
    """One metadata file: its name as the user knows it (with protocol) and its dataset fragment."""

    name: str
    fragment: ds.ParquetFileFragment


def open_inputs(source: str) -> list[InputFile]:
    """Every input file, each checked for every LAION column (error names file and column)."""
    fs, files = list_input_files(source)
    local = isinstance(fs, LocalFileSystem)
    dataset = ds.dataset(files, filesystem=None if local else fs, format="parquet")
    inputs = []
    for fragment in dataset.get_fragments():
        name = fragment.path if local else fs.unstrip_protocol(fragment.path)
        try:
            names = fragment.physical_schema.names
        except (OSError, pa.ArrowInvalid) as exc:
            raise SelectError(f"{name}: not a readable parquet file: {exc}") from exc
        missing = [column for column in LAION_ORDER if column not in names]
        if missing:
            more = f" (also missing: {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
            raise SelectError(f"{name}: missing required LAION column {missing[0]!r}{more}")
        inputs.append(InputFile(name, fragment))
    return inputs


def _read_batches(source: InputFile) -> Iterator[dict[str, pa.Array]]:
    """Stream one file's LAION columns, each cast to its LAION type (error names file and column)."""
    schema = LAION_COLUMNS.arrow_schema
    try:
        for batch in source.fragment.to_batches(columns=LAION_ORDER, batch_size=BATCH_ROWS):
            columns = {}
            for name in LAION_ORDER:
                want = schema.field(name).type
                try:
                    columns[name] = pc.cast(batch.column(name), want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise SelectError(f"{source.name}: column {name!r} cannot be read as {want}: {exc}") from exc
            yield columns
    except (OSError, pa.ArrowInvalid) as exc:
        raise SelectError(f"{source.name}: cannot read: {exc}") from exc


def _true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, nulls read as True (the row fails the check)."""
    return np.asarray(pc.fill_null(mask, True).to_numpy(zero_copy_only=False), dtype=bool)


def filter_masks(columns: dict[str, pa.Array], manifest: Manifest) -> list[tuple[str, np.ndarray]]:
    """One 'fails' mask per filter reason, in FILTER_REASONS order."""
    filters = manifest.filters
    caption = pc.utf8_trim_whitespace(columns["TEXT"])
    length = pc.utf8_length(caption)
    return [
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
            for columns in _read_batches(source):
                n = len(columns["SAMPLE_ID"])
                rows_read += n
                keep = np.ones(n, dtype=bool)
                for reason, fails in filter_masks(columns, manifest):
                    hit = keep & fails
                    dropped[reason] += int(hit.sum())
                    keep &= ~hit
                index = np.flatnonzero(keep)
                ids = pc.take(columns["SAMPLE_ID"], index).to_pylist()
                hashes = _selection_hashes(ids, seed)
                sampled = hashes < limit
                dropped["not_sampled"] += int((~sampled).sum())
                rows = pc.take(pa.table(columns), index[sampled]).to_pylist()
                for h, row in zip(hashes[sampled].tolist(), rows):
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


def record_rows(kept: Sequence[tuple[int, tuple]], shard: int, manifest: Manifest) -> list[dict]:
    """The RECORD_FEATURES rows of one shard, from its (key, LAION values) in selection order."""
    prompts = manifest.prompts
    rows = []
    for key, values in kept:
        laion = dict(zip(LAION_ORDER, values))
        caption = laion["TEXT"].strip()
        rows.append(
            {
                "id": str(laion["SAMPLE_ID"]),
                "url": laion["URL"],
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


def is_selected(layout: DataLayout) -> bool:
    """`select` is done when its stats file and every record shard it lists exist."""
    stats = layout.stats(STAGE, 0)
    if not stats.is_file():
        return False
    shards = int(read_stats(stats).get("shards", -1))
    return shards >= 0 and all(layout.records(k).is_file() for k in range(shards))


def _check_template(manifest: Manifest) -> None:
    """Fail early on a positive template with placeholders other than {caption}."""
    try:
        manifest.prompts.positive_template.format(caption="")
    except (KeyError, IndexError, ValueError) as exc:
        raise SelectError(f"{manifest.path}: prompts.positive_template: only {{caption}} may be used: {exc}") from exc


def select_records(
    manifest: Manifest, embedded_base_url: str | None = None, progress: bool = True, force: bool = False
) -> SelectStats:
    """Run `select` for a manifest (skipped when already done unless `force`); returns its stats."""
    layout = manifest.layout
    stats_path = layout.stats(STAGE, 0)
    if not force and is_selected(layout):
        return SelectStats.from_file(stats_path)
    started = time.monotonic()
    _check_template(manifest)
    source = resolve_source(manifest, embedded_base_url)
    inputs = open_inputs(source)
    max_records = manifest.sampling.max_records
    capacity = None
    if max_records is not None:
        capacity = max_records + max(MIN_DEDUPE_HEADROOM, int(max_records * DEDUPE_HEADROOM))
    passes = 0
    while True:
        passes += 1
        result = scan(inputs, manifest, capacity, progress)
        dropped = Counter(result.dropped)
        kept = deduplicate(result.candidates.in_order(), max_records, dropped)
        if capacity is None or len(kept) == max_records or not result.candidates.discarded:
            break
        log.info(
            "select: %d duplicates among the %d best candidates; rescanning with room for %d",
            capacity - len(kept), capacity, capacity * 2,
        )
        capacity *= 2
    dropped["over_max_records"] += result.candidates.discarded
    size = manifest.shard_size
    num_shards = -(-len(kept) // size)
    split_counts: Counter = Counter()
    stats_path.unlink(missing_ok=True)
    for shard in tqdm(range(num_shards), desc="write records", unit="shard", disable=not progress):
        rows = record_rows(kept[shard * size : (shard + 1) * size], shard, manifest)
        split_counts.update(row["split"] for row in rows)
        write_shard(rows, layout.records(shard), RECORD_FEATURES)
    for stale in layout.record_shards():
        if stale >= num_shards:
            layout.records(stale).unlink()
    stats = SelectStats(
        rows_read=result.rows_read,
        kept=len(kept),
        dropped={reason: dropped[reason] for reason in REASONS},
        splits={name: split_counts[name] for name in SPLITS},
        shards=num_shards,
        input_files=[source.name for source in inputs],
        source=manifest.metadata.source,
        release=manifest.metadata.release,
        duration_s=round(time.monotonic() - started, 3),
        passes=passes,
        extra={
            "manifest": manifest.name,
            "seed": manifest.seed,
            "fraction": manifest.sampling.fraction,
            "max_records": max_records,
            "shard_size": manifest.shard_size,
        },
    )
    write_stats(stats_path, stats.to_dict())
    return stats


def _run(args: argparse.Namespace) -> int:
    """`d3builder select`."""
    manifest = manifest_from_args(args)
    try:
        stats = select_records(manifest, args.embedded_base_url, progress=not args.no_progress, force=args.force)
    except SelectError as exc:
        print(f"d3builder select: error: {exc}")
        return 1
    records = manifest.layout.root / "records"
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
