"""Parquet shard I/O: atomic writes with `datasets` features in the metadata, streaming reads, validation."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image
from PIL import Image as PILImage

DEFAULT_ROW_GROUP_SIZE = 64
"""Rows per Parquet row group: small, because every row carries several images."""


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to a temporary sibling, fsync, and rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write a JSON document atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


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
    path: str | Path,
    features: Features,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
) -> Path:
    """Write one Parquet shard atomically (temp name, fsync, rename), features in the schema metadata."""
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else to_table(rows_or_table, features)
    table = table.select(list(features)).cast(features.arrow_schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, row_group_size=row_group_size, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def read_features(path: str | Path) -> Features | None:
    """The `datasets` features stored in a shard's schema metadata, if any."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(b"huggingface")
    if raw is None:
        return None
    info = json.loads(raw)
    features = info.get("info", {}).get("features")
    return Features.from_dict(features) if features else None


def iter_rows(
    path: str | Path, columns: Sequence[str] | None = None, batch_size: int = DEFAULT_ROW_GROUP_SIZE
) -> Iterator[dict]:
    """Stream a shard's rows as dicts, one record batch at a time."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
        yield from batch.to_pylist()


def decode_image(cell: dict | None) -> PILImage.Image:
    """Decode an `Image` cell fully (raises on a corrupt or bomb image)."""
    if cell is None or cell.get("bytes") is None:
        raise ValueError("no image bytes")
    image = PILImage.open(io.BytesIO(cell["bytes"]))
    image.load()
    return image


@dataclass
class ShardReport:
    """What `validate_shard` found in one shard."""

    path: str
    rows: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_shard(path: str | Path, expected: Features | None = None, decode_images: bool = True) -> ShardReport:
    """Check a shard: readable, schema as expected, unique ids, every image decodes."""
    report = ShardReport(str(path))
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        report.errors.append(f"{path}: not a readable Parquet file: {exc}")
        return report
    if expected is not None:
        for name, feature in expected.items():
            if name not in schema.names:
                report.errors.append(f"{path}: missing column {name!r}")
                continue
            want = Features({name: feature}).arrow_schema.field(name).type
            if schema.field(name).type != want:
                report.errors.append(f"{path}: column {name!r} has type {schema.field(name).type}, expected {want}")
    image_columns = [n for n, f in (expected or read_features(path) or {}).items() if isinstance(f, Image)]
    image_columns = [n for n in image_columns if n in schema.names]
    seen: set[str] = set()
    for row in iter_rows(path, ["id", *image_columns] if "id" in schema.names else image_columns):
        report.rows += 1
        record = row.get("id", f"row {report.rows - 1}")
        if "id" in row:
            if record in seen:
                report.errors.append(f"{path}: duplicate id {record!r}")
            seen.add(record)
        if decode_images:
            for column in image_columns:
                if row[column] is None:
                    continue
                try:
                    decode_image(row[column])
                except Exception as exc:  # noqa: BLE001 - any decoder failure is a defect to report
                    report.errors.append(f"{path}: record {record!r} column {column!r}: image does not decode: {exc}")
    return report


class ShardStream:
    """Write one shard row group by row group to a hidden temporary sibling; `commit` renames it into place."""

    def __init__(self, path: Path, features: Features, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
        self.path, self.features, self.row_group_size = path, features, row_group_size
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.rows = 0
        self._buffer: list[dict] = []
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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.features.arrow_schema, compression="zstd")
        self._writer.write_table(to_table(self._buffer, self.features), row_group_size=self.row_group_size)
        self.rows += len(self._buffer)
        self._buffer = []

    def commit(self) -> Path | None:
        """Flush, fsync and rename into place; returns the path, or None when no row was written."""
        self._flush()
        if self._writer is None:
            return None
        self._writer.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file."""
        if self._writer is not None:
            self._writer.close()
        self.tmp.unlink(missing_ok=True)
