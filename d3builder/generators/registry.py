"""Generator registry: YAML manifests of diffusers generators, validated on load."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import yaml

from d3builder.generators.tiny import TINY_PIPELINES

DTYPES = ("float16", "bfloat16", "float32")
TINY_SCHEME = "tiny://"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Arguments that generate() sets itself; an entry may not override them through call_kwargs.
RESERVED_CALL_ARGS = frozenset(
    {"prompt", "negative_prompt", "width", "height", "generator", "num_inference_steps",
     "guidance_scale", "output_type", "image", "return_dict", "num_images_per_prompt", "latents"}
)
STAGE_KEYS = {
    "pipeline": True, "model": True, "revision": False, "dtype": True, "variant": False,
    "steps": True, "guidance": True, "scheduler": False, "upscale": True,
    "share_components": False, "call_kwargs": False,
}
ENTRY_KEYS = {
    "pipeline": True, "model": True, "revision": False, "dtype": True, "variant": False,
    "steps": True, "guidance": True, "scheduler": False, "sizes": True, "native_size": False,
    "stages": False, "d3_column": False, "tiny": False, "call_kwargs": False, "description": False,
    "license": False,
}


class RegistryError(ValueError):
    """A generator manifest is malformed; the message names the file, the entry and the key."""


@dataclass(frozen=True)
class StageEntry:
    """One extra cascade stage (e.g. DeepFloyd IF stage II) run after the base pipeline."""

    pipeline: str
    model: str
    dtype: str
    steps: int
    guidance: float
    upscale: int
    revision: str | None = None
    variant: str | None = None
    scheduler: str | None = None
    share_components: tuple[str, ...] = ()
    call_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class GeneratorEntry:
    """One registry entry: a diffusers pipeline, its weights and its sampling settings."""

    name: str
    pipeline: str
    model: str
    dtype: str
    steps: int
    guidance: float
    sizes: tuple[tuple[int, int], ...]
    source: str
    revision: str | None = None
    variant: str | None = None
    scheduler: str | None = None
    native_size: tuple[int, int] | None = None
    stages: tuple[StageEntry, ...] = ()
    d3_column: int | None = None
    tiny: str | None = None
    call_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    description: str = ""
    license: str = ""
    """The licence of the model's weights and outputs, as its model card names it (shown in published dataset cards)."""

    @property
    def is_tiny(self) -> bool:
        """True for an offline tiny twin (model `tiny://<kind>`)."""
        return self.model.startswith(TINY_SCHEME)


