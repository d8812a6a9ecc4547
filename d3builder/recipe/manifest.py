"""Dataset recipes (YAML manifests), validated on load."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d3builder.core.yamlconfig import ConfigError, from_mapping, read_yaml
from d3builder.storage.layout import DataLayout, safe_name
from d3builder.storage.lease import DEFAULT_LEASE_SECONDS
from d3builder.storage.runner import DEFAULT_MAX_FAILED_FRACTION, UnitRunner
from d3builder.storage.schema import SPLITS
from d3builder.storage.store import StorageError

log = logging.getLogger(__name__)

EMBEDDED_SOURCE = "embedded"
"""Metadata source naming the small LAION-format set that ships inside the package."""


LAION_ENCODING_MIX = {"JPEG": 0.94, "PNG": 0.045, "GIF": 0.005, "BMP": 0.005, "TIFF": 0.005}
"""Default output-encoding mix of generated images, following LAION's own (mostly JPEG; our estimate)."""


@dataclass
class MetadataSource:
    """Where the LAION-format metadata parquet files come from."""

    source: str
    release: str = "unknown"


@dataclass
class Filters:
    """Which LAION rows are eligible."""

    nsfw: list[str] = field(default_factory=lambda: ["UNLIKELY"])
    min_width: int = 0
    min_height: int = 0
    min_similarity: float = 0.0
    min_caption_chars: int = 1
    max_caption_chars: int = 1000

    def validate(self) -> None:
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars is larger than max_caption_chars")


