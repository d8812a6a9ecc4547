"""Images/s of the `generate` stage against a bare loop over the same pipeline, batches and steps.

The bare loop loads the same registry entry with `load_generator`, builds the same jobs (seed and
size per record) and the same size-grouped batches with `plan_batches`, calls the pipeline and keeps
nothing. The stage additionally reads the records shards, encodes every image per the encoding mix,
writes the gen shards and stats atomically and claims each unit. Both are timed end to end, pipeline
loading included, in alternating repeats on the same machine; the best repeat of each is reported,
in wall-clock time and in this process's CPU time (which other load on a shared machine does not
inflate; with --threads 1 it is the work done). The target is a ratio (stage / bare) of at least 0.9.

    python benchmarks/generate.py [--generator sd14-tiny] [--records 48] [--shard-size 16] [--batch-size 4]
                                  [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import emit, machine

from d3builder.generators.render import (
    Job,
    generate_shards,
    manifest_registry,
    plan_batches,
)
from d3builder.generators.results import seed_for, size_for
from d3builder.generators.runtime import load_generator
from d3builder.recipe.manifest import Manifest, MetadataSource, load_manifest
from d3builder.storage.schema import RECORD_FEATURES
from d3builder.storage.shards import write_shard

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
CAPTIONS = ("a red bicycle leaning on a brick wall", "portrait of an old fisherman, oil painting",
            "aerial view of a river delta at sunset", "a bowl of ramen on a wooden table")


def record_row(index: int, shard: int) -> dict:
    """One records row (a LAION-like sample with a caption)."""
    caption = f"{CAPTIONS[index % len(CAPTIONS)]}, photo {index}"
    record = str(2_000_000 + index)
    return {
        "id": record, "url": f"http://127.0.0.1:9/{record}.jpg", "original_prompt": caption,
        "positive_prompt": caption, "negative_prompt": "", "split": "train", "shard": shard, "alternate_urls": [],
        "selection_hash": index / 1e6, "SAMPLE_ID": int(record), "URL": f"http://127.0.0.1:9/{record}.jpg",
        "TEXT": caption, "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": 0.33, "WIDTH": 512, "HEIGHT": 512,
    }


def make_manifest(root: Path, records: int, shard_size: int, batch_size: int) -> Manifest:
    """Records shards under `root` and a manifest using the repository's registry."""
    manifest = Manifest(name="bench", output_root=str(root), metadata=MetadataSource("embedded", "bench"),
                        shard_size=shard_size, generators=[], registry=[str(MANIFESTS / "generators.yaml")])
    manifest.generate.batch_size = batch_size
    for start in range(0, records, shard_size):
        shard = start // shard_size
        rows = [record_row(i, shard) for i in range(start, min(start + shard_size, records))]
        write_shard(rows, manifest.layout.records(shard), RECORD_FEATURES)
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in dataclasses.asdict(manifest).items() if k != "path"}))
    return load_manifest(path)


def bare_loop(manifest: Manifest, name: str, records: int) -> tuple[float, float]:
    """Wall and CPU seconds to load the pipeline and render the same batches, keeping nothing."""
    entry = manifest_registry(manifest)[name]
    started, cpu = time.perf_counter(), time.process_time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_generator(entry, device)
    prompts = {str(2_000_000 + i): record_row(i, 0)["positive_prompt"] for i in range(records)}
    shard_size = manifest.shard_size
    ids = list(prompts)
    for start in range(0, records, shard_size):
        jobs = [Job(r, prompts[r], "", seed_for(r, name, manifest.seed), *size_for(r, name, manifest.seed, entry.sizes))
                for r in ids[start:start + shard_size]]
        for batch in plan_batches(jobs, manifest.generate.batch_size):
            loaded.generate([j.prompt for j in batch], [j.negative_prompt for j in batch], batch[0].width,
                            batch[0].height, [j.seed for j in batch])
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, time.process_time() - cpu


def stage(manifest: Manifest, name: str, root: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds of one full `generate_shards` run into a fresh output root, and the images written.

    The registry is parsed before the clock starts, as in the bare loop."""
    fresh = dataclasses.replace(manifest, output_root=str(root))
    fresh.path = manifest.path
    records = manifest.layout.root / "records"
    (root / "records").mkdir(parents=True)
    for path in records.glob("*.parquet"):
        os.link(path, root / "records" / path.name)
    registry = manifest_registry(manifest)
    started, cpu = time.perf_counter(), time.process_time()
    summary = generate_shards(fresh, name, registry=registry, progress=False)
    return time.perf_counter() - started, time.process_time() - cpu, summary.counts["success"]


def main() -> None:
    """Alternate stage and bare runs, print images/s of each and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="sd14-tiny", help="registry entry (manifests/generators.yaml)")
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="d3-bench-generate-") as tmp:
        manifest = make_manifest(Path(tmp) / "inputs", args.records, args.shard_size, args.batch_size)
        bare_loop(manifest, args.generator, min(args.records, args.batch_size))  # warm-up: builds the twin, JIT paths
        bare_runs, stage_runs = [], []
        for repeat in range(args.repeats):
            bare_runs.append(bare_loop(manifest, args.generator, args.records))
            wall, cpu, images = stage(manifest, args.generator, Path(tmp) / f"run{repeat}")
            if images != args.records:
                raise SystemExit(f"the stage wrote {images} of {args.records} images")
            stage_runs.append((wall, cpu))
            print(f"repeat {repeat}: bare {args.records / bare_runs[-1][0]:.2f} images/s, "
                  f"stage {args.records / wall:.2f} images/s (wall)", flush=True)
    print(f"generator {args.generator}: {args.records} records, shards of {args.shard_size}, "
          f"batch {args.batch_size}, best of {args.repeats}")
    rows = []
    for clock, index in (("wall", 0), ("CPU", 1)):
        bare = args.records / min(run[index] for run in bare_runs)
        ours = args.records / min(run[index] for run in stage_runs)
        print(f"[{clock:4}] bare pipeline loop {bare:8.2f} images/s | generate stage {ours:8.2f} images/s | "
              f"ratio {ours / bare:.3f} (target >= 0.9)")
        rows.append({"case": f"{args.generator}, batch {args.batch_size}, {clock} clock", "ours": ours,
                     "baseline": bare, "unit": "images/s", "target": ">= 0.9"})
    print(f"machine: {machine()}")
    emit("generate", rows)


if __name__ == "__main__":
    main()
