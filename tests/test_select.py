"""`select`: filters with exact counts, deterministic sampling/splits/order, streaming inputs, skip and force."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from d3builder import cli
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.stages.select import (
    REASONS,
    SelectError,
    select_records,
    selection_hash,
    split_of,
)
from d3builder.storage.schema import LAION_COLUMNS, MAX_ALTERNATE_URLS, RECORD_FEATURES
from d3builder.storage.shards import read_features
from d3builder.storage.units import read_stats

SEED = 7
SPLITS = {"train": 0.6, "validation": 0.2, "test": 0.2}


def good(i: int, **overrides) -> dict:
    """An eligible LAION row."""
    row = {
        "SAMPLE_ID": 5000 + i,
        "URL": f"http://127.0.0.1:9/img/{i}.jpg",
        "TEXT": f"a photo of thing number {i}",
        "LICENSE": "?",
        "NSFW": "UNLIKELY",
        "similarity": 0.35,
        "WIDTH": 256,
        "HEIGHT": 200,
    }
    row.update(overrides)
    return row


def write_laion(path: Path, rows: list[dict], narrow_ints: bool = False) -> Path:
    """Write a LAION-400M-format parquet file (optionally with int32 sizes, as some copies have)."""
    schema = LAION_COLUMNS.arrow_schema.remove_metadata()
    table = pa.Table.from_pylist(rows, schema=schema)
    if narrow_ints:
        table = table.cast(pa.schema([pa.field(f.name, pa.int32() if f.name in ("WIDTH", "HEIGHT") else f.type) for f in schema]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# Rows failing exactly one check each (or several: counted under the first), with the expected reason.
BAD_ROWS = [
    ("null_sample_id", good(900, SAMPLE_ID=None)),
    ("null_sample_id", good(901, SAMPLE_ID=None, NSFW="NSFW")),
    ("bad_url", good(902, URL="ftp://127.0.0.1/a.jpg")),
    ("bad_url", good(903, URL=None)),
    ("bad_url", good(904, URL="not a url")),
    ("bad_url", good(905, URL="http:///no-host.jpg")),
    ("bad_url", good(906, URL="https://[::1/unbalanced.jpg")),
    ("bad_url", good(907, URL="javascript:alert(1)", NSFW="NSFW")),
    ("nsfw", good(908, NSFW="NSFW")),
    ("nsfw", good(909, NSFW=None)),
    ("too_small", good(910, WIDTH=63)),
    ("too_small", good(911, HEIGHT=None)),
    ("too_small", good(912, WIDTH=None, similarity=0.1)),
    ("low_similarity", good(913, similarity=0.29)),
    ("low_similarity", good(914, similarity=None)),
    ("low_similarity", good(915, similarity=math.nan)),
    ("empty_caption", good(916, TEXT="")),
    ("empty_caption", good(917, TEXT="   \t ")),
    ("empty_caption", good(918, TEXT=None)),
    ("caption_too_short", good(919, TEXT="cat")),
    ("caption_too_short", good(920, TEXT="   dog   ")),
    ("caption_too_long", good(921, TEXT="x" * 51)),
]


def write_manifest(folder: Path, source: str, **overrides) -> Manifest:
    """A manifest YAML in `folder` (source relative to it), loaded and validated."""
    recipe = {
        "name": "unit",
        "output_root": str(folder / "out"),
        "metadata": {"source": source, "release": "test-release-1"},
        "seed": SEED,
        "shard_size": 4,
        "splits": SPLITS,
        "sampling": {"fraction": 1.0},
        "filters": {
            "nsfw": ["UNLIKELY", "UNSURE"],
            "min_width": 64,
            "min_height": 64,
            "min_similarity": 0.3,
            "min_caption_chars": 5,
            "max_caption_chars": 50,
        },
        "prompts": {"positive_template": "{caption}, high quality photo", "negative": "blurry"},
        "generators": ["g"],
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            recipe[key] = {**recipe.get(key, {}), **value}
        else:
            recipe[key] = value
    path = folder / f"manifest-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_manifest(path)


def records_table(manifest: Manifest) -> pa.Table:
    """Every record shard, in shard order."""
    layout = manifest.layout
    return pa.concat_tables([pq.read_table(layout.records(k)) for k in layout.record_shards()])


@pytest.fixture()
def laion_folder(tmp_path: Path) -> Path:
    """Three LAION files: 30 good rows, every kind of bad row, a duplicate id and a duplicate URL."""
    meta = tmp_path / "meta"
    bad = [row for _, row in BAD_ROWS]
    write_laion(meta / "part-00000.parquet", [good(i) for i in range(0, 10)] + bad[:11])
    write_laion(meta / "part-00001.parquet", [good(i) for i in range(10, 20)] + bad[11:], narrow_ints=True)
    duplicates = [
        good(100, SAMPLE_ID=5003, URL="http://127.0.0.1:9/img/other.jpg", TEXT="the same id with another caption"),
        good(101, URL="http://127.0.0.1:9/img/15.jpg"),
    ]
    write_laion(meta / "part-00002.parquet", [good(i) for i in range(20, 30)] + duplicates)
    return meta


def expected_counts() -> dict[str, int]:
    counts = {reason: 0 for reason in REASONS}
    for reason, _ in BAD_ROWS:
        counts[reason] += 1
    counts["duplicate_id"] = 1
    counts["duplicate_url"] = 1
    return counts


def test_exact_counts_by_reason_and_record_contents(laion_folder: Path) -> None:
    manifest = write_manifest(laion_folder.parent, "meta")
    stats = select_records(manifest, progress=False)
    assert stats.dropped == expected_counts()
    assert stats.rows_read == 30 + len(BAD_ROWS) + 2
    assert stats.kept == 30
    assert stats.kept + sum(stats.dropped.values()) == stats.rows_read
    assert stats.shards == 8 and manifest.layout.record_shards() == list(range(8))
    assert sum(stats.splits.values()) == 30
    assert stats.release == "test-release-1" and len(stats.input_files) == 3

    table = records_table(manifest)
    assert read_features(manifest.layout.records(0)) == RECORD_FEATURES
    rows = table.to_pylist()
    ids = [row["SAMPLE_ID"] for row in rows]
    assert len(set(ids)) == 30 and len({row["URL"] for row in rows}) == 30
    hashes = [row["selection_hash"] for row in rows]
    assert hashes == sorted(hashes)
    for position, row in enumerate(rows):
        assert row["shard"] == position // 4
        assert row["id"] == str(row["SAMPLE_ID"])
        assert row["selection_hash"] == selection_hash(row["SAMPLE_ID"], SEED)
        assert row["split"] == split_of(row["SAMPLE_ID"], SEED, SPLITS)
        assert row["original_prompt"] == row["TEXT"].strip()
        assert row["positive_prompt"] == row["original_prompt"] + ", high quality photo"
        assert row["negative_prompt"] == "blurry"
        assert row["WIDTH"] == 256 and row["HEIGHT"] == 200
    # Duplicate URL: the row with the smaller selection hash wins.
    url_15 = [row for row in rows if row["URL"] == "http://127.0.0.1:9/img/15.jpg"]
    winner = min((5015, 5101), key=lambda i: selection_hash(i, SEED))
    assert [row["SAMPLE_ID"] for row in url_15] == [winner]

    stats_file = manifest.layout.stats("select", 0)
    assert stats_file.is_file()
    on_disk = yaml.safe_load(stats_file.read_text())
    assert on_disk["dropped"] == expected_counts() and on_disk["shards"] == 8


def test_same_result_whatever_the_file_order(laion_folder: Path, tmp_path: Path) -> None:
    first = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "a"))
    select_records(first, progress=False)

    shuffled = tmp_path / "shuffled"
    rng = np.random.default_rng(3)
    names = sorted(laion_folder.glob("*.parquet"))
    for position, path in enumerate(names):
        rows = pq.read_table(path).to_pylist()
        rng.shuffle(rows)
        write_laion(shuffled / f"{'zyx'[position]}-{path.name}", rows)
    second = write_manifest(tmp_path, "shuffled", output_root=str(tmp_path / "b"))
    stats = select_records(second, progress=False)

    assert records_table(first).equals(records_table(second))
    assert stats.dropped == expected_counts()


def test_fraction_sampling_is_a_hash_threshold_and_adding_files_keeps_choices(tmp_path: Path) -> None:
    write_laion(tmp_path / "meta" / "a.parquet", [good(i) for i in range(60)])
    write_laion(tmp_path / "meta" / "b.parquet", [good(i) for i in range(60, 120)])
    before = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "before"), sampling={"fraction": 0.5})
    stats = select_records(before, progress=False)
    expected = {5000 + i for i in range(120) if selection_hash(5000 + i, SEED) < 0.5}
    chosen = records_table(before).to_pylist()
    assert {row["SAMPLE_ID"] for row in chosen} == expected
    assert stats.dropped["not_sampled"] == 120 - len(expected)
    assert 30 < len(expected) < 90

    write_laion(tmp_path / "meta" / "c.parquet", [good(i) for i in range(120, 200)])
    after = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "after"), sampling={"fraction": 0.5})
    select_records(after, progress=False)
    later = {row["SAMPLE_ID"]: row["split"] for row in records_table(after).to_pylist()}
    assert all(later.get(row["SAMPLE_ID"]) == row["split"] for row in chosen)
    assert len(later) > len(chosen)


def test_splits_follow_their_fractions() -> None:
    splits = [split_of(i, SEED, SPLITS) for i in range(20_000)]
    for name, fraction in SPLITS.items():
        assert abs(splits.count(name) / len(splits) - fraction) < 0.015
    assert split_of(1, SEED, SPLITS) == split_of(1, SEED, SPLITS)
    assert [split_of(i, SEED, SPLITS) for i in range(50)] != [split_of(i, SEED + 1, SPLITS) for i in range(50)]


def test_max_records_keeps_the_smallest_hashes(laion_folder: Path) -> None:
    manifest = write_manifest(laion_folder.parent, "meta", sampling={"fraction": 1.0, "max_records": 5})
    stats = select_records(manifest, progress=False)
    full = write_manifest(laion_folder.parent, "meta", output_root=str(laion_folder.parent / "full"))
    select_records(full, progress=False)
    assert records_table(manifest).column("id").to_pylist() == records_table(full).column("id").to_pylist()[:5]
    assert stats.kept == 5 and stats.shards == 2
    assert stats.kept + sum(stats.dropped.values()) == stats.rows_read
    assert stats.dropped["over_max_records"] + stats.dropped["duplicate_id"] + stats.dropped["duplicate_url"] == 32 - 5


def test_heavy_duplicates_trigger_a_rescan_and_stay_exact(tmp_path: Path) -> None:
    shared = [good(i, URL="http://127.0.0.1:9/img/shared.jpg") for i in range(6000)]
    distinct = [good(i) for i in range(6000, 6008)]
    write_laion(tmp_path / "meta" / "a.parquet", shared + distinct)
    capped = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "capped"), sampling={"fraction": 1.0, "max_records": 6})
    stats = select_records(capped, progress=False)
    uncapped = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "uncapped"))
    full = select_records(uncapped, progress=False)
    assert full.kept == 9 and full.dropped["duplicate_url"] == 5999
    assert stats.passes > 1
    assert records_table(capped).column("id").to_pylist() == records_table(uncapped).column("id").to_pylist()[:6]


def test_missing_column_names_file_and_column_and_writes_nothing(tmp_path: Path) -> None:
    write_laion(tmp_path / "meta" / "a.parquet", [good(i) for i in range(5)])
    broken = pa.Table.from_pylist([good(9)]).drop_columns(["similarity", "NSFW"])
    pq.write_table(broken, tmp_path / "meta" / "b.parquet")
    manifest = write_manifest(tmp_path, "meta")
    with pytest.raises(SelectError) as excinfo:
        select_records(manifest, progress=False)
    message = str(excinfo.value)
    assert str(tmp_path / "meta" / "b.parquet") in message
    assert "'NSFW'" in message and "'similarity'" in message
    assert not (manifest.layout.root / "records").exists()
    assert not manifest.layout.stats("select", 0).exists()


def test_fsspec_url_and_glob_sources_give_the_same_records(laion_folder: Path, tmp_path: Path) -> None:
    local = write_manifest(tmp_path, "meta", output_root=str(tmp_path / "local"))
    select_records(local, progress=False)

    memory = fsspec.filesystem("memory")
    prefix = f"memory://laion-{uuid.uuid4().hex}"
    try:
        for path in laion_folder.glob("*.parquet"):
            memory.pipe(f"{prefix}/{path.name}", path.read_bytes())
        remote = write_manifest(tmp_path, f"{prefix}/*.parquet", output_root=str(tmp_path / "remote"))
        stats = select_records(remote, progress=False)
    finally:
        memory.rm(prefix, recursive=True)
    assert records_table(local).equals(records_table(remote))
    assert all(name.startswith("memory://") for name in stats.input_files)

    glob = write_manifest(tmp_path, str(laion_folder / "part-0000[01].parquet"), output_root=str(tmp_path / "glob"))
    assert len(select_records(glob, progress=False).input_files) == 2
    single = write_manifest(tmp_path, "meta/part-00002.parquet", output_root=str(tmp_path / "single"))
    assert select_records(single, progress=False).rows_read == 12


def test_rerun_skips_and_force_redoes(laion_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(laion_folder.parent, "meta")
    args = ["select", "--manifest", str(manifest.path), "--no-progress"]
    assert cli.main(args) == 0
    assert "kept 30 of" in capsys.readouterr().out
    shard = manifest.layout.records(0)
    stamp = shard.stat().st_mtime_ns
    assert cli.main(args) == 0
    assert "already done" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == stamp
    assert select_records(manifest, progress=False).skipped

    bigger = write_manifest(laion_folder.parent, "meta", shard_size=10)
    stats = select_records(bigger, progress=False, force=True)
    assert not stats.skipped and stats.shards == 3
    assert bigger.layout.record_shards() == [0, 1, 2]

    manifest.layout.records(1).unlink()
    assert not select_records(bigger, progress=False).skipped


def test_embedded_source_needs_a_base_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, "embedded")
    with pytest.raises(SelectError, match="serve-embedded"):
        select_records(manifest, progress=False)
    assert cli.main(["select", "--manifest", str(manifest.path)]) == 1
    assert "serve-embedded" in capsys.readouterr().out


def test_duplicate_ids_keep_their_other_urls_as_alternates(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/img/{}.jpg".format
    rows = [good(i) for i in range(6)]
    rows += [good(0, URL=url(f"0-copy{k}"), TEXT=f"copy {k} of the first row") for k in range(6)]  # more than the cap
    rows += [good(0)]  # the very same row again: not an alternate of itself
    rows += [good(1, URL=url(2), TEXT="id 5001 at the URL of record 5002")]  # another record's image: never
    rows += [good(3, URL=url("shared")), good(4, URL=url("shared"))]  # one URL offered to two records
    write_laion(tmp_path / "meta" / "a.parquet", rows)
    stats = select_records(write_manifest(tmp_path, "meta"), progress=False)
    records = {row["SAMPLE_ID"]: row for row in records_table(write_manifest(tmp_path, "meta")).to_pylist()}
    assert sorted(records) == [5000 + i for i in range(6)]
    assert stats.dropped["duplicate_id"] + stats.dropped["duplicate_url"] == 10
    first, copies = records[5000], {url(f"0-copy{k}") for k in range(6)} | {url(0)}
    assert first["url"] in copies and len(first["alternate_urls"]) == MAX_ALTERNATE_URLS == 4
    assert set(first["alternate_urls"]) < copies - {first["url"]}
    assert records[5001]["alternate_urls"] == []  # its duplicate's URL is record 5002's own
    shared = [records[i]["alternate_urls"] for i in (5003, 5004)]
    assert sorted(shared, key=len) == [[], [url("shared")]]  # the first in key order gets it, the other not
    assert stats.alternate_urls == 5 and read_stats(write_manifest(tmp_path, "meta").layout.stats("select", 0))["alternate_urls"] == 5
    all_urls = [u for r in records.values() for u in [r["url"], *r["alternate_urls"]]]
    assert len(all_urls) == len(set(all_urls))


def write_typed(path: Path, columns: dict[str, pa.Array]) -> Path:
    """A LAION-format file whose columns carry whatever Arrow types the test gives them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_bad_values_are_dropped_and_counted_never_fatal(tmp_path: Path) -> None:
    n = 9
    base = [good(i) for i in range(n)]
    columns = {name: pa.array([row[name] for row in base]) for name in LAION_COLUMNS}
    columns["SAMPLE_ID"] = pa.array(["5000", " 5001 ", "abc", "-5", "5004", "5005", "5006", "5007", "1e3"])
    columns["WIDTH"] = pa.array([256.0, 256.0, 256.0, 256.0, math.nan, 1.5, math.inf, 256.0, 256.0])  # pandas-style
    columns["similarity"] = pa.array(["0.35", "0.35", "0.35", "0.35", "0.35", "0.35", "0.35", "high", "0.35"])
    columns["TEXT"] = pa.array([row["TEXT"].encode() for row in base[:-1]] + [b"\xff\xfe not utf-8"], pa.binary())
    write_typed(tmp_path / "meta" / "typed.parquet", columns)
    manifest = write_manifest(tmp_path, "meta")
    stats = select_records(manifest, progress=False)
    # "abc", "-5", 1.5, inf, "high" and invalid UTF-8 are bad values; NaN is a missing width (too small)
    assert stats.dropped["bad_value"] == 6 and stats.dropped["too_small"] == 1
    assert stats.kept == 2 and stats.rows_read == n
    assert sorted(r["SAMPLE_ID"] for r in records_table(manifest).to_pylist()) == [5000, 5001]
    assert cli.main(["select", "--manifest", str(write_manifest(tmp_path, "meta").path), "--no-progress"]) == 0
