"""Run every benchmark (each measures the project against its baseline in one run) and print one table.

    python benchmarks/run_all.py            # the default sizes (about 15 minutes on 2 cores)
    python benchmarks/run_all.py --quick    # small sizes, for a smoke run
    python benchmarks/run_all.py --only dataloader train_step

Each benchmark prints its own figures as it goes; its last line `RESULT {json}` is collected
here. `generate_gpu.py` runs only where CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULT_PREFIX, machine

HERE = Path(__file__).resolve().parent

BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "fetch_real": ([], ["--urls", "300", "--repeats", "1"]),
    "generate": (["--threads", "1"], ["--threads", "1", "--records", "16", "--repeats", "1"]),
    "dataloader": ([], ["--records", "96"]),
    "train_step": ([], ["--steps", "2"]),
    "storage": (["--repeats", "2"], []),
    "cluster_yield": ([], ["--records", "32"]),
    "generate_gpu": ([], ["--steps", "5", "--batches", "1", "--naive-images", "1"]),
}
"""Benchmark script -> (default arguments, --quick arguments)."""


def run(name: str, args: list[str]) -> dict | None:
    """Run one benchmark script, echoing its output; returns its RESULT payload (None if it failed)."""
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    process = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *args], stdout=subprocess.PIPE, text=True)
    result = None
    for line in process.stdout:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        else:
            print(line, end="", flush=True)
    if process.wait() != 0 or result is None:
        print(f"=== {name}: failed (exit code {process.returncode})", flush=True)
        return None
    return result


def table(results: list[dict]) -> str:
    """One Markdown table of every benchmark's rows."""
    lines = ["| benchmark | case | ours | baseline | unit | ratio | target | note |", "|---|---|---:|---:|---|---:|---|---|"]
    for result in results:
        for row in result["rows"]:
            ratio = f"{row['ratio']:.2f}" if row.get("ratio") is not None else ""
            lines.append(f"| {result['benchmark']} | {row['case']} | {row['ours']:.2f} | {row['baseline']:.2f} | "
                         f"{row['unit']} | {ratio} | {row.get('target', '')} | {row.get('note', '')} |")
    return "\n".join(lines)


def main() -> int:
    """Run the chosen benchmarks and print the table; exit 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run; figures are noisier)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    import torch

    names = args.only or [n for n in BENCHMARKS if n != "generate_gpu" or torch.cuda.is_available()]
    results, failed = [], []
    for name in names:
        default, quick = BENCHMARKS[name]
        result = run(name, quick if args.quick else default)
        (results.append(result) if result else failed.append(name))
    print(f"\nmachine: {machine()}\n")
    print(table(results))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
