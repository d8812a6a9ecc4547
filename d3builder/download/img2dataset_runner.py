"""Run img2dataset on (id, url) rows and read back what it fetched, with the server's bytes untouched."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from d3builder.recipe.manifest import FetchConfig

BYTES_COLUMN = "jpg"
"""img2dataset names its image column after `encode_format`, even when it holds the server's bytes unchanged."""

LOG_TAIL_CHARS = 2000
POLL_S = 0.1


class Img2DatasetError(RuntimeError):
    """img2dataset did not finish a run (its log tail is in the message)."""


def img2dataset_version() -> str:
    """The installed img2dataset version."""
    return version("img2dataset")


def img2dataset_options(fetch: FetchConfig, num_rows: int) -> dict[str, Any]:
    """`img2dataset.download` keyword arguments (all but the paths) that keep each image's original bytes."""
    processes = max(1, fetch.processes)
    return {
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": ["id"],
        # Parquet, not img2dataset's default "files": no pair of small files per image to create and delete.
        "output_format": "parquet",
        # resize_mode="no" alone still decodes and re-encodes every image with OpenCV (as JPEG by default):
        # only disable_all_reencoding hands the downloaded bytes to the writer untouched.
        "resize_mode": "no",
        "disable_all_reencoding": True,
        "extract_exif": False,
        "compute_hash": None,  # we hash the very bytes we store
        "processes_count": processes,
        "thread_count": fetch.threads,
        "timeout": fetch.timeout,
        "retries": fetch.retries,
        "user_agent_token": fetch.user_agent_token or None,
        "disallowed_header_directives": list(fetch.disallowed_header_directives),
        "distributor": "multiprocessing",  # one run per fetch-real unit; units spread over nodes as workers
        # One img2dataset shard per process, so every process works on this records shard.
        "number_sample_per_shard": max(1, math.ceil(num_rows / processes)),
        "enable_wandb": False,
        # "overwrite" deletes img2dataset's own _tmp folder before using it; a fresh folder needs no mode.
        "incremental_mode": "incremental",
    }


def import_download() -> Callable[..., None]:
    """`img2dataset.download`, imported on first use (it is slow to import, and albumentations would query PyPI)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    return download


@contextmanager
def _output_to(log: Path, keep_stderr: bool) -> Iterator[None]:
    """Send file descriptors 1 (and 2 unless `keep_stderr`) to `log`, for this process and its children."""
    targets = [1] if keep_stderr else [1, 2]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in targets}
    try:
        with open(log, "ab") as fh:
            for fd in targets:
                os.dup2(fh.fileno(), fd)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


@contextmanager
def _sigint_restored() -> Iterator[None]:
    """img2dataset installs a SIGINT handler that exits with status 0; put ours back afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def log_tail(log: Path) -> str:
    """The end of img2dataset's log, for error messages."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    return text[-LOG_TAIL_CHARS:].strip() or "(img2dataset printed nothing)"


def run_download(input_parquet: Path, output_folder: Path, options: dict[str, Any], log: Path, progress: bool) -> None:
    """Call `img2dataset.download` (never at import time: it spawns workers), its printing sent to `log`."""
    download = import_download()
    with _sigint_restored(), _output_to(log, keep_stderr=progress):
        try:
            download(url_list=str(input_parquet), output_folder=str(output_folder), **options)
        except SystemExit as exc:  # img2dataset's SIGINT handler calls sys.exit(0): an interrupt is no success
            raise KeyboardInterrupt("img2dataset was interrupted") from exc


class FinishedShards:
    """Hands each shard img2dataset finishes to `process` on a thread, while its other shards and teardown go on."""

    def __init__(self, output_folder: Path, count: int, process: Callable[[pa.Table], Any]) -> None:
        self.output_folder, self.process = output_folder, process
        self.names = [f"{j:05d}" for j in range(count)]
        self.results: dict[str, Any] = {}
        self.error: Exception | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="img2dataset-shards", daemon=True)

    def _finished(self, name: str) -> bool:
        """img2dataset writes a shard's stats file after closing its parquet file."""
        return (self.output_folder / f"{name}_stats.json").is_file()

    def _take(self, name: str) -> None:
        """Read one finished shard as (id, status, error_message, bytes) and process it."""
        table = pq.read_table(
            self.output_folder / f"{name}.parquet", columns=["id", "status", "error_message", BYTES_COLUMN]
        )
        self.results[name] = self.process(table.rename_columns(["id", "status", "error_message", "bytes"]))

    def _watch(self) -> None:
        """Take each shard as it finishes, until stopped."""
        try:
            while not self.stop.wait(POLL_S):
                for name in self.names:
                    if name not in self.results and self._finished(name):
                        self._take(name)
        except Exception as exc:  # noqa: BLE001 - raised again by collect()
            self.error = exc

    def __enter__(self) -> FinishedShards:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()

    def collect(self, log: Path) -> list[Any]:
        """Every shard's result in order, once img2dataset has returned; raises if any shard did not finish."""
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        missing = [name for name in self.names if not self._finished(name)]
        if missing:
            raise Img2DatasetError(
                f"img2dataset did not finish shard(s) {', '.join(missing)}; log tail:\n{log_tail(log)}"
            )
        for name in self.names:
            if name not in self.results:
                self._take(name)
        return [self.results[name] for name in self.names]


def fetch_rows(
    rows: pa.Table, work_dir: Path, fetch: FetchConfig, process: Callable[[pa.Table], Any], progress: bool
) -> list[Any]:
    """Download `rows` (id, url) with img2dataset in `work_dir`; `process` each of its shards as soon as it is done.

    `process` gets a table (id, status, error_message, bytes) of one img2dataset shard; its results come back in order.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    input_parquet, output_folder, log = work_dir / "input.parquet", work_dir / "output", work_dir / "img2dataset.log"
    pq.write_table(rows.select(["id", "url"]), input_parquet)
    options = img2dataset_options(fetch, rows.num_rows)
    with FinishedShards(
        output_folder, math.ceil(rows.num_rows / options["number_sample_per_shard"]), process
    ) as shards:
        try:
            run_download(input_parquet, output_folder, options, log, progress)
        except Exception as exc:  # noqa: BLE001 - whatever img2dataset raised, report it with its log
            raise Img2DatasetError(f"img2dataset failed: {exc!r}; log tail:\n{log_tail(log)}") from exc
        return shards.collect(log)
