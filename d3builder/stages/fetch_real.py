"""`fetch-real`: each records shard's real images, fetched by img2dataset byte for byte, into `real/{k}.parquet`.

A record's URLs are tried in order (its own, then the `alternate_urls` its duplicates left): one
img2dataset pass per position, over the records still without an image. Unless the manifest allows
private addresses, a URL whose host is or resolves to a non-public address is refused before any request.
"""

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
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from d3builder.core.commandline import UsageError
from d3builder.download.addresses import url_refusals
from d3builder.download.errors import download_error_text
from d3builder.download.img2dataset_runner import (
    fetch_rows,
    img2dataset_options,
    img2dataset_version,
)
from d3builder.imaging.inspection import Inspection, inspect_image
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_unit_args,
    manifest_from_args,
    report,
)
from d3builder.recipe.elsa import DEFAULT_SHARD_SIZE, ElsaError, ingest_elsa
from d3builder.recipe.manifest import FetchConfig, Manifest, MetadataSource
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
ELSA_RELEASE = "elsaEU/ELSA_D3"
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


@dataclass(frozen=True)
class Outcome:
    """What one URL gave one record: an inspected image (with its bytes as a one-row array) or an error."""

    inspection: Inspection
    cell: pa.Array | None = None

    @property
    def ok(self) -> bool:
        return self.inspection.error is None


def outcomes(ids: Sequence[str], fetched: Fetched) -> dict[str, Outcome]:
    """Each id's outcome in one img2dataset run: its bytes if they decode, else why not."""
    first_row: dict[str, int] = {}
    for j, record_id in enumerate(fetched.ids):
        first_row.setdefault(record_id, j)
    result = {}
    for record_id in ids:
        j = first_row.get(record_id)
        if j is None:
            result[record_id] = Outcome(Inspection(error="img2dataset wrote no row for this record"))
        elif fetched.statuses[j] != SUCCESS:
            message = fetched.messages[j]
            result[record_id] = Outcome(Inspection(error=download_error_text(message) if message else fetched.statuses[j]))
        else:
            inspection = fetched.inspections[j]
            result[record_id] = Outcome(inspection, fetched.cells[j] if inspection.error is None else None)
    return result


def fetch_urls(folder: Path, rows: pa.Table, fetch: FetchConfig, progress: bool) -> dict[str, Outcome]:
    """One URL per record (id, url): refused addresses answered without a request, the rest fetched and inspected."""
    ids, urls = rows["id"].to_pylist(), rows["url"].to_pylist()
    refused = {} if fetch.allow_private_addresses else url_refusals(urls, fetch.threads)
    result = {i: Outcome(Inspection(error=refused[u])) for i, u in zip(ids, urls, strict=True) if refused.get(u)}
    allowed = rows.filter(pa.array([not refused.get(u) for u in urls], pa.bool_()))
    if allowed.num_rows:
        inspect = functools.partial(inspect_rows, max_bytes=fetch.max_image_bytes)
        parts = fetch_rows(allowed, folder, fetch, inspect, progress)
        result.update(outcomes(allowed["id"].to_pylist(), Fetched.concat(parts)))
    return result


def failure_message(errors: Sequence[str]) -> str:
    """One record's failure: its own URL's error first (the reason it is counted under), then each alternate's."""
    if not errors:
        return "no URL to fetch"
    return "; ".join([errors[0], *(f"alternate URL {i}: {e}" for i, e in enumerate(errors[1:], start=1))])


