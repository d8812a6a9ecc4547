"""`assemble` and the dataset card: paired shards that `datasets` loads, incomplete records counted, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset
from PIL import Image
from stagekit import GENERATORS, make_stage_inputs

from d3builder import cli
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.validate import validate_dataset
from d3builder.storage.lease import acquire
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import d3_features, elsa_features

DONE, SKIPPED, BUSY = UnitOutcome.DONE, UnitOutcome.SKIPPED, UnitOutcome.BUSY

EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def gen_rows(inputs, generator: str) -> dict[str, dict]:
    """Every gen row of `generator`, by id."""
    rows = {}
    for shard in inputs.shards:
        path = inputs.layout.gen(generator, shard)
        if path.is_file():
            rows.update({r["id"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def real_rows(inputs) -> dict[str, dict]:
    """Every real row, by id."""
    return {r["id"]: r for s in inputs.shards for r in pq.read_table(inputs.layout.real(s)).to_pylist()}


def test_assembled_shards_load_through_datasets_with_every_elsa_column(tmp_path: Path) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=12, shard_size=5)
    summary = assemble_dataset(inputs.manifest, progress=False)
    assert summary.shards(DONE) == [0, 1, 2] and summary.complete and summary.records == sum(summary.counts.values())
    d3 = inputs.layout.d3_dir()
    files = {split: sorted(str(p) for p in (d3 / split).glob("*.parquet")) for split in ("train", "validation", "test")}
    dataset = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    elsa, gens, reals = elsa_features(), {g: gen_rows(inputs, g) for g in GENERATORS}, real_rows(inputs)
    for split in ("train", "validation", "test"):
        part = dataset[split]
        for name, feature in elsa.items():
            assert part.features[name] == feature, name
        assert part.features == d3_features(4)
        assert part["id"] == inputs.complete_ids(split)
        assert set(part["split"]) == {split}
    row = dataset["train"][0]
    record = row["id"]
    assert isinstance(row["image_real"], Image.Image) and isinstance(row["image_gen3"], Image.Image)
    raw = pq.read_table(inputs.layout.d3("train", 0)).to_pylist()[0]
    assert raw["image_real"]["bytes"] == reals[record]["image"]["bytes"]
    assert raw["sha256_real"] == hashlib.sha256(raw["image_real"]["bytes"]).hexdigest()
    for slot, generator in enumerate(GENERATORS):
        source = gens[generator][record]
        assert raw[f"image_gen{slot}"]["bytes"] == source["image"]["bytes"]
        assert raw[f"model_gen{slot}"] == f"tiny/{generator}" and raw[f"generator_gen{slot}"] == generator
        assert raw[f"filepath_gen{slot}"] == f"{generator}/{record}.{EXT[source['encoding']]}"
        assert (raw[f"seed_gen{slot}"], raw[f"model_revision_gen{slot}"]) == (source["seed"], f"rev-{slot}")
        assert (raw[f"width_gen{slot}"], raw[f"height_gen{slot}"]) == row[f"image_gen{slot}"].size
        assert raw[f"safety_checker_gen{slot}"] is False and raw[f"encoding_gen{slot}"] == source["encoding"]
    report = validate_dataset(inputs.layout.root, progress=False)
    assert report.ok, [str(d) for d in report.defects]
    assert report.groups["train"].records == len(inputs.complete_ids("train"))


def test_incomplete_records_are_left_out_and_counted_by_reason(tmp_path: Path) -> None:
    fail = {
        "1001": "real_missing",
        "1002": "real_failed",
        "1003": "gen_failed:sd14-tiny",
        "1004": "gen_missing:sdxl-tiny",
        "1005": ["real_failed", "gen_failed:if-tiny"],
    }
    inputs = make_stage_inputs(tmp_path / "data", n_records=8, shard_size=8, fail=fail)
    summary = assemble_dataset(inputs.manifest, progress=False)
    written = [r for split in ("train", "validation", "test") for r in _ids(inputs.layout.d3(split, 0))]
    assert sorted(written) == ["1000", "1006", "1007"]
    stats = json.loads(inputs.layout.stats("assemble", 0).read_text())
    expected = {
        "real_missing": 1,
        "real_failed": 2,
        "gen_failed:sd14-tiny": 1,
        "gen_missing:sdxl-tiny": 1,
        "gen_failed:if-tiny": 1,
    }
    assert stats["dropped_by_reason"] == expected and stats["dropped"] == 5 and stats["records"] == 8
    assert summary.records - sum(summary.counts.values()) == 5 and dict(summary.reasons) == expected
    card = (inputs.layout.d3_dir() / "README.md").read_text()
    assert "| gen_missing:sdxl-tiny | 1 |" in card and "| real_failed | 2 |" in card


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist() if path.is_file() else []


def test_missing_or_unreadable_input_is_reported_and_the_rest_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "data"
    inputs = make_stage_inputs(root, n_records=12, shard_size=4, skip=[("sd21-tiny", 1)])
    missing, broken = inputs.layout.gen("sd21-tiny", 1), inputs.layout.gen("sd14-tiny", 2)
    broken.write_bytes(broken.read_bytes()[:100])
    assert cli.main(["assemble", "--manifest", str(inputs.manifest.path)]) == 1
    out = capsys.readouterr().out
    assert f"assemble shard 1: NOT done, missing input: {missing}" in out
    assert f"assemble shard 2: NOT done, {broken}: unreadable input shard" in out
    assert _ids(inputs.layout.d3("train", 0)) and not inputs.layout.stats("assemble", 1).exists()
    assert not list(inputs.layout.d3_dir().glob("*/*-0000[12].parquet"))
    before = {p: p.stat().st_mtime_ns for p in inputs.layout.d3_dir().glob("*/*-00000.parquet")}
    make_stage_inputs(root, n_records=12, shard_size=4)  # the generator catches up
    summary = assemble_dataset(inputs.manifest, progress=False)
    assert (summary.shards(DONE), summary.shards(SKIPPED), summary.complete) == ([1, 2], [0], True)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert sorted(_ids(inputs.layout.d3("train", 1))) == inputs.complete_ids("train")[2:4]


def test_resume_skips_done_units_redoes_unfinished_ones_and_respects_claims(tmp_path: Path) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=12, shard_size=4)
    assemble_dataset(inputs.manifest, progress=False)
    layout = inputs.layout
    outputs = sorted(layout.d3_dir().glob("*/*.parquet"))
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in outputs}
    layout.stats("assemble", 1).unlink()  # as if killed after the shards were renamed, before the stats
    summary = assemble_dataset(inputs.manifest, progress=False)
    assert (summary.shards(DONE), summary.shards(SKIPPED)) == ([1], [0, 2])
    for path, (data, mtime) in snapshot.items():
        assert path.read_bytes() == data
        assert (path.stat().st_mtime_ns == mtime) == ("-00001" not in path.name)
    layout.stats("assemble", 2).unlink()
    lease = acquire(layout.store, layout.leases("assemble", "00002"), "assemble", "00002", 3600.0)  # a live owner
    assert assemble_dataset(inputs.manifest, [2], progress=False, wait=False).shards(BUSY) == [2]
    lease.release(finished=False)
    assert not [p for p in layout.root.rglob(".*tmp*")]


def test_small_row_groups_and_no_file_for_an_empty_split(tmp_path: Path) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=7, shard_size=7, split_cycle=("train", "test"))
    result = assemble_dataset(inputs.manifest, progress=False, row_group_size=2)
    assert result.counts == {"test": 3, "train": 4}
    assert pq.ParquetFile(inputs.layout.d3("train", 0)).metadata.num_row_groups == 2
    assert not (inputs.layout.d3_dir() / "validation").exists()
    stats = json.loads(inputs.layout.stats("assemble", 0).read_text())
    assert set(stats["outputs"]) == {"train", "test"}


def test_card_makes_the_folder_a_loadable_hub_style_repo(tmp_path: Path) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=10, shard_size=5, fail={"1002": "real_failed"})
    summary = assemble_dataset(inputs.manifest, progress=False)
    d3 = inputs.layout.d3_dir()
    text = (d3 / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "other"
    assert front["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": s, "path": f"{s}/{s}-*.parquet"} for s in ("train", "validation", "test")],
        }
    ]
    declared = {s["name"]: s["num_examples"] for s in front["dataset_info"]["splits"]}
    assert declared == dict(summary.counts)
    assert {"name": "image_gen2", "dtype": "image"} in front["dataset_info"]["features"]
    dataset = load_dataset(str(d3), cache_dir=str(tmp_path / "hf"))
    assert {s: dataset[s].num_rows for s in dataset} == declared
    assert isinstance(dataset["validation"][0]["image_real"], Image.Image)
    assert isinstance(dataset["test"][0]["image_gen1"], Image.Image)
    body = text.split("---\n", 2)[2]
    for expected in (
        "stagekit-release-v1",
        "| gen1 | sd14-tiny | tiny/sd14-tiny | rev-1 |",
        "| real_failed | 1 |",
        "| datasets |",
        "| torch |",
        '"diffusers": "0.0-test"',
        "pd.read_parquet",
        "load_dataset",
    ):
        assert expected in body, expected
