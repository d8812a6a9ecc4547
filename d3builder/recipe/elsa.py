"""Records from the published ELSA_D3 parquet: its `id`, `url` and prompts as record shards for `fetch-real`.

Only those columns are read (Parquet column projection: the image columns, nearly all of the bytes, are
never fetched). Rows without a usable id or URL are dropped and counted; a duplicated id keeps its first
row and its other rows' URLs as `alternate_urls`. The split comes from the file name (`train-*`, `val-*`).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from d3builder.storage.layout import DataLayout, safe_name
from d3builder.storage.schema import LAION_COLUMNS, MAX_ALTERNATE_URLS, RECORD_FEATURES
from d3builder.storage.shards import write_shard
from d3builder.storage.sources import (
    URL_PATTERN,
    InputFile,
    SourceError,
    open_parquet_inputs,
)
from d3builder.storage.units import read_stats, write_stats

STATS_STAGE = "select"
"""The record source's stats live where `select` writes its own: there is one record source per output root."""
SOURCE_KIND = "ELSA_D3"
REQUIRED = ("id", "url")
PROMPTS = ("original_prompt", "positive_prompt", "negative_prompt")
REASONS = ("null_id", "unsafe_id", "bad_url", "duplicate_id")
"""Every reason a published row yields no record, as counted in the stats."""
BATCH_ROWS = 65_536
DEFAULT_SHARD_SIZE = 5000
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
SPLIT_OF_PREFIX = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
_FILE_SPLIT = re.compile(r"^([A-Za-z_]+)-\d")


class ElsaError(ValueError):
    """The ELSA_D3 source cannot be read, or the output root holds records of another source."""


def resolve_source(source: str) -> str:
    """A local path or fsspec URL as given; a hub repo id (`elsaEU/ELSA_D3`) as its `hf://datasets/` URL."""
    if "://" in source or Path(source).expanduser().exists():
        return source
    if REPO_ID.fullmatch(source):
        return f"hf://datasets/{source}"
    raise ElsaError(f"{source}: no such file or folder, and not a hub dataset id (owner/name)")


def split_of_file(name: str) -> str | None:
    """The split a published file holds, from its name (`train-00000-of-00002.parquet` -> train, `val-*` -> validation)."""
    match = _FILE_SPLIT.match(Path(name).name)
    return SPLIT_OF_PREFIX.get(match.group(1).lower()) if match else None


@dataclass
class ElsaRecords:
    """What reading the published parquet kept and dropped."""

    source: str
    rows_read: int = 0
    kept: int = 0
    shards: int = 0
    dropped: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    alternate_urls: int = 0
    input_files: list[str] = field(default_factory=list)
    skipped: bool = False

    def describe(self, layout: DataLayout) -> str:
        """One line for the command line."""
        if self.skipped:
            return f"ELSA_D3 records: already read ({self.kept} records in {self.shards} shards under {layout.root / 'records'})"
        splits = ", ".join(f"{name} {count}" for name, count in sorted(self.splits.items())) or "none"
        dropped = ", ".join(f"{reason} {self.dropped[reason]}" for reason in REASONS if self.dropped[reason]) or "none"
        return (
            f"ELSA_D3 records: kept {self.kept} of {self.rows_read} rows in {self.shards} shards under "
            f"{layout.root / 'records'} ({splits}); dropped: {dropped}; {self.alternate_urls} alternate URL(s)"
        )

    def stats(self, shard_size: int, seconds: float) -> dict[str, Any]:
        """The stats file payload."""
        return {
            "record_source": SOURCE_KIND,
            "source": self.source,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "dropped": {reason: self.dropped[reason] for reason in REASONS},
            "splits": dict(sorted(self.splits.items())),
            "shards": self.shards,
            "shard_size": shard_size,
            "alternate_urls": self.alternate_urls,
            "input_files": self.input_files,
            "duration_s": round(seconds, 3),
        }


