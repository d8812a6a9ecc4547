"""`kind: http`: a text-to-image HTTP API described by data, called within its rate limit and spend cap.

One POST per record (its JSON body filled from the entry's request template), at most `concurrency` at a
time, request starts spaced by 60 / rate_limit seconds, retries with exponential backoff (or the server's
Retry-After) on 429, 5xx, timeouts and connection errors, and at most `max_requests` POSTs per run. The
API key comes from the environment variable the entry names; it is sent only to the endpoint's host and
never written anywhere (errors are scrubbed of it).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from d3builder.generators.backends.base import (
    Columns,
    Job,
    failed,
    ready_encoded,
    stated_columns,
)
from d3builder.generators.backends.transport import (
    FetchError,
    Limits,
    check_url,
    fetch,
    origin,
)
from d3builder.generators.checker import RegistryError
from d3builder.generators.kinds import PLACEHOLDER_RE, HttpEntry
from d3builder.generators.results import GenerationResult

PIPELINE = "http"
MAX_BACKOFF_S = 300.0
DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def api_key(entry: HttpEntry) -> str | None:
    """The API key from the entry's environment variable (RegistryError naming it when unset)."""
    if entry.auth is None:
        return None
    value = os.environ.get(entry.auth.env, "")
    if not value:
        raise RegistryError(f"{entry.source}: entry '{entry.name}': key 'auth.env': environment variable "
                            f"{entry.auth.env} is not set (the API key is read from it and never stored)")
    return value


