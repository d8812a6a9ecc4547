"""pytest fixtures over `s3kit`: one S3 server per session, a fresh bucket per test with the AWS_* environment.

    from s3fixtures import s3, s3_bucket  # noqa: F401 - fixtures

    def test_x(s3_bucket: str, s3) -> None:   # "s3://<fresh bucket>"; s3.storage_options, s3.filesystem()

The environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) reach s3fs in this process and in the
worker processes a test starts, so code under test needs no options at all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from s3kit import S3Server, s3_server


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The session's S3 server (moto on 127.0.0.1, a free port)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the standard AWS_* variables pointing at the server; returns `s3://bucket`."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.bucket(f"test-{uuid.uuid4().hex[:12]}")
