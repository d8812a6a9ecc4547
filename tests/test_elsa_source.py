"""`fetch-real --elsa`: the published ELSA_D3 parquet as the record source, keyed by id; codetrain finds the reals."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shardkit import Sizes, make_record

from codetrain.realsource import RealImageSource
from d3builder import cli
from d3builder.embedded.server import serve_folder
from d3builder.recipe.elsa import ingest_elsa, resolve_source, split_of_file
from d3builder.storage.layout import DataLayout
from d3builder.storage.schema import elsa_features
from d3builder.storage.shards import write_shard
from d3builder.storage.units import read_stats

SIZES = Sizes(real=(48, 64), fake=(96, 128))
FILES = {"train-00000-of-00002.parquet": range(0, 4), "train-00001-of-00002.parquet": range(4, 7),
         "val-00000-of-00001.parquet": range(7, 9)}  # fmt: skip


def corrupt_image_columns(path: Path) -> None:
    """Overwrite the pages of every image column with garbage: a reader that touches one fails."""
    metadata = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            if chunk.path_in_schema.startswith("image_gen"):
                start = chunk.dictionary_page_offset or chunk.data_page_offset
                data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def write_published(root: Path, served: Path, base: str) -> dict[str, bytes]:
    """The published layout (data/train-*, data/val-*; exact ELSA_D3 features), reals served from `served`.

    Returns the bytes each record id must end up with. Record 1's own URL is dead, its duplicate row
    carries a good one; record 8's URL is dead; bad rows: null id, unsafe id, a URL that is no URL.
    """
    expected, features = {}, elsa_features()
    for name, indices in FILES.items():
        rows = []
        for i in indices:
            row, real = make_record(i, "train", seed=11, sizes=SIZES)
            (served / f"{row['id']}.jpg").write_bytes(real)
            row = {k: row[k] for k in features} | {"url": f"{base}/{row['id']}.jpg"}
            if i == 1:
                rows.append(row | {"url": f"{base}/gone-{i}.jpg"})
            elif i == 8:
                row["url"] = f"{base}/gone-{i}.jpg"
            rows.append(row)
            if i != 8:
                expected[row["id"]] = real
        if name.startswith("val"):
            template = rows[0]
            rows += [template | {"id": None}, template | {"id": "../../etc/passwd"}, template | {"id": "77", "url": "not a url"}]
        path = write_shard(rows, root / "data" / name, features, row_group_size=2)
        corrupt_image_columns(path)
    return expected


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    served, root = tmp_path_factory.mktemp("served"), tmp_path_factory.mktemp("ELSA_D3")
    with serve_folder(served) as base:
        expected = write_published(root, served, base)
        out = tmp_path_factory.mktemp("out")
        args = ["fetch-real", "--elsa", str(root), "--output-root", str(out), "--allow-private-addresses"]
        code = cli.main(args)
        yield root, out, expected, code, args


def test_published_parquet_becomes_record_shards_keyed_by_id_without_reading_images(published) -> None:
    root, out, expected, code, _ = published
    with pytest.raises(OSError):
        pq.read_table(root / "data" / "val-00000-of-00001.parquet", columns=["image_gen0"])
    assert code == 0
    layout = DataLayout(out)
    records = [r for k in layout.record_shards() for r in pq.read_table(layout.records(k)).to_pylist()]
    assert [r["id"] for r in records] == [make_record(i, "train", 11, SIZES)[0]["id"] for i in range(9)]
    assert layout.record_shards() == [0] and {r["shard"] for r in records} == {0}
    assert [r["split"] for r in records] == ["train"] * 7 + ["validation"] * 2
    first, duplicate = records[0], records[1]
    assert first["original_prompt"] == "a photo number 0" and first["URL"] == first["url"]
    assert duplicate["url"].endswith("/gone-1.jpg") and duplicate["alternate_urls"] == [
        duplicate["url"].replace("gone-1", duplicate["id"])
    ]
    stats = read_stats(layout.stats("select", 0))
    assert stats["record_source"] == "ELSA_D3" and stats["source"] == str(root)
    assert (stats["rows_read"], stats["kept"], stats["alternate_urls"]) == (13, 9, 1)
    assert stats["dropped"] == {"null_id": 1, "unsafe_id": 1, "bad_url": 1, "duplicate_id": 1}
    assert stats["splits"] == {"train": 7, "validation": 2}


def test_reals_are_fetched_per_id_and_codetrain_finds_them(published) -> None:
    _, out, expected, _, _ = published
    layout = DataLayout(out)
    real = {r["id"]: r for k in layout.record_shards() for r in pq.read_table(layout.real(k)).to_pylist()}
    assert len(real) == 9 and sum(r["status"] == "success" for r in real.values()) == 8
    dead = next(r for r in real.values() if r["status"] == "failed")
    assert dead["id"] not in expected and dead["error_message"].startswith("HTTP Error 404")
    served_by_alternate = [r for r in real.values() if r["url_index"] == 1]
    assert len(served_by_alternate) == 1 and served_by_alternate[0]["served_url"].endswith(f"/{served_by_alternate[0]['id']}.jpg")
    for source in (RealImageSource(str(out / "real")), RealImageSource(str(out))):
        assert len(source) == 8 and source.get(dead["id"]) is None
        assert all(source.get(record_id) == data for record_id, data in expected.items())


def test_rerun_reuses_records_and_reals(published, capsys: pytest.CaptureFixture) -> None:
    _, out, _, _, args = published
    stamp = DataLayout(out).real(0).stat().st_mtime_ns
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "ELSA_D3 records: already read (9 records in 1 shards" in printed and "1 skipped" in printed
    assert DataLayout(out).real(0).stat().st_mtime_ns == stamp


def test_records_are_cut_into_shards_in_published_order(published, tmp_path: Path) -> None:
    root, out, _, _, _ = published
    layout = DataLayout(tmp_path / "cut")
    result = ingest_elsa(str(root), layout, shard_size=4)
    assert (result.kept, result.shards) == (9, 3) and layout.record_shards() == [0, 1, 2]
    cut = [pq.read_table(layout.records(k), columns=["id", "shard"]).to_pylist() for k in range(3)]
    assert [len(rows) for rows in cut] == [4, 4, 1] and all(r["shard"] == k for k, rows in enumerate(cut) for r in rows)
    whole = pq.read_table(DataLayout(out).records(0), columns=["id"])["id"].to_pylist()
    assert [r["id"] for rows in cut for r in rows] == whole


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, published) -> None:
    root, out, _, _, _ = published
    assert cli.main(["fetch-real", "--elsa", str(root)]) == 2
    assert "--output-root" in capsys.readouterr().err
    assert cli.main(["fetch-real", "--elsa", str(tmp_path / "nowhere"), "--output-root", str(tmp_path / "o")]) == 2
    assert "nowhere: no such file or folder, and not a hub dataset id" in capsys.readouterr().err
    broken = tmp_path / "broken" / "data" / "train-00000-of-00001.parquet"
    broken.parent.mkdir(parents=True)
    pq.write_table(pq.read_table(root / "data" / "val-00000-of-00001.parquet", columns=["id"]), broken)
    assert cli.main(["fetch-real", "--elsa", str(broken.parents[1]), "--output-root", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(broken) in err and "missing required ELSA_D3 column 'url'" in err
    assert cli.main(["fetch-real", "--elsa", str(broken.parents[1]), "--output-root", str(out)]) == 2
    assert "already holds records of" in capsys.readouterr().err


def test_hub_ids_resolve_to_hf_urls_unless_a_local_folder_has_that_name(tmp_path: Path, monkeypatch) -> None:
    assert resolve_source("elsaEU/ELSA_D3") == "hf://datasets/elsaEU/ELSA_D3"
    assert resolve_source("hf://datasets/elsaEU/ELSA_D3/data/val-*.parquet") == "hf://datasets/elsaEU/ELSA_D3/data/val-*.parquet"
    (tmp_path / "elsaEU" / "ELSA_D3").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_source("elsaEU/ELSA_D3") == "elsaEU/ELSA_D3"
    assert [split_of_file(n) for n in ("data/train-00003-of-00120.parquet", "val-00000-of-00001.parquet", "x.parquet")] == [
        "train", "validation", None,
    ]
