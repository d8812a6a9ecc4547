"""`fetch-real`: each records shard's real images, fetched by img2dataset byte for byte, into `real/{k}.parquet`."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from d3builder.download.img2dataset_runner import (
    fetch_rows,
    img2dataset_options,
    img2dataset_version,
)
from d3builder.imaging.inspection import Inspection, inspect_image
from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import FetchConfig, Manifest
from d3builder.storage.layout import DataLayout, shard_name
from d3builder.storage.schema import REAL_FEATURES
from d3builder.storage.shards import write_shard
from d3builder.storage.units import claim, is_done, read_stats, write_stats

STAGE = "fetch-real"
SUCCESS, FAILED = "success", "failed"
REASON_CHARS = 200

log = logging.getLogger(__name__)

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


def read_records(path: Path) -> pa.Table:
    """A records shard's (id, url), checked for duplicate ids."""
    records = pq.read_table(path, columns=["id", "url"])
    ids = records["id"].to_pylist()
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"{path}: record id {duplicate!r} appears more than once")
    return records


def remove_leftovers(layout: DataLayout, shard: int) -> None:
    """Delete what a killed run on `shard` left: its img2dataset folder and any half-written shard (claim held)."""
    for folder in (layout.root / ".tmp" / STAGE).glob(f"{shard_name(shard)}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    output = layout.real(shard)
    for partial in output.parent.glob(f".{output.name}.tmp-*"):
        partial.unlink(missing_ok=True)


@contextmanager
def work_dir(layout: DataLayout, shard: int) -> Iterator[Path]:
    """A fresh temporary folder for one shard's img2dataset run, deleted after."""
    path = layout.root / ".tmp" / STAGE / f"{shard_name(shard)}-{os.getpid()}"
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


@dataclass
class ShardOutcome:
    """What happened to one shard in this run."""

    action: str
    counts: dict[str, Any] = field(default_factory=dict)


def fetch_shard(layout: DataLayout, shard: int, fetch: FetchConfig, progress: bool) -> ShardOutcome:
    """Fetch every record of shard `shard`, write `real/{k}.parquet`, then its stats (the done marker)."""
    start = time.time()
    records = read_records(layout.records(shard))
    table = download(layout, shard, records, fetch, progress)
    write_shard(table, layout.real(shard), REAL_FEATURES)
    seconds = time.time() - start
    counts = shard_counts(table)
    write_stats(
        layout.stats(STAGE, shard),
        {
            "stage": STAGE,
            "shard": shard,
            **counts,
            "duration_s": seconds,
            "urls_per_s": records.num_rows / seconds if seconds > 0 else None,
            "img2dataset_version": img2dataset_version(),
            "img2dataset_options": img2dataset_options(fetch, records.num_rows),
            "retries": [],
        },
    )
    log.info("shard %s: %d/%d fetched in %.1f s", shard_name(shard), counts["successes"], counts["records"], seconds)
    return ShardOutcome("fetched", counts)


def retry_shard(layout: DataLayout, shard: int, fetch: FetchConfig, progress: bool) -> ShardOutcome:
    """Fetch a done shard's failed records again and rewrite it, successes kept as they were."""
    start = time.time()
    output, stats_path = layout.real(shard), layout.stats(STAGE, shard)
    old = pq.read_table(output)
    failed = old.filter(pc.equal(old["status"], FAILED)).select(["id", "url"])
    if failed.num_rows == 0:
        return ShardOutcome("skipped")
    new = download(layout, shard, failed, fetch, progress)
    merged = merge_retry(old, new)
    write_shard(merged, output, REAL_FEATURES)
    seconds = time.time() - start
    stats = read_stats(stats_path)
    counts = shard_counts(merged)
    attempt = {
        "retried": failed.num_rows,
        "recovered": counts["successes"] - stats.get("successes", 0),
        "duration_s": seconds,
        "urls_per_s": failed.num_rows / seconds if seconds > 0 else None,
        "img2dataset_version": img2dataset_version(),
        "at": time.time(),
    }
    write_stats(stats_path, {**stats, **counts, "retries": [*stats.get("retries", []), attempt]})
    log.info("shard %s: retried %d, recovered %d", shard_name(shard), failed.num_rows, attempt["recovered"])
    return ShardOutcome("retried", counts)


def process_shard(
    layout: DataLayout, shard: int, fetch: FetchConfig, retry_failed: bool, progress: bool
) -> ShardOutcome:
    """Fetch shard `shard` unless done (or retry its failures), under a claim so no two processes do it."""
    if not layout.records(shard).is_file():
        raise FileNotFoundError(f"no records shard {layout.records(shard)}")
    output, stats = layout.real(shard), layout.stats(STAGE, shard)
    if is_done(output, stats) and not retry_failed:
        return ShardOutcome("skipped")
    with claim(output) as mine:
        if not mine:
            return ShardOutcome("busy")
        remove_leftovers(layout, shard)
        if not is_done(output, stats):
            return fetch_shard(layout, shard, fetch, progress)
        if retry_failed:
            return retry_shard(layout, shard, fetch, progress)
        return ShardOutcome("skipped")


@dataclass
class FetchSummary:
    """What one `fetch_real` call did: shards per action, and the records of the shards it wrote."""

    fetched: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    records: int = 0
    successes: int = 0
    failures: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, shard: int, outcome: ShardOutcome) -> None:
        """Count one shard's outcome."""
        getattr(self, outcome.action).append(shard)
        self.records += outcome.counts.get("records", 0)
        self.successes += outcome.counts.get("successes", 0)
        self.failures += outcome.counts.get("failures", 0)

    def describe(self) -> str:
        """A short human summary, one error per line."""
        head = (
            f"{STAGE}: {len(self.fetched)} shard(s) fetched, {len(self.retried)} retried, {len(self.skipped)} skipped, "
            f"{len(self.busy)} busy elsewhere, {len(self.errors)} error(s); the shards written hold "
            f"{self.records} records: {self.successes} fetched, {self.failures} failed; {self.seconds:.1f} s"
        )
        return "\n".join([head, *(f"error: {message}" for message in self.errors.values())])


