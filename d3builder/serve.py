"""Serve a folder over HTTP on 127.0.0.1 (the embedded photos, test fixtures, shards)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LOOPBACK = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    """A static-file handler that does not log every request to stderr."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        pass


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
