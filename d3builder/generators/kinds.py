"""Registry entries that are not diffusers pipelines: a Python function, an HTTP API, a folder of images.

Loading a registry only checks each entry's keys; whether it can run here (the function imports, the API
key is set, the folder exists) is checked by `d3builder.generators.backends.check_ready` before any work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from d3builder.generators.checker import Checker

CALLABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
PLACEHOLDERS = ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance")
"""What a request template may ask for; `{steps}` and `{guidance}` need the entry's steps and guidance."""
IMAGE_FORMS = ("base64", "url")
SECRET_HEADER_WORDS = ("authorization", "key", "token", "secret", "cookie")
PROVENANCE_TYPES: dict[str, type] = {
    "model": str, "model_revision": str, "pipeline": str, "scheduler": str, "dtype": str,
    "num_inference_steps": int, "guidance_scale": float, "seed": int, "safety_checker": bool, "watermark": bool,
}
"""Gen-row provenance columns a folder entry (or its index file) may state, with their types."""

PYTHON_KEYS = {"kind": True, "callable": True, "sizes": True, "model": False, "revision": False, "steps": False,
               "guidance": False, "description": False, "license": False}
HTTP_KEYS = {"kind": True, "endpoint": True, "request": True, "image": True, "auth": False, "headers": False,
             "concurrency": False, "rate_limit": True, "timeout_s": False, "retries": False, "backoff_s": False,
             "max_requests": True, "max_response_bytes": False, "sizes": True, "model": False, "revision": False,
             "steps": False, "guidance": False, "description": False, "license": False}
FOLDER_KEYS = {"kind": True, "folder": False, "index": False, "provenance": False, "max_image_bytes": False,
               "timeout_s": False, "description": False, "license": False}


@dataclass(frozen=True)
class PythonEntry:
    """`kind: python`: `callable` (package.module:function) renders images; see backends.function.ImageFunction."""

    name: str
    callable: str
    sizes: tuple[tuple[int, int], ...]
    source: str
    model: str
    revision: str | None = None
    steps: int | None = None
    guidance: float | None = None
    description: str = ""
    license: str = ""
    kind: str = "python"


@dataclass(frozen=True)
class HttpAuth:
    """Where the API key comes from (an environment variable) and how it is sent (a header)."""

    env: str
    header: str = "Authorization"
    prefix: str = "Bearer "


@dataclass(frozen=True)
class ResponseImage:
    """Where the image is in the JSON response: a path of keys and list indices, holding base64 or a URL."""

    path: tuple[str | int, ...]
    form: str


@dataclass(frozen=True)
class HttpEntry:
    """`kind: http`: a text-to-image HTTP API described by data (request template, response path, limits)."""

    name: str
    endpoint: str
    request: Mapping[str, Any] = field(hash=False)
    image: ResponseImage
    rate_limit: float
    max_requests: int
    sizes: tuple[tuple[int, int], ...]
    source: str
    model: str
    auth: HttpAuth | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    concurrency: int = 1
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_response_bytes: int = 20_000_000
    revision: str | None = None
    steps: int | None = None
    guidance: float | None = None
    description: str = ""
    license: str = ""
    kind: str = "http"


@dataclass(frozen=True)
class FolderEntry:
    """`kind: folder`: images made elsewhere, `{id}.{ext}` files in `folder` and/or an `index` id -> path/url."""

    name: str
    source: str
    folder: str | None = None
    index: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict, hash=False)
    max_image_bytes: int = 50_000_000
    timeout_s: float = 60.0
    description: str = ""
    license: str = ""
    kind: str = "folder"
    sizes: tuple[tuple[int, int], ...] = ()  # none to draw: each image has the size it was made at

    @property
    def model(self) -> str:
        """The provenance model name, else where the images come from."""
        return self.provenance.get("model") or f"folder:{self.folder or self.index}"


def _parse_python(check: Checker, raw: dict) -> PythonEntry:
    check.keys(raw, PYTHON_KEYS)
    target = check.string(raw, "callable")
    assert target is not None
    if not CALLABLE_RE.match(target):
        raise check.fail("callable", f"must read package.module:function, got {target!r}")
    return PythonEntry(
        name=check.name, callable=target, sizes=check.sizes(raw, 1), source=str(check.path),
        model=check.string(raw, "model", optional=True) or f"python:{target}",
        revision=check.string(raw, "revision", optional=True), steps=check.optional_int(raw, "steps"),
        guidance=check.optional_number(raw, "guidance"), description=check.description(raw), license=check.text(raw, "license"),
    )


