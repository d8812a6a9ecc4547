"""The plan of a full build: stages, shards, images and estimated GPU-hours, before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from d3builder.core.yamlconfig import from_mapping, read_yaml
from d3builder.generators.registry import load_registries
from d3builder.recipe.manifest import Manifest

LAION_400M_ROWS = 413_000_000
"""Samples in LAION-400M (D3_FACTS.md)."""


@dataclass
class GeneratorThroughput:
    """Seconds per image of one generator at its registry settings on the reference GPU."""

    seconds_per_image: float
    measured: bool = False
    note: str = ""


@dataclass
class ThroughputTable:
    """Per-generator throughput on one GPU kind, measured by benchmarks/generate_gpu.py or estimated."""

    gpu: str
    generators: dict[str, GeneratorThroughput]
    download_yield: float = 0.72
    """Fraction of selected records whose real image downloads (D3_FACTS.md: 68-75% today)."""
    train_records_per_second_per_gpu: float = 3000.0
    download_urls_per_second_per_worker: float = 400.0
    """URLs one fetch-real worker (one img2dataset run, fetch.processes x fetch.threads) gets through per second."""

    def validate(self) -> None:
        if not 0.0 < self.download_yield <= 1.0:
            raise ValueError("download_yield must be in (0, 1]")
        if self.download_urls_per_second_per_worker <= 0:
            raise ValueError("download_urls_per_second_per_worker must be > 0")


def load_throughput(path: str | Path) -> ThroughputTable:
    """Load a throughput table (YAML), validated."""
    return from_mapping(ThroughputTable, read_yaml(path), path)


@dataclass(frozen=True)
class ClusterSize:
    """The machines a build runs on: GPU workers (one per GPU) and CPU workers (fetch-real, assemble, ...)."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpu_workers: int = 8

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "cpu_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    @property
    def gpu_workers(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class StagePlan:
    """One stage of the plan: its units (how many, how big), what it reads and writes, and what it costs."""

    stage: str
    units: int
    items: int
    what: str
    gpu_hours: float = 0.0
    unit_size: str = ""


@dataclass
class Plan:
    """The whole build, stage by stage."""

    manifest: str
    records: int
    records_source: str
    shards: int
    expected_reals: int
    gpu: str
    fetch_hours: float = 0.0
    """Hours one fetch-real worker needs for every URL."""
    shard_fetch_hours: float = 0.0
    """Hours one fetch-real unit takes (the pipeline's fill: generation starts after the first one)."""
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(stage.gpu_hours for stage in self.stages)

    def table(self) -> str:
        """The plan as a Markdown table with a total line."""
        lines = [
            f"Plan for manifest {self.manifest}: {self.records:,} records ({self.records_source}), "
            f"{self.shards:,} shards, about {self.expected_reals:,} real images after download",
            "",
            "| stage | units | items | per unit | what | GPU-hours |",
            "|---|---:|---:|---|---|---:|",
        ]
        for s in self.stages:
            lines.append(f"| {s.stage} | {s.units:,} | {s.items:,} | {s.unit_size} | {s.what} | {s.gpu_hours:,.1f} |")
        lines.append(f"| **total** | {sum(s.units for s in self.stages):,} | | | GPU-hours on {self.gpu} | "
                     f"**{self.gpu_hours:,.1f}** |")
        return "\n".join(lines)

    def hours(self, prefix: str) -> float:
        """GPU-hours of the stages whose name starts with `prefix` (`generate`, `extend`, `codetrain train`)."""
        return sum(stage.gpu_hours for stage in self.stages if stage.stage.startswith(prefix))

    def wall_clock(self, cluster: ClusterSize) -> list[tuple[str, str, float]]:
        """(phase, workers, hours) on `cluster`: fetch-real and generation run side by side (generation of shard
        k starts once fetch-real has done shard k), then extend, then training on one node under Accelerate.
        CPU stages after generation (assemble runs beside it; transform-test, validate) take minutes: not counted."""
        fetch = self.fetch_hours / cluster.cpu_workers
        generate = self.hours("generate") / cluster.gpu_workers
        last_unit = max((s.gpu_hours / s.units for s in self.stages if s.stage.startswith("generate") and s.units),
                        default=0.0)
        build = max(fetch + last_unit, generate + self.shard_fetch_hours)
        gpus, cpus = f"{cluster.gpu_workers} GPU", f"{cluster.cpu_workers} CPU"
        return [
            ("fetch-real + generate + assemble (pipelined)", f"{cpus} + {gpus}", build),
            ("extend + transform-test", f"{gpus} + {cpus}", self.hours("extend") / cluster.gpu_workers),
            ("codetrain train (one node, Accelerate)", f"{cluster.gpus_per_node} GPU",
             self.hours("codetrain train") / cluster.gpus_per_node),
        ]

    def wall_clock_table(self, cluster: ClusterSize) -> str:
        """`wall_clock` as a Markdown table with a total line."""
        rows = self.wall_clock(cluster)
        lines = [
            f"Estimated wall-clock on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPU(s) "
            f"({cluster.gpu_workers} generation workers) and {cluster.cpu_workers} CPU workers:",
            "",
            "| phase | workers | hours |",
            "|---|---|---:|",
            *(f"| {phase} | {workers} | {hours:,.1f} |" for phase, workers, hours in rows),
            f"| **total** | | **{sum(hours for *_, hours in rows):,.1f}** |",
        ]
        return "\n".join(lines)


def _selected_records(manifest: Manifest) -> tuple[int, str]:
    """Records `select` chose (if it ran) or the recipe's estimate from the LAION-400M size."""
    layout = manifest.layout
    stats = layout.stats("select", 0)
    if layout.store.isfile(stats):
        return int(layout.store.read_json(stats)["kept"]), "selected"
    estimate = int(LAION_400M_ROWS * manifest.sampling.fraction)
    if manifest.sampling.max_records is not None:
        estimate = min(estimate, manifest.sampling.max_records)
    return estimate, "estimated from LAION-400M size and the sampling fraction"


def generation_units(records_per_shard: int, shards: int, seconds_per_image: float,
                     max_unit_minutes: float, rendered: float = 1.0) -> tuple[int, str]:
    """Units of one generator: each shard cut into parts of at most `max_unit_minutes` of GPU time (counted on
    every record, as `generate` cuts a shard before its reals are fetched), of which a `rendered` fraction is
    rendered (the records whose real image was fetched)."""
    parts = max(1, math.ceil(records_per_shard * seconds_per_image / (max_unit_minutes * 60)))
    per_part = math.ceil(records_per_shard * rendered / parts)
    minutes = per_part * seconds_per_image / 60
    return shards * parts, f"{per_part:,} images, {minutes:,.{0 if minutes >= 10 else 1}f} GPU-min"


def make_plan(manifest: Manifest, throughput: ThroughputTable, train_epochs: int = 150) -> Plan:
    """Plan every stage of `manifest`; GPU-hours and generation unit sizes from the throughput table.

    Generation renders only the records whose real image was fetched (the table's `download_yield` of them;
    records recovered later by `fetch-real --retry-failed` are topped up), or every selected record with
    `generate.render_failed_reals`. A generation unit is at most `generate.max_unit_minutes` of GPU time:
    bigger shards are split into parts.
    """
    registry = load_registries(*manifest.registry_paths())
    records, source = _selected_records(manifest)
    shards = math.ceil(records / manifest.shard_size)
    reals = int(records * throughput.download_yield)
    test_records = int(reals * manifest.splits.get("test", 0.0))
    fit_records = int(reals * manifest.splits.get("fit", 0.0))
    train_records = int(reals * manifest.splits.get("train", 0.0))
    per_shard = min(manifest.shard_size, records)
    rate = throughput.download_urls_per_second_per_worker * 3600
    plan = Plan(str(manifest.path), records, source, shards, reals, throughput.gpu, records / rate, per_shard / rate)
    rendered = 1.0 if manifest.generate.render_failed_reals else throughput.download_yield
    images = int(records * rendered)
    max_minutes = manifest.generate.max_unit_minutes
    plan.stages += [
        StagePlan("select", 1, records, "records/{k}.parquet", unit_size=f"{records:,} records"),
        StagePlan("fetch-real", shards, records, "real/{k}.parquet (img2dataset, no GPU)",
                  unit_size=f"{per_shard:,} URLs"),
    ]
    for name in manifest.generators:
        if name not in registry:
            raise KeyError(f"{manifest.path}: generator {name!r} is not in the registry")
        speed = throughput.generators.get(name)
        if speed is None:
            raise KeyError(f"no throughput for generator {name!r} (gpu {throughput.gpu}): add it to the table")
        kind = "measured" if speed.measured else "estimated"
        units, size = generation_units(per_shard, shards, speed.seconds_per_image, max_minutes, rendered)
        plan.stages.append(
            StagePlan(
                f"generate {name}",
                units,
                images,
                f"gen/{name}/{{k}}.parquet, {speed.seconds_per_image:g} s/image ({kind})",
                images * speed.seconds_per_image / 3600,
                size,
            )
        )
    per_record = 1 + len(manifest.generators)
    plan.stages += [
        StagePlan("assemble", shards, reals, "d3/{split}/{split}-{k}.parquet", unit_size=f"{per_shard:,} records"),
        StagePlan("transform-test", shards, (test_records + fit_records) * per_record, "d3/test_augm/, d3/fit_augm/ (CPU)",
                  unit_size=f"{math.ceil((test_records + fit_records) * per_record / max(shards, 1)):,} images"),
    ]
    test_selected = int(records * manifest.splits.get("test", 0.0))
    test_images = int(test_selected * rendered)
    test_per_shard = math.ceil(test_selected / max(shards, 1))
    for name in manifest.extended.generators:
        speed = throughput.generators.get(name)
        hours = test_images * speed.seconds_per_image / 3600 if speed else 0.0
        what = f"extended/{name}/" + ("" if speed else " (no throughput figure: not counted)")
        units, size = (generation_units(test_per_shard, shards, speed.seconds_per_image, max_minutes, rendered)
                       if speed else (shards, f"{math.ceil(test_per_shard * rendered):,} images"))
        plan.stages.append(StagePlan(f"extend {name}", units, test_images, what, hours, size))
    plan.stages += [
        StagePlan("validate", shards, reals * per_record, "every image decoded (CPU)",
                  unit_size=f"{math.ceil(reals * per_record / max(shards, 1)):,} images"),
        StagePlan(
            "codetrain train",
            train_epochs,
            train_records * train_epochs,
            f"{train_epochs} epochs of ViT-Tiny",
            train_records * train_epochs / throughput.train_records_per_second_per_gpu / 3600,
            f"{train_records:,} records (an epoch)",
        ),
    ]
    return plan
