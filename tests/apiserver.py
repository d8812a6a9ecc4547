"""A text-to-image HTTP API on 127.0.0.1 for the tests, answering each record as its behaviour says.

The record id is the last word of the prompt ("a photo number 1003"). Behaviours (per endpoint path):
ok, 429_then_ok, 500_then_ok, always_500, unauthorized, slow, malformed, no_field, huge, not_image,
file_url, redirect_file. The `/url` endpoints answer with an image URL (on `image_host`, another origin)
instead of base64. Every request is recorded with its arrival time and headers.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

SLOW_S = 1.5
HUGE_BYTES = 300_000


@dataclass
class Seen:
    """One request as the server saw it."""

    time: float
    method: str
    path: str
    headers: dict[str, str]
    body: dict | None


def api_image(record: str, seed: int, width: int, height: int, fmt: str) -> bytes:
    """The image the API sends for a record: noise from (record, seed) at the requested size."""
    rng = np.random.default_rng([int(record), seed % 2**32])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeImageApi


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", **headers: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        api = self.server.api
        api.record(Seen(time.monotonic(), "GET", self.path, dict(self.headers), None))
        data = api.files.get(self.path)
        self._send(200, data, "image/jpeg") if data is not None else self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        api = self.server.api
        length = int(self.headers.get("Content-Length", "0"))
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            body = None
        api.record(Seen(time.monotonic(), "POST", self.path, dict(self.headers), body))
        if body is None or not isinstance(body.get("prompt"), str):
            return self._send(400, b'{"error": "bad request"}')
        record = re.findall(r"(\d+)$", body["prompt"])[0]
        behaviour = api.behaviours.get(self.path, {}).get(record, "ok")
        attempt = api.count(self.path, record)
        if self.headers.get("Authorization") != f"Bearer {api.secret}" or behaviour == "unauthorized":
            return self._send(401, b'{"error": "unauthorized"}')
        if behaviour == "slow":
            time.sleep(SLOW_S)
        if behaviour == "always_500" or (behaviour == "500_then_ok" and attempt == 1):
            echo = json.dumps({"error": "internal", "your_headers": dict(self.headers)}).encode()
            return self._send(500, echo)  # echoes the key: a client must never store an error body
        if behaviour == "429_then_ok" and attempt == 1:
            return self._send(429, b'{"error": "slow down"}', Retry_After="0")
        if behaviour == "malformed":
            return self._send(200, b'{"data": [{"b64_json": "abc"')
        if behaviour == "no_field":
            return self._send(200, b'{"data": []}')
        if behaviour == "huge":
            return self._send(200, json.dumps({"data": [{"b64_json": "A" * HUGE_BYTES}]}).encode())
        if behaviour == "not_image":
            return self._send(200, json.dumps({"data": [{"b64_json": base64.b64encode(b"hello").decode()}]}).encode())
        if behaviour == "file_url":
            return self._send(200, json.dumps({"data": [{"url": "file:///etc/passwd"}]}).encode())
        if behaviour == "redirect_file":
            return self._send(302, b"", Location="file:///etc/passwd")
        fmt = "JPEG" if self.path.endswith("/url") else "PNG"
        data = api_image(record, int(body["seed"]), int(body["width"]), int(body["height"]), fmt)
        api.sent[(self.path, record)] = data
        if self.path.endswith("/url"):
            image_path = f"/images/{record}-{body['seed']}.jpg"
            api.image_host.files[image_path] = data
            return self._send(200, json.dumps({"data": [{"url": api.image_host.url(image_path)}]}).encode())
        return self._send(200, json.dumps({"data": [{"b64_json": base64.b64encode(data).decode()}]}).encode())


@dataclass
class FakeImageApi:
    """The server, what it was asked and what it sent (see the module docstring)."""

    secret: str = ""
    behaviours: dict[str, dict[str, str]] = field(default_factory=dict)
    image_host: FakeImageApi | None = None
    seen: list[Seen] = field(default_factory=list)
    sent: dict[tuple[str, str], bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.api = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def count(self, path: str, record: str) -> int:
        """This request's attempt number for (path, record), from 1."""
        with self.lock:
            self.attempts[(path, record)] += 1
            return self.attempts[(path, record)]

    def posts(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