class _Checker:
    """Validates one entry (or stage) mapping, raising RegistryError with file/entry/key context."""

    def __init__(self, path: Path, name: str, prefix: str = "") -> None:
        """Remember where errors come from."""
        self.path, self.name, self.prefix = path, name, prefix

    def fail(self, key: str | None, problem: str) -> RegistryError:
        """Build an error naming the file, the entry and the key."""
        where = f"{self.path}: entry '{self.name}'"
        if key is not None:
            where += f": key '{self.prefix}{key}'"
        return RegistryError(f"{where}: {problem}")

    def keys(self, raw: Any, allowed: dict[str, bool]) -> None:
        """Reject non-mappings, unknown keys and missing required keys."""
        if not isinstance(raw, dict):
            raise self.fail(None if not self.prefix else self.prefix.rstrip("."),
                            f"must be a mapping, got {type(raw).__name__}")
        for key in raw:
            if key not in allowed:
                raise self.fail(str(key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for key, required in allowed.items():
            if required and key not in raw:
                raise self.fail(key, "missing required key")

    def string(self, raw: dict, key: str, optional: bool = False) -> str | None:
        """A non-empty string (or None when optional and absent/null)."""
        value = raw.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, raw: dict, key: str, low: int, high: int | None = None) -> int:
        """An int in [low, high]."""
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.fail(key, f"must be {bound}, got {value}")
        return value

    def number(self, raw: dict, key: str) -> float:
        """A finite non-negative number."""
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise self.fail(key, f"must be a non-negative number, got {value!r}")
        return float(value)

    def dtype(self, raw: dict) -> str:
        """One of DTYPES."""
        value = raw.get("dtype")
        if value not in DTYPES:
            raise self.fail("dtype", f"must be one of {', '.join(DTYPES)}, got {value!r}")
        return value

    def diffusers_class(self, raw: dict, key: str, base: type, optional: bool = False) -> str | None:
        """A class name exported by diffusers that subclasses `base`."""
        name = self.string(raw, key, optional)
        if name is None:
            return None
        cls = getattr(diffusers, name, None) if name.isidentifier() else None
        if not isinstance(cls, type) or not issubclass(cls, base):
            raise self.fail(key, f"'{name}' is not a diffusers {base.__name__} class")
        return name

    def size(self, value: Any, key: str, multiple: int) -> tuple[int, int]:
        """A [width, height] pair of positive ints, each a multiple of `multiple`."""
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
            raise self.fail(key, f"must be [width, height] with positive integers, got {value!r}")
        if any(v % multiple for v in value):
            raise self.fail(key, f"width and height must be multiples of {multiple}, got {value!r}")
        return int(value[0]), int(value[1])

    def model(self, raw: dict, pipeline: str) -> str:
        """tiny://<kind> of the same pipeline, an existing local path, or a hub id."""
        model = self.string(raw, "model")
        assert model is not None
        if model.startswith(TINY_SCHEME):
            kind = model[len(TINY_SCHEME):]
            if kind not in TINY_PIPELINES:
                raise self.fail("model", f"unknown tiny kind '{kind}' (known: {', '.join(sorted(TINY_PIPELINES))})")
            if TINY_PIPELINES[kind] != pipeline:
                raise self.fail("model", f"tiny kind '{kind}' is a {TINY_PIPELINES[kind]}, not a {pipeline}")
            return model
        local = Path(model).expanduser()
        if not local.is_absolute():
            local = self.path.parent / local
        looks_local = model.startswith(("/", ".", "~")) or not HUB_ID_RE.match(model)
        if local.exists():
            return str(local.resolve())
        if looks_local:
            raise self.fail("model", f"local model path '{model}' does not exist (resolved: {local})")
        if raw.get("revision") is None:
            raise self.fail("revision", f"hub model '{model}' needs a pinned revision")
        return model

    def call_kwargs(self, raw: dict, pipeline: str) -> dict[str, Any]:
        """Extra pipeline call arguments: scalars keyed by explicit arguments of the pipeline's __call__."""
        value = raw.get("call_kwargs", {}) or {}
        if not isinstance(value, dict):
            raise self.fail("call_kwargs", f"must be a mapping, got {type(value).__name__}")
        accepted = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
        for key, item in value.items():
            if key in RESERVED_CALL_ARGS:
                raise self.fail(f"call_kwargs.{key}", "is set by the generator itself and may not be overridden")
            if key not in accepted or key in ("self", "kwargs"):
                raise self.fail(f"call_kwargs.{key}", f"is not an argument of {pipeline}.__call__")
            if not isinstance(item, (str, int, float, bool, type(None))):
                raise self.fail(f"call_kwargs.{key}", f"must be a scalar, got {type(item).__name__}")
        # The default of clean_caption depends on which packages are installed: pin it for reproducibility.
        if "clean_caption" in accepted and not isinstance(value.get("clean_caption"), bool):
            raise self.fail("call_kwargs.clean_caption", f"must be set to true or false for {pipeline} "
                            "(true needs beautifulsoup4 and ftfy)")
        return dict(value)


def _sampling_fields(check: _Checker, raw: Mapping[str, Any], pipeline: str) -> dict[str, Any]:
    """The keys an entry and a cascade stage share: weights, dtype, steps, guidance, scheduler."""
    return {
        "model": check.model(raw, pipeline),
        "revision": check.string(raw, "revision", optional=True),
        "dtype": check.dtype(raw),
        "variant": check.string(raw, "variant", optional=True),
        "steps": check.integer(raw, "steps", 1),
        "guidance": check.number(raw, "guidance"),
        "scheduler": check.diffusers_class(raw, "scheduler", diffusers.SchedulerMixin, optional=True),
    }


def _parse_stage(path: Path, name: str, index: int, raw: Any) -> StageEntry:
    """Validate one cascade stage."""
    check = _Checker(path, name, prefix=f"stages[{index}].")
    check.keys(raw, STAGE_KEYS)
    pipeline = check.diffusers_class(raw, "pipeline", diffusers.DiffusionPipeline)
    assert pipeline is not None
    shared = raw.get("share_components", []) or []
    if not isinstance(shared, list) or not all(isinstance(s, str) and s.isidentifier() for s in shared):
        raise check.fail("share_components", f"must be a list of component names, got {shared!r}")
    return StageEntry(
        pipeline=pipeline,
        **_sampling_fields(check, raw, pipeline),
        upscale=check.integer(raw, "upscale", 1),
        share_components=tuple(shared),
        call_kwargs=check.call_kwargs(raw, pipeline),
    )


def _parse_entry(path: Path, name: Any, raw: Any) -> GeneratorEntry:
    """Validate one generator entry."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{path}: entry {name!r}: name must match {NAME_RE.pattern} (it names output folders)")
    check = _Checker(path, name)
    check.keys(raw, ENTRY_KEYS)
    pipeline = check.diffusers_class(raw, "pipeline", diffusers.DiffusionPipeline)
    assert pipeline is not None
    native = raw.get("native_size")
    native_size = check.size(native, "native_size", 8) if native is not None else None
    stages_raw = raw.get("stages", []) or []
    if not isinstance(stages_raw, list):
        raise check.fail("stages", f"must be a list, got {type(stages_raw).__name__}")
    stages = tuple(_parse_stage(path, name, i, s) for i, s in enumerate(stages_raw))
    if stages and native_size is None:
        raise check.fail("native_size", "a cascade with stages needs the base stage's native_size")
    sizes_raw = raw.get("sizes")
    if not isinstance(sizes_raw, list) or not sizes_raw:
        raise check.fail("sizes", f"must be a non-empty list of [width, height], got {sizes_raw!r}")
    # Without a cascade the pipeline renders the size itself, so it must suit a latent grid.
    multiple = 1 if native_size is not None else 8
    sizes = tuple(check.size(s, f"sizes[{i}]", multiple) for i, s in enumerate(sizes_raw))
    if len(set(sizes)) != len(sizes):
        raise check.fail("sizes", "contains duplicates")
    d3_column = check.integer(raw, "d3_column", 0, 3) if raw.get("d3_column") is not None else None
    description, license_name = raw.get("description", "") or "", raw.get("license", "") or ""
    for key, value in (("description", description), ("license", license_name)):
        if not isinstance(value, str):
            raise check.fail(key, "must be a string")
    return GeneratorEntry(
        name=name,
        pipeline=pipeline,
        **_sampling_fields(check, raw, pipeline),
        sizes=sizes,
        native_size=native_size,
        stages=stages,
        d3_column=d3_column,
        tiny=check.string(raw, "tiny", optional=True),
        call_kwargs=check.call_kwargs(raw, pipeline),
        description=description,
        license=license_name,
        source=str(path),
    )


def _check_links(entries: dict[str, GeneratorEntry]) -> None:
    """Cross-entry rules: tiny twins exist and mirror their entry; d3 columns are unique."""
    columns: dict[int, str] = {}
    for entry in entries.values():
        if entry.d3_column is not None:
            if entry.d3_column in columns:
                raise RegistryError(
                    f"{entry.source}: entry '{entry.name}': key 'd3_column': column {entry.d3_column} "
                    f"is already used by entry '{columns[entry.d3_column]}'")
            columns[entry.d3_column] = entry.name
        if entry.tiny is None:
            continue
        twin = entries.get(entry.tiny)
        where = f"{entry.source}: entry '{entry.name}': key 'tiny'"
        if twin is None:
            raise RegistryError(f"{where}: twin entry '{entry.tiny}' is not defined")
        if not twin.is_tiny:
            raise RegistryError(f"{where}: twin entry '{entry.tiny}' is not a tiny:// model")
        ours = [entry.pipeline, *(s.pipeline for s in entry.stages)]
        theirs = [twin.pipeline, *(s.pipeline for s in twin.stages)]
        if ours != theirs:
            raise RegistryError(f"{where}: twin '{entry.tiny}' runs {theirs}, not {ours}")


def _read_entries(path: Path) -> dict[str, GeneratorEntry]:
    """Parse and validate every entry of one manifest, without cross-entry checks."""
    if not path.is_file():
        raise RegistryError(f"{path}: registry file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"generators"} or not isinstance(data["generators"], dict):
        raise RegistryError(f"{path}: must contain exactly one top-level key 'generators' holding a mapping")
    return {name: _parse_entry(path, name, raw) for name, raw in data["generators"].items()}


def load_registry(path: str | Path) -> dict[str, GeneratorEntry]:
    """Load and fully validate one generator manifest (no model is loaded)."""
    entries = _read_entries(Path(path))
    _check_links(entries)
    return entries


def load_registries(*paths: str | Path) -> dict[str, GeneratorEntry]:
    """Load several manifests into one registry; a name defined twice is an error."""
    merged: dict[str, GeneratorEntry] = {}
    for path in paths:
        for name, entry in load_registry(path).items():
            if name in merged:
                raise RegistryError(
                    f"{path}: entry '{name}': already defined in {merged[name].source}")
            merged[name] = entry
    _check_links(merged)
    return merged
