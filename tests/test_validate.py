"""`validate`: a finished dataset passes; each kind of defect is found and named by file, record and column."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from stagekit import make_stage_inputs

from d3builder import cli
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.transform_test import transform_test
from d3builder.stages.validate import validate_dataset
from d3builder.storage.schema import d3_features, elsa_features
from d3builder.storage.shards import image_cell, read_features, write_shard


@pytest.fixture
def dataset(tmp_path: Path):
    """An assembled dataset: 12 records in 3 shards of 4 (train, train, validation, test each)."""
    inputs = make_stage_inputs(tmp_path / "data", n_records=12, shard_size=4)
    assemble_dataset(inputs.manifest, progress=False)
    return inputs


def rewrite(path: Path, edit) -> None:
    """Rewrite a shard after `edit(rows)` changed its rows in place (same features)."""
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    write_shard(rows, path, read_features(path))


def messages(report) -> list[str]:
    return [str(d) for d in report.defects]


def test_a_finished_dataset_passes_with_a_summary_table(dataset, capsys: pytest.CaptureFixture) -> None:
    transform_test(dataset.manifest, progress=False)
    assert cli.main(["validate", str(dataset.layout.root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["split", "shards", "records", "images", "defects"]
    assert lines[2].split() == ["train", "3", "6", "30", "0"]
    assert lines[5].split() == ["test_augm", "3", "3", "15", "0"]
    assert out.rstrip().endswith("OK: no defect")
    workers = validate_dataset(dataset.layout.d3_dir(), workers=2, progress=False)
    assert workers.ok and workers.groups["validation"].records == 3


def test_duplicate_id_across_splits_is_a_named_leak(dataset, capsys: pytest.CaptureFixture) -> None:
    train_id = pq.read_table(dataset.layout.d3("train", 0), columns=["id"]).column("id")[0].as_py()
    test_path = dataset.layout.d3("test", 2)

    def leak(rows: list[dict]) -> None:
        rows[0]["id"] = train_id

    rewrite(test_path, leak)
    assert cli.main(["validate", str(dataset.layout.d3_dir())]) == 1
    out = capsys.readouterr().out
    assert f"DEFECT {test_path}: record '{train_id}': column 'id': id also in train" in out
    assert "leak between splits" in out and "FAILED: 1 defect(s)" in out


def test_corrupted_shard_and_corrupt_image_are_named(dataset, capsys: pytest.CaptureFixture) -> None:
    broken = dataset.layout.d3("validation", 1)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    image_path = dataset.layout.d3("train", 2)
    victim = {}

    def corrupt(rows: list[dict]) -> None:
        victim["id"] = rows[1]["id"]
        rows[1]["image_gen3"] = image_cell(b"\xff\xd8\xff\xe0 truncated jpeg")

    rewrite(image_path, corrupt)
    assert cli.main(["validate", str(dataset.layout.root)]) == 1
    out = capsys.readouterr().out
    assert f"DEFECT {broken}: not a readable Parquet file" in out
    assert f"DEFECT {image_path}: record '{victim['id']}': column 'image_gen3': image does not decode" in out
    assert "split 'validation': card says 3 records, shards hold 2" in out


def test_pairing_model_columns_and_schema_defects(dataset) -> None:
    path = dataset.layout.d3("train", 1)
    ids = []

    def unpair(rows: list[dict]) -> None:
        ids.extend(r["id"] for r in rows)
        rows[0]["image_gen1"] = None
        rows[1]["model_gen2"] = "someone/else"

    rewrite(path, unpair)
    found = messages(validate_dataset(dataset.layout.root, progress=False))
    assert f"{path}: record '{ids[0]}': column 'image_gen1': image missing (record not paired)" in found
    assert any(m.startswith(f"{path}: column 'model_gen2': not constant within the shard") for m in found)
    features = d3_features(4)
    features["width_gen0"] = features["model_gen0"]  # a string where ELSA has int64
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["width_gen0"] = str(row["width_gen0"])
    write_shard(rows, path, features)
    found = messages(validate_dataset(dataset.layout.root, progress=False))
    assert f"{path}: column 'width_gen0': type string, expected int64" in found


def test_counts_are_checked_against_card_and_stats(dataset) -> None:
    gone = dataset.layout.d3("test", 0)
    gone.unlink()
    found = messages(validate_dataset(dataset.layout.root, progress=False))
    assert any("split 'test': card says 3 records, shards hold 2" in m for m in found)
    assert any(m.startswith(f"{gone}: shard missing, though") for m in found)


def test_published_elsa_layout_and_extended_leaks(tmp_path: Path, dataset) -> None:
    elsa = elsa_features()
    rows = [{k: r[k] for k in elsa} for r in pq.read_table(dataset.layout.d3("train", 0)).to_pylist()]
    published = tmp_path / "published"
    write_shard(rows, published / "data" / "train-00000-of-00001.parquet", elsa)
    report = validate_dataset(published, progress=False)
    assert report.ok and list(report.groups) == ["train"] and report.groups["train"].images == 2 * 4
    train_rows = pq.read_table(dataset.layout.d3("train", 0)).to_pylist()
    extended = d3_features(1)
    row = {k: train_rows[0][k] for k in extended}
    path = dataset.layout.extended("pixart-tiny", 0)
    write_shard([row], path, extended)
    found = messages(validate_dataset(dataset.layout.root, progress=False))
    assert (
        f"{path}: record '{row['id']}': column 'id': held-out record also in {dataset.layout.d3('train', 0)} (leak)"
        in found
    )


def test_missing_folder_and_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    assert cli.main(["validate", str(tmp_path)]) == 1
    assert "no Parquet shards found" in capsys.readouterr().out


def test_completeness_names_unfinished_units_and_unaccounted_records(tmp_path: Path, capsys) -> None:
    inputs = make_stage_inputs(tmp_path / "data", n_records=16, shard_size=2, fail={"1003": "real_failed"},
                               skip=[("sd21-tiny", k) for k in (5, 6, 7)])  # fmt: skip
    layout = inputs.layout
    rows = pq.read_table(layout.real(0)).to_pylist()
    write_shard(rows[1:], layout.real(0), read_features(layout.real(0)))  # fetch-real "lost" record 1000
    assert not assemble_dataset(inputs.manifest, progress=False).complete  # 3 of 8 shards cannot be assembled
    transform_test(inputs.manifest, progress=False)
    rows = pq.read_table(layout.real(1)).to_pylist()  # record 1003 recovered by a retry after assembling
    rows[1] |= {"status": "success", "error_message": None, "image": rows[0]["image"]}
    write_shard(rows, layout.real(1), read_features(layout.real(1)))
    assert validate_dataset(layout.d3_dir(), progress=False).ok  # the d3/ folder alone looks fine

    assert cli.main(["validate", str(layout.root)]) == 1
    out = capsys.readouterr().out
    for shard in (5, 6, 7):
        assert f"DEFECT {layout.gen('sd21-tiny', shard)}: missing: the unit never finished" in out
        assert f"DEFECT {layout.stats('assemble', shard)}: missing: the shard was never assembled" in out
    assert f"DEFECT {layout.real(0)}: record '1000': no row for this record: fetch-real lost it" in out
    assert f"DEFECT {layout.records(1)}: record '1003': complete (real and 4 generated images) but in no d3/ shard" in out
    assert f"DEFECT {layout.stats('assemble', 1)}: says 1 records dropped, the inputs explain 0" in out
    summary = out[out.index("completeness of"):out.index("DEFECT")]
    assert "selected     16 records in 8 shards" in summary and "fetched      15 ok, 0 failed" in summary
    assert "generated    if-tiny 16 ok, 0 failed; sd14-tiny 16 ok, 0 failed; sd21-tiny 10 ok" in summary
    assert "assembled    8 (test 1, train 5, validation 2)" in summary and "dropped      1 (real_missing 1)" in summary
    assert "unaccounted  8 record(s)" in summary  # 1000, 1003 and the 6 records of shards 5-7
    assert out.rstrip().endswith("FAILED: 9 defect(s)")


def test_output_root_never_assembled_names_the_missing_stage_not_its_inputs(tmp_path: Path, capsys) -> None:
    """records/, real/ and gen/ are stage inputs: with no d3/ yet, validate says so, never "not a D3 shard"."""
    inputs = make_stage_inputs(tmp_path / "data", n_records=4, shard_size=2)
    layout = inputs.layout
    assert cli.main(["validate", str(layout.root), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"DEFECT {layout.d3_dir()}: no Parquet shards found" in out
    for shard in (0, 1):
        assert f"DEFECT {layout.stats('assemble', shard)}: missing: the shard was never assembled" in out
    assert "not a D3 shard" not in out and "in a 'records' shard" not in out
    assert out.rstrip().endswith("FAILED: 3 defect(s)")


def test_bare_d3_folder_says_completeness_was_not_checked_and_a_manifest_checks_it(dataset, capsys) -> None:
    transform_test(dataset.manifest, progress=False)
    assert cli.main(["validate", str(dataset.layout.d3_dir())]) == 0
    out = capsys.readouterr().out
    assert f"completeness: not checked: {dataset.layout.d3_dir()} holds no records/" in out
    assert cli.main(["validate", "--manifest", str(dataset.manifest.path)]) == 0
    out = capsys.readouterr().out
    assert "unaccounted  0 record(s); 0 gap(s)" in out and "selected     12 records in 3 shards" in out
    assert "generated    if-tiny 12 ok, 0 failed; sd14-tiny 12 ok, 0 failed; sd21-tiny 12 ok" in out
    assert cli.main(["validate"]) == 2 and "give the dataset folder" in capsys.readouterr().err
    augm, stats = dataset.layout.d3("test_augm", 0), dataset.layout.stats("transform_test", 0)
    augm.unlink()
    stats.unlink()  # transform-test ran, but not on shard 0
    assert cli.main(["validate", str(dataset.layout.root)]) == 1
    assert f"DEFECT {stats}: missing: the test shard was never transformed" in capsys.readouterr().out
