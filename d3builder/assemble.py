"""`assemble`: join records, real and generated shards by id into the final paired D3 shards."""

from __future__ import annotations

import argparse
import bisect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .cliargs import add_manifest_args, manifest_from_args
from .layout import DataLayout, safe_name
from .manifest import SPLITS, Manifest
from .schema import d3_features
from .shards import DEFAULT_ROW_GROUP_SIZE, ShardStream
from .units import claim, unit_done, write_stats

logger = logging.getLogger(__name__)

STAGE = "assemble"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
"""File extension of each image encoding, for the ELSA-style `filepath_gen{i}` and image paths."""

REAL_META = ["id", "status", "width", "height", "encoding", "sha256"]
GEN_META = [
    "id", "generator", "status", "model", "model_revision", "pipeline", "scheduler", "dtype",
    "num_inference_steps", "guidance_scale", "seed", "width", "height", "encoding", "jpeg_quality",
    "safety_checker", "watermark", "software",
]  # fmt: skip
PROVENANCE = ("model", "model_revision", "pipeline", "scheduler", "dtype", "safety_checker", "watermark", "software")


def extension(encoding: str | None) -> str:
    """The file extension of an encoding name (JPEG -> jpg), `bin` when unknown."""
    return EXTENSIONS.get((encoding or "").upper(), "bin")


class InputError(Exception):
    """An input shard that cannot be read; the message names the file."""

    def __init__(self, path: Path, cause: Exception) -> None:
        super().__init__(f"{path}: unreadable input shard: {cause}")


class ShardSource:
    """One input shard opened for lookup by id: metadata in memory, images read a row group at a time."""

    def __init__(self, path: Path, meta_columns: list[str]) -> None:
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
            self.meta = self.file.read(columns=meta_columns).to_pylist()
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise InputError(path, exc) from exc
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


@dataclass
class ShardResult:
    """What assembling one records shard did."""

    shard: int
    state: str  # assembled | done | busy | missing_input | bad_input
    written: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass
class AssembleSummary:
    """Totals of one `assemble` run over every records shard."""

    assembled: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    missing_inputs: dict[int, list[str]] = field(default_factory=dict)
    bad_inputs: dict[int, list[str]] = field(default_factory=dict)
    written: Counter = field(default_factory=Counter)
    dropped: int = 0
    reasons: Counter = field(default_factory=Counter)
    card: Path | None = None

    @property
    def complete(self) -> bool:
        """True when every records shard is assembled (now or before)."""
        return not self.missing_inputs and not self.bad_inputs and not self.busy

    def add(self, result: ShardResult) -> None:
        """Fold one shard's result into the totals."""
        if result.state == "assembled":
            self.assembled.append(result.shard)
        elif result.state == "done":
            self.already_done.append(result.shard)
        elif result.state == "busy":
            self.busy.append(result.shard)
        elif result.state == "missing_input":
            self.missing_inputs[result.shard] = result.problems
        else:
            self.bad_inputs[result.shard] = result.problems
        self.written.update(result.written)
        self.dropped += result.dropped
        self.reasons.update(result.reasons)


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
    for generator, source in gens.items():
        meta = source.get(record_id)
        if meta is None:
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


def _provenance(gens: dict[str, ShardSource]) -> dict[str, dict[str, list[Any]]]:
    """Distinct provenance values of each generator's successful rows."""
    out = {}
    for generator, source in gens.items():
        rows = [m for m in source.meta if m["status"] == "success"]
        out[generator] = {key: sorted({r[key] for r in rows if r[key] is not None}, key=str) for key in PROVENANCE}
    return out


def _inputs(layout: DataLayout, shard: int, generators: list[str]) -> dict[str, Path]:
    paths = {"records": layout.records(shard), "real": layout.real(shard)}
    paths.update({f"gen:{g}": layout.gen(g, shard) for g in generators})
    return paths


def read_records(path: Path) -> list[dict]:
    columns = ["id", "original_prompt", "positive_prompt", "negative_prompt", "url", "split"]
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise InputError(path, exc) from exc