@dataclass
class Sampling:
    """How many eligible rows to keep: a hash threshold, then a cap."""

    fraction: float = 1.0
    max_records: int | None = None

    def validate(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("max_records must be at least 1")


@dataclass
class Prompts:
    """How the generation prompts are made from a caption."""

    positive_template: str = "{caption}"
    negative: str = ""

    def validate(self) -> None:
        if "{caption}" not in self.positive_template:
            raise ValueError("positive_template must contain {caption}")


@dataclass
class FetchConfig:
    """img2dataset knobs for `fetch-real` (passed through)."""

    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 0
    user_agent_token: str = "d3code"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    """X-Robots-Tag directives that opt an image out (img2dataset's defaults: honoured unless emptied)."""
    max_image_bytes: int = 50_000_000
    allow_private_addresses: bool = False
    """Download from hosts that are or resolve to loopback, private, link-local... addresses (off: refused)."""
    distributor: str | None = None
    """Removed: downloads spread over nodes as fetch-real units, one img2dataset run (multiprocessing) per unit."""

    def validate(self) -> None:
        if self.distributor == "multiprocessing":
            log.warning("fetch.distributor is deprecated and ignored (every fetch-real unit runs img2dataset with "
                        "multiprocessing): delete it from the manifest")
        elif self.distributor is not None:
            raise ValueError(f"distributor: {self.distributor!r} is no longer supported: downloads spread over nodes "
                             "as fetch-real units, each one img2dataset run on one node (`d3builder launch --stage "
                             "fetch-real --workers N`); delete fetch.distributor")


@dataclass
class GenerateConfig:
    """Generation knobs shared by every generator."""

    batch_size: int = 4
    encoding_mix: dict[str, float] = field(default_factory=lambda: dict(LAION_ENCODING_MIX))
    jpeg_quality: list[int] = field(default_factory=lambda: [75, 95])
    batch_retries: int = 1
    """Times a batch that raised is rendered again (after out-of-memory: in halves) before its records fail."""
    throughput: str | None = None
    """Seconds per image per generator on the target GPU (e.g. throughput-h100.yaml): sizes the units."""
    max_unit_minutes: float = 30.0
    """With `throughput`, a records shard is split into parts of at most this much GPU time each."""
    render_failed_reals: bool = False
    """Render every selected record, also those whose real image was not fetched (assemble drops them); by
    default only fetched records are rendered, and records fetch-real recovers later are topped up."""

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.batch_retries < 0:
            raise ValueError("batch_retries must be >= 0")
        if self.max_unit_minutes <= 0:
            raise ValueError("max_unit_minutes must be > 0")
        unknown = set(self.encoding_mix) - set(LAION_ENCODING_MIX)
        if unknown:
            raise ValueError(f"encoding_mix: unknown formats {sorted(unknown)} (known: {sorted(LAION_ENCODING_MIX)})")
        if not math.isclose(sum(self.encoding_mix.values()), 1.0, abs_tol=1e-6):
            raise ValueError("encoding_mix weights must sum to 1")


@dataclass
class TransformTestConfig:
    """The test split 'with transformations'."""

    max_ops: int = 2
    seed: int = 1234


@dataclass
class ExtendedConfig:
    """Further generators rendered on the test records (the extended test set)."""

    registry: str = "extended.yaml"
    generators: list[str] = field(default_factory=list)


@dataclass
class UnitsConfig:
    """The unit runner: leases and what counts as a failed run."""

    lease_seconds: float = DEFAULT_LEASE_SECONDS
    """A unit whose owner sent no heartbeat for this long is taken over (heartbeats every third of it)."""
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION
    """A run whose failed records exceed this fraction of its records exits 1."""

    def validate(self) -> None:
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError("max_failed_fraction must be in [0, 1]")


EXECUTOR_KINDS = ("local", "slurm", "ray")


@dataclass
class LocalExecutorConfig:
    """Worker processes on this machine."""

    gpus: list[int] | None = None
    """GPU ids for generation workers, one worker per GPU (CUDA_VISIBLE_DEVICES); None: every visible GPU."""
    max_restarts: int = 3
    """A worker killed by a signal is started again this many times at most (its unit in flight is redone)."""


@dataclass
class SlurmExecutorConfig:
    """A SLURM job array per stage through submitit: one single-GPU (or CPU) task per worker."""

    partition: str | None = None
    """Partition of GPU workers (None: the cluster's default)."""
    cpu_partition: str | None = None
    """Partition of CPU workers (fetch-real, assemble, ...; None: `partition`)."""
    account: str | None = None
    qos: str | None = None
    time_min: int = 240
    """Time limit of one task; a task that times out or is preempted is requeued and resumes from the storage."""
    array_parallelism: int = 256
    """Tasks of one array running at once (slurm_array_parallelism)."""
    gpu_gres: str = "gpu"
    """The GPU generic resource: a GPU worker asks for `{gpu_gres}:1` (e.g. gpu:h100 gives gpu:h100:1)."""
    cpus_per_gpu_worker: int = 8
    cpus_per_cpu_worker: int = 16
    """CPUs of a CPU worker: fetch-real runs img2dataset with fetch.processes processes."""
    mem_gb: float | None = None
    max_requeues: int = 3
    """Requeues after a timeout before a task gives up (submitit's max_num_timeout); preemptions are free."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each task, e.g. `source /path/to/.venv/bin/activate`."""
    additional: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options (submitit's slurm_additional_parameters), e.g. {constraint: h100}."""
    cluster: str = "slurm"
    """`local` runs the same path through submitit's local executor (processes on this machine), to try it."""

    def validate(self) -> None:
        if self.cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be slurm or local, got {self.cluster!r}")


@dataclass
class RayExecutorConfig:
    """Ray tasks on an existing Ray cluster."""

    address: str | None = "auto"
    """`auto` (the cluster this node belongs to), `ray://head:10001`, or null: a local Ray instance."""
    max_retries: int = 3
    """A task whose worker or node dies is run again this many times at most."""
    cpus_per_gpu_worker: float = 4.0
    cpus_per_cpu_worker: float = 8.0
    object_store_memory_mb: int | None = None
    """Object store size of a local instance (address null); workers pass no data through it."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime environment of the tasks (e.g. env_vars)."""


@dataclass
class ExecutorConfig:
    """Which engine starts the workers of `d3builder launch` and `pipelines/full_d3.py`, and how."""

    kind: str = "local"
    gpus_per_generation_worker: int = 1
    """GPUs of a generate/extend worker: 1 (one GPU = one worker), or 0 for generators that run on CPUs."""
    log_dir: str = "cluster-logs"
    """Local folder for worker logs and submitit's job files (on a filesystem every node sees, for SLURM)."""
    local: LocalExecutorConfig = field(default_factory=LocalExecutorConfig)
    slurm: SlurmExecutorConfig = field(default_factory=SlurmExecutorConfig)
    ray: RayExecutorConfig = field(default_factory=RayExecutorConfig)

    def validate(self) -> None:
        if self.kind not in EXECUTOR_KINDS:
            raise ValueError(f"kind must be one of {', '.join(EXECUTOR_KINDS)}, got {self.kind!r}")
        if self.gpus_per_generation_worker not in (0, 1):
            raise ValueError("gpus_per_generation_worker must be 0 or 1 (one GPU = one worker)")


@dataclass
class Manifest:
    """A dataset recipe: which records, how they are cut into shards, which generators."""

    name: str
    output_root: str
    metadata: MetadataSource
    shard_size: int
    generators: list[str]
    seed: int = 42
    filters: Filters = field(default_factory=Filters)
    sampling: Sampling = field(default_factory=Sampling)
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.998, "validation": 0.001, "test": 0.001})
    prompts: Prompts = field(default_factory=Prompts)
    registry: list[str] = field(default_factory=lambda: ["generators.yaml"])
    fetch: FetchConfig = field(default_factory=FetchConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    transform_test: TransformTestConfig = field(default_factory=TransformTestConfig)
    extended: ExtendedConfig = field(default_factory=ExtendedConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of output_root's filesystem (on top of the environment's credentials), e.g. endpoint_url."""
    path: Path = field(default=Path("."), init=False)

    def validate(self) -> None:
        safe_name(self.name, "manifest name")
        if self.shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"splits: unknown split {sorted(unknown)[0]!r} (allowed: {', '.join(SPLITS)})")
        if any(v < 0 for v in self.splits.values()) or not math.isclose(sum(self.splits.values()), 1.0, abs_tol=1e-6):
            raise ValueError("splits: fractions must be >= 0 and sum to 1")
        if len(set(self.generators)) != len(self.generators):
            raise ValueError("generators: a generator is listed twice")

    @property
    def layout(self) -> DataLayout:
        """The output layout of this recipe (local folder or storage URL)."""
        return DataLayout(self.output_root, self.storage_options)

    def runner(self, **options: Any) -> UnitRunner:
        """A UnitRunner on this recipe's layout with its lease and failure settings (`options` go to UnitRunner)."""
        return UnitRunner(self.layout, lease_seconds=self.units.lease_seconds,
                          max_failed_fraction=self.units.max_failed_fraction, **options)

    def registry_paths(self) -> list[Path]:
        """Registry files, resolved against the manifest's folder."""
        return [self.resolve(p) for p in self.registry]

    def extended_registry_path(self) -> Path:
        """The extended-generators registry, resolved against the manifest's folder."""
        return self.resolve(self.extended.registry)

    def resolve(self, relative: str) -> Path:
        """A path from the manifest, relative to the manifest's own folder."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.path.parent / path


def load_manifest(path: str | Path, output_root: str | Path | None = None) -> Manifest:
    """Load and validate a manifest; `output_root` overrides the one in the file.

    The output root's filesystem is checked now: an unknown or missing one fails before any work, naming
    the manifest key (or raising StorageError for an `output_root` given here)."""
    path = Path(path)
    manifest = from_mapping(Manifest, read_yaml(path), path)
    manifest.path = path.resolve()
    if output_root is not None:
        manifest.output_root = str(output_root)
        manifest.layout  # noqa: B018 - raises StorageError naming the URL
        return manifest
    try:
        manifest.layout  # noqa: B018 - opens (checks) the output root's filesystem
    except StorageError as exc:
        raise ConfigError(path, "output_root", str(exc)) from exc
    return manifest


__all__ = ["ConfigError", "Manifest", "load_manifest", "EMBEDDED_SOURCE", "SPLITS"]
