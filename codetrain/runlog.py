"""What a training run reports: RUN/metrics.jsonl, TensorBoard (when installed) and RUN/loss_curve.png.

In a local run folder each metrics row is appended as it comes; in a remote one (an fsspec
URL) the whole file is uploaded as one object at every `flush` (each checkpoint) and at the
end. TensorBoard logs are written for local run folders only.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codetrain.errors import MissingInputError, read_input
from codetrain.runlayout import RunLayout
from d3builder.storage.store import Store

log = logging.getLogger(__name__)


class RowKind(str, enum.Enum):
    """The `kind` of a metrics row."""

    TRAIN = "train"
    VAL = "val"


def _tensorboard_writer(folder: Path) -> Any:
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: logging to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(folder))


def _lines(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a metrics file (local path or URL; a missing file gives an empty list)."""
    try:
        text = read_input(path).decode("utf-8")
    except MissingInputError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class RunLog:
    """Keeps the metric rows of a run in RUN/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run: Store, tensorboard: bool = True, resume_step: int | None = None) -> None:
        """Open the log; on resume keep only rows up to `resume_step` (later ones will be redone)."""
        self.store, self.path = run, run.root / RunLayout.METRICS
        rows = read_metrics(run.url(self.path)) if resume_step is not None else []
        self.rows = [r for r in rows if r.get("step", 0) <= resume_step] if resume_step is not None else []
        self.flush()
        self.writer = None
        if tensorboard and run.local:
            self.writer = _tensorboard_writer(Path(run.root, RunLayout.TENSORBOARD))
        elif tensorboard:
            log.info("TensorBoard logs are written for local run folders only; %s has metrics.jsonl", run.url())

    def write(self, row: dict[str, Any]) -> None:
        """Add one row (appended to a local file at once) and its numeric values to TensorBoard."""
        self.rows.append(row)
        if self.store.local:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(_lines([row]))
        if self.writer is not None:
            kind = RowKind(row.get("kind", RowKind.TRAIN)).value
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, row.get("step", 0))

    def flush(self) -> None:
        """Write the whole file (atomic: one object upload on an object store)."""
        self.store.write_text(self.path, _lines(self.rows))

    def close(self) -> None:
        """Flush, and close TensorBoard."""
        self.flush()
        if self.writer is not None:
            self.writer.close()


def loss_curve_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Training losses (total, real, fake) and validation accuracy against step as PNG bytes; None without data."""
    train = [r for r in rows if r.get("kind") == RowKind.TRAIN]
    val = [r for r in rows if r.get("kind") == RowKind.VAL and r.get("val_acc") is not None]
    if not train:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
