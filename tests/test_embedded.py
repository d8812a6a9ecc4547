"""The embedded set: real packaged photos written in a LAION-like mix, LAION-format metadata, served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from d3builder.embedded.photos import (
    embedded_server,
    photo_specs,
    prepare_photos,
    write_metadata,
)
from d3builder.recipe.manifest import load_manifest
from d3builder.stages.select import select_records
from d3builder.storage.schema import LAION_COLUMNS

REPO = Path(__file__).resolve().parents[1]
PART_NAME = re.compile(r"^part-(\d{5})-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-c000\.snappy\.parquet$")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    prepare_photos(folder)
    return folder


def fetch(url: str) -> bytes:
    """GET a URL on 127.0.0.1."""
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_photos_decode_in_several_formats_and_sizes(photo_folder: Path) -> None:
    infos = prepare_photos(photo_folder)
    assert len(infos) == len(photo_specs()) >= 30
    formats = Counter(info.encoding for info in infos)
    assert {"JPEG", "PNG", "GIF"} <= set(formats)
    assert formats["JPEG"] > 0.75 * len(infos)
    digests = set()
    for info in infos:
        data = info.path.read_bytes()
        digests.add(hashlib.sha256(data).hexdigest())
        with Image.open(info.path) as image:
            image.load()
            assert image.format == info.encoding
            assert image.size == (info.width, info.height)
        assert min(info.width, info.height) >= 64
        assert info.caption.strip() and info.path.name == info.filename
    assert len(digests) == len(infos)
    assert len({(info.width, info.height) for info in infos}) > 15
    assert len({info.caption for info in infos}) == len(infos)
    assert len({info.sample_id for info in infos}) == len(infos)
    modes = set()
    for info in infos:
        with Image.open(info.path) as image:
            modes.add(image.mode)
    assert {"RGB", "L"} <= modes


def test_prepare_is_idempotent_and_repairs(photo_folder: Path) -> None:
    first = prepare_photos(photo_folder)
    stamps = {info.path: info.path.stat().st_mtime_ns for info in first}
    assert prepare_photos(photo_folder) == first
    assert {info.path: info.path.stat().st_mtime_ns for info in first} == stamps
    victim, broken = first[0].path, first[1].path
    victim.unlink()
    broken.write_bytes(broken.read_bytes()[:100])
    assert prepare_photos(photo_folder) == first
    for path in (victim, broken):
        with Image.open(path) as image:
            image.load()


def test_metadata_is_laion_400m_format(tmp_path: Path) -> None:
    paths = write_metadata(tmp_path / "meta", "http://127.0.0.1:8765/")
    assert [PART_NAME.match(p.name).group(1) for p in paths] == ["00000", "00001"]
    assert write_metadata(tmp_path / "again", "http://127.0.0.1:8765") == [tmp_path / "again" / p.name for p in paths]
    table = pq.read_table(tmp_path / "meta")
    schema = LAION_COLUMNS.arrow_schema.remove_metadata()
    assert table.schema.names == list(LAION_COLUMNS) and all(pq.read_schema(p).equals(schema) for p in paths)
    rows = table.to_pylist()
    specs = {spec.sample_id: spec for spec in photo_specs()}
    assert len(rows) == len(specs) and {row["SAMPLE_ID"] for row in rows} == set(specs)
    for row in rows:
        spec = specs[row["SAMPLE_ID"]]
        assert row["URL"] == f"http://127.0.0.1:8765/{spec.filename}"
        assert row["TEXT"] == spec.caption and row["NSFW"] == "UNLIKELY"
        assert 0.3 <= row["similarity"] < 0.4
    single = write_metadata(tmp_path / "one.parquet", "http://127.0.0.1:1")
    assert single == [tmp_path / "one.parquet"] and pq.read_table(single[0]).num_rows == len(rows)
    fewer = write_metadata(tmp_path / "meta", "http://127.0.0.1:8765", num_files=1)
    assert sorted((tmp_path / "meta").iterdir()) == fewer


def test_served_photos_match_and_select_accepts_the_metadata(photo_folder: Path, tmp_path: Path) -> None:
    manifest = load_manifest(REPO / "manifests" / "tiny.yaml", output_root=tmp_path / "run")
    with embedded_server(photo_folder) as base_url:
        stats = select_records(manifest, base_url, progress=False)
        records = pq.read_table(manifest.layout.root / "records").to_pylist()
        by_format = {}
        for row in records:
            by_format.setdefault(Path(row["url"]).suffix, row)
        assert {".jpg", ".png", ".gif"} <= set(by_format)
        for row in by_format.values():
            name = row["url"].rsplit("/", 1)[1]
            assert fetch(row["url"]) == (photo_folder / name).read_bytes()
    assert stats.kept == len(photo_specs()) and stats.rows_read == len(photo_specs())
    assert stats.source == "embedded" and stats.release == manifest.metadata.release
    assert len(stats.input_files) == 2


@pytest.mark.slow
def test_serve_embedded_command_prints_url_and_stops_on_ctrl_c(photo_folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "d3builder", "serve-embedded", "--folder", str(photo_folder), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        assert fetch(f"{match.group(1)}/coin.gif") == (photo_folder / "coin.gif").read_bytes()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
