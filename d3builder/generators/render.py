"""Rendering records shards with one generator: the engine behind `generate` and `extend`.

Each process takes its share of the records shards (round robin by process index) and claims each
unit with a lock file, so several nodes on one filesystem never render the same shard. Per shard:
records are grouped by output size (drawn per record with `size_for`) and cut into batches of
`batch_size`, which the generator's backend renders (one backend per registry kind: a diffusers
pipeline, a Python function, an HTTP API, a folder of images); every image is seeded from
`seed_for(record id, generator, manifest seed)`; each rendered image is encoded in a format drawn from
the manifest's encoding mix, while images encoded elsewhere (an API's, a folder's) are kept as they
are. Rows are written in batch order to a hidden temporary file and renamed into place at the end,
then the stats file marks the unit done, so an interrupted shard is redone from scratch, never half
kept. Because batches are a pure function of the stored rows (their order, sizes and the recorded
batch size), `regenerate` can rebuild any image's exact batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import diffusers
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from accelerate import PartialState
from tqdm import tqdm

from d3builder.generators.backends import check_ready, load_backend
from d3builder.generators.backends.base import FAILURE_REASONS, Backend, Columns, Job
from d3builder.generators.encoding import (
    check_mix,
    check_quality_range,
    draw_encoding,
    encode_image,
)
from d3builder.generators.registry import (
    DTYPES,
    Entry,
    GeneratorEntry,
    RegistryError,
    load_registries,
)
from d3builder.generators.runtime import (
    NAN_OUTPUT,
    GenerationResult,
    resolve_model_path,
    seed_for,
    size_for,
)
from d3builder.recipe.manifest import SPLITS, Manifest
from d3builder.storage.layout import DataLayout, extension
from d3builder.storage.schema import GEN_FEATURES
from d3builder.storage.shards import ShardStream, image_cell, write_shard
from d3builder.storage.units import (
    claim,
    is_done,
    read_stats,
    shards_for_process,
    write_stats,
)

logger = logging.getLogger(__name__)

STAGE = "generate"
RECORD_COLUMNS = ["id", "positive_prompt", "negative_prompt", "split"]
ROW_PROVENANCE = ("model", "model_revision", "scheduler", "dtype", "num_inference_steps", "guidance_scale",
                  "safety_checker", "watermark")
"""Gen-row columns a generator states once (Columns) and an image may state for itself (GenerationResult.fields)."""


@dataclass(frozen=True)
class SpeedOptions:
    """Speed switches: dtype from the registry entry unless set, SDPA on, compile/channels_last/VAE slicing+tiling off."""

    dtype: str | None = None
    sdpa: bool = True
    compile: bool = False
    channels_last: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False


def plan_batches(jobs: Iterable[Job], batch_size: int) -> list[list[Job]]:
    """Group jobs by output size (sizes in order of first appearance, jobs in order), then cut into batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.width, job.height), []).append(job)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def manifest_registry(manifest: Manifest, *extra: str | Path) -> dict[str, Entry]:
    """The manifest's registry files (plus `extra` ones), loaded and validated (RegistryError on a bad entry)."""
    paths = [*manifest.registry_paths()]
    paths += [Path(p) for p in extra if Path(p).resolve() not in {q.resolve() for q in paths}]
    return load_registries(*paths)


def registry_entry(registry: dict[str, Entry], name: str) -> Entry:
    """The entry called `name`, or a RegistryError listing the known names."""
    if name not in registry:
        sources = sorted({e.source for e in registry.values()})
        raise RegistryError(
            f"generator '{name}' is not in the registry ({', '.join(sources) or 'no registry file'}); "
            f"known: {', '.join(sorted(registry))}"
        )
    return registry[name]


