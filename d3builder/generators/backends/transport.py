"""HTTP requests with the limits a generator backend needs: http(s) only, capped bodies, a total deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from d3builder.generators.checker import HTTP_SCHEMES

MAX_REDIRECTS = 3
CHUNK = 65536
REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A request that produced no usable answer; `reason` is a counted failure reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Answer:
    """A complete HTTP answer (any status)."""

    status: int
    headers: dict[str, str]
    body: bytes
    url: str


@dataclass
class Limits:
    """What one request may take: seconds in all (connect, redirects, body) and bytes of body."""

    timeout_s: float
    max_bytes: int
    private_headers: dict[str, str] = field(default_factory=dict)
    """Headers (credentials) sent only to `private_origin`, never after a redirect to another host."""
    private_origin: tuple[str, str, int | None] | None = None


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL."""
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


def check_url(url: str) -> str:
    """`url` if it is http(s) with a host, else FetchError refused_url."""
    parts = urlsplit(url)
    if parts.scheme not in HTTP_SCHEMES or not parts.hostname:
        raise FetchError("refused_url", f"not an http(s) URL: {url[:200]!r}")
    return url


def _read(response: requests.Response, limits: Limits, deadline: float) -> bytes:
    """The body, refused once it passes max_bytes or the deadline."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} bytes, over the limit of {limits.max_bytes}")
    chunks, total = [], 0
    for chunk in response.iter_content(CHUNK):
        total += len(chunk)
        if total > limits.max_bytes:
            raise FetchError("too_large", f"over the limit of {limits.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError("timeout", "the body took longer than the timeout")
        chunks.append(chunk)
    return b"".join(chunks)


def fetch(session: requests.Session, method: str, url: str, limits: Limits, *, headers: dict[str, str] | None = None,
          json_body: Any = None) -> Answer:
    """Send one request and read its answer, following up to MAX_REDIRECTS redirects to http(s) URLs only.

    FetchError (refused_url, too_large, timeout, connection_error, http_status for a redirect loop) when
    there is no complete answer; any HTTP status is returned as it is."""
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url)
        sent = dict(headers or {})
        if limits.private_origin is not None and origin(url) == limits.private_origin:
            sent.update(limits.private_headers)
        remaining = max(0.001, deadline - time.monotonic())
        try:
            response = session.request(method, url, headers=sent, json=json_body, timeout=remaining,
                                       allow_redirects=False, stream=True)
            try:
                if response.status_code in REDIRECTS and response.headers.get("Location"):
                    target = urljoin(url, response.headers["Location"])
                    if response.status_code in (301, 302, 303):
                        method, json_body = "GET", None
                    url = target
                    continue
                body = _read(response, limits, deadline)
                return Answer(response.status_code, dict(response.headers), body, url)
            finally:
                response.close()
        except requests.Timeout:
            raise FetchError("timeout", f"no answer within {limits.timeout_s:g} s") from None
        except requests.ConnectionError as exc:
            if any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
                raise FetchError("timeout", f"no answer within {limits.timeout_s:g} s") from None
            raise FetchError("connection_error", type(exc).__name__) from None
        except requests.RequestException as exc:
            raise FetchError("connection_error", type(exc).__name__) from None
    raise FetchError("http_status", f"more than {MAX_REDIRECTS} redirects")
