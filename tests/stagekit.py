"""Build stage input shards (records, real, gen) directly with `write_shard`, for tests of later stages."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from rowkit import schema_row

from d3builder.recipe.manifest import (
    Manifest,
    MetadataSource,
    TransformTestConfig,
    load_manifest,
)
from d3builder.storage.layout import DataLayout
from d3builder.storage.schema import GEN_FEATURES, REAL_FEATURES, RECORD_FEATURES
from d3builder.storage.shards import image_cell, write_shard
from d3builder.storage.units import write_stats

GENERATORS = ("if-tiny", "sd14-tiny", "sd21-tiny", "sdxl-tiny")
ENCODINGS = ("JPEG", "PNG", "GIF", "BMP", "TIFF")
SIZES = ((40, 30), (32, 32), (48, 27))


@dataclass
class StageInputs:
    """What `make_stage_inputs` wrote: the manifest, its layout and each shard's record ids."""

    manifest: Manifest
    shards: dict[int, list[str]]
    splits: dict[str, str]
    fail: dict[str, list[str]] = field(default_factory=dict)

    @property
    def layout(self) -> DataLayout:
        return self.manifest.layout

    def complete_ids(self, split: str | None = None) -> list[str]:
        """Record ids with no failure reason (optionally of one split), in shard order."""
        ids = [i for shard in sorted(self.shards) for i in self.shards[shard] if not self.fail.get(i)]
        return [i for i in ids if split is None or self.splits[i] == split]


def image_bytes(seed: int, size: tuple[int, int], encoding: str) -> bytes:
    """A small random-noise image encoded as `encoding`."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, encoding)
    return buffer.getvalue()


def _reasons(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def make_manifest(root: Path, shard_size: int, generators: Sequence[str], max_ops: int = 2) -> Manifest:
    """Write `root/manifest.yaml` (embedded source, a test release name, output under `root`) and load it."""
    manifest = Manifest(
        name="stagekit",
        output_root=str(root),
        metadata=MetadataSource(source="embedded", release="stagekit-release-v1"),
        shard_size=shard_size,
        generators=list(generators),
        splits={"train": 0.5, "validation": 0.25, "test": 0.25},
        transform_test=TransformTestConfig(max_ops=max_ops, seed=1234),
    )
    mapping = {k: v for k, v in dataclasses.asdict(manifest).items() if k != "path"}
    path = Path(root) / "manifest.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return load_manifest(path)


def make_stage_inputs(
    root: Path,
    n_records: int,
    shard_size: int,
    generators: Sequence[str] = GENERATORS,
    fail: Mapping[str, str | Iterable[str]] | None = None,
    split_cycle: Sequence[str] = ("train", "train", "validation", "test"),
    skip: Iterable[tuple[str, int]] = (),
) -> StageInputs:
    """Write records/, real/ and gen/{g}/ shards for `n_records` records, each unit with its stats file.

    `fail` maps a record id to reasons among real_missing, real_failed, gen_missing:<g>,
    gen_failed:<g>; `skip` names (generator, shard) gen shards not to write at all.
    Record ids are str(1000 + i); split i is split_cycle[i % len]."""
    manifest = make_manifest(root, shard_size, generators)
    layout = manifest.layout
    fails = {record: _reasons(reasons) for record, reasons in (fail or {}).items()}
    skipped = set(skip)
    shards: dict[int, list[str]] = {}
    splits: dict[str, str] = {}
    for start in range(0, n_records, shard_size):
        shard = start // shard_size
        indices = range(start, min(start + shard_size, n_records))
        ids = [str(1000 + i) for i in indices]
        shards[shard] = ids
        splits.update({record: split_cycle[i % len(split_cycle)] for i, record in zip(indices, ids, strict=True)})
        write_shard([_record_row(r, splits[r], shard) for r in ids], layout.records(shard), RECORD_FEATURES)
        real_rows = [_real_row(r, fails.get(r, [])) for r in ids if "real_missing" not in fails.get(r, [])]
        write_shard(real_rows, layout.real(shard), REAL_FEATURES)
        write_stats(layout.stats("fetch-real", shard), {"shard": shard, "records": len(real_rows)})
        for slot, generator in enumerate(generators):
            if (generator, shard) in skipped:
                continue
            rows = [
                _gen_row(r, slot, generator, fails.get(r, []))
                for r in ids
                if f"gen_missing:{generator}" not in fails.get(r, [])
            ]
            write_shard(rows, layout.gen(generator, shard), GEN_FEATURES)
            write_stats(layout.stats("generate", shard, generator), {"shard": shard, "records": len(rows), "splits": None})
    write_stats(layout.stats("select", 0), {"kept": n_records, "shards": len(shards)})
    return StageInputs(manifest=manifest, shards=shards, splits=splits, fail=fails)


def _record_row(record: str, split: str, shard: int) -> dict:
    caption = f"a photo number {record}"
    return schema_row(
        RECORD_FEATURES,
        id=record,
        url=f"http://127.0.0.1:9/{record}.jpg",
        alternate_urls=[],
        original_prompt=caption,
        positive_prompt=caption,
        negative_prompt="",
        split=split,
        shard=shard,
        selection_hash=int(record) / 1e6,
        SAMPLE_ID=int(record),
        URL=f"http://127.0.0.1:9/{record}.jpg",
        TEXT=caption,
        LICENSE="?",
        NSFW="UNLIKELY",
        similarity=0.33,
        WIDTH=40,
        HEIGHT=30,
    )


def _real_row(record: str, reasons: list[str]) -> dict:
    failed = "real_failed" in reasons
    encoding = ("JPEG", "PNG")[int(record) % 2]
    size = SIZES[int(record) % len(SIZES)]
    data = None if failed else image_bytes(int(record), size, encoding)
    return schema_row(
        REAL_FEATURES,
        id=record,
        url=f"http://127.0.0.1:9/{record}.jpg",
        status="failed" if failed else "success",
        error_message="HTTP 404" if failed else None,
        image=image_cell(data, f"{record}.{encoding.lower()}"),
        width=None if failed else size[0],
        height=None if failed else size[1],
        encoding=None if failed else encoding,
        sha256=None if failed else hashlib.sha256(data).hexdigest(),
        num_bytes=None if failed else len(data),
        url_index=None if failed else 0,
        served_url=None if failed else f"http://127.0.0.1:9/{record}.jpg",
    )


def _gen_row(record: str, slot: int, generator: str, reasons: list[str]) -> dict:
    failed = f"gen_failed:{generator}" in reasons
    encoding = ENCODINGS[(int(record) + slot) % len(ENCODINGS)]
    size = SIZES[(int(record) + slot) % len(SIZES)]
    seed = int(record) * 10 + slot
    return schema_row(
        GEN_FEATURES,
        id=record,
        generator=generator,
        status="failed" if failed else "success",
        error_message="RuntimeError: out of memory" if failed else None,
        image=None if failed else image_cell(image_bytes(seed, size, encoding)),
        model=f"tiny/{generator}",
        model_revision=f"rev-{slot}",
        pipeline="StableDiffusionPipeline",
        scheduler="PNDMScheduler",
        dtype="float32",
        num_inference_steps=2,
        guidance_scale=7.5,
        seed=seed,
        width=size[0],
        height=size[1],
        encoding=encoding,
        jpeg_quality=90 if encoding == "JPEG" else None,
        safety_checker=False,
        watermark=False,
        prompt=f"a photo number {record}",
        negative_prompt="",
        software='{"diffusers": "0.0-test", "torch": "0.0-test"}',
        seconds=0.01,
    )
