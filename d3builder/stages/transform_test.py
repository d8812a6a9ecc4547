"""`transform-test`: the test and fit splits "with transformations", every image passed through seeded CoDE augmentations.

`d3/test/` becomes `d3/test_augm/` and `d3/fit/` (the held-out subset the classifiers are fitted
on) becomes `d3/fit_augm/`, with the same seed, draw and recorded ops per image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from d3builder.imaging.augmentations import FAMILIES, apply_ops, draw_ops
from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import Manifest
from d3builder.storage.card import split_shards, write_dataset_card
from d3builder.storage.layout import extension, shard_number
from d3builder.storage.schema import (
    AUGM_SPLITS,
    SOURCE_SPLIT,
    augm_features,
    generator_slots,
)
from d3builder.storage.shards import DEFAULT_ROW_GROUP_SIZE, ShardStream, decode_image
from d3builder.storage.units import claim, unit_done, write_stats

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
"""Quality of the final JPEG/WebP re-encoding (the JPEG-quality family, when drawn, acts before it)."""
SAVE_FORMATS = {
    "JPEG": "JPEG",
    "JPG": "JPEG",
    "MPO": "JPEG",
    "PNG": "PNG",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
    "WEBP": "WEBP",
}
"""Pillow format used to re-encode each original encoding; anything else is written as PNG."""


def image_rng(seed: int, record: str, column: str) -> np.random.Generator:
    """The generator of one image's draw, seeded from (seed, record id, column) only."""
    digest = hashlib.sha256(f"{seed}\x00{record}\x00{column}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def encode(image: Image.Image, encoding: str | None) -> tuple[bytes, str]:
    """Encode `image` in its original encoding (JPEG/WebP at JPEG_QUALITY); returns bytes and the format used."""
    fmt = SAVE_FORMATS.get((encoding or "").upper(), "PNG")
    options = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue(), fmt


class UndecodableImage(ValueError):
    """An input image that does not decode; `column` names it."""

    def __init__(self, column: str, cause: Exception) -> None:
        self.column = column
        super().__init__(f"column {column!r}: image does not decode: {cause}")


def _with_extension(path: str | None, fmt: str) -> str | None:
    return None if path is None else f"{path.rsplit('.', 1)[0]}.{extension(fmt)}"


@dataclass
class TransformSummary:
    """Totals of one `transform-test` run."""

    transformed: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    fit_units: Counter = field(default_factory=Counter)
    """Shards of the fit split by outcome (transformed, done, busy); the three lists above are test shards."""
    written: int = 0
    per_split: Counter = field(default_factory=Counter)
    """Records written per transformed split (test_augm, fit_augm)."""
    dropped: Counter = field(default_factory=Counter)
    card: Path | None = None


class _Transformer:
    """Augments every image of a row, recording the ops."""

    def __init__(self, seed: int, max_ops: int, slots: list[int], split: str) -> None:
        self.seed, self.max_ops, self.split = seed, max_ops, split
        self.columns = [("real", "image_real", "encoding_real")] + [
            (f"gen{s}", f"image_gen{s}", f"encoding_gen{s}") for s in slots
        ]
        self.families: Counter = Counter()

    def row(self, row: dict) -> dict:
        """The augmented row (raises UndecodableImage naming the column whose image does not decode)."""
        out = dict(row, split=self.split)
        for suffix, image_column, encoding_column in self.columns:
            try:
                image = decode_image(row[image_column])
            except Exception as exc:  # noqa: BLE001 - any decoder failure names its column
                raise UndecodableImage(image_column, exc) from exc
            ops = draw_ops(image_rng(self.seed, row["id"], image_column), self.max_ops)
            augmented = apply_ops(image, ops)
            data, fmt = encode(augmented, row[encoding_column] or image.format)
            self.families.update(op.family for op in ops)
            out[image_column] = {"bytes": data, "path": _with_extension(row[image_column].get("path"), fmt)}
            out[f"width_{suffix}"], out[f"height_{suffix}"] = augmented.size
            out[encoding_column] = fmt
            out[f"augm_{suffix}"] = json.dumps([op.to_dict() for op in ops], sort_keys=True)
            if suffix == "real":
                out["sha256_real"] = hashlib.sha256(data).hexdigest()
            else:
                out[f"filepath_{suffix}"] = _with_extension(row[f"filepath_{suffix}"], fmt)
                out[f"jpeg_quality_{suffix}"] = JPEG_QUALITY if fmt == "JPEG" else None
        return out


def transform_shard(manifest: Manifest, source: Path, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> str:
    """Write the augmented copy of one test or fit shard; returns transformed, done or busy."""
    layout, shard, split = manifest.layout, shard_number(source), source.parent.name
    output, stats = layout.d3(AUGM_SPLITS[split], shard), layout.transform_stats(split, shard)
    if unit_done(stats, layout.root):
        return "done"
    with claim(stats) as ours:
        if not ours:
            return "busy"
        _transform_claimed(manifest, source, shard, output, stats, row_group_size)
    return "transformed"


def _transform_claimed(
    manifest: Manifest, source: Path, shard: int, output: Path, stats: Path, row_group_size: int
) -> None:
    started, config = time.time(), manifest.transform_test
    slots = generator_slots(pq.read_schema(source).names)
    augm_split = AUGM_SPLITS[source.parent.name]
    transformer = _Transformer(config.seed, config.max_ops, slots, augm_split)
    stream = ShardStream(output, augm_features(len(slots)), row_group_size)
    records, dropped = 0, Counter()
    try:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=row_group_size):
            for row in batch.to_pylist():
                records += 1
                try:
                    stream.write(transformer.row(row))
                except UndecodableImage as exc:
                    dropped[f"decode_failed:{exc.column}"] += 1
                    logger.error("%s: record %r left out of %s: %s", source, row["id"], augm_split, exc)
        written = stream.commit()
    except BaseException:
        stream.abort()
        raise
    if written is None:
        output.unlink(missing_ok=True)
    write_stats(
        stats,
        {
            "shard": shard,
            "input": str(source.relative_to(manifest.layout.root)),
            "records": records,
            "written": stream.rows,
            "dropped_by_reason": dict(sorted(dropped.items())),
            "outputs": {} if written is None else {augm_split: str(written.relative_to(manifest.layout.root))},
            "seed": config.seed,
            "max_ops": config.max_ops,
            "jpeg_quality": JPEG_QUALITY,
            "families": sorted(FAMILIES),
            "ops_drawn": dict(sorted(transformer.families.items())),
            "seconds": round(time.time() - started, 3),
        },
    )


def transform_test(manifest: Manifest, progress: bool = True) -> TransformSummary:
    """Build d3/test_augm/ and d3/fit_augm/ from every d3/test/ and d3/fit/ shard not yet done, then rewrite the card."""
    layout = manifest.layout
    found = split_shards(layout.d3_dir()) if layout.d3_dir().is_dir() else {}
    if not found.get(SOURCE_SPLIT):
        logger.error("no test shards under %s: run `assemble` first", layout.d3_dir() / SOURCE_SPLIT)
    sources = [path for split in AUGM_SPLITS for path in found.get(split, [])]
    summary = TransformSummary()
    for source in tqdm(sources, desc="transform-test", unit="shard", disable=not progress):
        state = transform_shard(manifest, source)
        if source.parent.name == SOURCE_SPLIT:
            {"transformed": summary.transformed, "done": summary.already_done, "busy": summary.busy}[state].append(
                shard_number(source)
            )
        else:
            summary.fit_units[state] += 1
    for split, augm_split in AUGM_SPLITS.items():
        for path in sorted(layout.transform_stats(split, 0).parent.glob("[0-9]*.json")):
            stats = json.loads(path.read_text())
            summary.written += stats["written"]
            summary.per_split[augm_split] += stats["written"]
            summary.dropped.update(stats["dropped_by_reason"])
    if sources:
        summary.card = write_dataset_card(manifest, layout.d3_dir())
    return summary


def _run(args: argparse.Namespace) -> int:
    summary = transform_test(manifest_from_args(args))
    print(f"transformed {len(summary.transformed)} test shard(s), {len(summary.already_done)} already done")
    if summary.fit_units:
        print(f"transformed {summary.fit_units['transformed']} fit shard(s), {summary.fit_units['done']} already done")
    for split, count in summary.per_split.items():
        print(f"{split}: {count} records")
    for reason, count in sorted(summary.dropped.items()):
        print(f"  left out ({reason}): {count}")
    if summary.busy or summary.fit_units["busy"]:
        print(f"shards being transformed by another process: test {summary.busy}, fit {summary.fit_units['busy']}")
    return 0 if summary.card is not None and not summary.busy and not summary.fit_units["busy"] else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder transform-test`."""
    parser = subparsers.add_parser(
        "transform-test",
        help="build the test and fit splits with transformations (d3/test_augm/, d3/fit_augm/)",
        description="Pass every image of d3/test/ and d3/fit/ through a seeded random draw of the CoDE augmentations, "
        "re-encode it in its original encoding and record the ops (augm_real, augm_gen{i}). Resumable.",
    )
    add_manifest_args(parser)
    parser.set_defaults(func=_run)
