"""`fetch-real`: each records shard's real images, fetched by img2dataset byte for byte, into `real/{k}.parquet`."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from d3builder.core.commandline import UsageError
from d3builder.download.img2dataset_runner import (
    fetch_rows,
    img2dataset_options,
    img2dataset_version,
)
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_unit_args,
    manifest_from_args,
    report,
)
from d3builder.recipe.manifest import FetchConfig, Manifest
from d3builder.storage.layout import DataLayout, shard_name
from d3builder.storage.runner import (
    BadInput,
    RunSummary,
    Unit,
    UnitContext,
    UnitJob,
    UnitWork,
)
from d3builder.storage.schema import REAL_FEATURES
from d3builder.storage.store import Store

STAGE = "fetch-real"
SUCCESS, FAILED = "success", "failed"
REASON_CHARS = 200

log = logging.getLogger(__name__)

JPEG_FORMATS = {"JPEG", "MPO"}


@dataclass(frozen=True)
class Inspection:
    """What one record's fetched bytes turned out to be (or why there are none)."""

    error: str | None = None
    width: int | None = None
    height: int | None = None
    encoding: str | None = None
    sha256: str | None = None
    num_bytes: int | None = None


def inspect_image(data: bytes | memoryview, max_bytes: int) -> Inspection:
    """Decode `data` with Pillow, decompression-bomb guard on: its size and format, or why it is no usable image.

    JPEGs are decoded at 1/8 scale (libjpeg's DCT scaling): every entropy-coded byte is still decoded, so
    truncated or corrupt data fails exactly as in a full decode, for about half the CPU.
    """
    size, digest = len(data), hashlib.sha256(data).hexdigest()

    def failed(reason: str) -> Inspection:
        return Inspection(error=reason, sha256=digest, num_bytes=size)

    if size == 0:
        return failed("empty response: the server sent no bytes")
    if size > max_bytes:
        return failed(f"too large: {size} bytes, over max_image_bytes={max_bytes}")
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            width, height, encoding = image.width, image.height, image.format
            limit = PILImage.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                return failed(f"decompression bomb guard: {width}x{height} pixels, over Pillow's {limit}")
            if encoding in JPEG_FORMATS:
                image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
            image.load()
            return Inspection(None, width, height, encoding, digest, size)
    except PILImage.DecompressionBombError as exc:
        return failed(f"decompression bomb guard: {exc}")
    except UnidentifiedImageError:
        return failed(f"not an image Pillow can identify: starts with {bytes(data[:16])!r}")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the bytes are no usable image
        return failed(f"image does not decode: {type(exc).__name__}: {exc}")


def failure_reason(message: str) -> str:
    """The part of an error message that names its kind (for counting failures by reason)."""
    return message.split(": ", 1)[0][:REASON_CHARS]


def _cells(column: pa.ChunkedArray) -> list[pa.Array]:
    """Each value of a column as a one-row array sharing its memory."""
    return [chunk.slice(i, 1) for chunk in column.chunks for i in range(len(chunk))]


def _image_column(payloads: list[pa.Array | None]) -> pa.ChunkedArray:
    """The `Image` column from one-row binary arrays (None: no image), one chunk per row, bytes not copied."""
    image_type = REAL_FEATURES.arrow_schema.field("image").type
    no_path = pa.nulls(1, pa.string())
    chunks = [
        pa.nulls(1, image_type)
        if cell is None
        else pa.StructArray.from_arrays([cell, no_path], names=["bytes", "path"])
        for cell in payloads
    ]
    return pa.chunked_array(chunks, type=image_type)


@dataclass
class Fetched:
    """img2dataset's rows as parallel lists, each downloaded image inspected (None where nothing was downloaded)."""

    ids: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    messages: list[str | None] = field(default_factory=list)
    cells: list[pa.Array] = field(default_factory=list)
    inspections: list[Inspection | None] = field(default_factory=list)

    @classmethod
    def concat(cls, parts: Sequence[Fetched]) -> Fetched:
        """Several img2dataset shards' rows as one."""
        return cls(
            *(
                [item for part in parts for item in getattr(part, name)]
                for name in ("ids", "statuses", "messages", "cells", "inspections")
            )
        )


