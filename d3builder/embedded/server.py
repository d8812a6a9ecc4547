"""Serve a folder over HTTP on 127.0.0.1 (the embedded photos, test fixtures, shards)."""

from __future__ import annotations

import functools
import io
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

LOOPBACK = "127.0.0.1"


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _QuietHandler(SimpleHTTPRequestHandler):
    """A static-file handler with HTTP range requests (so Parquet row groups stream), quiet logs."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def send_head(self) -> BinaryIO | None:
        """Serve `Range: bytes=a-b` (one range) with 206; anything else as the base class does."""
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        path = Path(self.translate_path(self.path))
        if match is None or not path.is_file() or match.groups() == ("", ""):
            return super().send_head()
        size = path.stat().st_size
        first, last = match.groups()
        start = max(0, size - int(last)) if first == "" else int(first)
        end = size - 1 if first == "" or last == "" else min(int(last), size - 1)
        if start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@contextmanager
def serve_folder(folder: str | Path, port: int = 0) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (port 0 = any free port); yields the base URL, stops on exit."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = ThreadingHTTPServer((LOOPBACK, port), handler)
    except OSError:
        if port == 0:
            raise
        server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="d3code-serve", daemon=True)
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