def real_table(records: pa.Table, candidates: dict[str, list[str]], served: dict[str, tuple[int, Outcome]],
               failures: dict[str, list[Inspection]]) -> pa.Table:
    """One REAL_FEATURES row per record, in records order: the image one of its URLs served, else why none did."""
    results, cells, indices, served_urls = [], [], [], []
    for record_id in records["id"].to_pylist():
        if record_id in served:
            index, outcome = served[record_id]
            results.append(outcome.inspection)
            cells.append(outcome.cell)
            indices.append(index)
            served_urls.append(candidates[record_id][index])
            continue
        tried = failures.get(record_id, [])
        first = tried[0] if tried else Inspection()
        message = failure_message([t.error or "unknown" for t in tried])
        results.append(Inspection(message, first.width, first.height, first.encoding, first.sha256, first.num_bytes))
        cells.append(None)
        indices.append(None)
        served_urls.append(None)
    column = {
        name: [getattr(r, name) for r in results] for name in ("width", "height", "encoding", "sha256", "num_bytes")
    }
    return pa.table(
        {
            "id": records["id"],
            "url": records["url"],
            "status": pa.array([SUCCESS if r.error is None else FAILED for r in results], pa.string()),
            "error_message": pa.array([r.error for r in results], pa.string()),
            "image": _image_column(cells),
            "width": pa.array(column["width"], pa.int64()),
            "height": pa.array(column["height"], pa.int64()),
            "encoding": pa.array(column["encoding"], pa.string()),
            "sha256": pa.array(column["sha256"], pa.string()),
            "num_bytes": pa.array(column["num_bytes"], pa.int64()),
            "url_index": pa.array(indices, pa.int64()),
            "served_url": pa.array(served_urls, pa.string()),
        }
    )


def conform(table: pa.Table) -> pa.Table:
    """A real shard in today's REAL_FEATURES schema (columns added since it was written read as null)."""
    schema = REAL_FEATURES.arrow_schema
    for name in schema.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


def merge_retry(old: pa.Table, new: pa.Table) -> pa.Table:
    """`old` with each row whose id is in `new` replaced by `new`'s row, order kept, other rows untouched."""
    old, new = conform(old), conform(new)
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
    indices = table["url_index"].to_pylist() if "url_index" in table.column_names else [None] * len(ok)
    return {
        "records": table.num_rows,
        "successes": sum(ok),
        "served_by_alternate_url": sum(1 for i, good in zip(indices, ok, strict=True) if good and (i or 0) > 0),
        "failures": len(ok) - sum(ok),
        "failures_by_reason": dict(
            Counter(failure_reason(m or "unknown") for m, good in zip(messages, ok, strict=True) if not good)
        ),
        "encodings": dict(Counter(e for e, good in zip(encodings, ok, strict=True) if good)),
        "bytes": sum(n for n, good in zip(sizes, ok, strict=True) if good),
    }


def read_records(store: Store, path: PurePath) -> pa.Table:
    """A records shard's (id, url, alternate_urls), checked for duplicate ids (no alternates in older shards).

    BadInput names the file when it is missing, unreadable or holds an id twice."""
    if not store.isfile(path):
        raise BadInput(f"no records shard {store.url(path)} (run select)")
    try:
        names = store.read_schema(path).names
        columns = ["id", "url", *(["alternate_urls"] if "alternate_urls" in names else [])]
        records = store.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise BadInput(f"{store.url(path)}: unreadable records shard: {exc}") from exc
    if "alternate_urls" not in names:
        records = records.append_column("alternate_urls", pa.array([[]] * records.num_rows, pa.list_(pa.string())))
    ids = records["id"].to_pylist()
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, n in Counter(ids).items() if n > 1)
        raise BadInput(f"{store.url(path)}: record id {duplicate!r} appears more than once")
    return records