def software() -> str:
    """Versions of the software that renders and encodes, as a JSON string."""
    try:
        ours = metadata.version("d3code")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    versions = {
        "d3code": ours,
        "diffusers": diffusers.__version__,
        "pillow": PIL.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return json.dumps(versions, sort_keys=True)


def failure_reason(error: str) -> str:
    """The counted reason of one failed image: nan_output, encode_error, a backend reason, or exception:<type>."""
    reason = error.split(":", 1)[0].strip()
    if error == NAN_OUTPUT or reason == "encode_error" or reason in FAILURE_REASONS:
        return reason
    return f"exception:{reason or 'unknown'}"


def done(layout: DataLayout, generator: str, shard: int, splits: Sequence[str] | None = None) -> bool:
    """A gen unit is done when shard and stats exist and it covered the requested splits (None: all)."""
    output, stats = layout.gen(generator, shard), layout.stats(STAGE, shard, generator)
    if not is_done(output, stats):
        return False
    covered = read_stats(stats).get("splits")
    return covered is None or (splits is not None and set(splits) <= set(covered))


@dataclass
class GenerateSummary:
    """What one process of a `generate` run did."""

    generator: str
    process_index: int = 0
    num_processes: int = 1
    generated: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    bad_inputs: dict[int, str] = field(default_factory=dict)
    images: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Successful images per second of rendering (loading excluded)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        """True when every shard of this process is done and none was unreadable or held by another."""
        return not self.bad_inputs and not self.busy


class ShardGenerator:
    """Renders records shards of one generator; its backend is loaded on the first shard that needs it."""

    def __init__(self, manifest: Manifest, entry: Entry, *, device: str | torch.device,
                 batch_size: int, speed: SpeedOptions, splits: Sequence[str] | None = None,
                 process_index: int = 0) -> None:
        self.manifest, self.entry, self.device = manifest, entry, torch.device(device)
        self.batch_size, self.speed = batch_size, speed
        self.splits = sorted(set(splits)) if splits is not None else None
        self.mix = dict(manifest.generate.encoding_mix)
        self.quality = list(check_quality_range(manifest.generate.jpeg_quality))
        check_mix(self.mix)
        self.process_index = process_index
        self.backend: Backend | None = None
        self.columns = Columns(model=entry.model)
        self.software = software()

    def load(self) -> Backend:
        """Load the generator (pipeline, function, API client or folder listing) once."""
        if self.backend is None:
            self.backend = load_backend(self.entry, self.device, asdict(self.speed))
            self.columns = self.backend.columns()
        return self.backend

    def jobs(self, shard: int) -> tuple[list[Job], int]:
        """The shard's jobs (selected splits, first row of a duplicated id) and how many duplicates were skipped.

        An entry without sizes (a folder of images made elsewhere) leaves each size to its image."""
        path = self.manifest.layout.records(shard)
        table = pq.read_table(path, columns=RECORD_COLUMNS)
        jobs, seen, duplicates = [], set(), 0
        for row in table.to_pylist():
            if self.splits is not None and row["split"] not in self.splits:
                continue
            if row["id"] in seen:
                duplicates += 1
                continue
            seen.add(row["id"])
            width, height = (size_for(row["id"], self.entry.name, self.manifest.seed, self.entry.sizes)
                             if self.entry.sizes else (None, None))
            jobs.append(Job(row["id"], row["positive_prompt"] or "", row["negative_prompt"] or "",
                            seed_for(row["id"], self.entry.name, self.manifest.seed), width, height))
        return jobs, duplicates

    def row(self, job: Job, result: GenerationResult, seconds: float) -> dict[str, Any]:
        """The gen row of one job: the image (encoded here per the mix, or kept as encoded elsewhere) or the
        failure, with the generator's provenance columns (per-image values from `result.fields` win)."""
        columns = self.columns
        data, error, fmt, quality = None, result.error, None, None
        if result.data is not None:
            data, fmt = result.data, result.encoding
        elif columns.encoded_here:
            encoding = draw_encoding(job.id, self.entry.name, job.seed, self.mix, self.quality)
            fmt, quality = encoding.format, encoding.quality
            if result.image is not None:
                try:
                    data = encode_image(result.image, encoding)
                except (OSError, ValueError) as exc:
                    error = f"encode_error: {type(exc).__name__}: {exc}"
        stated = {key: result.fields.get(key, getattr(columns, key)) for key in ROW_PROVENANCE}
        return {
            "id": job.id,
            "generator": self.entry.name,
            "status": "success" if data is not None else "failed",
            "error_message": error if data is None else None,
            "image": image_cell(data, f"{self.entry.name}/{job.id}.{extension(fmt)}"),
            **stated,
            "pipeline": result.fields.get("pipeline") or result.pipeline or columns.pipeline,
            "seed": result.seed,
            "width": result.width,
            "height": result.height,
            "encoding": fmt,
            "jpeg_quality": quality,
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "software": self.software,
            "seconds": round(seconds, 4),
        }

    def run(self, shard: int, jobs: list[Job], duplicates: int, bar: tqdm, summary: GenerateSummary) -> None:
        """Render one claimed shard's jobs and write gen/{g}/{k}.parquet, then its stats (the done marker)."""
        layout = self.manifest.layout
        output = layout.gen(self.entry.name, shard)
        for stale in output.parent.glob(f".{output.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed run of this unit; we hold its claim now
        backend = self.load() if jobs else None
        started, rendering = time.time(), 0.0
        counts, reasons, encodings = Counter(), Counter(), Counter()
        stream = ShardStream(output, GEN_FEATURES)
        try:
            for batch in plan_batches(jobs, self.batch_size):
                tick = time.perf_counter()
                results = backend.render(batch)
                seconds = time.perf_counter() - tick
                rendering += seconds
                for job, result in zip(batch, results, strict=True):
                    row = self.row(job, result, seconds / len(batch))
                    stream.write(row)
                    counts[row["status"]] += 1
                    if row["status"] == "success":
                        encodings[row["encoding"]] += 1
                    else:
                        reasons[failure_reason(row["error_message"])] += 1
                bar.update(len(batch))
            if stream.commit() is None:
                write_shard([], output, GEN_FEATURES)  # no record of the requested splits: an empty, done shard
        except BaseException:
            stream.abort()
            raise
        summary.images += counts["success"]
        summary.failed += counts["failed"]
        summary.reasons.update(reasons)
        summary.seconds += rendering
        write_stats(layout.stats(STAGE, shard, self.entry.name), {
            "shard": shard,
            "generator": self.entry.name,
            "records": len(jobs),
            "success": counts["success"],
            "failed": counts["failed"],
            "failures_by_reason": dict(sorted(reasons.items())),
            "duplicate_ids_skipped": duplicates,
            "encodings": dict(sorted(encodings.items())),
            "splits": self.splits,
            "batch_size": self.batch_size,
            "encoding_mix": self.mix,
            "jpeg_quality": self.quality,
            "seed": self.manifest.seed,
            "device": str(self.device),
            "process_index": self.process_index,
            "kind": self.entry.kind,
            "provenance": self.backend.provenance() if self.backend is not None else None,
            "not_recorded": dict(self.columns.not_recorded),
            "output": str(output.relative_to(layout.root)),
            "seconds": round(time.time() - started, 3),
            "render_seconds": round(rendering, 3),
            "images_per_second": round(counts["success"] / rendering, 3) if rendering > 0 else 0.0,
        })


def _records_in(layout: DataLayout, shards: Sequence[int], splits: Sequence[str] | None) -> int:
    """How many records of the splits (None: all) the shards hold (unreadable shards count 0)."""
    total = 0
    for shard in shards:
        try:
            column = pq.read_table(layout.records(shard), columns=["split"]).column("split").to_pylist()
        except (OSError, pa.ArrowException, KeyError):
            continue
        total += sum(1 for s in column if splits is None or s in splits)
    return total


def prepare_weights(entry: Entry, state: PartialState) -> None:
    """Build tiny twins on the main process first: under torch.distributed, transformers saves weights on rank 0 only."""
    if not isinstance(entry, GeneratorEntry):
        return
    with state.main_process_first():
        for spec in (entry, *entry.stages):
            resolve_model_path(spec)


def process_state() -> PartialState:
    """This process's Accelerate state (CPU processes with gloo when there is no CUDA)."""
    return PartialState(cpu=not torch.cuda.is_available())


def generate_shards(
    manifest: Manifest,
    generator_name: str,
    *,
    registry: dict[str, Entry] | None = None,
    shards: Sequence[int] | None = None,
    batch_size: int | None = None,
    speed: SpeedOptions | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> GenerateSummary:
    """Render this process's share of the records shards with one generator (done shards are skipped).

    `registry` defaults to the manifest's registry files; `shards` to every records shard; `batch_size`
    to manifest.generate.batch_size; `speed` to SpeedOptions() (registry dtype, SDPA on, the rest off); `splits` (e.g. ["test"]) limits the records rendered (None: all).
    A bad registry, an unknown generator or bad options raise before any shard is touched."""
    registry = manifest_registry(manifest) if registry is None else registry
    entry = registry_entry(registry, generator_name)
    check_ready(entry)
    speed = speed or SpeedOptions()
    batch_size = batch_size or manifest.generate.batch_size
    if speed.dtype is not None and speed.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {speed.dtype!r}")
    if splits is not None and set(splits) - set(SPLITS):
        raise ValueError(f"unknown splits {sorted(set(splits) - set(SPLITS))} (allowed: {', '.join(SPLITS)})")
    state = process_state()
    prepare_weights(entry, state)
    worker = ShardGenerator(manifest, entry, device=state.device, batch_size=batch_size, speed=speed, splits=splits,
                            process_index=state.process_index)
    layout = manifest.layout
    summary = GenerateSummary(entry.name, state.process_index, state.num_processes)
    every = sorted(shards) if shards is not None else layout.record_shards()
    if not every:
        logger.error("no records shards under %s: run `select` first", layout.root / "records")
    mine = shards_for_process(every, state.process_index, state.num_processes)
    todo = [k for k in mine if not done(layout, entry.name, k, worker.splits)]
    summary.already_done = [k for k in mine if k not in todo]
    bar = tqdm(total=_records_in(layout, todo, worker.splits), desc=f"generate {entry.name}", unit="img",
               disable=not (progress and state.is_main_process))
    for shard in todo:
        if not layout.records(shard).is_file():
            logger.error("shard %d not generated: %s is missing", shard, layout.records(shard))
            summary.bad_inputs[shard] = f"{layout.records(shard)}: missing records shard (run select)"
            continue
        output = layout.gen(entry.name, shard)
        output.parent.mkdir(parents=True, exist_ok=True)
        with claim(output) as ours:
            if not ours:
                summary.busy.append(shard)
            elif done(layout, entry.name, shard, worker.splits):
                summary.already_done.append(shard)  # finished by another node between our check and the claim
            else:
                try:
                    jobs, duplicates = worker.jobs(shard)
                except (OSError, pa.ArrowException, KeyError) as exc:
                    logger.error("shard %d not generated: %s: unreadable records shard: %s", shard,
                                 layout.records(shard), exc)
                    summary.bad_inputs[shard] = f"{layout.records(shard)}: unreadable records shard: {exc}"
                    continue
                worker.run(shard, jobs, duplicates, bar, summary)
                summary.generated.append(shard)
        bar.set_postfix(ok=summary.images, failed=summary.failed)
    bar.close()
    return summary


def print_summary(summary: GenerateSummary) -> None:
    """Print one process's summary (prefixed with its rank when there are several)."""
    prefix = f"[process {summary.process_index}/{summary.num_processes}] " if summary.num_processes > 1 else ""
    print(f"{prefix}{summary.generator}: generated {len(summary.generated)} shard(s), "
          f"{len(summary.already_done)} already done; {summary.images} image(s), {summary.failed} failed, "
          f"{summary.images_per_second:.2f} images/s")
    for reason, count in sorted(summary.reasons.items()):
        print(f"{prefix}  failed {reason}: {count}")
    for shard, problem in sorted(summary.bad_inputs.items()):
        print(f"{prefix}shard {shard}: NOT generated, {problem}")
    if summary.busy:
        print(f"{prefix}shards claimed by another process: {summary.busy}")
