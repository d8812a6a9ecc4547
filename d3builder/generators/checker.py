"""Validation of one registry entry's keys, with errors naming the file, the entry and the key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TINY_SCHEME = "tiny://"
# kind -> diffusers pipeline class name; the registry checks entries against it without building anything.
TINY_PIPELINES: dict[str, str] = {
    "sd14": "StableDiffusionPipeline",
    "sd21": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "if": "IFPipeline",
    "if-ii": "IFSuperResolutionPipeline",
    "x4-upscaler": "StableDiffusionUpscalePipeline",
    "lcm": "LatentConsistencyModelPipeline",
    "pixart": "PixArtAlphaPipeline",
}
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HTTP_SCHEMES = ("http", "https")


class RegistryError(ValueError):
    """A generator manifest is malformed; the message names the file, the entry and the key."""


class Checker:
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

    def nested(self, raw: dict, key: str, allowed: dict[str, bool], optional: bool = False) -> dict | None:
        """A sub-mapping with its own allowed keys (None when optional and absent)."""
        value = raw.get(key)
        if value is None and optional:
            return None
        Checker(self.path, self.name, f"{self.prefix}{key}.").keys(value, allowed)
        return value

    def string(self, raw: dict, key: str, optional: bool = False) -> str | None:
        """A non-empty string (or None when optional and absent/null)."""
        value = raw.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, raw: dict, key: str, low: int, high: int | None = None, default: int | None = None) -> int:
        """An int in [low, high] (`default` when absent and a default is given)."""
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise self.fail(key, f"must be {bound}, got {value}")
        return value

    def number(self, raw: dict, key: str, default: float | None = None, positive: bool = False) -> float:
        """A finite non-negative (or, with `positive`, strictly positive) number."""
        value = raw.get(key, default)
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < float("inf")
        if not ok or (positive and value == 0):
            raise self.fail(key, f"must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
        return float(value)

    def optional_int(self, raw: dict, key: str) -> int | None:
        """An int >= 1, or None when absent."""
        return None if raw.get(key) is None else self.integer(raw, key, 1)

    def optional_number(self, raw: dict, key: str) -> float | None:
        """A non-negative number, or None when absent."""
        return None if raw.get(key) is None else self.number(raw, key)

    def diffusers_class(self, raw: dict, key: str, base: str, optional: bool = False) -> str | None:
        """A class name exported by diffusers that subclasses diffusers' class `base`."""
        name = self.string(raw, key, optional)
        if name is None:
            return None
        cls = _diffusers_attribute(name) if name.isidentifier() else None
        if not isinstance(cls, type) or not issubclass(cls, _diffusers_attribute(base)):
            raise self.fail(key, f"'{name}' is not a diffusers {base} class")
        return name

    def size(self, value: Any, key: str, multiple: int) -> tuple[int, int]:
        """A [width, height] pair of positive ints, each a multiple of `multiple`."""
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value)):
            raise self.fail(key, f"must be [width, height] with positive integers, got {value!r}")
        if any(v % multiple for v in value):
            raise self.fail(key, f"width and height must be multiples of {multiple}, got {value!r}")
        return int(value[0]), int(value[1])

    def sizes(self, raw: dict, multiple: int) -> tuple[tuple[int, int], ...]:
        """The non-empty, duplicate-free list of output sizes under `sizes`."""
        sizes_raw = raw.get("sizes")
        if not isinstance(sizes_raw, list) or not sizes_raw:
            raise self.fail("sizes", f"must be a non-empty list of [width, height], got {sizes_raw!r}")
        sizes = tuple(self.size(s, f"sizes[{i}]", multiple) for i, s in enumerate(sizes_raw))
        if len(set(sizes)) != len(sizes):
            raise self.fail("sizes", "contains duplicates")
        return sizes

    def text(self, raw: dict, key: str) -> str:
        """An optional free-text value (a description, a licence); empty when absent."""
        value = raw.get(key, "") or ""
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        return value

    def description(self, raw: dict) -> str:
        """The optional free-text description."""
        return self.text(raw, "description")

    def local_path(self, raw: dict, key: str, optional: bool = False) -> str | None:
        """A path resolved against the manifest's folder (existence is checked when the entry runs)."""
        value = self.string(raw, key, optional)
        if value is None:
            return None
        local = Path(value).expanduser()
        return str(local if local.is_absolute() else (self.path.parent / local).resolve())

    def http_url(self, raw: dict, key: str) -> str:
        """An http(s) URL with a host and no credentials in it."""
        value = self.string(raw, key)
        assert value is not None
        parts = urlsplit(value)
        if parts.scheme not in HTTP_SCHEMES or not parts.hostname:
            raise self.fail(key, f"must be an http(s) URL with a host, got {value!r}")
        if parts.username or parts.password:
            raise self.fail(key, "must not hold credentials (they would be stored with the shards): use auth.env")
        return value

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


def _diffusers_attribute(name: str) -> Any:
    """A name exported by diffusers (None if none): diffusers loads on the first entry checked, not at import."""
    import diffusers

    return getattr(diffusers, name, None)


def call_defaults(pipeline: str) -> dict[str, Any]:
    """The explicit arguments of a diffusers pipeline's __call__ with their defaults."""
    parameters = inspect.signature(_diffusers_attribute(pipeline).__call__).parameters
    return {k: p.default for k, p in parameters.items() if k not in ("self", "kwargs")}