def inspect_rows(rows: pa.Table, max_bytes: int) -> Fetched:
    """Inspect every image img2dataset downloaded in one of its shards (id, status, error_message, bytes)."""
    statuses, cells = rows["status"].to_pylist(), _cells(rows["bytes"])

    def inspect(cell: pa.Array) -> Inspection:
        buffer = cell[0].as_buffer()
        return inspect_image(memoryview(buffer) if buffer is not None else b"", max_bytes)

    downloaded = [j for j, status in enumerate(statuses) if status == SUCCESS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # Pillow decodes without holding the GIL
        inspected = dict(zip(downloaded, pool.map(inspect, (cells[j] for j in downloaded)), strict=True))
    return Fetched(
        rows["id"].to_pylist(),
        statuses,
        rows["error_message"].to_pylist(),
        cells,
        [inspected.get(j) for j in range(len(cells))],
    )


def real_table(records: pa.Table, fetched: Fetched) -> pa.Table:
    """One REAL_FEATURES row per record, in records order: the server's bytes if they decode, else why not."""
    first_row: dict[str, int] = {}
    for j, record_id in enumerate(fetched.ids):
        first_row.setdefault(record_id, j)
    rows = [first_row.get(record_id) for record_id in records["id"].to_pylist()]
    results = []
    for j in rows:
        if j is None:
            results.append(Inspection(error="img2dataset wrote no row for this record"))
        elif fetched.statuses[j] != SUCCESS:
            results.append(Inspection(error=fetched.messages[j] or fetched.statuses[j]))
        else:
            results.append(fetched.inspections[j])
    column = {
        name: [getattr(r, name) for r in results] for name in ("width", "height", "encoding", "sha256", "num_bytes")
    }
    return pa.table(
        {
            "id": records["id"],
            "url": records["url"],
            "status": pa.array([SUCCESS if r.error is None else FAILED for r in results], pa.string()),
            "error_message": pa.array([r.error for r in results], pa.string()),
            "image": _image_column(
                [fetched.cells[j] if r.error is None else None for j, r in zip(rows, results, strict=True)]
            ),
            "width": pa.array(column["width"], pa.int64()),
            "height": pa.array(column["height"], pa.int64()),
            "encoding": pa.array(column["encoding"], pa.string()),
            "sha256": pa.array(column["sha256"], pa.string()),
            "num_bytes": pa.array(column["num_bytes"], pa.int64()),
        }
    )


def merge_retry(old: pa.Table, new: pa.Table) -> pa.Table:
    """`old` with each row whose id is in `new` replaced by `new`'s row, order kept, other rows untouched."""
    schema = REAL_FEATURES.arrow_schema
    old, new = old.select(list(REAL_FEATURES)).cast(schema), new.select(list(REAL_FEATURES)).cast(schema)
    replacement = {record_id: j for j, record_id in enumerate(new["id"].to_pylist())}
    pieces, start = [], 0
    for i, record_id in enumerate(old["id"].to_pylist()):
        j = replacement.get(record_id)
        if j is None:
            continue
        pieces.extend([old.slice(start, i - start), new.slice(j, 1)])
        start = i + 1
    pieces.append(old.slice(start))
    return pa.concat_tables(pieces)


def shard_counts(table: pa.Table) -> dict[str, Any]:
    """Successes, failures by reason, encodings and bytes of one real shard."""
    statuses, messages = table["status"].to_pylist(), table["error_message"].to_pylist()
    encodings, sizes = table["encoding"].to_pylist(), table["num_bytes"].to_pylist()
    ok = [s == SUCCESS for s in statuses]
    return {
        "records": table.num_rows,
        "successes": sum(ok),
        "failures": len(ok) - sum(ok),
        "failures_by_reason": dict(
            Counter(failure_reason(m or "unknown") for m, good in zip(messages, ok, strict=True) if not good)
        ),
        "encodings": dict(Counter(e for e, good in zip(encodings, ok, strict=True) if good)),
        "bytes": sum(n for n, good in zip(sizes, ok, strict=True) if good),
    }


def read_records(store: Store, path: PurePath) -> pa.Table:
    """A records shard's (id, url), checked for duplicate ids (BadInput naming the file otherwise)."""
    if not store.isfile(path):
        raise BadInput(f"no records shard {store.url(path)} (run select)")
    try:
        records = store.read_table(path, columns=["id", "url"])
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"{store.url(path)}: unreadable records shard: {exc}") from exc
    ids = records["id"].to_pylist()
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise BadInput(f"{store.url(path)}: record id {duplicate!r} appears more than once")
    return records


@contextmanager
def work_dir(layout: DataLayout, shard: int) -> Iterator[Path]:
    """A fresh local folder for one shard's img2dataset run (under the root, or TMPDIR for URLs), deleted after."""
    path = layout.store.scratch(STAGE, f"{shard_name(shard)}-{os.getpid()}")
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def download(layout: DataLayout, shard: int, rows: pa.Table, fetch: FetchConfig, progress: bool) -> pa.Table:
    """`rows` (id, url) as REAL_FEATURES rows, fetched by img2dataset in a temporary folder that is removed after."""
    if rows.num_rows == 0:
        return real_table(rows, Fetched())
    with work_dir(layout, shard) as folder:
        parts = fetch_rows(
            rows, folder, fetch, functools.partial(inspect_rows, max_bytes=fetch.max_image_bytes), progress
        )
    return real_table(rows, Fetched.concat(parts))


def _work(counts: dict[str, Any], stats: dict[str, Any], records: int) -> UnitWork:
    """A unit's work: download failures are recorded by reason but are not failed work (link rot is data)."""
    return UnitWork(stats, records=records, reasons=Counter(counts["failures_by_reason"]),
                    counts=Counter(fetched=counts["successes"], not_fetched=counts["failures"]))


