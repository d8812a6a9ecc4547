"""A folder served on 127.0.0.1 (a free port) after a pause per request, so that a download is still going
when a test acts on it (kills a worker, watches a later stage start)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _SlowHandler(SimpleHTTPRequestHandler):
    """Serves files after `delay_s` seconds."""

    def __init__(self, *args: object, delay_s: float, **kwargs: object) -> None:
        self.delay_s = delay_s
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        time.sleep(self.delay_s)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass


@contextmanager
def slow_server(folder: Path, delay_s: float = 0.4) -> Iterator[str]:
    """Serve `folder`, each request answered after `delay_s`; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_SlowHandler, directory=str(folder), delay_s=delay_s))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
