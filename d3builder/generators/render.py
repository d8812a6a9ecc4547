"""Rendering records shards with one generator: the engine behind `generate` and `extend`.

Units go through the unit runner (`d3builder.storage.runner`): leased, committed atomically, stats last.
Under `accelerate launch` each process takes its share of the records shards (round robin by process
index); independent workers (any number, any node) share every shard through the leases. Per shard:
records are grouped by output size (drawn per record with `size_for`) and cut into batches of
`batch_size`, which the generator's backend renders (one backend per registry kind: a diffusers
pipeline, a Python function, an HTTP API, a folder of images); every image is seeded from
`seed_for(record id, generator, manifest seed)`; each rendered image is encoded in a format drawn from
the manifest's encoding mix, while images encoded elsewhere (an API's, a folder's) are kept as they
are. Rows are written in batch order.

A batch that raises is rendered again (`generate.batch_retries`), after out-of-memory in halves, before
its records are recorded as failed; batches rendered other than planned are listed in the stats
(`rebatched`). A done shard with failed records is redone record by record with `--retry-failed`.

Only records whose real image was fetched (and decodes) are rendered, so no GPU time goes to fakes that
`assemble` would drop: a generate unit reads `real/{k}.parquet` and waits for fetch-real's unit k (pipelined
workers render shard k as soon as it is fetched). When `fetch-real --retry-failed` later recovers reals, the
units of their shards are stale and a rerun of `generate` tops them up: it renders exactly the records now
fetched that have no row yet, appended to the shard (listed in the stats under `added`, and their batches
under `rebatched`). `generate.render_failed_reals: true` renders every record instead.

Units are sized by work: with a throughput table (`generate.throughput`), a shard whose images take more
than `generate.max_unit_minutes` of GPU time is split into parts, each a run of whole planned batches,
committed as `gen/{g}/parts/`; a merge unit then writes `gen/{g}/{k}.parquet` exactly as one unit would
(same batches, same rows in the same order). The number of parts follows from the records shard alone (so
every worker cuts a shard the same way before its reals are fetched); the fetched records' batches are spread
over them. Because batches are a pure function of the stored rows (their order, sizes, the recorded batch
size, `rebatched` and `added`), `regenerate` can rebuild any image's exact batch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import PIL
import pyarrow as pa

from d3builder.core.commandline import package_version
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
    RegistryError,
    load_registries,
)
from d3builder.generators.results import (
    NAN_OUTPUT,
    GenerationResult,
    seed_for,
    size_for,
)
from d3builder.recipe.manifest import SPLITS, Manifest
from d3builder.recipe.plan import load_throughput
from d3builder.storage.layout import extension
from d3builder.storage.lease import current
from d3builder.storage.runner import (
    BadInput,
    InputsPending,
    RunSummary,
    Unit,
    UnitContext,
    UnitJob,
    UnitWork,
    shards_for_process,
)
from d3builder.storage.schema import GEN_FEATURES
from d3builder.storage.shards import image_cell

if TYPE_CHECKING:
    import torch

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


def replay_batches(jobs: Sequence[Job], batch_size: int, rebatched: Sequence[Sequence[str]] = (),
                   added: Sequence[str] = ()) -> list[tuple[list[Job], set[str]]]:
    """The batches stored rows were rendered in, each with the ids whose stored image it made: the plan (of the
    rows but those `added` later by a top-up), except that an id of a `rebatched` group (from the stats) was
    made by the last group holding it."""
    by_id = {job.id: job for job in jobs}
    last = {record: index for index, group in enumerate(rebatched) for record in group}
    later = set(added)
    batches = []
    for batch in plan_batches([job for job in jobs if job.id not in later], batch_size):
        owns = {job.id for job in batch if job.id not in last}
        if owns:
            batches.append((batch, owns))
    for index, group in enumerate(rebatched):
        batch = [by_id[r] for r in group if r in by_id]
        owns = {job.id for job in batch if last[job.id] == index}
        if owns:
            batches.append((batch, owns))
    return batches


def part_slices(batches: int, parts: int) -> list[slice]:
    """`parts` contiguous runs of batch indices, as even as possible (the first ones one longer)."""
    size, extra = divmod(batches, parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + size + (index < extra))
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


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
    # runtime holds the model stack: it loads with the first job, not when the command line starts
    from d3builder.generators.runtime import stack_versions

    return json.dumps({"d3code": package_version(), "pillow": PIL.__version__, **stack_versions()}, sort_keys=True)


def failure_reason(error: str) -> str:
    """The counted reason of one failed image: nan_output, encode_error, a backend reason, or exception:<type>."""
    reason = error.split(":", 1)[0].strip()
    if error == NAN_OUTPUT or reason == "encode_error" or reason in FAILURE_REASONS:
        return reason
    return f"exception:{reason or 'unknown'}"


def covers(stats: dict[str, Any], splits: Sequence[str] | None) -> bool:
    """Whether a gen unit's stats cover the requested splits (None: all; a unit rendered for all covers any)."""
    covered = stats.get("splits")
    return covered is None or (splits is not None and set(splits) <= set(covered))