def assemble_shard(manifest: Manifest, shard: int, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> ShardResult:
    """Assemble records shard `shard` into d3/{split}/{split}-{shard}.parquet (skipped when done)."""
    layout = manifest.layout
    stats = layout.stats(STAGE, shard)
    if unit_done(stats, layout.root):
        return ShardResult(shard, "done")
    inputs = _inputs(layout, shard, manifest.generators)
    missing = [str(p) for p in inputs.values() if not p.is_file()]
    if missing:
        logger.error("shard %d not assembled: missing input %s", shard, ", ".join(missing))
        return ShardResult(shard, "missing_input", problems=missing)
    with claim(stats) as ours:
        if not ours:
            return ShardResult(shard, "busy")
        try:
            real = ShardSource(inputs["real"], REAL_META)
            gens = {g: ShardSource(inputs[f"gen:{g}"], GEN_META) for g in manifest.generators}
            records = read_records(inputs["records"])
            return _assemble_claimed(manifest, shard, inputs, records, real, gens, row_group_size)
        except InputError as exc:
            logger.error("shard %d not assembled: %s", shard, exc)
            return ShardResult(shard, "bad_input", problems=[str(exc)])


def _assemble_claimed(
    manifest: Manifest,
    shard: int,
    inputs: dict[str, Path],
    records: list[dict],
    real: ShardSource,
    gens: dict[str, ShardSource],
    row_group_size: int,
) -> ShardResult:
    layout, started = manifest.layout, time.time()
    features = d3_features(len(manifest.generators))
    streams: dict[str, ShardStream] = {}
    result = ShardResult(shard, "assembled")
    seen: set[str] = set()
    try:
        for record in records:
            row, reasons = (None, ["duplicate_id"]) if record["id"] in seen else paired_row(record, real, gens)
            seen.add(record["id"])
            if row is None:
                result.dropped += 1
                result.reasons.update(reasons)
                continue
            split = row["split"]
            if split not in streams:
                streams[split] = ShardStream(layout.d3(split, shard), features, row_group_size)
            streams[split].write(row)
        outputs = {split: stream.commit() for split, stream in sorted(streams.items())}
    except BaseException:
        for stream in streams.values():
            stream.abort()
        raise
    for split in set(SPLITS) - set(outputs):
        layout.d3(split, shard).unlink(missing_ok=True)  # a stale file of an earlier, different run of this unit
    result.written = {split: streams[split].rows for split in outputs}
    write_stats(
        layout.stats(STAGE, shard),
        {
            "shard": shard,
            "records": len(records),
            "written": result.written,
            "dropped": result.dropped,
            "dropped_by_reason": dict(sorted(result.reasons.items())),
            "outputs": {split: str(path.relative_to(layout.root)) for split, path in outputs.items()},
            "inputs": {name: str(path.relative_to(layout.root)) for name, path in inputs.items()},
            "generators": list(manifest.generators),
            "provenance": _provenance(gens),
            "seconds": round(time.time() - started, 3),
        },
    )
    return result


def assemble_dataset(manifest: Manifest, progress: bool = True) -> AssembleSummary:
    """Assemble every records shard not yet done, then write the dataset card."""
    from .card import write_dataset_card

    summary = AssembleSummary()
    shards = manifest.layout.record_shards()
    if not shards:
        logger.error("no records shards under %s: run `select` first", manifest.layout.root / "records")
    bar = tqdm(shards, desc="assemble", unit="shard", disable=not progress)
    for shard in bar:
        summary.add(assemble_shard(manifest, shard))
        bar.set_postfix(written=sum(summary.written.values()), dropped=summary.dropped)
    summary.card = write_dataset_card(manifest)
    return summary


def _run(args: argparse.Namespace) -> int:
    summary = assemble_dataset(manifest_from_args(args))
    print(f"assembled {len(summary.assembled)} shard(s), {len(summary.already_done)} already done")
    print("written: " + (", ".join(f"{s}={n}" for s, n in sorted(summary.written.items())) or "nothing"))
    print(f"dropped {summary.dropped} incomplete record(s)")
    for reason, count in sorted(summary.reasons.items()):
        print(f"  {reason}: {count}")
    for shard, missing in sorted(summary.missing_inputs.items()):
        print(f"shard {shard}: NOT assembled, missing input: {', '.join(missing)}")
    for shard, problems in sorted(summary.bad_inputs.items()):
        print(f"shard {shard}: NOT assembled, {'; '.join(problems)}")
    if summary.busy:
        print(f"shards being assembled by another process: {summary.busy}")
    print(f"dataset card: {summary.card}")
    return 0 if summary.complete else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder assemble`."""
    parser = subparsers.add_parser(
        "assemble",
        help="join records, real and generated shards into paired d3/{split}/ shards",
        description="Join records/{k}, real/{k} and gen/{g}/{k} by id into d3/{split}/{split}-{k}.parquet "
        "(complete records only; the rest counted by reason in stats/assemble/{k}.json). Resumable.",
    )
    add_manifest_args(parser)
    parser.set_defaults(func=_run)