def fill(template: Any, values: dict[str, Any]) -> Any:
    """The request template with placeholders filled: a string that is one placeholder takes the value's type.

    A key whose whole value is {negative_prompt} is left out when the record has no negative prompt."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            if value == "{negative_prompt}" and values["negative_prompt"] is None:
                continue
            out[key] = fill(value, values)
        return out
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if isinstance(template, str):
        whole = PLACEHOLDER_RE.fullmatch(template)
        if whole:
            return values[whole.group(1)]
        return PLACEHOLDER_RE.sub(lambda m: str(values[m.group(1)]), template)
    return template


def at_path(document: Any, path: tuple[str | int, ...]) -> Any:
    """The value at a path of keys and list indices, or KeyError naming where it stopped."""
    value = document
    for depth, step in enumerate(path):
        if isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value):
            value = value[step]
        elif isinstance(value, dict) and str(step) in value:
            value = value[str(step)]
        else:
            raise KeyError(".".join(str(p) for p in path[: depth + 1]))
    return value


class RateLimiter:
    """Spaces request starts by at least 60 / per_minute seconds, across threads."""

    def __init__(self, per_minute: float) -> None:
        self.interval = 60.0 / per_minute
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        """Block until this caller's slot."""
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class WebApiBackend:
    """One HTTP API entry: its session, rate limiter and the run's request count."""

    def __init__(self, entry: HttpEntry) -> None:
        self.entry = entry
        self.secret = api_key(entry)
        self.limiter = RateLimiter(entry.rate_limit)
        self.lock = threading.Lock()
        self.sent = 0
        self.local = threading.local()
        private = {entry.auth.header: f"{entry.auth.prefix}{self.secret}"} if entry.auth else {}
        self.limits = Limits(entry.timeout_s, entry.max_response_bytes, private, origin(entry.endpoint))

    def columns(self) -> Columns:
        """Model (default the endpoint), and the steps and guidance the entry sends, if any."""
        not_recorded = {"scheduler": "an HTTP API reports no scheduler", "dtype": "an HTTP API reports no dtype",
                        "safety_checker": "an HTTP API's safety filtering is not known",
                        "watermark": "an HTTP API's watermarking is not known",
                        "jpeg_quality": "the API's image is kept as it was sent; its JPEG quality is not known"}
        return stated_columns(self.entry, PIPELINE, not_recorded, gives="sends", encoded_here=False)

    def provenance(self) -> dict[str, Any]:
        """The endpoint, the request template and the limits; the key's variable name, never its value."""
        entry = self.entry
        return {"generator": entry.name, "kind": entry.kind, "endpoint": entry.endpoint, "model": entry.model,
                "revision": entry.revision, "request": dict(entry.request), "headers": dict(entry.headers),
                "image": {entry.image.form: ".".join(str(p) for p in entry.image.path)},
                "auth_env": entry.auth.env if entry.auth else None, "concurrency": entry.concurrency,
                "rate_limit_per_minute": entry.rate_limit, "timeout_s": entry.timeout_s, "retries": entry.retries,
                "backoff_s": entry.backoff_s, "max_requests": entry.max_requests,
                "max_response_bytes": entry.max_response_bytes, "requests_sent": self.sent}

    def render(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """Every job's request, `concurrency` at a time; results in job order."""
        workers = max(1, min(self.entry.concurrency, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self._one, jobs))

    def _session(self) -> requests.Session:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        return session

    def _spend(self) -> bool:
        """Count one more POST, unless the run's max_requests are used up."""
        with self.lock:
            if self.sent >= self.entry.max_requests:
                return False
            self.sent += 1
            return True

    def _scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret else text

    def _backoff(self, attempt: int, answer_headers: dict[str, str] | None) -> None:
        delay = self.entry.backoff_s * 2**attempt
        retry_after = (answer_headers or {}).get("Retry-After", "")
        if retry_after.strip().isdigit():
            delay = max(delay, float(retry_after))
        time.sleep(min(delay, MAX_BACKOFF_S))

    def _one(self, job: Job) -> GenerationResult:
        """POST one record's request (with retries) and take the image from the answer."""
        entry = self.entry
        values = {"prompt": job.prompt, "negative_prompt": job.negative_prompt or None, "width": job.width,
                  "height": job.height, "seed": job.seed, "steps": entry.steps, "guidance": entry.guidance}
        body = fill(dict(entry.request), values)
        last = ("connection_error", "no attempt made")
        attempts = entry.retries + 1
        for attempt in range(attempts):
            if not self._spend():
                return failed(job, "spend_cap", f"max_requests={entry.max_requests} requests already sent in this "
                              "run", pipeline=PIPELINE)
            self.limiter.wait()
            try:
                answer = fetch(self._session(), "POST", entry.endpoint, self.limits,
                               headers={"Accept": "application/json", **entry.headers}, json_body=body)
            except FetchError as exc:
                if exc.reason not in ("timeout", "connection_error"):
                    return failed(job, exc.reason, self._scrub(exc.detail), pipeline=PIPELINE)
                last = (exc.reason, exc.detail)
                if attempt + 1 < attempts:
                    self._backoff(attempt, None)
                continue
            if answer.status == 429 or answer.status >= 500:
                last = ("http_status", f"HTTP {answer.status}")
                if attempt + 1 < attempts:
                    self._backoff(attempt, answer.headers)
                continue
            if not 200 <= answer.status < 300:
                return failed(job, "http_status", f"HTTP {answer.status}", pipeline=PIPELINE)
            return self._image(job, answer.body)
        reason, detail = last
        return failed(job, reason, self._scrub(f"{detail} (after {attempts} attempts)"), pipeline=PIPELINE)

    def _image(self, job: Job, body: bytes) -> GenerationResult:
        """The image the answer holds (base64, or a URL fetched with the same limits)."""
        entry = self.entry
        where = ".".join(str(p) for p in entry.image.path)
        try:
            value = at_path(json.loads(body), entry.image.path)
        except ValueError:
            return failed(job, "bad_response", "the answer is not JSON", pipeline=PIPELINE)
        except KeyError as exc:
            return failed(job, "bad_response", f"the answer has no {where} (stopped at {exc.args[0]})",
                          pipeline=PIPELINE)
        if not isinstance(value, str) or not value:
            return failed(job, "bad_response", f"{where} holds {type(value).__name__}, not a string",
                          pipeline=PIPELINE)
        if entry.image.form == "base64":
            try:
                data = base64.b64decode(DATA_URL.sub("", value, count=1), validate=True)
            except (binascii.Error, ValueError):
                return failed(job, "bad_response", f"{where} is not valid base64", pipeline=PIPELINE)
        else:
            try:
                answer = fetch(self._session(), "GET", check_url(value), self.limits)
            except FetchError as exc:
                return failed(job, exc.reason, self._scrub(exc.detail), pipeline=PIPELINE)
            if not 200 <= answer.status < 300:
                return failed(job, "http_status", f"HTTP {answer.status} for the image URL", pipeline=PIPELINE)
            data = answer.body
        return ready_encoded(job, data, entry.max_response_bytes, job.seed, PIPELINE)