def fetch_real(
    manifest: Manifest, shards: Sequence[int] | None = None, retry_failed: bool = False, progress: bool = True
) -> FetchSummary:
    """Fetch the real images of every records shard (or of `shards`) not done yet; `retry_failed` retries failures."""
    layout = manifest.layout
    wanted = layout.record_shards() if shards is None else sorted(set(shards))
    summary, start = FetchSummary(), time.time()
    bar = tqdm(wanted, desc=STAGE, unit="shard", disable=not progress)
    for shard in bar:
        try:
            summary.add(shard, process_shard(layout, shard, manifest.fetch, retry_failed, progress))
        except Exception as exc:  # noqa: BLE001 - one broken shard must not stop the others; reported below
            summary.errors[shard] = f"shard {shard_name(shard)}: {exc}"
            log.error("%s", summary.errors[shard])
        bar.set_postfix(ok=summary.successes, failed=summary.failures, errors=len(summary.errors))
    summary.seconds = time.time() - start
    return summary


def shard_list(text: str) -> list[int]:
    """Parse `--shards 0,3,7`."""
    try:
        shards = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shards takes comma-separated shard numbers, got {text!r}") from exc
    if not shards or min(shards) < 0:
        raise argparse.ArgumentTypeError(f"--shards takes shard numbers >= 0, got {text!r}")
    return shards


def run(args: argparse.Namespace) -> int:
    """The `fetch-real` subcommand."""
    summary = fetch_real(manifest_from_args(args), shards=args.shards, retry_failed=args.retry_failed)
    print(summary.describe())
    return 0 if summary.ok else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder fetch-real`."""
    parser = subparsers.add_parser(
        "fetch-real",
        help="download the real images with img2dataset (original bytes) into real/{k}.parquet",
        description="Download each records shard's images with img2dataset, keeping the bytes the server sent, "
        "into real/{k}.parquet with a status and reason per record; done shards are skipped.",
    )
    add_manifest_args(parser)
    parser.add_argument(
        "--retry-failed", action="store_true", help="also download the failed records of done shards again"
    )
    parser.add_argument(
        "--shards", type=shard_list, help="only these shard numbers, e.g. 0,3 (default: every records shard)"
    )
    parser.set_defaults(func=run)
