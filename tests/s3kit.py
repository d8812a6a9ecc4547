"""A real S3-compatible server on 127.0.0.1 for the tests (moto's server: real HTTP, real S3 API, s3fs as client).

    from s3kit import s3_server, s3_bucket  # noqa: F401 - fixtures

    def test_x(s3_bucket: str) -> None:      # "s3://<fresh bucket>", AWS_* variables pointing at the server
        open_store(f"{s3_bucket}/d3")

The server runs for the whole session; each test gets a fresh bucket and the standard environment
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which s3fs,
botocore and child processes (workers started by a test) all read. `S3_OPTIONS` are the equivalent
`storage_options` for code that takes them explicitly (datasets.load_dataset, a manifest's block).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict:
    """storage_options for s3fs talking to `endpoint` (what the environment variables say, spelled out)."""
    return {"key": CREDENTIALS["AWS_ACCESS_KEY_ID"], "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": endpoint}}


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the server, with the AWS_* environment pointing at it; returns `s3://bucket`."""
    import s3fs

    for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options(s3_server)).mkdir(bucket)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    return f"s3://{bucket}"
