"""Benchmark: `fetch-real` against bare img2dataset (same options, its own output) on the same loopback URLs."""

from __future__ import annotations

import argparse
import io
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import emit, machine
from PIL import Image
from skimage.data import astronaut
from tqdm import tqdm

from d3builder.download.img2dataset_runner import (
    img2dataset_options,
    img2dataset_version,
    import_download,
    run_download,
)
from d3builder.embedded.server import serve_folder
from d3builder.recipe.manifest import FetchConfig, Manifest, MetadataSource
from d3builder.stages.fetch_real import fetch_real
from d3builder.storage.schema import RECORD_FEATURES
from d3builder.storage.shards import write_shard


def make_jpegs(folder: Path, count: int, seed: int = 0) -> list[int]:
    """`count` JPEG photos of realistic web sizes (random crops of skimage's astronaut); returns their byte sizes."""
    rng = np.random.default_rng(seed)
    photo = astronaut()
    sizes = []
    for i in tqdm(range(count), desc="making JPEGs", unit="file"):
        top, left = rng.integers(0, 160, 2)
        crop = photo[top : top + 352, left : left + 352]
        width, height = int(rng.integers(320, 520)), int(rng.integers(240, 400))
        buffer = io.BytesIO()
        Image.fromarray(crop).resize((width, height)).save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
        sizes.append(len(buffer.getvalue()))
    return sizes


def _serve(folder: str, urls: multiprocessing.Queue, stop: threading.Event) -> None:
    """Serve `folder` on 127.0.0.1 until `stop` is set, sending the base URL back."""
    with serve_folder(folder) as base:
        urls.put(base)
        stop.wait()


@contextmanager
def served_by_another_process(folder: Path) -> Iterator[str]:
    """`serve_folder` in its own process, so the server never competes with the fetcher for a GIL."""
    context = multiprocessing.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(str(folder), urls, stop), daemon=True)
    server.start()
    try:
        yield urls.get(timeout=120)
    finally:
        stop.set()
        server.join(timeout=10)


def record_rows(base: str, count: int) -> list[dict]:
    """One RECORD_FEATURES row per served JPEG."""
    rows = []
    for i in range(count):
        url = f"{base}/{i:05d}.jpg"
        rows.append({
            "id": f"r{i:05d}", "url": url, "alternate_urls": [], "original_prompt": "an astronaut", "positive_prompt": "an astronaut",
            "negative_prompt": "", "split": "train", "shard": 0, "selection_hash": 0.5, "SAMPLE_ID": i, "URL": url,
            "TEXT": "an astronaut", "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": 0.3, "WIDTH": 0, "HEIGHT": 0,
        })  # fmt: skip
    return rows


def time_ours(work: Path, rows: list[dict], fetch: FetchConfig, shard_size: int, run: int) -> float:
    """Seconds for `fetch_real` over `rows` cut into shards of `shard_size`, from records to real shards."""
    root = work / f"ours-{run}"
    manifest = Manifest(
        name="bench",
        output_root=str(root),
        metadata=MetadataSource("embedded"),
        shard_size=shard_size,
        generators=[],
        fetch=fetch,
    )
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        write_shard(rows[start : start + shard_size], manifest.layout.records(shard), RECORD_FEATURES)
    start = time.perf_counter()
    summary = fetch_real(manifest, progress=False)
    seconds = time.perf_counter() - start
    if not summary.ok or summary.successes != len(rows):
        sys.exit(f"our run did not fetch everything: {summary.describe()}")
    return seconds


def time_bare(work: Path, rows: list[dict], fetch: FetchConfig, run: int) -> float:
    """Seconds for one bare `img2dataset.download` over the same URLs with the same options."""
    folder = work / f"bare-{run}"
    folder.mkdir()
    url_list = folder / "urls.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in rows], "url": [r["url"] for r in rows]}), url_list)
    start = time.perf_counter()
    run_download(
        url_list, folder / "output", img2dataset_options(fetch, len(rows)), folder / "img2dataset.log", progress=False
    )
    seconds = time.perf_counter() - start
    written = sum(pq.read_metadata(p).num_rows for p in (folder / "output").glob("*.parquet"))
    if written != len(rows):
        sys.exit(f"bare img2dataset wrote {written} rows, expected {len(rows)}")
    return seconds


def main() -> None:
    """Run both, alternating, and print URLs/s of each and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=2000, help="records per shard for our run")
    parser.add_argument("--processes", type=int, default=FetchConfig.processes)
    parser.add_argument("--threads", type=int, default=FetchConfig.threads)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each, alternating which goes first; medians reported"
    )
    args = parser.parse_args()
    fetch = FetchConfig(processes=args.processes, threads=args.threads, allow_private_addresses=True)  # loopback
    import_download()  # both runs then start with img2dataset already imported in this process
    with tempfile.TemporaryDirectory(prefix="bench-fetch-real-") as tmp:
        work = Path(tmp)
        (work / "www").mkdir()
        sizes = make_jpegs(work / "www", args.urls)
        with served_by_another_process(work / "www") as base:
            rows = record_rows(base, args.urls)
            ours, bare = [], []
            for run in tqdm(range(args.repeats), desc="runs", unit="pair"):
                if run % 2:
                    ours.append(time_ours(work, rows, fetch, args.shard_size, run))
                bare.append(time_bare(work, rows, fetch, run))
                if not run % 2:
                    ours.append(time_ours(work, rows, fetch, args.shard_size, run))
    ours_rate, bare_rate = args.urls / statistics.median(ours), args.urls / statistics.median(bare)
    pair_ratios = [b / o for b, o in zip(bare, ours, strict=True)]
    print(f"machine: {machine()}")
    mean_kb = statistics.mean(sizes) / 1024
    print(
        f"workload: {args.urls} JPEGs on 127.0.0.1, {min(sizes) // 1024}-{max(sizes) // 1024} KB, mean {mean_kb:.0f} KB"
    )
    print(f"img2dataset {img2dataset_version()}: processes={fetch.processes}, threads={fetch.threads}")
    print(f"our shard size: {args.shard_size}")
    print(f"bare img2dataset:     {bare_rate:8.1f} URLs/s  (runs: {', '.join(f'{s:.1f}' for s in bare)} s)")
    print(f"d3builder fetch-real: {ours_rate:8.1f} URLs/s  (runs: {', '.join(f'{s:.1f}' for s in ours)} s)")
    pairs = ", ".join(f"{r:.2f}" for r in pair_ratios)
    print(f"ratio (ours / bare): {ours_rate / bare_rate:.2f} of the medians; per pair {pairs}; target >= 0.9")
    emit("fetch_real", [{"case": f"{args.urls} JPEGs on loopback", "ours": ours_rate, "baseline": bare_rate,
                         "unit": "URLs/s", "target": ">= 0.9"}])


if __name__ == "__main__":
    main()
