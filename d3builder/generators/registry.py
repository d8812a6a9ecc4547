"""Generator registry: YAML manifests of generators of four kinds, validated on load.

`kind: diffusers` (the default) names a diffusers pipeline; `python`, `http` and `folder` entries
(d3builder.generators.kinds) name a Python function, a text-to-image HTTP API or a folder of images
made elsewhere. Every error names the file, the entry and the key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d3builder.generators.checker import (
    TINY_SCHEME,
    Checker,
    RegistryError,
    call_defaults,
)
from d3builder.generators.kinds import KIND_PARSERS, FolderEntry, HttpEntry, PythonEntry

DTYPES = ("float16", "bfloat16", "float32")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
KINDS = ("diffusers", *KIND_PARSERS)
# Arguments that generate() sets itself; an entry may not override them through call_kwargs.
RESERVED_CALL_ARGS = frozenset(
    {"prompt", "negative_prompt", "width", "height", "generator", "num_inference_steps",
     "guidance_scale", "output_type", "image", "return_dict", "num_images_per_prompt", "latents"}
)
STAGE_KEYS = {
    "pipeline": True, "model": True, "revision": False, "dtype": True, "variant": False,
    "steps": True, "guidance": True, "scheduler": False, "upscale": True,
    "share_components": False, "call_kwargs": False, "sources": False,
}
ENTRY_KEYS = {
    "kind": False, "pipeline": True, "model": True, "revision": False, "dtype": True, "variant": False,
    "steps": True, "guidance": True, "scheduler": False, "sizes": True, "native_size": False,
    "stages": False, "d3_column": False, "tiny": False, "call_kwargs": False, "sources": False,
    "description": False, "license": False,
}
SOURCE_KINDS = ("published", "default", "card")
"""Evidence of a setting: the published ELSA_D3 data/card, the pipeline's own default, or the model card's usage."""
CALL_ARGS = {"steps": "num_inference_steps", "guidance": "guidance_scale", "negative_prompt": "negative_prompt"}
"""The __call__ argument behind each sampling setting that has a pipeline default."""


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
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class GeneratorEntry:
    """One `kind: diffusers` entry: a diffusers pipeline, its weights and its sampling settings."""

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
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    license: str = ""
    """The licence of the model's weights and outputs, as its model card names it (shown in published dataset cards)."""
    kind: str = "diffusers"

    @property
    def is_tiny(self) -> bool:
        """True for an offline tiny twin (model `tiny://<kind>`)."""
        return self.model.startswith(TINY_SCHEME)


Entry = GeneratorEntry | PythonEntry | HttpEntry | FolderEntry
"""A registry entry of any kind."""


def _dtype(check: Checker, raw: dict) -> str:
    """One of DTYPES."""
    value = raw.get("dtype")
    if value not in DTYPES:
        raise check.fail("dtype", f"must be one of {', '.join(DTYPES)}, got {value!r}")
    return value


def _call_kwargs(check: Checker, raw: dict, pipeline: str) -> dict[str, Any]:
    """Extra pipeline call arguments: scalars keyed by explicit arguments of the pipeline's __call__."""
    value = raw.get("call_kwargs", {}) or {}
    if not isinstance(value, dict):
        raise check.fail("call_kwargs", f"must be a mapping, got {type(value).__name__}")
    accepted = call_defaults(pipeline)
    for key, item in value.items():
        if key in RESERVED_CALL_ARGS:
            raise check.fail(f"call_kwargs.{key}", "is set by the generator itself and may not be overridden")
        if key not in accepted:
            raise check.fail(f"call_kwargs.{key}", f"is not an argument of {pipeline}.__call__")
        if not isinstance(item, (str, int, float, bool, type(None))):
            raise check.fail(f"call_kwargs.{key}", f"must be a scalar, got {type(item).__name__}")
    # The default of clean_caption depends on which packages are installed: pin it for reproducibility.
    if "clean_caption" in accepted and not isinstance(value.get("clean_caption"), bool):
        raise check.fail("call_kwargs.clean_caption", f"must be set to true or false for {pipeline} "
                         "(true needs beautifulsoup4 and ftfy)")
    return dict(value)


