"""D3Records: disjoint and complete splits, seeded order, exact resume, bad images, HTTP and the ELSA_D3 layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shardkit import GENERATORS, MODELS, make_d3_shards, shard_ids, write_real_sources
from torch.utils.data import DataLoader

from codetrain.data import (
    D3Records,
    RealImageSource,
    collate,
    list_shards,
    shuffle_order,
)
from codetrain.views import VIEW_KEYS, ViewMaker
from d3builder.embedded.server import serve_folder
from d3builder.storage.schema import REAL_FEATURES, d3_features
from d3builder.storage.shards import write_shard

N = 45
BATCH = 4
SMALL = ViewMaker(local_size=32, global_size=32)
"""Small outputs keep the tests fast; the view code path is the same at 224 (tests/test_views.py)."""


@pytest.fixture(scope="module")
def d3dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("d3")
    make_d3_shards(root, N, "train", shard_size=16, seed=0)
    return root


@pytest.fixture(scope="module")
def shards(d3dir: Path) -> list[str]:
    return list_shards(str(d3dir), "train")


def run(dataset: D3Records, workers: int = 0, batch_size: int = BATCH) -> list[dict]:
    """Every sample the DataLoader yields, unbatched, in order."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    samples = []
    for batch in loader:
        for i, rid in enumerate(batch["id"]):
            samples.append({"id": rid, "generator": batch["generator"][i], "skipped": int(batch["skipped"][i]),
                            **{k: batch[k][i] for k in VIEW_KEYS}})
    return samples


def dataset(shards: list[str], **kw) -> D3Records:
    return D3Records(shards, seed=kw.pop("seed", 5), shuffle_buffer=kw.pop("shuffle_buffer", 16),
                     views=kw.pop("views", SMALL), batch_size=kw.pop("batch_size", BATCH), **kw)


def test_list_shards_finds_our_layout_and_hub_layouts(d3dir: Path, shards: list[str], tmp_path: Path) -> None:
    assert shards == sorted(str(p) for p in (d3dir / "train").glob("*.parquet")) and len(shards) == 3
    assert list_shards(str(d3dir), "validation") == []
    # a glob offers the splits its file names start with, never its files as any split asked for
    assert list_shards(str(d3dir / "train" / "*-0000[01].parquet"), "train") == shards[:2]
    assert list_shards(str(d3dir / "train" / "*-0000[01].parquet"), "test") == []
    flat = tmp_path / "data"
    flat.mkdir()
    (flat / "train-00000-of-00001.parquet").write_bytes(Path(shards[0]).read_bytes())
    assert list_shards(str(tmp_path), "train") == [str(flat / "train-00000-of-00001.parquet")]
    with pytest.raises(ValueError, match="unsafe split"):
        list_shards(str(d3dir), "../etc")


def test_two_ranks_by_two_workers_see_every_record_once(shards: list[str]) -> None:
    seen = {rank: [s["id"] for s in run(dataset(shards, rank=rank, world_size=2), workers=2)] for rank in (0, 1)}
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == N
    assert set(everything) == set(shard_ids(shards))
    assert abs(len(seen[0]) - len(seen[1])) <= 1 and len(dataset(shards, rank=1, world_size=2)) == len(seen[1])


def test_order_is_fixed_by_seed_and_epoch_and_independent_of_workers(shards: list[str]) -> None:
    ds = dataset(shards)
    first = run(ds)
    with_workers = run(dataset(shards), workers=2)
    assert [s["id"] for s in with_workers] == [s["id"] for s in first]
    for a, b in zip(first, with_workers, strict=True):
        assert a["generator"] == b["generator"] in GENERATORS and all(torch.equal(a[k], b[k]) for k in VIEW_KEYS)
    ds.set_epoch(1)
    second = run(ds)
    assert sorted(s["id"] for s in second) == sorted(s["id"] for s in first)
    assert [s["id"] for s in second] != [s["id"] for s in first]
    by_id = {s["id"]: s for s in second}
    assert any(not torch.equal(s["g_r"], by_id[s["id"]]["g_r"]) for s in first)  # new crops each epoch
    assert [s["id"] for s in run(dataset(shards, seed=6))] != [s["id"] for s in first]
    assert len({s["generator"] for s in first}) >= 3  # the drawn fakes cover several generators


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_gives_exactly_the_remaining_records_with_identical_views(shards: list[str], workers: int) -> None:
    full = dataset(shards)
    full.set_epoch(2)
    reference = run(full, workers=2)
    assert len(reference) == N
    for consumed in (BATCH, 5 * BATCH + 1):
        resumed = dataset(shards)
        saved = {"epoch": 2, "position": consumed, "seed": 5}
        resumed.load_state_dict(saved)
        assert resumed.state_dict() == saved
        rest = run(resumed, workers=workers)
        assert [s["id"] for s in rest] == [s["id"] for s in reference[consumed:]]
        for a, b in zip(rest, reference[consumed:], strict=True):
            assert all(torch.equal(a[k], b[k]) for k in VIEW_KEYS)
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**saved, "seed": 9})


