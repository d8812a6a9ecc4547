"""Records/s of the CoDE training loader (all eight views) against a naive loader, on realistic D3 shards.

Run: python benchmarks/dataloader.py [--records 400] [--batch-size 32] [--workers 0 2] [--data DIR]

The naive baseline decodes all five images of a record (ours decodes the real and the one
fake drawn), augments the full-size image and crops with torchvision's RandomResizedCrop on
the full image (no crop-before-resize, PIL resizes): the authors' style of loader. Both
decode every image at full size, as evaluation does. Besides records/s (wall clock, which
other processes on the machine disturb) it prints the CPU time per record of all processes.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import emit, machine
from shardkit import REALISTIC, make_d3_shards

from codetrain.data import D3Records, collate, list_shards, record_rng
from codetrain.views import IMAGENET_MEAN, IMAGENET_STD, ViewMaker
from d3builder.imaging.augmentations import random_augment, resize_center_crop, to_rgb
from d3builder.storage.schema import generator_slots
from d3builder.storage.shards import decode_image, iter_rows


class NaiveRecords(IterableDataset):
    """Decode every image of a record fully, then build the eight views from full-size images."""

    def __init__(self, shards: list[str], local_size: int = 96, seed: int = 42) -> None:
        self.shards, self.seed = shards, seed
        normalise = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.clean = transforms.Compose(normalise)
        self.global_crop = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.4, 1.0)), *normalise])
        self.local_crop = transforms.Compose([transforms.RandomResizedCrop(local_size, scale=(0.05, 0.4)), *normalise])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = -1
        for shard in self.shards:
            for row in iter_rows(shard):
                index += 1
                if index % workers != worker:
                    continue
                rng = record_rng(self.seed, 0, row["id"])
                real = to_rgb(decode_image(row["image_real"]))
                fakes = [to_rgb(decode_image(row[f"image_gen{s}"])) for s in generator_slots(list(row))]
                fake = fakes[int(rng.integers(len(fakes)))]
                views = {}
                for tag, img in (("r", real), ("f", fake)):
                    views[f"x_{tag}"] = self.clean(resize_center_crop(img))
                    views[f"a_{tag}"] = self.clean(resize_center_crop(random_augment(img, rng)[0]))
                    views[f"g_{tag}"] = self.global_crop(img)
                    views[f"l_{tag}"] = self.local_crop(img)
                yield {**views, "id": row["id"]}


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (finished DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(dataset: IterableDataset, workers: int, batch_size: int) -> tuple[float, float, int]:
    """Records/s over one full pass (worker start-up included), CPU ms per record (all processes), records."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    batches = iter(loader)
    for batch in batches:
        count += len(batch["id"])
        assert batch["x_r"].shape[1:] == (3, 224, 224)
    elapsed = time.perf_counter() - start
    del batches  # joins the workers, so their CPU time is counted
    return count / elapsed, (cpu_seconds() - cpu) * 1000 / count, count


def shards_for(folder: Path, records: int) -> list[str]:
    """Realistic shards (reals 300-800 px, fakes 256-640 px, JPEG; 4 fakes + 1 real), made once per folder."""
    shards = list_shards(str(folder), "train")
    if not shards:
        print(f"writing {records} realistic records under {folder} ...", flush=True)
        make_d3_shards(folder, records, "train", shard_size=100, seed=0, sizes=REALISTIC, row_group_size=64)
        shards = list_shards(str(folder), "train")
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "d3code-dataloader-bench")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in DataLoader workers: both loaders' main-process work runs alike
    shards = shards_for(args.data / str(args.records), args.records)
    print(f"machine: {machine()}")
    print(f"{args.records} records, batch {args.batch_size}, views x/a/g at 224, l at {args.local_size}")
    print(f"{'workers':>7} {'ours rec/s':>11} {'naive rec/s':>12} {'ratio':>6} {'ours CPU ms/rec':>16} {'naive CPU ms/rec':>17}")
    rows = []
    for workers in args.workers:
        ours = D3Records(shards, views=ViewMaker(local_size=args.local_size), batch_size=args.batch_size)
        fast, fast_cpu, n_fast = measure(ours, workers, args.batch_size)
        slow, slow_cpu, n_slow = measure(NaiveRecords(shards, args.local_size), workers, args.batch_size)
        assert n_fast == n_slow == args.records, (n_fast, n_slow)
        print(f"{workers:>7} {fast:>11.1f} {slow:>12.1f} {fast / slow:>5.2f}x {fast_cpu:>16.1f} {slow_cpu:>17.1f}", flush=True)
        rows.append({"case": f"8 views, {workers} workers", "ours": fast, "baseline": slow, "unit": "records/s",
                     "target": ">= 110 records/s with 2 workers" if workers == 2 else "",
                     "note": f"{os.cpu_count() * 1000 / fast_cpu:.0f} records/s from CPU time on free cores"})
    print(f"load avg after: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share these cores)")
    print(f"CPU ms/rec counts every process (main + workers); with the cores to itself a loader gives about "
          f"{os.cpu_count()} x 1000 / (CPU ms/rec) records/s")
    emit("dataloader", rows)


if __name__ == "__main__":
    main()