def _sources(check: Checker, raw: dict, pipeline: str, settings: dict[str, Any], required: bool) -> dict[str, str]:
    """The `sources:` note of each setting: '<published|default|card>: evidence'.

    A `default:` note is checked against the pipeline's __call__ signature (a scheduler's default is the
    pipeline's own one, i.e. no `scheduler` key); with `required`, every setting needs a note."""
    notes = raw.get("sources", {}) or {}
    if not isinstance(notes, dict):
        raise check.fail("sources", f"must be a mapping of setting -> note, got {type(notes).__name__}")
    defaults = call_defaults(pipeline)
    for key, note in notes.items():
        where = f"sources.{key}"
        if key not in settings:
            raise check.fail(where, f"names no setting of this entry (settings: {', '.join(settings)})")
        kind, _, text = note.partition(":") if isinstance(note, str) else ("", "", "")
        if kind not in SOURCE_KINDS or not text.strip():
            raise check.fail(where, f"must read '<{'|'.join(SOURCE_KINDS)}>: evidence', got {note!r}")
        if kind != "default":
            continue
        argument = key.removeprefix("call_kwargs.") if key.startswith("call_kwargs.") else CALL_ARGS.get(key)
        if key == "scheduler":
            if settings[key] is not None:
                raise check.fail(where, f"says default, but scheduler {settings[key]} replaces the pipeline's own")
        elif argument is None:
            raise check.fail(where, f"'{key}' has no pipeline default: cite where its value comes from")
        elif settings[key] != defaults[argument]:
            raise check.fail(where, f"says default, but {settings[key]!r} differs from {pipeline}.__call__'s "
                             f"{argument}={defaults[argument]!r}")
    missing = [key for key in settings if key not in notes]
    if required and missing:
        raise check.fail(f"sources.{missing[0]}", "missing: every setting of a D3 generator cites its evidence "
                         f"(still missing: {', '.join(missing)})")
    return dict(notes)


