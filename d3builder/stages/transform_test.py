"""`transform-test`: the test and fit splits "with transformations", every image passed through seeded CoDE augmentations.

`d3/test/` becomes `d3/test_augm/` and `d3/fit/` (the held-out subset the classifiers are fitted
on) becomes `d3/fit_augm/`, with the same seed, draw and recorded ops per image. A unit is (split, shard):
stats/transform_test/{k}.json for test, stats/transform_test/fit/{k}.json for fit.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath

import numpy as np
import pyarrow as pa
from PIL import Image

from d3builder.core.commandline import UsageError
from d3builder.imaging.augmentations import FAMILIES, apply_ops, draw_ops
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_unit_args,
    manifest_from_args,
    report,
)
from d3builder.recipe.manifest import Manifest
from d3builder.storage.card import split_shards, write_dataset_card
from d3builder.storage.layout import TRANSFORM_STAGE, extension, shard_number
from d3builder.storage.runner import (
    BadInput,
    RunSummary,
    Unit,
    UnitContext,
    UnitJob,
    UnitWork,
)
from d3builder.storage.schema import (
    AUGM_SPLITS,
    SOURCE_SPLIT,
    augm_features,
    generator_slots,
)
from d3builder.storage.shards import DEFAULT_ROW_GROUP_SIZE, decode_image

logger = logging.getLogger(__name__)

STAGE = TRANSFORM_STAGE
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


class TransformJob(UnitJob):
    """transform-test's unit (split, k): d3/{split}/{split}-{k} -> d3/{split}_augm/..., every image augmented and recorded.

    The unit's group is the source split (None for test)."""

    stage = STAGE

    def __init__(self, manifest: Manifest, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
        super().__init__(manifest.layout)
        self.manifest, self.row_group_size = manifest, row_group_size

    def source(self, unit: Unit) -> PurePath:
        return self.layout.d3(unit.group or SOURCE_SPLIT, unit.shard)

    def outputs(self, unit: Unit) -> list[PurePath]:
        return [self.layout.d3(AUGM_SPLITS[unit.group or SOURCE_SPLIT], unit.shard)]

    def input_units(self, unit: Unit) -> list[Unit]:
        return [Unit("assemble", unit.shard)]

    def size(self, unit: Unit) -> int:
        return self.store.parquet_file(self.source(unit)).metadata.num_rows

    def compute(self, ctx: UnitContext) -> UnitWork:
        store, source, started, config = self.store, self.source(ctx.unit), time.time(), self.manifest.transform_test
        output = self.outputs(ctx.unit)[0]
        try:
            parquet = store.parquet_file(source)
        except (OSError, pa.ArrowException) as exc:
            raise BadInput(f"{store.url(source)}: unreadable test shard: {exc}") from exc
        slots = generator_slots(parquet.schema_arrow.names)
        augm_split = AUGM_SPLITS[ctx.unit.group or SOURCE_SPLIT]
        transformer = _Transformer(config.seed, config.max_ops, slots, augm_split)
        stream = ctx.stream(output, augm_features(len(slots)), self.row_group_size)
        records, dropped = 0, Counter()
        try:
            for batch in parquet.iter_batches(batch_size=self.row_group_size):
                for row in batch.to_pylist():
                    records += 1
                    try:
                        stream.write(transformer.row(row))
                    except UndecodableImage as exc:
                        dropped[f"decode_failed:{exc.column}"] += 1
                        logger.error("%s: record %r left out of %s: %s", store.url(source), row["id"], augm_split, exc)
                ctx.advance(batch.num_rows)
            written = ctx.commit(stream)
        except BaseException:
            stream.abort()
            raise
        if written is None:
            ctx.remove(output)
        return UnitWork({
            "shard": ctx.unit.shard,
            "input": store.relative(source),
            "records": records,
            "written": stream.rows,
            "dropped_by_reason": dict(sorted(dropped.items())),
            "outputs": {} if written is None else {augm_split: store.relative(written)},
            "seed": config.seed,
            "max_ops": config.max_ops,
            "jpeg_quality": JPEG_QUALITY,
            "families": sorted(FAMILIES),
            "ops_drawn": dict(sorted(transformer.families.items())),
            "seconds": round(time.time() - started, 3),
        }, records=records, reasons=dropped, counts=Counter({augm_split: stream.rows}))


def transform_test(manifest: Manifest, shards: Sequence[int] | None = None, progress: bool = True,
                   wait: bool = True) -> RunSummary:
    """Build d3/test_augm/ and d3/fit_augm/ from every d3/test/ and d3/fit/ shard (or `shards`) not yet done, then
    rewrite the dataset card.

    Raises UsageError when there is no test shard (run assemble first)."""
    layout = manifest.layout
    found = split_shards(layout.d3_dir(), layout.store)
    if not found.get(SOURCE_SPLIT):
        raise UsageError(f"no test shards under {layout.url(layout.d3_dir() / SOURCE_SPLIT)}: "
                         "run `d3builder assemble` first")
    units = [Unit(STAGE, shard_number(path), None if split == SOURCE_SPLIT else split)
             for split in AUGM_SPLITS for path in found.get(split, [])
             if shards is None or shard_number(path) in shards]
    summary = manifest.runner(progress=progress, wait=wait).run(TransformJob(manifest), units)
    write_dataset_card(manifest)
    return summary


def _run(args: argparse.Namespace) -> int:
    summary = transform_test(manifest_from_args(args), args.shards, progress=args.progress, wait=args.wait)
    code = report(summary)
    for split in AUGM_SPLITS.values():
        if split in summary.counts:
            print(f"{split}: {summary.counts[split]} records written now")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder transform-test`."""
    parser = subparsers.add_parser(
        "transform-test",
        help="build the test and fit splits with transformations (d3/test_augm/, d3/fit_augm/)",
        description="Pass every image of d3/test/ and d3/fit/ through a seeded random draw of the CoDE augmentations, "
        "re-encode it in its original encoding and record the ops (augm_real, augm_gen{i}). Resumable.",
    )
    add_manifest_args(parser)
    add_unit_args(parser)
    parser.set_defaults(func=_run)
