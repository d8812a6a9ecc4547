"""The paper's fit split: selected by the same hash, assembled, transformed like the test split, validated, carded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from datasets import load_dataset
from PIL import Image
from stagekit import make_stage_inputs

from d3builder import cli
from d3builder.imaging.augmentations import Op, apply_ops
from d3builder.recipe.manifest import load_manifest
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.select import split_of
from d3builder.stages.transform_test import encode
from d3builder.stages.validate import validate_dataset
from d3builder.storage.shards import read_features, write_shard

ROOT = Path(__file__).resolve().parents[1]
IMAGE_COLUMNS = ("real", "gen0", "gen1", "gen2", "gen3")


def test_adding_the_fit_split_moves_only_train_records() -> None:
    before = {"train": 0.6, "validation": 0.2, "test": 0.2}
    after = {"train": 0.45, "fit": 0.15, "validation": 0.2, "test": 0.2}
    moved = 0
    for sample_id in range(20_000):
        old, new = split_of(sample_id, 7, before), split_of(sample_id, 7, after)
        if old != "train":
            assert new == old, sample_id  # validation and test keep exactly their records
        else:
            assert new in ("train", "fit"), sample_id
            moved += new == "fit"
    assert abs(moved / 20_000 - 0.15) < 0.01


def test_the_recipes_hold_a_fit_split_of_the_papers_size() -> None:
    d3 = load_manifest(ROOT / "manifests" / "d3.yaml")
    # selected records x download yield (75%, D3_FACTS.md) in the fit split: about 9,600 as in the paper
    assert abs(d3.sampling.max_records * d3.splits["fit"] * 0.75 - 9_600) < 100
    assert (d3.splits["validation"], d3.splits["test"]) == (0.00206, 0.00206)  # unchanged by adding fit
    assert abs(d3.splits["train"] + d3.splits["fit"] - 0.99588) < 1e-9
    tiny = load_manifest(ROOT / "manifests" / "tiny.yaml")
    assert 0 < tiny.splits["fit"] < tiny.splits["train"]


def test_fit_is_assembled_transformed_validated_and_carded(tmp_path: Path, capsys) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=8, shard_size=4, split_cycle=("train", "fit", "validation", "test"))
    layout = inputs.layout
    assemble_dataset(inputs.manifest, progress=False)
    fit_ids = inputs.complete_ids("fit")
    assert [r for k in (0, 1) for r in pq.read_table(layout.d3("fit", k), columns=["id"]).column("id").to_pylist()] == fit_ids

    assert cli.main(["transform-test", "--manifest", str(inputs.manifest.path)]) == 0
    out = capsys.readouterr().out
    assert "test_augm: 2 records" in out and "fit_augm: 2 records" in out
    for k in (0, 1):
        source, augmented = pq.read_table(layout.d3("fit", k)).to_pylist(), pq.read_table(layout.d3("fit_augm", k)).to_pylist()
        assert [r["id"] for r in augmented] == [r["id"] for r in source]
        for before, after in zip(source, augmented, strict=True):
            assert after["split"] == "fit_augm"
            for suffix in IMAGE_COLUMNS:  # the same recorded, replayable transformations as test_augm
                ops = [Op.from_dict(d) for d in json.loads(after[f"augm_{suffix}"])]
                original = Image.open(io.BytesIO(before[f"image_{suffix}"]["bytes"]))
                assert after[f"image_{suffix}"]["bytes"] == encode(apply_ops(original, ops), before[f"encoding_{suffix}"])[0]
    test_stats = json.loads(layout.stats("transform_test", 0).read_text())
    fit_stats = json.loads(layout.stats("transform_test", 0, "fit").read_text())
    assert fit_stats["outputs"] == {"fit_augm": "d3/fit_augm/fit_augm-00000.parquet"}
    assert {k: fit_stats[k] for k in ("seed", "max_ops", "families", "jpeg_quality")} == {
        k: test_stats[k] for k in ("seed", "max_ops", "families", "jpeg_quality")}

    card = (layout.d3_dir() / "README.md").read_text()
    assert "path: fit/fit-*.parquet" in card and "path: fit_augm/fit_augm-*.parquet" in card
    augm = load_dataset(str(layout.d3_dir()), "test_augm", cache_dir=str(tmp_path / "hf"))
    assert sorted(augm) == ["fit_augm", "test_augm"] and augm["fit_augm"].num_rows == 2
    report = validate_dataset(layout.root, progress=False)
    assert report.ok, [str(d) for d in report.defects]
    assert (report.groups["fit"].records, report.groups["fit_augm"].records, report.groups["fit_augm"].images) == (2, 2, 10)
    summary = report.completeness_lines()
    assert "  test_augm    2" in summary and "  fit_augm     2" in summary  # completeness counts both transformed splits

    fit_stats = layout.transform_stats("fit", 1)
    saved = fit_stats.read_bytes()
    fit_stats.unlink()  # transform-test ran, but its fit unit of shard 1 never finished
    found = [str(d) for d in validate_dataset(layout.root, progress=False).defects]
    assert f"{fit_stats}: missing: the fit shard was never transformed (run `d3builder transform-test`)" in found, found
    assert f"{layout.d3('fit_augm', 1)}: no stats file names this shard (unit unfinished?)" in found and len(found) == 2, found
    fit_stats.write_bytes(saved)

    train_id = pq.read_table(layout.d3("train", 0), columns=["id"]).column("id")[0].as_py()
    path = layout.d3("fit_augm", 0)
    rows = pq.read_table(path).to_pylist()
    rows[0]["id"] = train_id  # a training record among the transformed fit records
    write_shard(rows, path, read_features(path))
    found = [str(d) for d in validate_dataset(layout.root, progress=False).defects]
    assert any(f"record '{train_id}'" in d and "not a record of the fit split" in d for d in found), found
    assert any(f"record '{train_id}'" in d and "held-out record also in" in d and "train-00000" in d for d in found), found
    assert any(f"record '{fit_ids[0]}'" in d and "has no transformed copy in fit_augm" in d for d in found), found
