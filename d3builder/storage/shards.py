"""Parquet shard I/O: atomic writes with `datasets` features in the metadata, streaming reads, validation.

Writes go through a `Store` (`d3builder.storage.store`): local by default, any output root's store when given.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image
from PIL import Image as PILImage

from d3builder.storage.store import (  # noqa: F401 - re-exported: codetrain writes its run files with these
    AtomicFile,
    Store,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    open_store,
)

DEFAULT_ROW_GROUP_SIZE = 64
"""Rows per Parquet row group: small, because every row carries several images."""

LOCAL = open_store(".")
"""The store of plain local paths (the default of every function here)."""


def image_cell(data: bytes | None, path: str | None = None) -> dict | None:
    """A value for an `Image` column: struct{bytes, path}, or None for no image."""
    return None if data is None else {"bytes": data, "path": path}


def to_table(rows: Sequence[dict], features: Features) -> pa.Table:
    """Rows (dicts keyed by column) to an Arrow table with the features' schema and metadata."""
    schema = features.arrow_schema
    for index, row in enumerate(rows):
        missing = set(features) - row.keys()
        if missing:
            raise KeyError(f"row {index} (id {row.get('id')!r}) is missing columns {sorted(missing)}")
    return pa.Table.from_pylist([{k: row[k] for k in features} for row in rows], schema=schema)


def write_shard(
    rows_or_table: Sequence[dict] | pa.Table,
    path: PurePath | str,
    features: Features,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    store: Store | None = None,
    guard: Callable[[], None] | None = None,
) -> PurePath:
    """Write one Parquet shard atomically (see Store.atomic_file), features in the schema metadata.

    `guard` runs just before the file becomes visible (a lease check: it raises to abandon the write)."""
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else to_table(rows_or_table, features)
    table = table.select(list(features)).cast(features.arrow_schema)
    store = store or LOCAL
    path = Path(path) if store.local else path
    target = store.atomic_file(path)
    try:
        pq.write_table(table, target.file, row_group_size=row_group_size, compression="zstd")
    except BaseException:
        target.discard()
        raise
    return target.commit(guard)


def read_features(path: str | PurePath, store: Store | None = None) -> Features | None:
    """The `datasets` features stored in a shard's schema metadata, if any."""
    metadata = (store or LOCAL).read_schema(path).metadata or {}
    raw = metadata.get(b"huggingface")
    if raw is None:
        return None
    info = json.loads(raw)
    features = info.get("info", {}).get("features")
    return Features.from_dict(features) if features else None


def iter_rows(
    path: str | PurePath, columns: Sequence[str] | None = None, batch_size: int = DEFAULT_ROW_GROUP_SIZE,
    store: Store | None = None,
) -> Iterator[dict]:
    """Stream a shard's rows as dicts, one record batch at a time (from `store`, default the local disk)."""
    parquet = (store or LOCAL).parquet_file(path)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
        yield from batch.to_pylist()


def decode_image(cell: dict | None) -> PILImage.Image:
    """Decode an `Image` cell fully (raises on a corrupt or bomb image)."""
    if cell is None or cell.get("bytes") is None:
        raise ValueError("no image bytes")
    image = PILImage.open(io.BytesIO(cell["bytes"]))
    image.load()
    return image


@dataclass(frozen=True)
class Defect:
    """One problem, named by file and, where it applies, record id and column."""

    file: str
    message: str
    record: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record!r}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{': '.join(where)}: {self.message}"


@dataclass
class ShardReport:
    """What checking one shard found: rows, images present, the ids in order, and every defect."""

    path: str
    rows: int = 0
    images: int = 0
    ids: list[str] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.defects

    def add(self, message: str, record: str | None = None, column: str | None = None) -> None:
        """Record a defect of this shard."""
        self.defects.append(Defect(self.path, message, record, column))


RowCheck = Callable[[ShardReport, dict, str | None], None]
"""An extra check of one row (the report, the row, its record id) that `check_rows` runs after its own."""


def open_parquet(report: ShardReport, path: PurePath, store: Store) -> pq.ParquetFile | None:
    """The shard's ParquetFile, or None with a defect in `report` when it is not a readable Parquet file."""
    try:
        parquet = store.parquet_file(path)
        parquet.schema_arrow  # noqa: B018 - reading the footer is the check
    except (OSError, pa.ArrowException) as exc:
        report.add(f"not a readable Parquet file: {exc}")
        return None
    return parquet


def schema_defects(report: ShardReport, schema: pa.Schema, expected: Features, kind: str = "expected") -> None:
    """Add a defect for each column of `expected` that the schema lacks or holds with another Arrow type."""
    for name, feature in expected.items():
        if name not in schema.names:
            report.add(f"missing column {name!r} (in the {kind} schema)", column=name)
            continue
        want = Features({name: feature}).arrow_schema.field(name).type
        if schema.field(name).type != want:
            report.add(f"type {schema.field(name).type}, expected {want}", column=name)