def _batches(source: InputFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    try:
        yield from source.fragment.to_batches(columns=columns, batch_size=BATCH_ROWS)
    except (OSError, pa.ArrowException) as exc:
        raise ElsaError(f"{source.name}: cannot read: {exc}") from exc


def _strings(batch: pa.RecordBatch, name: str, source: InputFile) -> list[str | None]:
    try:
        return pc.cast(batch.column(name), pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ElsaError(f"{source.name}: column {name!r} cannot be read as text: {exc}") from exc


def _row_problem(record_id: str | None, url_ok: bool) -> str | None:
    if record_id is None:
        return "null_id"
    try:
        safe_name(record_id, "record id")
    except ValueError:
        return "unsafe_id"
    return None if url_ok else "bad_url"


def _first_rows(inputs: list[InputFile], result: ElsaRecords) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Pass 1 over (id, url): which rows become records (the first usable row of each id) and each id's other URLs."""
    keep: list[np.ndarray] = []
    first_url: dict[str, str] = {}
    alternates: dict[str, list[str]] = {}
    for source in inputs:
        for batch in _batches(source, list(REQUIRED)):
            ids, urls = _strings(batch, "id", source), _strings(batch, "url", source)
            url_ok = pc.fill_null(pc.match_substring_regex(batch.column("url").cast(pa.string()), URL_PATTERN,
                                                           ignore_case=True), False).to_pylist()
            mask = np.zeros(len(ids), dtype=bool)
            for j, (record_id, url, ok) in enumerate(zip(ids, urls, url_ok, strict=True)):
                result.rows_read += 1
                problem = _row_problem(record_id, ok)
                if problem is None and record_id in first_url:
                    problem = "duplicate_id"
                    others = alternates.setdefault(record_id, [])
                    if url != first_url[record_id] and url not in others and len(others) < MAX_ALTERNATE_URLS:
                        others.append(url)
                if problem is not None:
                    result.dropped[problem] += 1
                    continue
                first_url[record_id] = url
                mask[j] = True
            keep.append(mask)
    return (np.concatenate(keep) if keep else np.zeros(0, dtype=bool)), alternates


def _record_row(values: dict[str, Any], split: str | None, shard: int, alternates: list[str]) -> dict[str, Any]:
    """A RECORD_FEATURES row from one published row: prompts as published, LAION columns unknown but the id/url."""
    record_id = values["id"]
    row = dict.fromkeys(LAION_COLUMNS)
    sample_id = int(record_id) if record_id.isdigit() and len(record_id) < 19 else None
    row.update(SAMPLE_ID=sample_id, URL=values["url"], TEXT=values.get("original_prompt"))
    row.update(
        id=record_id, url=values["url"], alternate_urls=alternates, split=split, shard=shard, selection_hash=None,
        **{name: values.get(name) for name in PROMPTS},
    )
    return row


def ingest_elsa(source: str, layout: DataLayout, shard_size: int = DEFAULT_SHARD_SIZE) -> ElsaRecords:
    """Write `records/{k}.parquet` from the published ELSA_D3 parquet at `source` (skipped when done from the same source)."""
    url = resolve_source(source)
    stats_path = layout.stats(STATS_STAGE, 0)
    if stats_path.is_file():
        previous = read_stats(stats_path)
        if previous.get("source") != url:
            raise ElsaError(
                f"{layout.root} already holds records of {previous.get('source')!r}: use another --output-root"
            )
        if all(layout.records(k).is_file() for k in range(int(previous.get("shards", 0)))):
            return ElsaRecords(url, previous["rows_read"], previous["kept"], previous["shards"],
                               Counter(previous["dropped"]), Counter(previous["splits"]), previous["alternate_urls"],
                               previous["input_files"], skipped=True)
    started = time.monotonic()
    try:
        inputs = open_parquet_inputs(url, REQUIRED, SOURCE_KIND)
    except SourceError as exc:
        raise ElsaError(f"ELSA_D3 source {exc}") from exc
    result = ElsaRecords(url, input_files=[source.name for source in inputs])
    keep, alternates = _first_rows(inputs, result)
    pending: list[dict[str, Any]] = []
    position = 0
    for source in inputs:
        split = split_of_file(source.name)
        names = source.fragment.physical_schema.names
        for batch in _batches(source, [*REQUIRED, *(p for p in PROMPTS if p in names)]):
            kept = keep[position : position + batch.num_rows]
            position += batch.num_rows
            columns = {name: _strings(batch, name, source) for name in batch.schema.names}
            for j in np.flatnonzero(kept):
                values = {name: column[j] for name, column in columns.items()}
                pending.append(_record_row(values, split, result.shards, alternates.get(values["id"], [])))
                result.splits[split or "unknown"] += 1
                if len(pending) == shard_size:
                    _write(layout, result, pending)
    if pending:
        _write(layout, result, pending)
    for stale in layout.record_shards():
        if stale >= result.shards:
            layout.records(stale).unlink()  # left by an earlier run cut into more shards
    result.alternate_urls = sum(len(urls) for urls in alternates.values())
    write_stats(stats_path, result.stats(shard_size, time.monotonic() - started))
    return result


def _write(layout: DataLayout, result: ElsaRecords, rows: list[dict[str, Any]]) -> None:
    """Write one records shard from `rows` and empty the list."""
    write_shard(rows, layout.records(result.shards), RECORD_FEATURES)
    result.kept += len(rows)
    result.shards += 1
    rows.clear()
