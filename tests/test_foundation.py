"""The shard schema, atomic writer, reader, validator, manifests and unit claims."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rowkit
from datasets import load_dataset
from PIL import Image

from d3builder.core.yamlconfig import ConfigError
from d3builder.recipe.manifest import load_manifest
from d3builder.storage import schema
from d3builder.storage.layout import DataLayout, safe_name
from d3builder.storage.lease import LeaseRecord, acquire
from d3builder.storage.runner import shards_for_process
from d3builder.storage.shards import (
    image_cell,
    read_features,
    validate_shard,
    write_shard,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small random JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def d3_row(record_id: str, num_generators: int = 4) -> dict:
    """One complete row of our final schema, 40x30 JPEGs everywhere."""
    fakes = [(jpeg_bytes(1000 * slot + int(record_id)), (40, 30)) for slot in range(num_generators)]
    return rowkit.d3_row(record_id, jpeg_bytes(int(record_id)), fakes, width_real=40, height_real=30, sha256_real="0" * 64)


def test_written_shard_loads_through_datasets_with_images(tmp_path: Path) -> None:
    path = write_shard([d3_row(str(i)) for i in range(5)], tmp_path / "train-00000.parquet", schema.d3_features())
    assert read_features(path) == schema.d3_features()
    dataset = load_dataset("parquet", data_files=str(path), split="train")
    assert dataset.features == schema.d3_features()
    first = dataset[0]
    assert isinstance(first["image_real"], Image.Image) and first["image_real"].size == (40, 30)
    assert isinstance(first["image_gen3"], Image.Image)
    assert dataset["id"] == [str(i) for i in range(5)]
    assert pq.ParquetFile(path).metadata.num_row_groups >= 1
    assert validate_shard(path, schema.d3_features()).ok


def test_writer_leaves_no_temporary_file_and_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "shard.parquet"
    write_shard([d3_row("1")], target, schema.d3_features())
    write_shard([d3_row("2")], target, schema.d3_features())
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]
    assert pq.read_table(target).column("id").to_pylist() == ["2"]


def test_small_row_groups(tmp_path: Path) -> None:
    path = write_shard([d3_row(str(i)) for i in range(10)], tmp_path / "s.parquet", schema.d3_features(), row_group_size=3)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4


def test_missing_column_names_the_row(tmp_path: Path) -> None:
    row = d3_row("5")
    del row["image_gen2"]
    with pytest.raises(KeyError, match="row 0 .*'5'.*image_gen2"):
        write_shard([row], tmp_path / "x.parquet", schema.d3_features())
    assert not list(tmp_path.iterdir())


def test_validator_reports_duplicates_and_corrupt_images(tmp_path: Path) -> None:
    bad = d3_row("2")
    bad["image_gen1"] = image_cell(b"\xff\xd8\xff\xe0 not really a jpeg")
    path = write_shard([d3_row("1"), d3_row("1"), bad], tmp_path / "s.parquet", schema.d3_features())
    report = validate_shard(path, schema.d3_features())
    assert report.rows == 3
    assert any("duplicate id '1'" in str(d) for d in report.defects)
    assert any("'2'" in str(d) and "image_gen1" in str(d) for d in report.defects)


def test_validator_reports_schema_mismatch_and_unreadable_file(tmp_path: Path) -> None:
    path = write_shard([d3_row("1", num_generators=3)], tmp_path / "s.parquet", schema.d3_features(3))
    report = validate_shard(path, schema.d3_features(4))
    assert any("missing column 'image_gen3'" in str(d) for d in report.defects)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert "not a readable Parquet file" in str(validate_shard(junk).defects[0])


def test_published_elsa_layout_is_accepted(tmp_path: Path) -> None:
    features = schema.elsa_features()
    rows = [{k: d3_row("3")[k] for k in features}]
    path = write_shard(rows, tmp_path / "elsa.parquet", features)
    assert validate_shard(path, features).ok
    assert schema.generator_slots(pq.read_schema(path).names) == [0, 1, 2, 3]
    assert "image_real" not in pq.read_schema(path).names


def test_d3_schema_has_every_elsa_column_with_its_dtype() -> None:
    ours, elsa = schema.d3_features(), schema.elsa_features()
    for name, feature in elsa.items():
        assert ours[name] == feature
    assert ours["width_gen0"].dtype == "int64" and ours["model_gen2"].dtype == "string"


def test_manifests_load_and_bad_keys_name_file_and_key(tmp_path: Path) -> None:
    tiny = load_manifest(MANIFESTS / "tiny.yaml")
    d3 = load_manifest(MANIFESTS / "d3.yaml")
    assert tiny.generators == ["if-tiny", "sd14-tiny", "sd21-tiny", "sdxl-tiny"]
    assert d3.shard_size == 5000 and d3.generators == ["deepfloyd-if", "sd14", "sd21", "sdxl"]
    text = (MANIFESTS / "tiny.yaml").read_text()
    cases = {
        "shard_size: 16": ("shard_size: sixteen", "shard_size: must be int"),
        "  min_width: 32": ("  min_widht: 32", "filters.min_widht: unknown key"),
        "splits: {train: 0.375, fit: 0.125, validation: 0.25, test: 0.25}": ("splits: {train: 0.375, test: 0.25}", "sum to 1"),
        "name: tiny": ("name: ../evil", "unsafe manifest name"),
    }
    for original, (replacement, message) in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(original, replacement))
        with pytest.raises(ConfigError, match=message) as info:
            load_manifest(bad)
        assert str(bad) in str(info.value)
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: x\n")
    with pytest.raises(ConfigError, match="output_root: required key is missing"):
        load_manifest(missing)


def test_layout_refuses_unsafe_names(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    assert layout.gen("sd14-tiny", 3) == tmp_path / "gen" / "sd14-tiny" / "00003.parquet"
    assert layout.d3("test", 12).name == "test-00012.parquet"
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            safe_name(bad)


def test_shards_for_process_is_disjoint_and_complete() -> None:
    shards = list(range(11))
    parts = [shards_for_process(shards, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == shards
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1 :])


def test_lease_is_exclusive_and_stale_leases_are_taken_over(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    folder = layout.leases("fetch-real", "00000")
    first = acquire(layout.store, folder, "fetch-real", "00000", 60.0)
    assert not isinstance(first, LeaseRecord)
    second = acquire(layout.store, folder, "fetch-real", "00000", 60.0)
    assert isinstance(second, LeaseRecord) and second.token == first.token  # busy: held by the first
    first.release(finished=True)
    assert not list(folder.iterdir())
    stale = json.loads(first.record.to_bytes())  # a dead process on this host held it (its pid is free)
    (folder / "00000007.json").write_text(json.dumps({**stale, "pid": 2**22 + 12345, "renewed_at": 1e12}))
    third = acquire(layout.store, folder, "fetch-real", "00000", 60.0)
    assert not isinstance(third, LeaseRecord) and third.record.epoch == 8
