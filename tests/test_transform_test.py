"""`transform-test`: seeded, recorded, replayable augmentations of the test split, re-encoded as found."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset
from PIL import Image
from stagekit import make_stage_inputs

from d3builder import cli
from d3builder.imaging.augmentations import Op, apply_ops
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.transform_test import (
    augm_features,
    encode,
    image_rng,
    transform_test,
)
from d3builder.stages.validate import validate_dataset
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import d3_features
from d3builder.storage.shards import image_cell, write_shard

IMAGE_COLUMNS = ("real", "gen0", "gen1", "gen2", "gen3")


def build(root: Path, n_records: int = 6, shard_size: int = 3):
    """Assembled inputs whose records are all in the test split."""
    inputs = make_stage_inputs(root, n_records=n_records, shard_size=shard_size, split_cycle=("test",))
    assemble_dataset(inputs.manifest, progress=False)
    return inputs


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_every_image_is_augmented_recorded_replayable_and_loads(tmp_path: Path) -> None:
    inputs = build(tmp_path / "data")
    summary = transform_test(inputs.manifest, progress=False)
    layout = inputs.layout
    assert summary.shards(UnitOutcome.DONE) == [0, 1] and summary.counts["test_augm"] == 6
    changed, drawn = 0, []
    for shard in (0, 1):
        source, augmented = rows(layout.d3("test", shard)), rows(layout.d3("test_augm", shard))
        assert [r["id"] for r in augmented] == [r["id"] for r in source]
        for before, after in zip(source, augmented, strict=True):
            assert after["split"] == "test_augm"
            assert after["positive_prompt"] == before["positive_prompt"]
            for suffix in IMAGE_COLUMNS:
                ops = [Op.from_dict(d) for d in json.loads(after[f"augm_{suffix}"])]
                drawn.append(len(ops))
                original = Image.open(io.BytesIO(before[f"image_{suffix}"]["bytes"]))
                replayed, fmt = encode(apply_ops(original, ops), before[f"encoding_{suffix}"])
                assert after[f"image_{suffix}"]["bytes"] == replayed  # exact replay from the recorded ops
                assert fmt == after[f"encoding_{suffix}"] == before[f"encoding_{suffix}"]
                image = Image.open(io.BytesIO(after[f"image_{suffix}"]["bytes"]))
                assert image.format == fmt and image.size == (after[f"width_{suffix}"], after[f"height_{suffix}"])
                old, new = pixels(before[f"image_{suffix}"]["bytes"]), pixels(after[f"image_{suffix}"]["bytes"])
                changed += old.shape != new.shape or not np.array_equal(old, new)
            assert after["sha256_real"] == hashlib.sha256(after["image_real"]["bytes"]).hexdigest()
    assert set(drawn) == {0, 1, 2} and changed > len(drawn) // 2
    dataset = load_dataset(str(layout.d3_dir()), "test_augm", cache_dir=str(tmp_path / "hf"))["test_augm"]
    assert dataset.features == augm_features(4) and dataset.num_rows == 6
    assert isinstance(dataset[0]["image_gen2"], Image.Image)
    card = (layout.d3_dir() / "README.md").read_text()
    assert "config_name: test_augm" in card and "path: test_augm/test_augm-*.parquet" in card
    assert "seed 1234" in card and "quality 95" in card
    report = validate_dataset(layout.root, progress=False)
    assert report.ok, [str(d) for d in report.defects]
    assert report.groups["test_augm"].records == 6 and report.groups["test_augm"].images == 30


def test_deterministic_and_resumable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = build(tmp_path / "data")
    layout = inputs.layout
    assert cli.main(["transform-test", "--manifest", str(inputs.manifest.path)]) == 0
    assert "test_augm: 6 records written now" in capsys.readouterr().out
    first = {k: layout.d3("test_augm", k).read_bytes() for k in (0, 1)}
    mtime = layout.d3("test_augm", 0).stat().st_mtime_ns
    layout.stats("transform_test", 1).unlink()
    layout.d3("test_augm", 1).unlink()
    summary = transform_test(inputs.manifest, progress=False)
    assert (summary.shards(UnitOutcome.DONE), summary.shards(UnitOutcome.SKIPPED)) == ([1], [0])
    assert layout.d3("test_augm", 0).stat().st_mtime_ns == mtime
    assert {k: layout.d3("test_augm", k).read_bytes() for k in (0, 1)} == first
    other = build(tmp_path / "other")
    other.manifest.transform_test.seed = 99
    transform_test(other.manifest, progress=False)
    ours = [r["augm_gen1"] for k in (0, 1) for r in rows(layout.d3("test_augm", k))]
    theirs = [r["augm_gen1"] for k in (0, 1) for r in rows(other.layout.d3("test_augm", k))]
    assert ours != theirs


def test_draws_depend_only_on_seed_record_and_column() -> None:
    def draw(seed: int, record: str, column: str) -> list[int]:
        return image_rng(seed, record, column).integers(0, 2**31, 4).tolist()

    assert draw(1, "7", "image_real") == draw(1, "7", "image_real")
    assert (
        len(
            {
                tuple(draw(*key))
                for key in [
                    (1, "7", "image_real"),
                    (2, "7", "image_real"),
                    (1, "8", "image_real"),
                    (1, "7", "image_gen0"),
                ]
            }
        )
        == 4
    )


def test_an_undecodable_image_leaves_its_record_out_and_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = build(tmp_path / "data", n_records=3, shard_size=3)
    path = inputs.layout.d3("test", 0)
    table = rows(path)
    table[1]["image_gen2"] = image_cell(b"\x89PNG\r\n\x1a\n broken", table[1]["filepath_gen2"])
    write_shard(table, path, d3_features(4))
    with caplog.at_level(logging.ERROR):
        transform_test(inputs.manifest, progress=False)
    assert [r["id"] for r in rows(inputs.layout.d3("test_augm", 0))] == [table[0]["id"], table[2]["id"]]
    stats = json.loads(inputs.layout.stats("transform_test", 0).read_text())
    assert stats["dropped_by_reason"] == {"decode_failed:image_gen2": 1} and stats["records"] == 3
    assert f"record '{table[1]['id']}'" in caplog.text and "image_gen2" in caplog.text and str(path) in caplog.text