def check_rows(
    report: ShardReport,
    parquet: pq.ParquetFile,
    image_columns: Sequence[str],
    decode_images: bool = True,
    require_images: bool = False,
    columns: Sequence[str] = (),
    row_check: RowCheck | None = None,
    batch_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> None:
    """Read every row (ids, images, `columns`): ids present and unique, images decode, missing ones a defect when
    `require_images`; then `row_check`. A shard without an id column is not read (its schema check says why)."""
    if "id" not in parquet.schema_arrow.names:
        return
    seen: set[str] = set()
    try:
        for batch in parquet.iter_batches(batch_size=batch_size, columns=list(dict.fromkeys(["id", *columns, *image_columns]))):
            for row in batch.to_pylist():
                report.rows += 1
                record = row["id"]
                if record is None:
                    report.add(f"row {report.rows - 1} has no id", column="id")
                elif record in seen:
                    report.add(f"duplicate id {record!r} within the shard", record, "id")
                else:
                    seen.add(record)
                    report.ids.append(record)
                if row_check is not None:
                    row_check(report, row, record)
                for column in image_columns:
                    _check_image(report, row[column], record, column, decode_images, require_images)
    except (OSError, pa.ArrowException) as exc:
        report.add(f"unreadable after {report.rows} rows: {exc}")


def _check_image(report: ShardReport, cell: dict | None, record: str | None, column: str, decode: bool,
                 required: bool) -> None:
    if cell is None or cell.get("bytes") is None:
        if required:
            report.add("image missing (record not paired)", record, column)
        return
    report.images += 1
    if decode:
        try:
            decode_image(cell)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a defect to report
            report.add(f"image does not decode: {exc}", record, column)


def validate_shard(path: str | PurePath, expected: Features | None = None, decode_images: bool = True,
                   store: Store | None = None) -> ShardReport:
    """Check a shard: readable, schema as expected, unique ids, every image present decodes."""
    store = store or LOCAL
    report = ShardReport(store.url(PurePath(path)))
    parquet = open_parquet(report, PurePath(path), store)
    if parquet is None:
        return report
    schema = parquet.schema_arrow
    if expected is not None:
        schema_defects(report, schema, expected)
    features = expected or read_features(path, store) or {}
    image_columns = [n for n, f in features.items() if isinstance(f, Image) and n in schema.names]
    check_rows(report, parquet, image_columns, decode_images)
    return report


class ShardStream:
    """Write one shard row group by row group to an atomic file of `store`; `commit` makes it visible."""

    def __init__(self, path: PurePath, features: Features, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 store: Store | None = None, guard: Callable[[], None] | None = None, statistics: bool = True) -> None:
        self.store = store or LOCAL
        self.path = Path(path) if self.store.local else path
        self.features, self.row_group_size, self.guard = features, row_group_size, guard
        self.statistics = statistics
        self.rows = 0
        self._buffer: list[dict] = []
        self._target: AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, row: dict) -> None:
        """Buffer one row; a full buffer is flushed as one row group."""
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self._target = self.store.atomic_file(self.path)
            self._writer = pq.ParquetWriter(self._target.file, self.features.arrow_schema, compression="zstd",
                                            write_statistics=self.statistics)
        self._writer.write_table(to_table(self._buffer, self.features), row_group_size=self.row_group_size)
        self.rows += len(self._buffer)
        self._buffer = []

    def commit(self) -> PurePath | None:
        """Flush and commit (the guard runs first); returns the path, or None when no row was written."""
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        return self._target.commit(self.guard)

    def abort(self) -> None:
        """Drop what was written."""
        if self._writer is not None:
            self._writer.close()
            self._target.discard()


def value_nbytes(value: Any) -> int:
    """An upper bound of the bytes a cell takes in Parquet pages without statistics.

    Binary and text: their length, a 4-byte length prefix and 4 bytes for a dictionary index;
    scalars 8 bytes; nested values the sum of their parts.
    """
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value.encode()) + 8
    if isinstance(value, (bytes, bytearray)):
        return len(value) + 8
    if isinstance(value, dict):
        return sum(value_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(value_nbytes(v) for v in value) + 8
    return 8


def parquet_overhead(features: Features, row: dict) -> tuple[int, int]:
    """(bytes of a file without rows, bytes a row group adds beyond its rows' payload), measured in memory on `row`.

    Measured as `write_sized_shards` writes: zstd, no column statistics.
    """

    def size(rows: list[dict]) -> int:
        buffer = io.BytesIO()
        with pq.ParquetWriter(buffer, features.arrow_schema, compression="zstd", write_statistics=False) as writer:
            if rows:
                writer.write_table(to_table(rows, features))
        return len(buffer.getvalue())

    empty = size([])
    return empty, max(0, size([row]) - empty - value_nbytes(row))


def write_sized_shards(
    rows: Iterable[dict],
    path_of: Callable[[int], Path],
    features: Features,
    max_bytes: int,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> list[Path]:
    """Write rows in order into shards path_of(0), path_of(1), ... of at most `max_bytes` each, each one atomically.

    A shard is closed before the row that would take its size estimate (file overhead,
    row-group overhead and an upper bound of every row's payload) past `max_bytes`; a row
    larger than that on its own gets a shard of its own. Columns outside `features` are
    dropped. No column statistics are written: min/max of image bytes only bloat the footer.
    """
    paths: list[Path] = []
    stream: ShardStream | None = None
    used = count = 0
    base = per_group = 0
    try:
        for raw in rows:
            row = {name: raw[name] for name in features}
            cost = value_nbytes(row)
            if not paths and stream is None:
                base, per_group = parquet_overhead(features, row)
            if stream is not None and base + per_group * -(-(count + 1) // row_group_size) + used + cost > max_bytes:
                paths.append(stream.commit())  # type: ignore[arg-type] - it holds rows
                stream = None
            if stream is None:
                stream, used, count = ShardStream(path_of(len(paths)), features, row_group_size, statistics=False), 0, 0
            stream.write(row)
            used, count = used + cost, count + 1
        if stream is not None:
            paths.append(stream.commit())  # type: ignore[arg-type]
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    return paths
