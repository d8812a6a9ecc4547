"""What a training run reports: RUN/metrics.jsonl, TensorBoard (when installed) and RUN/loss_curve.png."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _tensorboard_writer(folder: Path) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: logging to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(folder))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a metrics file (a missing file gives an empty list)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class RunLog:
    """Appends metric rows to RUN/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run: Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        """Open the log; on resume drop rows written after `resume_step` (they will be redone)."""
        self.path = run / "metrics.jsonl"
        run.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if resume_step is not None else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self.writer = _tensorboard_writer(run / "tensorboard") if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (flushed at once) and its numeric values to TensorBoard."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            kind = row.get("kind", "train")
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, row.get("step", 0))

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(metrics: str | Path, png: str | Path) -> Path | None:
    """Plot training losses (total, real, fake) and validation accuracy against step; None without data."""
    rows = read_metrics(metrics)
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val" and r.get("val_acc") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in train]
    for key, label in (("loss", "total"), ("loss_real", "real"), ("loss_fake", "fake")):
        ax.plot(steps, [r.get(key, math.nan) for r in train], label=f"loss {label}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("InfoNCE loss")
    if val:
        acc = ax.twinx()
        acc.plot([r["step"] for r in val], [r["val_acc"] for r in val], "k.--", label="val probe acc")
        acc.set_ylabel("validation linear-probe accuracy")
        acc.set_ylim(0, 1)
        acc.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title("CoDE training")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
