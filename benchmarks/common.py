"""What every benchmark shares: the machine it ran on, and one machine-readable result line."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULT_PREFIX = "RESULT "
"""Start of the line `run_all.py` collects: `RESULT {json}` with the benchmark's rows."""


def machine() -> str:
    """CPU model, cores, GPU, load and library versions: what the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}, load avg {load}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.python_implementation()} {platform.python_version()}")


def emit(benchmark: str, rows: list[dict]) -> None:
    """Print the result line: rows of {case, ours, baseline, unit, ratio, target}."""
    for row in rows:
        row.setdefault("ratio", row["ours"] / row["baseline"] if row.get("baseline") else None)
    print(RESULT_PREFIX + json.dumps({"benchmark": benchmark, "machine": machine(), "rows": rows}), flush=True)
