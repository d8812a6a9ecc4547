"""The loopback file server: whole files and HTTP range requests."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from d3builder.embedded.server import serve_folder


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET `url`; returns status, headers and body."""
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, dict(response.headers), response.read()


def test_whole_file_and_byte_ranges(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    (tmp_path / "blob.bin").write_bytes(data)
    with serve_folder(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        status, headers, body = fetch(f"{base}/blob.bin")
        assert (status, body, headers["Accept-Ranges"]) == (200, data, "bytes")
        status, headers, body = fetch(f"{base}/blob.bin", {"Range": "bytes=10-19"})
        assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
        assert fetch(f"{base}/blob.bin", {"Range": "bytes=2500-"})[2] == data[2500:]
        assert fetch(f"{base}/blob.bin", {"Range": "bytes=-5"})[2] == data[-5:]
        assert fetch(f"{base}/blob.bin", {"Range": "bytes=100-99999"})[2] == data[100:]
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(f"{base}/blob.bin", {"Range": "bytes=9999-"})
        assert info.value.code == 416
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(f"{base}/missing.bin", {"Range": "bytes=0-1"})
        assert info.value.code == 404


def test_parquet_row_group_streams_over_http_without_reading_the_whole_file(tmp_path: Path) -> None:
    """fsspec reads by range (it refuses a server that answers a range request with the whole file)."""
    table = pa.table({"x": list(range(20_000)), "blob": [b"\0" * 200] * 20_000})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=2_000, compression="none")
    with serve_folder(tmp_path) as base:
        with fsspec.open(f"{base}/s.parquet", "rb", block_size=64 * 1024, cache_type="none") as fh:
            parquet = pq.ParquetFile(fh)
            assert parquet.read_row_group(3).column("x").to_pylist() == list(range(6_000, 8_000))
    assert parquet.metadata.num_row_groups == 10