@contextmanager
def work_dir(layout: DataLayout, shard: int) -> Iterator[Path]:
    """A fresh local folder for one shard's img2dataset runs (under the root, or TMPDIR for URLs), deleted after."""
    path = layout.store.scratch(STAGE, f"{shard_name(shard)}-{os.getpid()}")
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def download(layout: DataLayout, shard: int, records: pa.Table, fetch: FetchConfig, progress: bool) -> pa.Table:
    """`records` (id, url, alternate_urls) as REAL_FEATURES rows, each record's URLs tried in order until one serves
    a usable image: one img2dataset pass per URL position, in a temporary folder that is removed after."""
    ids = records["id"].to_pylist()
    candidates = {
        record_id: [u for u in [url, *(alternates or [])] if u]
        for record_id, url, alternates in zip(
            ids, records["url"].to_pylist(), records["alternate_urls"].to_pylist(), strict=True
        )
    }
    served: dict[str, tuple[int, Outcome]] = {}
    failures: dict[str, list[Inspection]] = {record_id: [] for record_id in ids}
    with work_dir(layout, shard) as folder:
        for index in range(max(map(len, candidates.values()), default=0)):
            todo = [r for r in ids if r not in served and index < len(candidates[r])]
            if not todo:
                break
            rows = pa.table({"id": pa.array(todo, pa.string()), "url": [candidates[r][index] for r in todo]})
            for record_id, outcome in fetch_urls(folder / f"url-{index}", rows, fetch, progress).items():
                if outcome.ok:
                    served[record_id] = (index, outcome)
                else:
                    failures[record_id].append(outcome.inspection)
    return real_table(records, candidates, served, failures)


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
            "allow_private_addresses": self.fetch.allow_private_addresses,
            "retries": [],
        }, records.num_rows)

    def retry(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        """Fetch a done shard's failed records again (every URL of each) and rewrite it, successes kept as they were."""
        layout, shard, start = self.layout, ctx.unit.shard, time.time()
        output = layout.real(shard)
        old = self.store.read_table(output)
        failed = old.filter(pc.equal(old["status"], FAILED))
        records = read_records(self.store, layout.records(shard))
        new = download(layout, shard, records.filter(pc.is_in(records["id"], failed["id"])), self.fetch, self.progress)
        merged = merge_retry(old, new)
        ctx.write_shard(merged, output, REAL_FEATURES)
        seconds = time.time() - start
        counts = shard_counts(merged)
        attempt = {
            "retried": failed.num_rows,
            "recovered": counts["successes"] - stats.get("successes", 0),
            "recovered_by_alternate_url": counts["served_by_alternate_url"] - stats.get("served_by_alternate_url", 0),
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
    wanted = layout.wanted_shards(shards)
    runner = manifest.runner(retry_failed=retry_failed, progress=progress, wait=wait)
    return runner.run(FetchJob(layout, manifest.fetch, progress), [Unit(STAGE, k) for k in wanted])


def positive_int(text: str) -> int:
    """Parse a count of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def manifest_for(args: argparse.Namespace) -> Manifest:
    """The command line's manifest; with --elsa and none, a bare one writing under --output-root."""
    if args.manifest:
        manifest = manifest_from_args(args)
    else:
        manifest = Manifest(
            name="elsa", output_root=args.output_root, metadata=MetadataSource(args.elsa, ELSA_RELEASE),
            shard_size=args.shard_size or DEFAULT_SHARD_SIZE, generators=[],
        )  # fmt: skip
    if args.allow_private_addresses:
        manifest.fetch.allow_private_addresses = True
    return manifest


def run(args: argparse.Namespace) -> int:
    """The `fetch-real` subcommand."""
    if not args.manifest and not (args.elsa and args.output_root):
        raise UsageError("give --manifest M (records written by select), "
                         "or --elsa SOURCE --output-root DIR (the published ELSA_D3 parquet)")
    manifest = manifest_for(args)
    if args.elsa:
        try:
            records = ingest_elsa(args.elsa, manifest.layout, args.shard_size or manifest.shard_size)
        except ElsaError as exc:
            raise UsageError(str(exc)) from exc
        print(records.describe(manifest.layout))
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
        "into real/{k}.parquet with a status and reason per record; done shards are skipped. The records come "
        "from `select` (--manifest) or from the published ELSA_D3 parquet (--elsa, keyed by its id column).",
    )
    add_manifest_args(parser, required=False)
    parser.add_argument(
        "--elsa", metavar="SOURCE",
        help="read the records from the published ELSA_D3 parquet: a file or folder, an hf:// URL, or a hub "
        "dataset id such as elsaEU/ELSA_D3 (only its id, url and prompt columns are read); needs --output-root "
        "or --manifest",
    )  # fmt: skip
    parser.add_argument(
        "--shard-size", type=positive_int, help=f"records per shard with --elsa (default: the manifest's, else {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument(
        "--allow-private-addresses", action="store_true",
        help="also download from loopback, private and link-local hosts (as fetch.allow_private_addresses: true)",
    )  # fmt: skip
    add_unit_args(parser, retry=True)
    parser.set_defaults(func=run)
