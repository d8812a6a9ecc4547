"""`fetch-real`: real img2dataset runs over 127.0.0.1, original bytes kept, bad images recorded, resumable."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset
from PIL import Image
from skimage.data import astronaut
from slowserver import slow_server

from d3builder.cli import COMMAND_MODULES
from d3builder.download.errors import download_error_text, error_text
from d3builder.embedded.server import serve_folder
from d3builder.recipe.manifest import FetchConfig, Manifest, MetadataSource
from d3builder.stages.fetch_real import STAGE, add_parser, fetch_real, inspect_image
from d3builder.storage.lease import acquire
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import REAL_FEATURES, RECORD_FEATURES
from d3builder.storage.shards import read_features, validate_shard, write_shard

DONE, SKIPPED, BUSY = UnitOutcome.DONE, UnitOutcome.SKIPPED, UnitOutcome.BUSY


def read_stats(path: Path) -> dict:
    return json.loads(path.read_text())

REPO = Path(__file__).resolve().parents[1]
GOOD = {  # file name -> the PIL format it must be recorded as
    "photo.jpg": "JPEG",
    "photo.png": "PNG",
    "photo.gif": "GIF",
    "photo.bmp": "BMP",
    "photo.tif": "TIFF",
    "cmyk.jpg": "JPEG",
    "deep16.png": "PNG",
    "palette.png": "PNG",
}
BAD = {  # record id -> a piece of the reason it must fail with
    "missing": "HTTP Error 404",
    "refused": "Connection refused",
    "html": "not an image Pillow can identify",
    "truncated": "truncated",
    "bomb": "decompression bomb guard",
    "late": "HTTP Error 404",
}


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_images(folder: Path) -> None:
    """The good images (from skimage's astronaut) and the bad payloads, as files."""
    photo = Image.fromarray(astronaut()).resize((96, 80))
    photo.save(folder / "photo.jpg", quality=90)
    photo.save(folder / "photo.png")
    photo.save(folder / "photo.gif")
    photo.save(folder / "photo.bmp")
    photo.save(folder / "photo.tif")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(folder / "deep16.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(folder / "palette.png")
    (folder / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>a web page, not a photo</body></html>")
    jpeg = (folder / "photo.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "bomb.png").write_bytes(png_claiming(60000, 60000))


def closed_port() -> int:
    """A loopback port with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def record_row(record_id: str, url: str, shard: int, alternates: list[str] | None = None) -> dict:
    """A RECORD_FEATURES row for one URL."""
    return {
        "id": record_id, "url": url, "alternate_urls": alternates or [], "original_prompt": "an astronaut", "positive_prompt": "an astronaut",
        "negative_prompt": "", "split": "train", "shard": shard, "selection_hash": 0.5, "SAMPLE_ID": 1,
        "URL": url, "TEXT": "an astronaut", "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": 0.3,
        "WIDTH": 96, "HEIGHT": 80,
    }  # fmt: skip


def make_manifest(root: Path, threads: int = 4, processes: int = 1, allow_private: bool = True) -> Manifest:
    """A manifest writing under `root` (private addresses allowed: the test servers listen on 127.0.0.1)."""
    fetch = FetchConfig(processes=processes, threads=threads, timeout=5, retries=0, allow_private_addresses=allow_private)
    return Manifest(
        name="fetch",
        output_root=str(root),
        metadata=MetadataSource("embedded"),
        shard_size=16,
        generators=[],
        fetch=fetch,
    )


def rows_by_id(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("served")
    write_images(folder)
    with serve_folder(folder) as base:
        yield folder, base


@pytest.fixture(scope="module")
def fetched(
    served: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Manifest, object, dict[str, dict]]:
    _, base = served
    urls = {f"good-{name}": f"{base}/{name}" for name in GOOD}
    urls.update(
        missing=f"{base}/missing.jpg",
        refused=f"http://127.0.0.1:{closed_port()}/photo.jpg",
        html=f"{base}/page.jpg",
        truncated=f"{base}/truncated.jpg",
        bomb=f"{base}/bomb.png",
        late=f"{base}/late.jpg",
    )
    manifest = make_manifest(tmp_path_factory.mktemp("data"))
    layout = manifest.layout
    write_shard([record_row(i, u, 0) for i, u in urls.items()], layout.records(0), RECORD_FEATURES)
    (layout.root / ".tmp" / STAGE / "00000-999999" / "output").mkdir(parents=True)  # what a killed run leaves
    layout.real(0).parent.mkdir(parents=True)
    layout.real(0).with_name(".00000.parquet.tmp-999999").write_bytes(b"half a shard")
    summary = fetch_real(manifest, progress=False)
    return manifest, summary, rows_by_id(manifest.layout.real(0))


def test_good_images_are_stored_byte_identical(served, fetched):
    folder, _ = served
    assert Image.open(folder / "deep16.png").mode == "I;16" and Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "palette.png").mode == "P"
    _, summary, rows = fetched
    assert summary.shards(DONE) == [0] and summary.complete, summary.describe()
    for name, encoding in GOOD.items():
        row, sent = rows[f"good-{name}"], (folder / name).read_bytes()
        assert row["status"] == "success", (name, row["error_message"])
        assert row["image"]["bytes"] == sent, name
        assert row["sha256"] == hashlib.sha256(sent).hexdigest() and row["num_bytes"] == len(sent)
        assert (row["encoding"], row["width"], row["height"]) == (encoding, 96, 80), name


def test_bad_images_fail_with_their_reason(fetched):
    _, summary, rows = fetched
    for record_id, reason in BAD.items():
        row = rows[record_id]
        assert row["status"] == "failed" and row["image"] is None, record_id
        assert reason in row["error_message"], (record_id, row["error_message"])
    assert rows["bomb"]["width"] is None and rows["html"]["num_bytes"] > 0
    assert (summary.counts["fetched"], summary.counts["not_fetched"]) == (len(GOOD), len(BAD))


def test_shard_is_complete_readable_and_has_stats(fetched, tmp_path):
    manifest, _, rows = fetched
    layout = manifest.layout
    real = layout.real(0)
    assert sorted(rows) == sorted(pq.read_table(layout.records(0), columns=["id"])["id"].to_pylist())
    assert read_features(real) == REAL_FEATURES and validate_shard(real, REAL_FEATURES).ok
    dataset = Dataset.from_parquet(str(real), cache_dir=str(tmp_path))
    first_good = next(r for r in dataset if r["status"] == "success")
    assert first_good["image"].size == (96, 80)
    stats = read_stats(layout.stats(STAGE, 0))
    assert (stats["records"], stats["successes"], stats["failures"]) == (len(rows), len(GOOD), len(BAD))
    assert (
        stats["failures_by_reason"]["HTTP Error 404"] == 2
        and stats["failures_by_reason"]["decompression bomb guard"] == 1
    )
    assert stats["img2dataset_version"] and stats["urls_per_s"] > 0 and stats["encodings"]["JPEG"] == 2
    assert stats["img2dataset_options"]["disable_all_reencoding"] is True
    assert not list((layout.root / ".tmp" / STAGE).iterdir())
    assert [p.name for p in real.parent.iterdir()] == [real.name]


def test_rerun_skips_a_done_shard(fetched):
    manifest, _, _ = fetched
    before = manifest.layout.real(0).stat().st_mtime_ns
    summary = fetch_real(manifest, progress=False)
    assert summary.shards(SKIPPED) == [0] and not summary.shards(DONE)
    assert manifest.layout.real(0).stat().st_mtime_ns == before


def test_shard_claimed_by_a_live_process_is_left_alone(tmp_path):
    manifest = make_manifest(tmp_path)
    layout = manifest.layout
    write_shard([record_row("a", "http://127.0.0.1:9/a.jpg", 0)], layout.records(0), RECORD_FEATURES)
    lease = acquire(layout.store, layout.leases(STAGE, "00000"), STAGE, "00000", 3600.0)  # this live process holds it
    summary = fetch_real(manifest, progress=False, wait=False)
    assert summary.shards(BUSY) == [0] and not layout.real(0).exists() and lease.path.exists()
    assert str(lease.path) in summary.describe() and summary.exit_code == 3


def test_missing_records_shard_is_reported_and_others_go_on(fetched):
    manifest, _, _ = fetched
    summary = fetch_real(manifest, shards=[0, 7], progress=False)
    assert summary.shards(SKIPPED) == [0] and list(summary.problems) == [7] and "00007.parquet" in summary.problems[7]


def test_retry_failed_recovers_a_file_served_later(served, fetched, tmp_path):
    folder, _ = served
    manifest, _, before = fetched
    shutil.copytree(manifest.layout.root, tmp_path / "data")
    copy = make_manifest(tmp_path / "data")
    shutil.copyfile(folder / "photo.png", folder / "late.jpg")
    summary = fetch_real(copy, retry_failed=True, progress=False)
    assert summary.shards(UnitOutcome.RETRIED) == [0] and summary.complete, summary.describe()
    after = rows_by_id(copy.layout.real(0))
    assert (
        after["late"]["status"] == "success" and after["late"]["image"]["bytes"] == (folder / "late.jpg").read_bytes()
    )
    assert list(after) == list(before)
    for record_id in before:
        if record_id != "late":
            assert after[record_id] == before[record_id], record_id
    stats = read_stats(copy.layout.stats(STAGE, 0))
    assert stats["successes"] == len(GOOD) + 1 and stats["failures"] == len(BAD) - 1
    assert [(r["retried"], r["recovered"]) for r in stats["retries"]] == [(len(BAD), 1)]


def test_inspect_image_guards_against_bombs_below_pillows_error_threshold():
    pixels = Image.MAX_IMAGE_PIXELS + 1
    with pytest.warns(Image.DecompressionBombWarning):
        result = inspect_image(png_claiming(pixels, 1), max_bytes=10**6)
    assert result.error.startswith("decompression bomb guard") and result.width is None


def test_cli_parses_shards_and_refuses_bad_lists(capsys):
    assert "d3builder.stages.fetch_real" in COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="d3builder")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fetch-real", "--manifest", "m.yaml", "--shards", "0,3", "--retry-failed"])
    assert (args.shards, args.retry_failed) == ([0, 3], True)
    with pytest.raises(SystemExit):
        parser.parse_args(["fetch-real", "--manifest", "m.yaml", "--shards", "zero"])
    assert "comma-separated shard numbers" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(served, tmp_path):
    folder, _ = served
    shards, per_shard = 3, 6
    manifest = make_manifest(tmp_path / "data", threads=2)
    layout = manifest.layout
    with slow_server(folder) as base:
        names = list(GOOD)
        ids = {}
        for shard in range(shards):
            ids[shard] = [f"s{shard}-r{i}" for i in range(per_shard)]
            rows = [record_row(r, f"{base}/{names[i % len(names)]}", shard) for i, r in enumerate(ids[shard])]
            write_shard(rows, layout.records(shard), RECORD_FEATURES)
        recipe = tmp_path / "fetch.yaml"
        recipe.write_text(yaml.safe_dump({
            "name": "fetch", "output_root": str(layout.root), "metadata": {"source": "embedded"},
            "shard_size": per_shard, "generators": [], "fetch": {"processes": 1, "threads": 2, "timeout": 10, "allow_private_addresses": True},
        }))  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "d3builder", "fetch-real", "--manifest", str(recipe)],
            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 90
        while time.time() < deadline and not (
            layout.real(0).exists() and list((layout.root / ".tmp" / STAGE).glob("00001-*"))
        ):
            assert process.poll() is None, "fetch-real ended before it could be killed"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)  # the command and the img2dataset workers it spawned
        process.wait()
        done_before = [s for s in range(shards) if layout.real(s).exists()]
        assert 0 in done_before and len(done_before) < shards
        summary = fetch_real(
            make_manifest(layout.root, threads=2, processes=2), progress=False
        )  # 2 img2dataset shards each
    assert summary.complete and summary.shards(DONE, SKIPPED) == list(range(shards)), summary.describe()
    for shard in range(shards):  # every record exactly once, in records order
        assert pq.read_table(layout.real(shard), columns=["id"])["id"].to_pylist() == ids[shard]
    assert all(
        pq.read_table(layout.real(s), columns=["status"])["status"].to_pylist() == ["success"] * per_shard
        for s in range(shards)
    )
    assert sorted(p.name for p in layout.real(0).parent.iterdir()) == [f"{s:05d}.parquet" for s in range(shards)]
    assert not list((layout.root / ".tmp" / STAGE).iterdir())


def test_failed_items_keep_no_response_bytes(fetched):
    manifest, _, rows = fetched
    message = rows["html"]["error_message"]
    assert message.startswith("not an image Pillow can identify") and "DOCTYPE" not in message and "b'" not in message
    assert "DOCTYPE" not in manifest.layout.stats(STAGE, 0).read_text()
    assert error_text("broken PNG file (chunk b'SeCr') after b\"x\\\"y\" in a verb'") == (
        "broken PNG file (chunk <bytes>) after <bytes> in a verb'"
    )
    assert download_error_text("HTTP Error 500: token=SECRET") == "HTTP Error 500: Internal Server Error"
    assert download_error_text("<urlopen error [Errno 111] Connection refused>") == (
        "<urlopen error [Errno 111] Connection refused>"
    )
    assert "SECRET" not in download_error_text("SECRET=1 not an HTTP status line\r\n")


@contextmanager
def not_http_server(reply: bytes) -> Iterator[str]:
    """A loopback TCP server that answers every request with `reply` (not HTTP)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_alternate_urls_are_tried_in_order_and_the_served_one_is_recorded(served, tmp_path):
    folder, base = served
    manifest = make_manifest(tmp_path / "data")
    layout = manifest.layout
    with not_http_server(b"AWS_SECRET_ACCESS_KEY=SECRET not an HTTP reply\r\n\r\n") as garbage:
        records = [
            record_row("alt-served", f"{base}/missing.jpg", 0, [f"{base}/photo.png", f"{base}/photo.gif"]),
            record_row("own-url", f"{base}/photo.jpg", 0, [f"{base}/photo.bmp"]),
            record_row("none-serves", f"{garbage}/photo.jpg", 0, [f"{base}/truncated.jpg"]),
            record_row("served-later", f"{base}/missing-again.jpg", 0, [f"{base}/alternate-later.png"]),
        ]  # one img2dataset pass per URL position, over the records still without an image
        write_shard(records, layout.records(0), RECORD_FEATURES)
        summary = fetch_real(manifest, progress=False)
    assert summary.complete and (summary.counts["fetched"], summary.counts["not_fetched"]) == (2, 2), summary.describe()
    rows = rows_by_id(layout.real(0))
    assert list(rows) == [r["id"] for r in records]
    assert (rows["alt-served"]["url_index"], rows["alt-served"]["served_url"]) == (1, f"{base}/photo.png")
    assert rows["alt-served"]["url"] == f"{base}/missing.jpg"
    assert rows["alt-served"]["image"]["bytes"] == (folder / "photo.png").read_bytes()
    assert (rows["own-url"]["url_index"], rows["own-url"]["served_url"]) == (0, f"{base}/photo.jpg")
    failed = rows["none-serves"]
    assert failed["status"] == "failed" and failed["url_index"] is None and failed["served_url"] is None
    assert failed["error_message"].split("; alternate URL 1: ")[0] == (
        "download failed: unrecognised error (withheld: it may quote the server's response)"
    )  # urllib's BadStatusLine message would be the response's first line
    assert "SECRET" not in layout.real(0).read_bytes().decode("latin-1")
    assert "SECRET" not in layout.stats(STAGE, 0).read_text()
    assert failed["error_message"].split("; alternate URL 1: ")[1].startswith("image does not decode")
    stats = read_stats(layout.stats(STAGE, 0))
    assert stats["served_by_alternate_url"] == 1 and sum(stats["failures_by_reason"].values()) == 2
    assert stats["failures_by_reason"]["HTTP Error 404"] == 1

    shutil.copyfile(folder / "photo.png", folder / "alternate-later.png")
    assert fetch_real(manifest, retry_failed=True, progress=False).shards(UnitOutcome.RETRIED) == [0]
    after = rows_by_id(layout.real(0))
    assert (after["served-later"]["status"], after["served-later"]["url_index"]) == ("success", 1)
    assert after["served-later"]["served_url"] == f"{base}/alternate-later.png"
    assert all(after[k] == rows[k] for k in ("alt-served", "own-url")) and after["none-serves"]["status"] == "failed"
    stats = read_stats(layout.stats(STAGE, 0))
    assert stats["served_by_alternate_url"] == 2
    assert [(r["retried"], r["recovered"], r["recovered_by_alternate_url"]) for r in stats["retries"]] == [(2, 1, 1)]


class _CountingHandler(SimpleHTTPRequestHandler):
    """Serves files and counts the requests it answered."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass


def test_non_public_addresses_are_refused_before_any_request(served, tmp_path):
    folder, _ = served
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_CountingHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    spellings = {
        "dotted": f"http://127.0.0.1:{port}/photo.jpg",
        "name": f"http://localhost:{port}/photo.jpg",
        "decimal": f"http://2130706433:{port}/photo.jpg",
        "hex": f"http://0x7f000001:{port}/photo.jpg",
        "octal": f"http://0177.0.0.1:{port}/photo.jpg",
        "short": f"http://127.1:{port}/photo.jpg",
        "mapped": f"http://[::ffff:127.0.0.1]:{port}/photo.jpg",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.1.2.3/a.jpg",
    }
    try:
        refusing = make_manifest(tmp_path / "refused", allow_private=False)
        write_shard([record_row(i, u, 0) for i, u in spellings.items()], refusing.layout.records(0), RECORD_FEATURES)
        summary = fetch_real(refusing, progress=False)
        assert summary.complete and summary.counts["not_fetched"] == len(spellings) and _CountingHandler.requests == 0
        rows = rows_by_id(refusing.layout.real(0))
        for record_id, row in rows.items():
            assert row["error_message"].startswith("refused non-public address: host "), (record_id, row)
        assert "(loopback)" in rows["decimal"]["error_message"] and "(link-local)" in rows["metadata"]["error_message"]
        assert "allow_private_addresses" in rows["private"]["error_message"]
        stats = read_stats(refusing.layout.stats(STAGE, 0))
        assert stats["failures_by_reason"] == {"refused non-public address": len(spellings)}
        assert stats["allow_private_addresses"] is False

        allowing = make_manifest(tmp_path / "allowed", allow_private=True)
        write_shard([record_row(i, spellings[i], 0) for i in ("dotted", "decimal")], allowing.layout.records(0), RECORD_FEATURES)
        assert fetch_real(allowing, progress=False).counts["fetched"] == 2 and _CountingHandler.requests == 2
    finally:
        server.shutdown()
        server.server_close()
