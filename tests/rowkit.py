"""One schema-driven row factory for every shard the tests write: rows follow `datasets.Features`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Features, Value

from d3builder.storage.schema import d3_features
from d3builder.storage.shards import image_cell

DEFAULTS = {"string": "", "int64": 0, "float64": 0.0, "float32": 0.0, "bool": False}
"""Typed defaults of plain columns; images, lists and other types default to None."""


def schema_row(features: Features, **values: Any) -> dict:
    """A row with every column of `features`: the given values, the rest a typed default (KeyError on a typo)."""
    unknown = sorted(set(values) - set(features))
    if unknown:
        raise KeyError(f"columns not in the schema: {unknown}")
    row = {}
    for name, feature in features.items():
        if name in values:
            row[name] = values[name]
        elif isinstance(feature, Value) and feature.dtype in DEFAULTS:
            row[name] = DEFAULTS[feature.dtype]
        else:
            row[name] = None
    return row


def slot_columns(slot: int, **values: Any) -> dict:
    """Generator-slot columns: `model=...` becomes `model_gen{slot}`."""
    return {f"{key}_gen{slot}": value for key, value in values.items()}


def d3_row(
    record_id: str,
    real: bytes,
    fakes: Sequence[tuple[bytes, tuple[int, int]]],
    *,
    split: str = "train",
    models: Sequence[str] | None = None,
    generators: Sequence[str] | None = None,
    **values: Any,
) -> dict:
    """A complete row of our final schema: the real image and one (bytes, size) fake per generator slot."""
    columns = {
        "id": record_id,
        "original_prompt": f"a photo number {record_id}",
        "positive_prompt": f"a photo number {record_id}",
        "url": f"http://127.0.0.1/{record_id}.jpg",
        "split": split,
        "image_real": image_cell(real, f"{record_id}.jpg"),
        "encoding_real": "JPEG",
    }
    for slot, (data, (width, height)) in enumerate(fakes):
        columns |= slot_columns(
            slot,
            model=(models or [f"tiny/{slot}"] * len(fakes))[slot],
            width=width,
            height=height,
            num_inference_steps=50,
            filepath=f"gen{slot}/{record_id}.jpg",
            image=image_cell(data),
            generator=(generators or [f"g{slot}"] * len(fakes))[slot],
            seed=7,
            guidance_scale=7.5,
            scheduler="DDIMScheduler",
            model_revision="main",
            encoding="JPEG",
            jpeg_quality=90,
        )
    return schema_row(d3_features(len(fakes)), **(columns | values))

