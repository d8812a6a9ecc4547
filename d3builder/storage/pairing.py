"""Joining a record with its real and generated images by id: the row logic `assemble` and `extend` share."""

from __future__ import annotations

import bisect
from functools import lru_cache
from pathlib import PurePath
from typing import Any

import pyarrow as pa

from d3builder.storage.layout import extension, safe_name
from d3builder.storage.schema import SPLITS
from d3builder.storage.shards import LOCAL
from d3builder.storage.store import Store

REAL_META = ["id", "status", "width", "height", "encoding", "sha256"]
GEN_META = [
    "id", "generator", "status", "model", "model_revision", "pipeline", "scheduler", "dtype",
    "num_inference_steps", "guidance_scale", "seed", "width", "height", "encoding", "jpeg_quality",
    "safety_checker", "watermark", "software",
]  # fmt: skip
PROVENANCE = (
    "model", "model_revision", "pipeline", "scheduler", "num_inference_steps", "guidance_scale", "dtype",
    "safety_checker", "watermark", "software",
)  # fmt: skip


class InputError(Exception):
    """An input shard that cannot be read; the message names the file."""

    def __init__(self, path: PurePath | str, cause: Exception) -> None:
        super().__init__(f"{path}: unreadable input shard: {cause}")


class ShardSource:
    """One input shard opened for lookup by id: metadata in memory, images read a row group at a time."""

    def __init__(self, path: PurePath, meta_columns: list[str], store: Store | None = None) -> None:
        store = store or LOCAL
        self.path = store.url(path)
        try:
            self.file = store.parquet_file(path)
            self.meta = self.file.read(columns=meta_columns).to_pylist()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise InputError(self.path, exc) from exc
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self.index: dict[str, int] = {}
        for row, meta in enumerate(self.meta):
            previous = self.index.get(meta["id"])
            if previous is None or (self.meta[previous]["status"] != "success" and meta["status"] == "success"):
                self.index[meta["id"]] = row
        self._group = lru_cache(maxsize=4)(self._read_group)

    def _read_group(self, group: int) -> list[dict | None]:
        try:
            return self.file.read_row_group(group, columns=["image"]).column("image").to_pylist()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise InputError(self.path, exc) from exc

    def get(self, record: str) -> dict | None:
        """The metadata row of `record`, or None when the shard has no row for it."""
        row = self.index.get(record)
        return None if row is None else self.meta[row]

    def image(self, record: str) -> dict | None:
        """The image cell of `record` (read with its row group, a few groups cached)."""
        row = self.index[record]
        group = bisect.bisect_right(self.starts, row) - 1
        return self._group(group)[row - self.starts[group]]


def _real_columns(record: str, meta: dict, cell: dict) -> dict:
    return {
        "image_real": {"bytes": cell["bytes"], "path": f"real/{record}.{extension(meta['encoding'])}"},
        "width_real": meta["width"],
        "height_real": meta["height"],
        "encoding_real": meta["encoding"],
        "sha256_real": meta["sha256"],
    }


def _gen_columns(slot: int, generator: str, record: str, meta: dict, cell: dict) -> dict:
    filepath = f"{generator}/{record}.{extension(meta['encoding'])}"
    return {
        f"model_gen{slot}": meta["model"],
        f"width_gen{slot}": meta["width"],
        f"height_gen{slot}": meta["height"],
        f"num_inference_steps_gen{slot}": meta["num_inference_steps"],
        f"filepath_gen{slot}": filepath,
        f"image_gen{slot}": {"bytes": cell["bytes"], "path": filepath},
        f"generator_gen{slot}": generator,
        f"seed_gen{slot}": meta["seed"],
        f"guidance_scale_gen{slot}": meta["guidance_scale"],
        f"scheduler_gen{slot}": meta["scheduler"],
        f"model_revision_gen{slot}": meta["model_revision"],
        f"encoding_gen{slot}": meta["encoding"],
        f"jpeg_quality_gen{slot}": meta["jpeg_quality"],
        f"safety_checker_gen{slot}": meta["safety_checker"],
        f"watermark_gen{slot}": meta["watermark"],
    }


def _has_image(cell: dict | None) -> bool:
    return cell is not None and cell.get("bytes") is not None


def paired_row(record: dict, real: ShardSource, gens: dict[str, ShardSource]) -> tuple[dict | None, list[str]]:
    """The output row of one record, or None and every reason it is incomplete."""
    record_id = record["id"]
    reasons = []
    try:
        safe_name(record_id, "record id")
    except ValueError:
        reasons.append("bad_id")
    real_meta = real.get(record_id)
    if real_meta is None:
        reasons.append("real_missing")
    elif real_meta["status"] != "success":
        reasons.append("real_failed")
    if record["split"] not in SPLITS:
        reasons.append("bad_split")
    real_ok = real_meta is not None and real_meta["status"] == "success"
    for generator, source in gens.items():
        meta = source.get(record_id)
        if meta is None:
            if real_ok:  # no fake is rendered for a record whose real image is not there: only its real counts
                reasons.append(f"gen_missing:{generator}")
        elif meta["status"] != "success" or meta["generator"] not in (None, generator):
            reasons.append(f"gen_failed:{generator}")
    if reasons:
        return None, reasons
    row = {k: record[k] for k in ("id", "original_prompt", "positive_prompt", "negative_prompt", "url", "split")}
    cell = real.image(record_id)
    if not _has_image(cell):
        reasons.append("real_failed")
    else:
        row.update(_real_columns(record_id, real_meta, cell))
    for slot, (generator, source) in enumerate(gens.items()):
        cell = source.image(record_id)
        if not _has_image(cell):
            reasons.append(f"gen_failed:{generator}")
        else:
            row.update(_gen_columns(slot, generator, record_id, source.get(record_id), cell))
    return (None, reasons) if reasons else (row, [])


def provenance_summary(gens: dict[str, ShardSource]) -> dict[str, dict[str, list[Any]]]:
    """Distinct provenance values of each generator's successful rows."""
    out = {}
    for generator, source in gens.items():
        rows = [m for m in source.meta if m["status"] == "success"]
        out[generator] = {key: sorted({r[key] for r in rows if r[key] is not None}, key=str) for key in PROVENANCE}
    return out


def read_records(path: PurePath, store: Store | None = None) -> list[dict]:
    """The record columns a paired row needs, from a records shard (InputError naming it when unreadable)."""
    store = store or LOCAL
    columns = ["id", "original_prompt", "positive_prompt", "negative_prompt", "url", "split"]
    try:
        return store.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise InputError(store.url(path), exc) from exc