def _settings(fields: Mapping[str, Any], pipeline: str, call_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a source note can cite, with their values.

    An empty negative prompt is not passed at all, so its value is the pipeline's default."""
    settings = {"model": fields["model"], "steps": fields["steps"], "guidance": fields["guidance"],
                "scheduler": fields["scheduler"]}
    defaults = call_defaults(pipeline)
    if "negative_prompt" in defaults:
        settings["negative_prompt"] = defaults["negative_prompt"]
    settings.update({f"call_kwargs.{k}": v for k, v in call_kwargs.items()})
    return settings


def _sampling_fields(check: Checker, raw: Mapping[str, Any], pipeline: str) -> dict[str, Any]:
    """The keys an entry and a cascade stage share: weights, dtype, steps, guidance, scheduler."""
    return {
        "model": check.model(raw, pipeline),
        "revision": check.string(raw, "revision", optional=True),
        "dtype": _dtype(check, raw),
        "variant": check.string(raw, "variant", optional=True),
        "steps": check.integer(raw, "steps", 1),
        "guidance": check.number(raw, "guidance"),
        "scheduler": check.diffusers_class(raw, "scheduler", "SchedulerMixin", optional=True),
    }


def _parse_stage(path: Path, name: str, index: int, raw: Any, required_sources: bool) -> StageEntry:
    """Validate one cascade stage."""
    check = Checker(path, name, prefix=f"stages[{index}].")
    check.keys(raw, STAGE_KEYS)
    pipeline = check.diffusers_class(raw, "pipeline", "DiffusionPipeline")
    assert pipeline is not None
    shared = raw.get("share_components", []) or []
    if not isinstance(shared, list) or not all(isinstance(s, str) and s.isidentifier() for s in shared):
        raise check.fail("share_components", f"must be a list of component names, got {shared!r}")
    fields = _sampling_fields(check, raw, pipeline)
    call_kwargs = _call_kwargs(check, raw, pipeline)
    return StageEntry(
        pipeline=pipeline,
        **fields,
        upscale=check.integer(raw, "upscale", 1),
        share_components=tuple(shared),
        call_kwargs=call_kwargs,
        sources=_sources(check, raw, pipeline, _settings(fields, pipeline, call_kwargs), required_sources),
    )


def _parse_diffusers(path: Path, name: str, raw: dict) -> GeneratorEntry:
    """Validate one `kind: diffusers` entry; a D3 column (d3_column) must cite a source for every setting."""
    check = Checker(path, name)
    check.keys(raw, ENTRY_KEYS)
    pipeline = check.diffusers_class(raw, "pipeline", "DiffusionPipeline")
    assert pipeline is not None
    native = raw.get("native_size")
    native_size = check.size(native, "native_size", 8) if native is not None else None
    d3_column = check.integer(raw, "d3_column", 0, 3) if raw.get("d3_column") is not None else None
    stages_raw = raw.get("stages", []) or []
    if not isinstance(stages_raw, list):
        raise check.fail("stages", f"must be a list, got {type(stages_raw).__name__}")
    stages = tuple(_parse_stage(path, name, i, s, d3_column is not None) for i, s in enumerate(stages_raw))
    if stages and native_size is None:
        raise check.fail("native_size", "a cascade with stages needs the base stage's native_size")
    # Without a cascade the pipeline renders the size itself, so it must suit a latent grid.
    sizes = check.sizes(raw, 1 if native_size is not None else 8)
    fields = _sampling_fields(check, raw, pipeline)
    call_kwargs = _call_kwargs(check, raw, pipeline)
    settings = {**_settings(fields, pipeline, call_kwargs), "sizes": sizes}
    return GeneratorEntry(
        name=name,
        pipeline=pipeline,
        **fields,
        sizes=sizes,
        native_size=native_size,
        stages=stages,
        d3_column=d3_column,
        tiny=check.string(raw, "tiny", optional=True),
        call_kwargs=call_kwargs,
        sources=_sources(check, raw, pipeline, settings, d3_column is not None),
        description=check.description(raw),
        license=check.text(raw, "license"),
        source=str(path),
    )


def _parse_entry(path: Path, name: Any, raw: Any) -> Entry:
    """Validate one generator entry of any kind."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"{path}: entry {name!r}: name must match {NAME_RE.pattern} (it names output folders)")
    check = Checker(path, name)
    if not isinstance(raw, dict):
        raise check.fail(None, f"must be a mapping, got {type(raw).__name__}")
    kind = raw.get("kind", "diffusers")
    if kind not in KINDS:
        raise check.fail("kind", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    if kind == "diffusers":
        return _parse_diffusers(path, name, raw)
    return KIND_PARSERS[kind](check, raw)


def _check_links(entries: dict[str, Entry]) -> None:
    """Cross-entry rules: tiny twins exist and mirror their entry; d3 columns are unique."""
    columns: dict[int, str] = {}
    for entry in entries.values():
        if not isinstance(entry, GeneratorEntry):
            continue
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
        if not isinstance(twin, GeneratorEntry) or not twin.is_tiny:
            raise RegistryError(f"{where}: twin entry '{entry.tiny}' is not a tiny:// model")
        ours = [entry.pipeline, *(s.pipeline for s in entry.stages)]
        theirs = [twin.pipeline, *(s.pipeline for s in twin.stages)]
        if ours != theirs:
            raise RegistryError(f"{where}: twin '{entry.tiny}' runs {theirs}, not {ours}")


def _read_entries(path: Path) -> dict[str, Entry]:
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


def load_registry(path: str | Path) -> dict[str, Entry]:
    """Load and fully validate one generator manifest (no model is loaded, no user code is imported)."""
    entries = _read_entries(Path(path))
    _check_links(entries)
    return entries


def load_registries(*paths: str | Path) -> dict[str, Entry]:
    """Load several manifests into one registry; a name defined twice is an error."""
    merged: dict[str, Entry] = {}
    for path in paths:
        for name, entry in load_registry(path).items():
            if name in merged:
                raise RegistryError(
                    f"{path}: entry '{name}': already defined in {merged[name].source}")
            merged[name] = entry
    _check_links(merged)
    return merged


__all__ = ["DTYPES", "KINDS", "TINY_SCHEME", "Entry", "FolderEntry", "GeneratorEntry", "HttpEntry", "PythonEntry",
           "RegistryError", "StageEntry", "load_registries", "load_registry"]
