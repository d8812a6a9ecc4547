"""The published ELSA_D3 as a first-class codetrain input: its card's splits, hub ids, reals, the published test folders."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from shardkit import (
    ElsaRepo,
    real_row,
    record_id,
    write_elsa_repo,
    write_elsa_test_folders,
)

from codetrain.cli import main
from codetrain.sources import open_source, resolve_data
from d3builder.storage.schema import REAL_FEATURES
from d3builder.storage.shards import write_shard

ROOT = Path(__file__).resolve().parents[1]
SEED = 3
TEST_RECORDS = range(32, 38)
GEN_FOLDERS = ["gen_0", "gen_1", "gen_2", "gen_3"]
TRAIN_FLAGS = ["--config", str(ROOT / "configs" / "code_tiny.yaml"), "--model", "test_vit", "--img-size", "64",
               "--local-size", "32", "--batch-size", "4", "--no-progress", "--no-tensorboard"]


@pytest.fixture(scope="module")
def elsa(tmp_path_factory: pytest.TempPathFactory) -> ElsaRepo:
    return write_elsa_repo(tmp_path_factory.mktemp("hub") / "ELSA_D3", seed=SEED)


@pytest.fixture(scope="module")
def test_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_elsa_test_folders(tmp_path_factory.mktemp("published") / "D3_test", TEST_RECORDS, seed=SEED)


@pytest.fixture(scope="module")
def run(elsa: ElsaRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of training on the ELSA folder through the CLI (a run folder with config.yaml and a model)."""
    out = tmp_path_factory.mktemp("runs") / "elsa"
    assert main(["train", *TRAIN_FLAGS, "--data", str(elsa.root), "--real-source", str(elsa.reals), "--run", str(out),
                 "--epochs", "1", "--max-steps", "none"]) == 0
    return out


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The single stderr line of a refused command; it names every needle and holds no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def test_the_card_decides_the_splits_and_a_repo_id_means_the_hub(elsa: ElsaRepo, tmp_path: Path, monkeypatch) -> None:
    source = open_source(str(elsa.root))
    assert "card" in source.found_by and list(source.splits) == ["train", "validation"]
    assert source.splits["train"] == [str(p) for p in elsa.train] and any("/data/val-" in f for f in source.splits["train"])
    assert source.splits["validation"] == [str(p) for p in elsa.validation]
    assert resolve_data("elsaEU/ELSA_D3") == "hf://datasets/elsaEU/ELSA_D3"
    assert resolve_data("hf://datasets/elsaEU/ELSA_D3") == "hf://datasets/elsaEU/ELSA_D3"
    assert resolve_data("s3://bucket/d3") == "s3://bucket/d3" and resolve_data("runs/tiny/d3") == "runs/tiny/d3"
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_data("owner/name") == "owner/name", "an existing local folder wins over a hub id"


def test_training_reads_every_data_file_of_the_cards_train_split(run: Path, elsa: ElsaRepo) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    # 16 train-* + 8 val-* records in batches of 4: 6 steps (the train-* files alone give 4)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and all(r["skipped"] == 0 for r in train)
    val = [r for r in rows if r["kind"] == "val"]
    assert len(val) == 1 and val[0]["val_images"] == 8 * 5  # the validation-* file, reals from fetch-real's shards
    assert (run / "model.safetensors").is_file()


def test_training_without_usable_reals_is_one_line_and_writes_no_model(elsa: ElsaRepo, tmp_path: Path, capsys) -> None:
    common = [*TRAIN_FLAGS, "--data", str(elsa.root), "--max-steps", "2"]
    assert main(["train", *common, "--run", str(tmp_path / "none")]) == 2
    one_line_error(capsys, "--real-source", "carry no real image", "ELSA_D3", "d3builder fetch-real")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", *common, "--run", str(tmp_path / "empty-run"), "--real-source", str(empty)]) == 2
    one_line_error(capsys, "--real-source", "no real image for any record", str(empty), "d3builder fetch-real")
    broken = tmp_path / "broken"  # reals that were "fetched" but do not decode: every record is skipped
    ids = [record_id(SEED, i) for i in range(32)]
    write_shard([real_row(i, None, b"not an image", None) for i in ids], broken / "real" / "00000.parquet", REAL_FEATURES)
    assert main(["train", *common, "--run", str(tmp_path / "broken-run"), "--real-source", str(broken)]) == 2
    one_line_error(capsys, "--real-source", "no training step could run", "1 real/ shard(s) under")
    for name in ("none", "empty-run", "broken-run"):
        assert not (tmp_path / name / "model.safetensors").exists(), name


