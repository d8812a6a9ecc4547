"""Session-wide test setup: the tiny generator twins are built once per test run, in a private folder; the local
S3 server (`s3kit`) is started once, on first use; a small D3 folder is written once, on first use."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from d3builder.generators.tiny import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every subprocess it starts) builds and loads tiny twins from one session folder."""
    folder = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="session")
def small_d3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local D3 folder shared by the session (read it, never change it): 16 train records (2 shards), 8
    validation and 8 test records."""
    from shardkit import make_d3_shards

    root = tmp_path_factory.mktemp("small-d3")
    make_d3_shards(root, 16, "train", shard_size=8)
    make_d3_shards(root, 8, "validation", seed=1)
    make_d3_shards(root, 8, "test", seed=2)
    return root


@pytest.fixture(scope="session")
def s3() -> Iterator:
    """The session's S3 server (s3kit.S3Server: moto on 127.0.0.1, a free port)."""
    from s3kit import s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, with the standard AWS_* variables pointing at the server; returns `s3://bucket`."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.bucket(f"test-{uuid.uuid4().hex[:12]}")
