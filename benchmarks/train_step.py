"""Records/s of one full CoDE training step on the CPU: local crops 96 vs 224 px, fp32 vs bf16 autocast.

A step = forward of the 8 views (one pass per image size), the CoDE loss, backward,
gradient clipping and an AdamW step, as `codetrain.train` runs it (Accelerate's
mixed precision is the same `torch.autocast`). Inputs are random tensors: the step is
measured, not data loading. Prints a table, the ratios and the machine.

    python benchmarks/train_step.py [--batch 32] [--steps 4] [--warmup 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from common import emit

from codetrain.losses import GLOBAL_KEYS
from codetrain.model import create_embedder
from codetrain.train import compute_loss, cpu_has_native_bf16, step_generator


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else platform's guess) and the core count."""
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def make_batch(batch: int, local_size: int, img_size: int = 224) -> dict[str, torch.Tensor]:
    """Random normalised views of one batch: 6 at img_size, 2 local crops at local_size."""
    gen = torch.Generator().manual_seed(0)
    views = {k: torch.randn(batch, 3, img_size, img_size, generator=gen) for k in (*GLOBAL_KEYS, "g_r", "g_f")}
    views.update({k: torch.randn(batch, 3, local_size, local_size, generator=gen) for k in ("l_r", "l_f")})
    return views


@dataclass
class Setting:
    """One benchmarked configuration: its own model, optimizer and batch."""

    local_size: int
    precision: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    views: dict[str, torch.Tensor]
    times: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, local_size: int, precision: str, batch: int) -> Setting:
        """A fresh ViT-Tiny (same init for all settings) with AdamW and a random batch."""
        torch.manual_seed(0)
        model = create_embedder("vit_tiny_patch16_224", 224).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=2e-5)
        return cls(local_size, precision, model, optimizer, make_batch(batch, local_size))

    def step(self, index: int) -> float:
        """Run one full training step; returns its wall time in seconds."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = compute_loss(self.model, self.views, step_generator(42, index, 0), torch.device("cpu"))
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def rates(self, batch: int) -> tuple[float, float]:
        """Records/s at the fastest and at the median step time."""
        return batch / min(self.times), batch / statistics.median(self.times)


def measure(batch: int, steps: int, warmup: int) -> dict[tuple[int, str], tuple[float, float]]:
    """(best, median) records/s per (local size, precision); settings take turns step by step, so load drifts hit all alike."""
    settings = [Setting.build(local, precision, batch) for precision in ("fp32", "bf16") for local in (224, 96)]
    for index in range(warmup + steps):
        for setting in settings[index % len(settings):] + settings[: index % len(settings)]:
            elapsed = setting.step(index)
            if index >= warmup:
                setting.times.append(elapsed)
    return {(s.local_size, s.precision): s.rates(batch) for s in settings}


def main() -> None:
    """Run the four settings and print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()} | {platform.system()} {platform.machine()} | torch {torch.__version__} | "
          f"threads {torch.get_num_threads()} | cpu capability {torch.backends.cpu.get_cpu_capability()} | "
          f"native bf16 {cpu_has_native_bf16()}")
    print(f"batch {args.batch}, {args.steps} timed steps per setting after {args.warmup} warm-up, "
          "settings interleaved step by step\n")
    measured = measure(args.batch, args.steps, args.warmup)
    print(f"{'local crop':>10} {'precision':>9} {'best rec/s':>10} {'median rec/s':>12}")
    for (local, precision), (best, median) in measured.items():
        print(f"{local:>10} {precision:>9} {best:>10.2f} {median:>12.2f}")
    rates = {key: best for key, (best, _) in measured.items()}
    print("\nratios of the best step times (the least disturbed by other load on the machine):")
    for precision in ("fp32", "bf16"):
        print(f"local 96 / local 224 at {precision}: {rates[96, precision] / rates[224, precision]:.2f}x (target >= 1.3x)")
    for local in (224, 96):
        print(f"bf16 / fp32 at local {local}: {rates[local, 'bf16'] / rates[local, 'fp32']:.2f}x")
    print(f"local 96 bf16 / local 224 fp32 (our CPU default vs the authors' crops in fp32): "
          f"{rates[96, 'bf16'] / rates[224, 'fp32']:.2f}x")
    emit("train_step", [
        *({"case": f"batch {args.batch}, local 96 vs 224 px, {p}", "ours": rates[96, p], "baseline": rates[224, p],
           "unit": "records/s", "target": ">= 1.3"} for p in ("fp32", "bf16")),
        {"case": f"batch {args.batch}, bf16 vs fp32 autocast, local 96 px", "ours": rates[96, "bf16"],
         "baseline": rates[96, "fp32"], "unit": "records/s", "target": ""},
    ])


if __name__ == "__main__":
    main()
