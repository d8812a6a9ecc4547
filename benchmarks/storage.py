"""The tiny pipeline on an S3-compatible server against a local folder: select -> fetch-real -> generate -> assemble.

Both runs use the same recipe (manifests/tiny.yaml, the embedded photos served on 127.0.0.1, the tiny
generators), in this one process, one after the other; the S3 side is moto's server on 127.0.0.1 (real HTTP,
real S3 API, s3fs as the client), so the figure is the cost of the object-store code path (multipart uploads,
conditional creates, listings, leases as objects) without a network. The records/s of each stage and of the
whole pipeline are printed with the ratio S3 / local (a figure for the README, not a gate).

    python benchmarks/storage.py [--generators sd14-tiny ...] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import emit, machine

from d3builder.embedded.photos import embedded_server
from d3builder.generators.render import generate_shards
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.fetch_real import fetch_real
from d3builder.stages.select import select_records

MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "tiny.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_server() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, with the AWS_* environment pointing at it and a bucket."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    s3fs.S3FileSystem().mkdir("bench")
    return server, "s3://bench"


def pipeline(manifest: Manifest, base_url: str, generators: list[str]) -> dict[str, float]:
    """Seconds of each stage on one output root."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("select", lambda: select_records(manifest, embedded_base_url=base_url, progress=False)),
        ("fetch-real", lambda: fetch_real(manifest, progress=False)),
        *((f"generate {g}", lambda g=g: generate_shards(manifest, g, progress=False)) for g in generators),
        ("assemble", lambda: assemble_dataset(manifest, progress=False)),
    ]
    seconds = {}
    for name, run in steps:
        started = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - started
        if getattr(result, "complete", True) is False:
            raise SystemExit(f"{name} did not complete: {result.describe()}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generators", nargs="+", default=["sd14-tiny"], help="tiny generators to render")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; the best of each is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    server, bucket = s3_server()
    runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    try:
        with tempfile.TemporaryDirectory(prefix="d3-bench-storage-") as tmp, embedded_server(port=0) as base_url:
            records = 0
            for repeat in range(args.repeats):
                for kind in ("local", "s3"):
                    root = f"{bucket}/run{repeat}" if kind == "s3" else str(Path(tmp) / f"run{repeat}")
                    manifest = load_manifest(MANIFEST, output_root=root)
                    manifest.generators = list(args.generators)
                    runs[kind].append(pipeline(manifest, base_url, args.generators))
                    records = sum(manifest.layout.store.parquet_file(p).metadata.num_rows
                                  for p in manifest.layout.store.glob(manifest.layout.root / "records" / "*.parquet"))
                    print(f"repeat {repeat} {kind:5}: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs[kind][-1].items()),
                          flush=True)
    finally:
        server.stop()
    rows = []
    for stage in [*runs["local"][0], "pipeline"]:
        local = min(sum(r.values()) if stage == "pipeline" else r[stage] for r in runs["local"])
        s3 = min(sum(r.values()) if stage == "pipeline" else r[stage] for r in runs["s3"])
        print(f"{stage:22} local {records / local:8.2f} records/s | S3 {records / s3:8.2f} records/s | "
              f"ratio S3/local {local / s3:.3f}")
        rows.append({"case": f"{stage}, {records} records", "ours": records / s3, "baseline": records / local,
                     "unit": "records/s", "note": "ours = S3 (moto on 127.0.0.1), baseline = local folder"})
    print(f"machine: {machine()}")
    emit("storage", rows)


if __name__ == "__main__":
    main()
