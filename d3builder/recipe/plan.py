"""The plan of a full build: stages, shards, images and estimated GPU-hours, before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from d3builder.core.yamlconfig import from_mapping, read_yaml
from d3builder.generators.registry import load_registries
from d3builder.recipe.manifest import Manifest
from d3builder.storage.units import read_stats

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
    train_records_per_second_per_gpu: float = 3000.0

    def validate(self) -> None:
        if not 0.0 < self.download_yield <= 1.0:
            raise ValueError("download_yield must be in (0, 1]")


def load_throughput(path: str | Path) -> ThroughputTable:
    """Load a throughput table (YAML), validated."""
    return from_mapping(ThroughputTable, read_yaml(path), path)


@dataclass
class StagePlan:
    """One stage of the plan: what it reads, writes, and costs."""

    stage: str
    units: int
    items: int
    what: str
    gpu_hours: float = 0.0


@dataclass
class Plan:
    """The whole build, stage by stage."""

    manifest: str
    records: int
    records_source: str
    shards: int
    expected_reals: int
    gpu: str
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
            "| stage | units | items | what | GPU-hours |",
            "|---|---:|---:|---|---:|",
        ]
        for s in self.stages:
            lines.append(f"| {s.stage} | {s.units:,} | {s.items:,} | {s.what} | {s.gpu_hours:,.1f} |")
        lines.append(f"| **total** | | | GPU-hours on {self.gpu} | **{self.gpu_hours:,.1f}** |")
        return "\n".join(lines)


def _selected_records(manifest: Manifest) -> tuple[int, str]:
    """Records `select` chose (if it ran) or the recipe's estimate from the LAION-400M size."""
    stats = manifest.layout.stats("select", 0)
    if stats.is_file():
        return int(read_stats(stats)["kept"]), "selected"
    estimate = int(LAION_400M_ROWS * manifest.sampling.fraction)
    if manifest.sampling.max_records is not None:
        estimate = min(estimate, manifest.sampling.max_records)
    return estimate, "estimated from LAION-400M size and the sampling fraction"


def make_plan(manifest: Manifest, throughput: ThroughputTable, train_epochs: int = 150) -> Plan:
    """Plan every stage of `manifest`; GPU-hours from the throughput table.

    Generation renders every selected record (not only those whose real image was fetched), so that
    images recovered later by `fetch-real --retry-failed` still have their fakes.
    """
    registry = load_registries(*manifest.registry_paths())
    records, source = _selected_records(manifest)
    shards = math.ceil(records / manifest.shard_size)
    reals = int(records * throughput.download_yield)
    test_records = int(reals * manifest.splits.get("test", 0.0))
    fit_records = int(reals * manifest.splits.get("fit", 0.0))
    train_records = int(reals * manifest.splits.get("train", 0.0))
    plan = Plan(str(manifest.path), records, source, shards, reals, throughput.gpu)
    plan.stages += [
        StagePlan("select", 1, records, "records/{k}.parquet"),
        StagePlan("fetch-real", shards, records, "real/{k}.parquet (img2dataset, no GPU)"),
    ]
    for name in manifest.generators:
        if name not in registry:
            raise KeyError(f"{manifest.path}: generator {name!r} is not in the registry")
        speed = throughput.generators.get(name)
        if speed is None:
            raise KeyError(f"no throughput for generator {name!r} (gpu {throughput.gpu}): add it to the table")
        kind = "measured" if speed.measured else "estimated"
        plan.stages.append(
            StagePlan(
                f"generate {name}",
                shards,
                records,
                f"gen/{name}/{{k}}.parquet, {speed.seconds_per_image:g} s/image ({kind})",
                records * speed.seconds_per_image / 3600,
            )
        )
    per_record = 1 + len(manifest.generators)
    plan.stages += [
        StagePlan("assemble", shards, reals, "d3/{split}/{split}-{k}.parquet"),
        StagePlan("transform-test", shards, (test_records + fit_records) * per_record, "d3/test_augm/, d3/fit_augm/ (CPU)"),
    ]
    test_selected = int(records * manifest.splits.get("test", 0.0))
    for name in manifest.extended.generators:
        speed = throughput.generators.get(name)
        hours = test_selected * speed.seconds_per_image / 3600 if speed else 0.0
        what = f"extended/{name}/" + ("" if speed else " (no throughput figure: not counted)")
        plan.stages.append(StagePlan(f"extend {name}", shards, test_selected, what, hours))
    plan.stages += [
        StagePlan("validate", shards, reals * per_record, "every image decoded (CPU)"),
        StagePlan(
            "codetrain train",
            train_epochs,
            train_records * train_epochs,
            f"{train_epochs} epochs of ViT-Tiny",
            train_records * train_epochs / throughput.train_records_per_second_per_gpu / 3600,
        ),
    ]
    return plan