class FetchJob(UnitJob):
    """fetch-real's unit k: records/{k} -> real/{k}; --retry-failed downloads a done shard's failures again."""

    stage, item = STAGE, "url"

    def __init__(self, layout: DataLayout, fetch: FetchConfig, progress: bool) -> None:
        super().__init__(layout)
        self.fetch, self.progress = fetch, progress

    def outputs(self, unit: Unit) -> list[PurePath]:
        return [self.layout.real(unit.shard)]

    def size(self, unit: Unit) -> int:
        path = self.layout.records(unit.shard)
        return self.store.parquet_file(path).metadata.num_rows if self.store.isfile(path) else 0

    def retryable(self, stats: dict[str, Any]) -> bool:
        return stats.get("failures", 0) > 0

    def cleanup(self, unit: Unit) -> None:
        """img2dataset folders a killed run of this shard left."""
        for folder in self.store.scratch(STAGE).glob(f"{shard_name(unit.shard)}-*"):
            shutil.rmtree(folder, ignore_errors=True)

    def compute(self, ctx: UnitContext) -> UnitWork:
        """Fetch every record of the shard, write `real/{k}.parquet`; the runner writes the stats last."""
        layout, shard, start = self.layout, ctx.unit.shard, time.time()
        records = read_records(self.store, layout.records(shard))
        table = download(layout, shard, records, self.fetch, self.progress)
        ctx.write_shard(table, layout.real(shard), REAL_FEATURES)
        seconds = time.time() - start
        counts = shard_counts(table)
        ctx.advance(records.num_rows)
        log.info("shard %s: %d/%d fetched in %.1f s", shard_name(shard), counts["successes"], counts["records"], seconds)
        return _work(counts, {
            "shard": shard,
            **counts,
            "duration_s": seconds,
            "urls_per_s": records.num_rows / seconds if seconds > 0 else None,
            "img2dataset_version": img2dataset_version(),
            "img2dataset_options": img2dataset_options(self.fetch, records.num_rows),
            "retries": [],
        }, records.num_rows)

    def retry(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        """Fetch a done shard's failed records again and rewrite it, successes kept as they were."""
        layout, shard, start = self.layout, ctx.unit.shard, time.time()
        output = layout.real(shard)
        old = self.store.read_table(output)
        failed = old.filter(pc.equal(old["status"], FAILED)).select(["id", "url"])
        new = download(layout, shard, failed, self.fetch, self.progress)
        merged = merge_retry(old, new)
        ctx.write_shard(merged, output, REAL_FEATURES)
        seconds = time.time() - start
        counts = shard_counts(merged)
        attempt = {
            "retried": failed.num_rows,
            "recovered": counts["successes"] - stats.get("successes", 0),
            "duration_s": seconds,
            "urls_per_s": failed.num_rows / seconds if seconds > 0 else None,
            "img2dataset_version": img2dataset_version(),
            "at": time.time(),
        }
        ctx.advance(failed.num_rows)
        log.info("shard %s: retried %d, recovered %d", shard_name(shard), failed.num_rows, attempt["recovered"])
        return _work(counts, {**stats, **counts, "retries": [*stats.get("retries", []), attempt]}, failed.num_rows)


def fetch_real(
    manifest: Manifest, shards: Sequence[int] | None = None, retry_failed: bool = False, progress: bool = True,
    wait: bool = True,
) -> RunSummary:
    """Fetch the real images of every records shard (or of `shards`) not done yet; `retry_failed` retries failures.

    Raises UsageError when there is no records shard at all (run select first)."""
    layout = manifest.layout
    wanted = layout.record_shards() if shards is None else sorted(set(shards))
    if not wanted:
        raise UsageError(f"no records shards under {layout.url(layout.root / 'records')}: run `d3builder select` first")
    runner = manifest.runner(retry_failed=retry_failed, progress=progress, wait=wait)
    return runner.run(FetchJob(layout, manifest.fetch, progress), [Unit(STAGE, k) for k in wanted])


def run(args: argparse.Namespace) -> int:
    """The `fetch-real` subcommand."""
    manifest = manifest_from_args(args)
    summary = fetch_real(manifest, shards=args.shards, retry_failed=args.retry_failed, progress=args.progress,
                         wait=args.wait)
    counts = summary.counts
    code = report(summary)
    if summary.records:
        print(f"fetch-real: the shards written now hold {counts['fetched']} fetched and {counts['not_fetched']} "
              "failed downloads (recorded with their reason; `--retry-failed` tries them again)")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder fetch-real`."""
    parser = subparsers.add_parser(
        "fetch-real",
        help="download the real images with img2dataset (original bytes) into real/{k}.parquet",
        description="Download each records shard's images with img2dataset, keeping the bytes the server sent, "
        "into real/{k}.parquet with a status and reason per record; done shards are skipped.",
    )
    add_manifest_args(parser)
    add_unit_args(parser, retry=True)
    parser.set_defaults(func=run)