def _template(check: Checker, value: Any, key: str, available: set[str], used: set[str]) -> None:
    """Check every placeholder of a JSON request template (nested mappings, lists, strings)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise check.fail(key, f"keys must be strings, got {k!r}")
            _template(check, v, f"{key}.{k}", available, used)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _template(check, v, f"{key}[{i}]", available, used)
    elif isinstance(value, str):
        for name in PLACEHOLDER_RE.findall(value):
            if name not in PLACEHOLDERS:
                raise check.fail(key, f"unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)})")
            if name not in available:
                raise check.fail(key, f"{{{name}}} needs the entry's '{name}' key")
            used.add(name)
    elif not isinstance(value, (int, float, bool, type(None))):
        raise check.fail(key, f"must be JSON data, got {type(value).__name__}")


def _response_image(check: Checker, raw: dict) -> ResponseImage:
    spec = check.nested(raw, "image", {form: False for form in IMAGE_FORMS})
    assert spec is not None
    forms = [form for form in IMAGE_FORMS if spec.get(form) is not None]
    if len(forms) != 1:
        raise check.fail("image", "must name exactly one of base64: PATH or url: PATH (e.g. base64: data.0.b64_json)")
    text = spec[forms[0]]
    if not isinstance(text, str) or not all(text.split(".")):
        raise check.fail(f"image.{forms[0]}", f"must be a dotted path such as data.0.b64_json, got {text!r}")
    return ResponseImage(tuple(int(p) if p.isdigit() else p for p in text.split(".")), forms[0])


def _parse_http(check: Checker, raw: dict) -> HttpEntry:
    check.keys(raw, HTTP_KEYS)
    steps, guidance = check.optional_int(raw, "steps"), check.optional_number(raw, "guidance")
    request = raw.get("request")
    if not isinstance(request, dict) or not request:
        raise check.fail("request", "must be a non-empty mapping: the JSON body, with {prompt} and other placeholders")
    available = set(PLACEHOLDERS) - {n for n, v in (("steps", steps), ("guidance", guidance)) if v is None}
    used: set[str] = set()
    _template(check, request, "request", available, used)
    if "prompt" not in used:
        raise check.fail("request", "must send the caption: put {prompt} in it")
    auth = None
    auth_raw = check.nested(raw, "auth", {"env": True, "header": False, "prefix": False}, optional=True)
    if auth_raw is not None:
        sub = Checker(check.path, check.name, "auth.")
        env = sub.string(auth_raw, "env")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", env or ""):
            raise check.fail("auth.env", f"must be an environment variable name, got {env!r}")
        prefix = auth_raw.get("prefix", "Bearer ")
        if not isinstance(prefix, str):
            raise check.fail("auth.prefix", f"must be a string (may be empty), got {prefix!r}")
        auth = HttpAuth(env=env, header=sub.string(auth_raw, "header", optional=True) or "Authorization",
                        prefix=prefix)
    headers = raw.get("headers", {}) or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise check.fail("headers", "must map header names to strings")
    for header in headers:
        if any(word in header.lower() for word in SECRET_HEADER_WORDS):
            raise check.fail(f"headers.{header}", "looks like a credential, which would be stored with the "
                             "shards: name its environment variable in auth.env")
    endpoint = check.http_url(raw, "endpoint")
    return HttpEntry(
        name=check.name, endpoint=endpoint, request=request, image=_response_image(check, raw),
        rate_limit=check.number(raw, "rate_limit", positive=True), max_requests=check.integer(raw, "max_requests", 1),
        sizes=check.sizes(raw, 1), source=str(check.path), model=check.string(raw, "model", optional=True) or endpoint,
        auth=auth, headers=dict(headers), concurrency=check.integer(raw, "concurrency", 1, 64, default=1),
        timeout_s=check.number(raw, "timeout_s", default=60.0, positive=True),
        retries=check.integer(raw, "retries", 0, 20, default=3),
        backoff_s=check.number(raw, "backoff_s", default=1.0),
        max_response_bytes=check.integer(raw, "max_response_bytes", 1, default=20_000_000),
        revision=check.string(raw, "revision", optional=True), steps=steps, guidance=guidance,
        description=check.description(raw), license=check.text(raw, "license"),
    )


def check_provenance_value(column: str, value: Any) -> Any:
    """`value` as the type of provenance column `column` (ValueError naming the problem)."""
    wanted = PROVENANCE_TYPES[column]
    if value is None:
        return None
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, wanted) or (wanted is not bool and isinstance(value, bool)):
        raise ValueError(f"must be {wanted.__name__}, got {value!r}")
    return value


def _parse_folder(check: Checker, raw: dict) -> FolderEntry:
    check.keys(raw, FOLDER_KEYS)
    folder, index = check.local_path(raw, "folder", optional=True), check.local_path(raw, "index", optional=True)
    if folder is None and index is None:
        raise check.fail("folder", "a folder entry needs folder: DIR ({id}.{ext} files) and/or index: FILE")
    if index is not None and not index.lower().endswith((".csv", ".parquet")):
        raise check.fail("index", f"must be a .csv or .parquet file, got {index!r}")
    provenance = check.nested(raw, "provenance", {k: False for k in PROVENANCE_TYPES}, optional=True) or {}
    for column, value in provenance.items():
        try:
            check_provenance_value(column, value)
        except ValueError as exc:
            raise check.fail(f"provenance.{column}", str(exc)) from None
    return FolderEntry(
        name=check.name, source=str(check.path), folder=folder, index=index,
        provenance={k: check_provenance_value(k, v) for k, v in provenance.items()},
        max_image_bytes=check.integer(raw, "max_image_bytes", 1, default=50_000_000),
        timeout_s=check.number(raw, "timeout_s", default=60.0, positive=True), description=check.description(raw), license=check.text(raw, "license"),
    )


KIND_PARSERS: dict[str, Callable[[Checker, dict], PythonEntry | HttpEntry | FolderEntry]] = {
    "python": _parse_python,
    "http": _parse_http,
    "folder": _parse_folder,
}
"""Parser of each non-diffusers kind, keyed by the entry's `kind`."""
