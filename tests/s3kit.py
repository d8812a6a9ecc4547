"""A real local S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1 (a free port), s3fs as the client.

The fixtures `s3` (one server per test session) and `s3_bucket` (a fresh bucket per test, with the AWS_*
environment pointing at the server) live in conftest.py:

    def test_x(s3_bucket: str, s3: S3Server) -> None:   # "s3://<fresh bucket>"; s3.storage_options, s3.filesystem()

The environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) reach s3fs in this process and in the
worker processes a test starts, so code under test needs no options at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import s3fs
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
KEY = SECRET = "testing"


@dataclass(frozen=True)
class S3Server:
    """A running local S3 server: its endpoint, the options and environment that reach it, and a client."""

    endpoint: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (what a config's `storage_options:` holds)."""
        return {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment variables pointing at this server."""
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": REGION}

    def filesystem(self) -> s3fs.S3FileSystem:
        """An s3fs client (listings not cached)."""
        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options)

    def bucket(self, name: str) -> str:
        """Create a bucket; returns its URL `s3://name`."""
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=KEY,
                              aws_secret_access_key=SECRET)
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, folder: Path, url: str) -> None:
        """Copy a local folder's files to `url` (s3://bucket/prefix)."""
        fs = self.filesystem()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            fs.pipe_file(f"{url}/{path.relative_to(folder).as_posix()}", path.read_bytes())


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (port 0: any free port), stopped when the block ends."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()