def test_workers_split_the_sequence_into_alternating_whole_batches(shards: list[str]) -> None:
    ds = dataset(shards)
    ds.set_position(3)
    parts = [ds.worker_order(w, 3) for w in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == sorted(ds.order()[3:].tolist())
    assert parts[0][:BATCH].tolist() == ds.order()[3 : 3 + BATCH].tolist()
    assert parts[1][:BATCH].tolist() == ds.order()[3 + BATCH : 3 + 2 * BATCH].tolist()


def test_resume_skips_consumed_row_groups_without_reading_them(shards: list[str]) -> None:
    ds = dataset(shards, shuffle_buffer=0, batch_size=None)
    reads = []
    original = ds._load

    def counting(files, piece, rows):
        reads.append(piece)
        return original(files, piece, rows)

    ds._load = counting
    ds.set_position(len(ds) - 5)
    assert len(list(ds)) == 5
    assert len(reads) == 1  # the last 5 records lie in the last row group (of 5 or 8 rows)


def test_resume_with_several_workers_needs_the_batch_size(shards: list[str]) -> None:
    ds = dataset(shards, batch_size=None)
    assert len(ds.worker_order(0, 2)) + len(ds.worker_order(1, 2)) == N  # from the start: fine
    ds.set_position(BATCH)
    assert len(ds.worker_order(0, 1)) == N - BATCH
    with pytest.raises(ValueError, match="batch_size"):
        ds.worker_order(0, 2)


def test_corrupt_and_missing_images_are_skipped_counted_and_named(tmp_path: Path, shards: list[str], caplog) -> None:
    table = pq.read_table(shards[0])
    rows = table.to_pylist()
    rows[0]["image_real"] = {"bytes": b"\xff\xd8\xff\xe0 not really a jpeg", "path": None}
    for slot in range(4):
        rows[1][f"image_gen{slot}"] = None
    rows[2]["image_real"] = {"bytes": rows[2]["image_real"]["bytes"][:200], "path": None}  # truncated JPEG
    bad = {rows[0]["id"], rows[1]["id"], rows[2]["id"]}
    path = write_shard(rows, tmp_path / "train" / "train-00000.parquet", d3_features(), row_group_size=8)
    ds = dataset([str(path)], shuffle_buffer=0)  # bad rows 0-2 are followed by good rows 3-7
    with caplog.at_level(logging.WARNING, logger="codetrain.data"):
        samples = run(ds)
    assert {s["id"] for s in samples} == {r["id"] for r in rows} - bad
    assert sum(s["skipped"] for s in samples) == ds.skipped == 3
    for rid in bad:
        assert any(rid in message for message in caplog.messages)
    with_workers = run(dataset([str(path)], shuffle_buffer=0), workers=2)
    assert {s["id"] for s in with_workers} == {r["id"] for r in rows} - bad
    assert sum(s["skipped"] for s in with_workers) == 3  # counted in the batches across processes


def test_shards_stream_over_http_from_loopback(d3dir: Path, shards: list[str]) -> None:
    local = [s["id"] for s in run(dataset(shards), workers=2)]
    with serve_folder(d3dir) as url:
        remote = list_shards(url, "train")
        assert remote == [f"{url}/train/{Path(s).name}" for s in shards]
        assert [s["id"] for s in run(dataset(remote), workers=2)] == local


@pytest.fixture(scope="module")
def elsa(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("elsa")
    make_d3_shards(root, 20, "train", shard_size=8, seed=3, elsa_layout=True)
    real_dir, files_dir = write_real_sources(root, 20, seed=3)
    return root, real_dir, files_dir


def test_elsa_layout_reads_reals_from_real_shards_or_a_folder(elsa: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, real_dir, files_dir = elsa
    elsa_shards = list_shards(str(root), "train")
    assert "image_real" not in pq.read_schema(elsa_shards[0]).names
    with pytest.raises(ValueError, match="real_source"):
        dataset(elsa_shards)
    ours = make_d3_shards(tmp_path, 20, "train", shard_size=8, seed=3)
    reference = {s["id"]: s for s in run(dataset([str(p) for p in ours]))}
    for source in (RealImageSource(str(real_dir)), RealImageSource(str(root)), RealImageSource(str(files_dir))):
        samples = run(dataset(elsa_shards, real_source=source), workers=2)
        assert sorted(s["id"] for s in samples) == sorted(reference)
        for s in samples:  # the same bytes and the same record RNG: the same views
            assert s["generator"] in MODELS
            assert all(torch.equal(s[k], reference[s["id"]][k]) for k in VIEW_KEYS)


def test_real_source_sanitises_ids_and_ignores_failed_rows(elsa: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, real_dir, files_dir = elsa
    (files_dir / ".hidden.jpg").write_bytes(b"x")  # unsafe names are never indexed
    (files_dir / "a b.jpg").write_bytes(b"x")
    for source in (RealImageSource(str(real_dir)), RealImageSource(str(files_dir))):
        assert len(source) == 20
        assert source.get("999") is None
        with pytest.raises(ValueError, match="unsafe record id"):
            source.get("../../etc/passwd")
    rows = pq.read_table(next(real_dir.glob("*.parquet"))).to_pylist()
    rows[0]["status"] = "failed_to_download"
    write_shard(rows, tmp_path / "real" / "00000.parquet", REAL_FEATURES)
    partial = RealImageSource(str(tmp_path))
    assert partial.get(rows[0]["id"]) is None and partial.get(rows[1]["id"]) == rows[1]["image"]["bytes"]


def test_shuffle_order_is_a_local_permutation() -> None:
    rng = np.random.default_rng(0)
    order = shuffle_order(1000, 50, rng)
    assert sorted(order.tolist()) == list(range(1000))
    assert all(order[t] < t + 50 for t in range(1000))  # never ahead of what the buffer has read
    assert not np.array_equal(order, np.arange(1000))
    assert np.array_equal(shuffle_order(10, 0, rng), np.arange(10))


def test_bad_shards_are_refused_with_their_name(tmp_path: Path, shards: list[str]) -> None:
    not_parquet = tmp_path / "train-00000.parquet"
    not_parquet.write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match="train-00000.parquet"):
        D3Records([str(not_parquet)])
    ids_only = tmp_path / "ids.parquet"
    pq.write_table(pq.read_table(shards[0], columns=["id"]), ids_only)
    with pytest.raises(ValueError, match="ids.parquet is not a D3 shard"):
        D3Records([str(ids_only)])


def test_eval_mode_batches_hold_only_the_clean_views(shards: list[str]) -> None:
    batch = next(iter(DataLoader(dataset(shards, views=ViewMaker(eval_mode=True)), batch_size=BATCH, collate_fn=collate)))
    assert {k for k in batch if k in VIEW_KEYS} == {"x_r", "x_f"}
    assert batch["x_r"].shape == (BATCH, 3, 224, 224) and batch["x_r"].dtype == torch.float32


@pytest.mark.parametrize("local_size", [96, 224])
def test_training_batches_have_the_contract_shapes_and_range(shards: list[str], local_size: int) -> None:
    loader = DataLoader(dataset(shards, views=ViewMaker(local_size=local_size)), batch_size=BATCH, collate_fn=collate)
    batch = next(iter(loader))
    assert set(batch) == {*VIEW_KEYS, "id", "generator", "skipped"}
    for key in VIEW_KEYS:
        size = local_size if key.startswith("l_") else 224
        assert batch[key].shape == (BATCH, 3, size, size) and batch[key].dtype == torch.float32, key
        assert -2.2 <= float(batch[key].min()) and float(batch[key].max()) <= 2.7, key
    assert len(batch["id"]) == len(batch["generator"]) == BATCH and batch["skipped"].tolist() == [0] * BATCH