OUT_OF_MEMORY = "exception:OutOfMemoryError"
"""The reason of a batch that ran out of (GPU) memory: torch.OutOfMemoryError."""


def batch_error(results: Sequence[GenerationResult]) -> str | None:
    """The reason when the whole batch raised (every image failed with an exception), else None."""
    reasons = {failure_reason(r.error) if r.error else None for r in results}
    if len(reasons) == 1:
        (reason,) = reasons
        if reason is not None and reason.startswith("exception:"):
            return reason
    return None


class GenerateJob(UnitJob):
    """generate's units for one generator: unit (g, k) renders gen/{g}/{k}; big shards go by parts, then a merge."""

    stage, item = STAGE, "img"

    def __init__(self, manifest: Manifest, entry: Entry, *, device: str | torch.device,
                 batch_size: int, speed: SpeedOptions, splits: Sequence[str] | None = None,
                 process_index: int = 0, seconds_per_image: float | None = None) -> None:
        super().__init__(manifest.layout)
        self.manifest, self.entry, self.device = manifest, entry, device
        self.batch_size, self.speed = batch_size, speed
        self.splits = sorted(set(splits)) if splits is not None else None
        self.mix = dict(manifest.generate.encoding_mix)
        self.quality = list(check_quality_range(manifest.generate.jpeg_quality))
        check_mix(self.mix)
        self.process_index = process_index
        self.batch_retries = manifest.generate.batch_retries
        self.seconds_per_image = seconds_per_image
        self.max_unit_seconds = manifest.generate.max_unit_minutes * 60
        self.render_failed_reals = manifest.generate.render_failed_reals
        self.backend: Backend | None = None
        self.columns = Columns(model=entry.model)
        self.software = software()
        self.rebatched: list[list[str]] = []
        self._jobs = lru_cache(maxsize=8)(self._read_jobs)

    # -- units -------------------------------------------------------------------------------------------

    def parts(self, shard: int) -> int:
        """Into how many parts shard `shard` is split: at most max_unit_minutes of GPU time each (counted on
        every record of the shard, fetched or not: the cut is known before fetch-real has run)."""
        if not self.seconds_per_image:
            return 1
        try:
            jobs, _ = self._jobs(shard)
        except BadInput:
            return 1
        batches = len(plan_batches(jobs, self.batch_size))
        wanted = math.ceil(len(jobs) * self.seconds_per_image / self.max_unit_seconds)
        return max(1, min(batches, wanted))

    def units(self, shards: Sequence[int]) -> list[Unit]:
        """The units of these shards: the whole shard, or its parts followed by the merge."""
        units = []
        for shard in shards:
            parts = self.parts(shard)
            if parts > 1:
                units += [Unit(STAGE, shard, self.entry.name, (j, parts)) for j in range(parts)]
            units.append(Unit(STAGE, shard, self.entry.name))
        return units

    def outputs(self, unit: Unit) -> list[PurePath]:
        if unit.part is not None:
            return [self.layout.gen_part(self.entry.name, unit.shard, *unit.part)]
        return [self.layout.gen(self.entry.name, unit.shard)]

    def input_units(self, unit: Unit) -> list[Unit]:
        """fetch-real's unit of the same shard: only its fetched records are rendered."""
        return [] if self.render_failed_reals else [Unit("fetch-real", unit.shard)]

    def superseded(self, unit: Unit) -> bool:
        """A part is not rendered again once its shard was merged (the merge removes the parts)."""
        return unit.part is not None and self.store.isfile(self.stats_path(Unit(STAGE, unit.shard, self.entry.name)))

    def size(self, unit: Unit) -> int:
        try:
            jobs = self.render_jobs(unit.shard)
        except BadInput:
            return 0
        if unit.part is None:
            return len(jobs) if self.parts(unit.shard) == 1 else 0
        batches = plan_batches(jobs, self.batch_size)
        return sum(len(b) for b in batches[part_slices(len(batches), unit.part[1])[unit.part[0]]])

    def done(self, unit: Unit, stats: dict[str, Any]) -> bool:
        return covers(stats, self.splits)

    def fetched(self, shard: int) -> set[str] | None:
        """Ids of the shard whose real image was fetched and decodes (None: render every record)."""
        if self.render_failed_reals:
            return None
        path = self.layout.real(shard)
        if not self.store.isfile(path):
            raise BadInput(f"{self.layout.url(path)}: missing real shard: only records whose real image was fetched "
                           "are rendered (run `d3builder fetch-real` first, or set generate.render_failed_reals: true)")
        try:
            table = self.store.read_table(path, columns=["id", "status"])
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise BadInput(f"{self.layout.url(path)}: unreadable real shard: {exc}") from exc
        return {i for i, status in zip(table["id"].to_pylist(), table["status"].to_pylist(), strict=True)
                if status == "success"}

    def render_jobs(self, shard: int) -> list[Job]:
        """The jobs of the shard to render now: every selected record, or only those whose real was fetched."""
        jobs, _ = self._jobs(shard)
        fetched = self.fetched(shard)
        return jobs if fetched is None else [j for j in jobs if j.id in fetched]

    def retryable(self, stats: dict[str, Any]) -> bool:
        return stats.get("failed", 0) > 0 and "part" not in stats

    # -- rendering ---------------------------------------------------------------------------------------

    def load(self) -> Backend:
        """Load the generator (pipeline, function, API client or folder listing) once."""
        if self.backend is None:
            self.backend = load_backend(self.entry, self.device, asdict(self.speed))
            self.columns = self.backend.columns()
        return self.backend

    @property
    def provenance(self) -> dict[str, Any] | None:
        """How the loaded generator makes its images (None before it is loaded)."""
        return self.backend.provenance() if self.backend is not None else None

    def _read_jobs(self, shard: int) -> tuple[list[Job], int]:
        """The shard's jobs (selected splits, first row of a duplicated id) and how many duplicates were skipped.

        An entry without sizes (a folder of images made elsewhere) leaves each size to its image."""
        path = self.layout.records(shard)
        if not self.store.isfile(path):
            raise BadInput(f"{self.layout.url(path)}: missing records shard (run select)")
        try:
            table = self.store.read_table(path, columns=RECORD_COLUMNS)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise BadInput(f"{self.layout.url(path)}: unreadable records shard: {exc}") from exc
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

    def render_batch(self, batch: list[Job], planned: bool = True,
                     attempt: int = 0) -> list[tuple[Job, GenerationResult, float]]:
        """Render one batch: a batch that raised is rendered again, in halves after out-of-memory."""
        tick = time.perf_counter()
        results = self.load().render(batch)
        seconds = time.perf_counter() - tick
        error = batch_error(results)
        if error == OUT_OF_MEMORY and len(batch) > 1:
            half = (len(batch) + 1) // 2
            logger.warning("%s: out of memory on a batch of %d: rendering it in halves", self.entry.name, len(batch))
            return self.render_batch(batch[:half], False) + self.render_batch(batch[half:], False)
        if error is not None and attempt < self.batch_retries:
            logger.warning("%s: a batch of %d raised (%s): rendering it again", self.entry.name, len(batch), error)
            return self.render_batch(batch, planned, attempt + 1)
        if not planned:
            self.rebatched.append([j.id for j in batch])
        return [(job, result, seconds / len(batch)) for job, result in zip(batch, results, strict=True)]

    def render(self, ctx: UnitContext, batches: list[list[Job]], write: Callable[[dict[str, Any]], Any],
               apart: bool = False) -> Tally:
        """Render `batches` in order, handing each row to `write`, counting successes, failures and encodings.

        `apart`: the batches are rendered apart from the shard's plan, so each is listed in `rebatched`."""
        tally = Tally()
        for batch in batches:
            ctx.check()
            if apart:
                self.rebatched.append([j.id for j in batch])
            for job, result, seconds in self.render_batch(batch):
                row = self.row(job, result, seconds)
                write(row)
                tally.add(row, seconds)
            ctx.advance(len(batch))
        return tally

    def stats(self, unit: Unit, jobs: int, duplicates: int, tally: Tally, seconds: float) -> dict[str, Any]:
        """The stats payload of a rendered unit (or part)."""
        return {
            "shard": unit.shard,
            "generator": self.entry.name,
            **({"part": list(unit.part)} if unit.part is not None else {}),
            "records": jobs,
            "success": tally.counts["success"],
            "failed": tally.counts["failed"],
            "failures_by_reason": dict(sorted(tally.reasons.items())),
            "duplicate_ids_skipped": duplicates,
            "encodings": dict(sorted(tally.encodings.items())),
            "splits": self.splits,
            "render_failed_reals": self.render_failed_reals,
            "batch_size": self.batch_size,
            "batch_retries": self.batch_retries,
            "rebatched": list(self.rebatched),
            "encoding_mix": self.mix,
            "jpeg_quality": self.quality,
            "seed": self.manifest.seed,
            "device": str(self.device),
            "process_index": self.process_index,
            "kind": self.entry.kind,
            "provenance": self.provenance,
            "not_recorded": dict(self.columns.not_recorded),
            "output": self.store.relative(self.outputs(unit)[0]),
            "seconds": round(seconds, 3),
            "render_seconds": round(tally.seconds, 3),
            "images_per_second": round(tally.counts["success"] / tally.seconds, 3) if tally.seconds > 0 else 0.0,
        }

    def compute(self, ctx: UnitContext) -> UnitWork:
        """Render a shard (or one part of it), or merge its done parts."""
        unit, started = ctx.unit, time.time()
        _, duplicates = self._jobs(unit.shard)
        parts = self.parts(unit.shard)
        if unit.part is None and parts > 1:
            return self.merge(ctx, parts)
        batches = plan_batches(self.render_jobs(unit.shard), self.batch_size)
        if unit.part is not None:
            batches = batches[part_slices(len(batches), parts)[unit.part[0]]]
        self.rebatched = []
        output = self.outputs(unit)[0]
        stream = ctx.stream(output, GEN_FEATURES)
        try:
            tally = self.render(ctx, batches, stream.write)
            if ctx.commit(stream) is None:
                ctx.write_shard([], output, GEN_FEATURES)  # no record of the requested splits: an empty, done shard
        except BaseException:
            stream.abort()
            raise
        count = sum(len(b) for b in batches)
        return tally.work(self.stats(unit, count, duplicates if unit.part in (None, (0, parts)) else 0, tally,
                                     time.time() - started), count)

    def merge(self, ctx: UnitContext, parts: int) -> UnitWork:
        """Concatenate the shard's done parts, in order, into gen/{g}/{k}.parquet (what one unit would write)."""
        shard, runner = ctx.unit.shard, ctx.runner
        pieces, part_stats = [], []
        for index in range(parts):
            part = Unit(STAGE, shard, self.entry.name, (index, parts))
            stats = runner.read_done(self, part)
            if stats is None:
                holder = current(self.store, self.layout.leases(STAGE, part.key))
                if holder is not None and not holder.free():
                    raise InputsPending(f"waiting for {part.label}: {holder.describe()}")
                raise RuntimeError(f"{part.label} is not done (rerun generate)")
            pieces.append(self.store.read_table(self.outputs(part)[0]))
            part_stats.append(stats)
        table = pa.concat_tables(pieces)
        ctx.write_shard(table, self.layout.gen(self.entry.name, shard), GEN_FEATURES)
        first = part_stats[0]
        tally = Tally.of(part_stats)
        merged = {
            **{k: v for k, v in first.items() if k not in ("part", "stage", "unit", "lease", "committed",
                                                           "started_at", "finished_at")},
            "records": sum(s["records"] for s in part_stats),
            "success": tally.counts["success"],
            "failed": tally.counts["failed"],
            "failures_by_reason": dict(sorted(tally.reasons.items())),
            "encodings": dict(sorted(tally.encodings.items())),
            "rebatched": [group for s in part_stats for group in s.get("rebatched", [])],
            "output": self.store.relative(self.layout.gen(self.entry.name, shard)),
            "parts": [{k: s.get(k) for k in ("part", "records", "success", "failed", "host", "process_index",
                                              "started_at", "finished_at", "render_seconds")} for s in part_stats],
            "seconds": round(sum(s["seconds"] for s in part_stats), 3),
            "render_seconds": round(tally.seconds, 3),
        }
        return UnitWork(merged, records=0)

    def remove_parts(self, shards: Sequence[int]) -> None:
        """Delete the parts (and their stats) of shards whose merged shard is done."""
        for shard in shards:
            parts = self.parts(shard)
            if parts > 1 and self.store.isfile(self.layout.stats(STAGE, shard, self.entry.name)):
                for index in range(parts):
                    self.store.remove(self.layout.gen_part(self.entry.name, shard, index, parts))
                    self.store.remove(self.layout.stats(STAGE, shard, self.entry.name, (index, parts)))

    def retry(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        """Render a done shard's failed records again and merge them in (other rows untouched, order kept)."""
        started, shard = time.time(), ctx.unit.shard
        output = self.layout.gen(self.entry.name, shard)
        old = self.store.read_table(output)
        failed = {r["id"] for r in old.select(["id", "status"]).to_pylist() if r["status"] != "success"}
        jobs, _ = self._jobs(shard)
        redo = [j for j in jobs if j.id in failed]
        fresh, tally = self._render_apart(ctx, redo)
        by_id = {row["id"]: row for row in fresh}
        rows = [by_id.get(row["id"], row) for row in old.to_pylist()]
        ctx.write_shard(rows, output, GEN_FEATURES)
        attempt = {"retried": sorted(failed), "recovered": tally.counts["success"], "at": time.time(),
                   "seconds": round(time.time() - started, 3), "process_index": self.process_index}
        new_stats = {**self._restated(stats, rows), "retries": [*stats.get("retries", []), attempt]}
        return tally.work(new_stats, len(redo))

    def refresh(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        """Top a done shard up after fetch-real redid its unit: render the records now fetched that have no row
        yet and append them (other rows untouched, order kept). A part is rendered again whole."""
        if ctx.unit.part is not None:
            return self.compute(ctx)
        started, shard = time.time(), ctx.unit.shard
        output = self.layout.gen(self.entry.name, shard)
        old = self.store.read_table(output)
        have = set(old["id"].to_pylist())
        fresh, tally = self._render_apart(ctx, [j for j in self.render_jobs(shard) if j.id not in have])
        rows = old.to_pylist() + fresh
        if fresh:
            ctx.write_shard(rows, output, GEN_FEATURES)
        topup = {"added": len(fresh), "success": tally.counts["success"], "at": time.time(),
                 "seconds": round(time.time() - started, 3), "process_index": self.process_index}
        new_stats = {
            **self._restated(stats, rows),
            "records": stats.get("records", len(have)) + len(fresh),
            "added": [*stats.get("added", []), *(row["id"] for row in fresh)],
            "topups": [*stats.get("topups", []), topup],
        }
        return tally.work(new_stats, len(fresh))

    def _render_apart(self, ctx: UnitContext, jobs: Sequence[Job]) -> tuple[list[dict[str, Any]], Tally]:
        """Render `jobs` in batches apart from the shard's plan (kept for `rebatched`): their rows and tally."""
        self.rebatched = []
        rows: list[dict[str, Any]] = []
        tally = self.render(ctx, plan_batches(jobs, self.batch_size), rows.append, apart=True)
        return rows, tally

    def _restated(self, stats: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A done shard's stats counted again over all its `rows`, with the batches just rendered apart."""
        merged = Tally()
        for row in rows:
            merged.add(row, 0.0)
        return {
            **stats,
            "success": merged.counts["success"],
            "failed": merged.counts["failed"],
            "failures_by_reason": dict(sorted(merged.reasons.items())),
            "encodings": dict(sorted(merged.encodings.items())),
            "rebatched": [*stats.get("rebatched", []), *self.rebatched],
            "provenance": stats.get("provenance") or self.provenance,
        }


@dataclass
class Tally:
    """Counts of rendered rows: success/failed, failure reasons, encodings, rendering seconds."""

    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    encodings: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, row: dict[str, Any], seconds: float) -> None:
        self.counts[row["status"]] += 1
        self.seconds += seconds
        if row["status"] == "success":
            self.encodings[row["encoding"]] += 1
        else:
            self.reasons[failure_reason(row["error_message"] or "unknown")] += 1

    @classmethod
    def of(cls, stats: Sequence[dict[str, Any]]) -> Tally:
        """The sum of several units' stats."""
        tally = cls()
        for s in stats:
            tally.counts.update(success=s["success"], failed=s["failed"])
            tally.reasons.update(s["failures_by_reason"])
            tally.encodings.update(s["encodings"])
            tally.seconds += s["render_seconds"]
        return tally

    def work(self, stats: dict[str, Any], records: int) -> UnitWork:
        return UnitWork(stats, records=records, failed=self.counts["failed"], reasons=Counter(self.reasons),
                        counts=Counter(success=self.counts["success"]))


def seconds_per_image(manifest: Manifest, generator: str) -> float | None:
    """The generator's seconds per image from the manifest's throughput table (None: no table, no figure)."""
    if manifest.generate.throughput is None:
        return None
    figure = load_throughput(manifest.resolve(manifest.generate.throughput)).generators.get(generator)
    return figure.seconds_per_image if figure is not None else None


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
    retry_failed: bool = False,
    wait: bool = True,
    wait_inputs: bool = False,
) -> RunSummary:
    """Render this process's share of the records shards with one generator (done units are skipped).

    `registry` defaults to the manifest's registry files; `shards` to every records shard; `batch_size`
    to manifest.generate.batch_size; `speed` to SpeedOptions() (registry dtype, SDPA on, the rest off);
    `splits` (e.g. ["test"]) limits the records rendered (None: all); `retry_failed` also re-renders the
    failed records of done shards; `wait_inputs` waits for fetch-real units nobody has started yet (a worker
    beside fetch-real's workers). A bad registry, an unknown generator or bad options raise before any
    shard is touched; no records shard at all is a UsageError (run select first)."""
    registry = manifest_registry(manifest) if registry is None else registry
    entry = registry_entry(registry, generator_name)
    check_ready(entry)
    speed = speed or SpeedOptions()
    batch_size = batch_size or manifest.generate.batch_size
    if speed.dtype is not None and speed.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {speed.dtype!r}")
    if splits is not None and set(splits) - set(SPLITS):
        raise ValueError(f"unknown splits {sorted(set(splits) - set(SPLITS))} (allowed: {', '.join(SPLITS)})")
    every = manifest.layout.wanted_shards(shards)
    # runtime holds the model stack: it loads here, not when the command line starts
    from d3builder.generators.runtime import prepare_weights, process_state

    state = process_state()
    prepare_weights(entry, state)
    job = GenerateJob(manifest, entry, device=state.device, batch_size=batch_size, speed=speed, splits=splits,
                      process_index=state.process_index, seconds_per_image=seconds_per_image(manifest, entry.name))
    mine = shards_for_process(every, state.process_index, state.num_processes)
    runner = manifest.runner(progress=progress and state.is_main_process, wait=wait, retry_failed=retry_failed,
                             rank=state.process_index, world=state.num_processes, wait_inputs=wait_inputs)
    summary = runner.run(job, job.units(mine), group=entry.name)
    job.remove_parts(mine)
    return summary