def test_evaluate_refuses_missing_splits_naming_the_flags(run: Path, elsa: ElsaRepo, tmp_path: Path, capsys) -> None:
    base = ["evaluate", "--run", str(run), "--real-source", str(elsa.reals), "--eval-dir", str(tmp_path / "out"), "--no-robustness"]
    assert main([*base, "--data", str(elsa.root)]) == 2
    one_line_error(capsys, "--fit-split", "no 'fit_augm' split", "train, validation", "--test-splits")
    assert main([*base, "--data", str(elsa.root), "--fit-split", "validation"]) == 2
    one_line_error(capsys, "--test-splits", "none of the test splits", "--fit-split")
    assert main([*base, "--data", str(tmp_path / "nowhere")]) == 2
    one_line_error(capsys, "--data", "no such dataset folder")
    assert not (tmp_path / "out" / "classifiers").exists()


def test_one_file_is_never_both_fit_or_training_data_and_test_data(run: Path, elsa: ElsaRepo, tmp_path: Path, capsys) -> None:
    single = str(elsa.validation[0])
    base = ["evaluate", "--run", str(run), "--real-source", str(elsa.reals), "--eval-dir", str(tmp_path / "out"), "--no-robustness"]
    assert main([*base, "--data", single]) == 2  # one file offers one split: the defaults are not there
    one_line_error(capsys, "--fit-split", "no 'fit_augm' split", "validation")
    assert main([*base, "--data", single, "--fit-split", "validation", "--test-splits", "validation"]) == 2
    one_line_error(capsys, single, "in both the fit split 'validation' and the test split 'validation'")
    assert main([*base, "--data", str(elsa.root), "--fit-split", "validation", "--test-splits", "train"]) == 2
    one_line_error(capsys, "in both the run's training split and the test split 'train'", "train-00000-of-00002")
    assert not (tmp_path / "out" / "classifiers").exists()


def test_evaluate_on_the_published_test_folders_per_generator_and_variant(
    run: Path, elsa: ElsaRepo, test_folders: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(elsa.root), "--real-source", str(elsa.reals),
                 "--fit-split", "validation", "--test-data", str(test_folders), "--eval-dir", str(out),
                 "--classifiers", "linear", "knn", "--jpeg", "50", "--downscale", "--blur", "--crop"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["fit_split"] == "validation" and "a departure from the paper" in saved["fit_protocol"]
    assert saved["fit"]["CoDE"]["n_real"] == 8 and saved["fit"]["CoDE"]["n_fake"] == 32
    assert [(r["classifier"], r["split"]) for r in saved["results"]] == [
        (c, s) for s in ("no_augm", "augm") for c in ("linear", "knn")]
    for row in saved["results"]:
        assert (row["n_real"], row["n_fake"]) == (len(TEST_RECORDS), 4 * len(TEST_RECORDS))
        assert sorted(row["per_generator"]) == GEN_FOLDERS
        assert all(g["n"] == len(TEST_RECORDS) for g in row["per_generator"].values())
    assert {r["split"] for r in saved["robustness"]} == {"no_augm"}
    assert "Fit split: `validation`, a departure from the paper" in printed
    assert "## Accuracy per generator: no_augm" in printed and "## Accuracy per generator: augm" in printed
    assert (out / "acc_augm.png").is_file() and (out / "acc_no_augm.png").is_file()


def test_real_shards_without_image_real_column_in_our_layout_name_real_source_for_train(tmp_path: Path, elsa: ElsaRepo, capsys) -> None:
    flat = tmp_path / "flat"  # the ELSA files copied into our folder layout: the same refusal, the same one line
    for path in elsa.train:
        (flat / "train").mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(path), flat / "train" / f"train-{path.name.split('-')[1]}.parquet")
    assert main(["train", *TRAIN_FLAGS, "--data", str(flat), "--run", str(tmp_path / "r"), "--max-steps", "1"]) == 2
    one_line_error(capsys, "--real-source", "carry no real image")
