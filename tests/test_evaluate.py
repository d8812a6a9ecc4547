"""Tests for `codetrain evaluate`: embeddings, classifiers, tables, plots, robustness sweep, cache."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shardkit import (
    GENERATORS,
    MODELS,
    Sizes,
    make_d3_shards,
    make_record,
    write_real_sources,
)

from codetrain.cli import main
from codetrain.config import EvalConfig
from codetrain.embed import (
    Embeddings,
    embed_shards,
    embed_shards_cached,
    model_fingerprint,
)
from codetrain.errors import MissingInputError
from codetrain.evaluate import EvaluationResult, evaluate, load_fitted_classifiers
from codetrain.metrics import evaluate_predictions
from codetrain.model import create_embedder, load_embedder, save_weights
from codetrain.report import embedding_map, plot_embedding_map
from codetrain.robustness import perturb, validate_levels
from d3builder.storage.schema import d3_features
from d3builder.storage.shards import image_cell, write_shard

LEVELS = {"jpeg": [50.0], "downscale": [0.5], "blur": [1.0], "crop": [0.7]}
EXTENDED = ("gan-x", "sd14")
CORRUPT_ID_INDEX = 1


def write_split(folder: Path, split: str, n: int, seed: int, corrupt: int | None = None) -> list[str]:
    """Write `n` records of `split` in one shard; record `corrupt` gets garbage in image_gen3. Returns the ids."""
    rows = [make_record(i, split, seed, Sizes())[0] for i in range(n)]
    if corrupt is not None:
        rows[corrupt]["image_gen3"] = image_cell(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    write_shard(rows, folder / split / f"{split}-00000.parquet", d3_features())
    return [r["id"] for r in rows]


def write_extended(root: Path, n: int, seed: int) -> None:
    """One single-slot folder per extended generator, sharing the same real records."""
    for name in EXTENDED:
        rows = []
        for i in range(n):
            row = make_record(i, "test", seed, Sizes())[0]
            row["generator_gen0"] = name
            rows.append(row)
        write_shard(rows, root / "extended" / name / "test-00000.parquet", d3_features(1))


def config(run: Path, d3: Path, **kw) -> EvalConfig:
    """An evaluation of run `run` on the shards under `d3` (paths as text, as a YAML file or flags give them)."""
    return EvalConfig(run=str(run), data=str(d3), **kw)


def tiny_run(folder: Path) -> Path:
    """A run folder holding a fresh (untrained) tiny timm ViT embedder."""
    save_weights(create_embedder("test_vit"), folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """D3 shards (fit_augm 12, test 8 in 2 shards, test_augm 6 with one corrupt fake), extended set, run."""
    root = tmp_path_factory.mktemp("eval")
    d3 = root / "d3"
    make_d3_shards(d3, 12, "fit_augm", seed=1)
    make_d3_shards(d3, 8, "test", seed=2, shard_size=4)
    augm_ids = write_split(d3, "test_augm", 6, seed=3, corrupt=CORRUPT_ID_INDEX)
    write_extended(root / "ext", 4, seed=4)
    return {"root": root, "d3": d3, "ext": root / "ext", "run": tiny_run(root / "run"), "corrupt_id": Path(augm_ids[CORRUPT_ID_INDEX])}


@pytest.fixture(scope="module")
def result(data: dict[str, Path]) -> EvaluationResult:
    """One full evaluation with robustness and the extended set."""
    return evaluate(config(data["run"], data["d3"], extended=str(data["ext"]), robustness_levels=LEVELS))


def test_every_output_file_is_written(result: EvaluationResult, data: dict[str, Path]) -> None:
    out = data["run"] / "eval"
    assert result.out_dir == out
    expected = ["report.md", "results.csv", "results.json", "roc.json", "robustness.csv", "robustness.png"]
    for split in ("test", "test_augm", "extended"):
        expected += [f"acc_{split}.png", f"roc_{split}.png", f"map_{split}.png"]
    for name in expected:
        assert (out / name).is_file(), name
        assert result.files[name] == out / name
    for name in expected:
        if name.endswith(".png"):
            with Image.open(out / name) as img:
                assert img.format == "PNG" and img.width > 200 and img.height > 200
    for name in ("linear", "knn", "ocsvm"):
        assert (out / "classifiers" / f"{name}.skops").is_file()
    assert sorted(p.name for p in (out / "cache" / "code").glob("*.safetensors")) == [
        "extended.safetensors", "fit_augm.safetensors", "test.safetensors", "test_augm.safetensors"]


def test_rows_cover_every_classifier_split_and_exactly_the_data_generators(result: EvaluationResult) -> None:
    assert [(r["classifier"], r["split"]) for r in result.results] == [
        (c, s) for s in ("test", "test_augm", "extended") for c in ("linear", "knn", "ocsvm")]
    counts = {"test": (8, 32), "test_augm": (6, 23), "extended": (4, 8)}
    for row in result.results:
        assert row["detector"] == "CoDE"
        wanted = set(EXTENDED) if row["split"] == "extended" else set(GENERATORS)
        assert set(row["per_generator"]) == wanted
        assert (row["n_real"], row["n_fake"]) == counts[row["split"]]
        assert sum(g["n"] for g in row["per_generator"].values()) == row["n_fake"]
        for key in ("acc", "acc_real", "acc_fake", "auc", "ap"):
            assert 0.0 <= row[key] <= 1.0
        assert row["threshold"] == 0.0


def test_csv_json_and_markdown_agree_with_the_rows(result: EvaluationResult, data: dict[str, Path]) -> None:
    out = data["run"] / "eval"
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for res in result.results:
        mine = [r for r in rows if (r["classifier"], r["split"]) == (res["classifier"], res["split"])]
        assert {r["subset"] for r in mine} == {"all", "real", *res["per_generator"]}
        overall = next(r for r in mine if r["subset"] == "all")
        assert float(overall["acc"]) == pytest.approx(res["acc"]) and float(overall["auc"]) == pytest.approx(res["auc"])
        for gen, g in res["per_generator"].items():
            assert float(next(r for r in mine if r["subset"] == gen)["acc"]) == pytest.approx(g["acc"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(result.results))
    assert saved["fit"]["CoDE"] == {"n_real": 12, "n_fake": 48, "generators": sorted(GENERATORS)}
    assert saved["fit_split"] == "fit_augm" and saved["fit_protocol"] == "the held-out, transformed fit subset, as in the paper"
    report = (out / "report.md").read_text()
    assert "Fit split: `fit_augm`, the held-out, transformed fit subset, as in the paper." in report
    assert report.strip() == result.report.strip()
    for heading in ("## Summary", "## Accuracy per generator: test", "## Accuracy per generator: test_augm",
                    "## Accuracy per generator: extended", "## Robustness (test)", "## Skipped images", "## Plots"):
        assert heading in report
    per_gen_header = "| detector | classifier | real | " + " | ".join(sorted(GENERATORS)) + " | all fakes | overall |"
    assert per_gen_header in report
    assert "| detector | classifier | real | gan-x | sd14 | all fakes | overall |" in report


def test_corrupt_image_is_skipped_and_named(result: EvaluationResult, data: dict[str, Path]) -> None:
    saved = json.loads((data["run"] / "eval" / "results.json").read_text())
    skipped = saved["skipped"]["test_augm"]
    assert len(skipped) == 1 and str(data["corrupt_id"]) in skipped[0] and "image_gen3" in skipped[0]
    assert not saved["skipped"]["test"]
    assert str(data["corrupt_id"]) in result.report


def test_persisted_classifiers_reproduce_the_reported_metrics(result: EvaluationResult, data: dict[str, Path]) -> None:
    model = load_embedder(data["run"] / "model.safetensors")
    loaded = load_fitted_classifiers(data["run"] / "eval" / "classifiers", fingerprint=model_fingerprint(model))
    assert set(loaded) == {"linear", "knn", "ocsvm"}
    emb = embed_shards(model, sorted(str(p) for p in (data["d3"] / "test").glob("*.parquet")))
    for name, clf in loaded.items():
        scores = clf.score(emb.vectors)
        np.testing.assert_allclose(scores, result.classifiers[name].score(emb.vectors))
        metrics = evaluate_predictions(emb.labels, clf.predict(emb.vectors), scores, emb.generators)
        row = next(r for r in result.results if (r["classifier"], r["split"]) == (name, "test"))
        assert metrics["acc"] == pytest.approx(row["acc"]) and metrics["auc"] == pytest.approx(row["auc"])
        for gen, values in metrics["per_generator"].items():
            assert values == pytest.approx(row["per_generator"][gen])


def test_robustness_rows_one_per_classifier_family_level(result: EvaluationResult) -> None:
    keys = [(r["classifier"], r["family"], r["level"]) for r in result.robustness]
    assert keys == [(c, f, float(v[0])) for f, v in LEVELS.items() for c in ("linear", "knn", "ocsvm")]
    for row in result.robustness:
        assert row["split"] == "test" and (row["n_real"], row["n_fake"]) == (8, 32)
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["auc"] <= 1.0
    clean = {r["classifier"]: r["auc"] for r in result.results if r["split"] == "test"}
    assert any(r["auc"] != clean[r["classifier"]] for r in result.robustness)


def test_second_run_reuses_the_cache(result: EvaluationResult, data: dict[str, Path]) -> None:
    cache = data["run"] / "eval" / "cache" / "code"
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert len(stamps) == 4 + len(LEVELS)
    again = evaluate(config(data["run"], data["d3"], extended=str(data["ext"]), robustness_levels=LEVELS))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == stamps
    assert again.results == result.results and again.robustness == result.robustness


def test_cache_is_keyed_by_weights_shards_and_perturbation(tmp_path: Path, data: dict[str, Path]) -> None:
    shards = sorted(str(p) for p in (data["d3"] / "test").glob("*.parquet"))
    model, other = create_embedder("test_vit"), create_embedder("test_vit")
    cache = tmp_path / "test.safetensors"
    first = embed_shards_cached(model, shards, cache)
    stamp = cache.stat().st_mtime_ns
    again = embed_shards_cached(model, shards, cache)
    assert cache.stat().st_mtime_ns == stamp
    assert np.array_equal(again.vectors, first.vectors) and (again.ids, again.generators) == (first.ids, first.generators)
    retrained = embed_shards_cached(other, shards, cache)
    assert cache.stat().st_mtime_ns != stamp and not np.allclose(retrained.vectors, first.vectors)
    blurred = embed_shards_cached(other, shards, cache, op=partial(perturb, family="blur", level=2.0), op_key="blur=2")
    assert not np.allclose(blurred.vectors, retrained.vectors)
    assert np.array_equal(embed_shards_cached(other, shards[:1], cache).vectors, retrained.vectors[: len(first) // 2])
    assert Embeddings.load(cache, {"not": "the key"}) is None


def test_elsa_layout_takes_reals_from_a_real_source_and_names_generators_by_model(tmp_path: Path, data: dict[str, Path]) -> None:
    d3 = tmp_path / "elsa"
    make_d3_shards(d3, 6, "validation", seed=5, elsa_layout=True)
    make_d3_shards(d3, 4, "test", seed=6, elsa_layout=True)
    files = write_real_sources(tmp_path / "r5", 6, seed=5)[1]
    for path in write_real_sources(tmp_path / "r6", 4, seed=6)[1].iterdir():
        path.rename(files / path.name)
    with pytest.raises(MissingInputError, match="--real-source: .* carry no real image .*ELSA_D3 layout"):
        evaluate(config(data["run"], d3, eval_dir=str(tmp_path / "out"), fit_split="validation", classifiers=["linear"],
                        robustness=False))
    result = evaluate(config(data["run"], d3, eval_dir=str(tmp_path / "out"), fit_split="validation", classifiers=["linear"],
                             robustness=False, real_source=str(files)))
    row = result.results[0]
    assert (row["split"], row["n_real"], row["n_fake"]) == ("test", 4, 16)
    assert set(row["per_generator"]) == set(MODELS)


def test_missing_fit_split_and_unknown_classifier_are_clear_errors(tmp_path: Path, data: dict[str, Path]) -> None:
    make_d3_shards(tmp_path / "d3", 2, "test")
    with pytest.raises(MissingInputError, match="--fit-split: no 'fit_augm' split in .*: test\\); choose the splits with --fit-split"):
        evaluate(config(data["run"], tmp_path / "d3", eval_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="svm"):
        evaluate(config(data["run"], data["d3"], eval_dir=str(tmp_path / "out"), classifiers=["svm"]))
    with pytest.raises(MissingInputError, match="--test-splits: no 'nope' split in"):
        evaluate(config(data["run"], data["d3"], eval_dir=str(tmp_path / "out"), test_splits=["nope"]))


def test_cli_prints_the_report(tmp_path: Path, data: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["evaluate", "--run", str(data["run"]), "--data", str(data["d3"]), "--eval-dir", str(out), "--test-splits", "test",
                 "--classifiers", "linear", "knn", "--jpeg", "60", "--downscale", "--blur", "--crop"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Summary" in printed and "## Robustness (test)" in printed and "| jpeg | 60 |" in printed
    rows = json.loads((out / "results.json").read_text())["robustness"]
    assert [(r["classifier"], r["family"], r["level"]) for r in rows] == [("linear", "jpeg", 60.0), ("knn", "jpeg", 60.0)]
    assert sorted(p.name for p in (out / "classifiers").glob("*.skops")) == ["knn.skops", "linear.skops"]


def test_perturbations_and_level_checks() -> None:
    img = Image.new("RGB", (80, 60), (200, 30, 30))
    assert perturb(img, "downscale", 0.5).size == (40, 30)
    assert perturb(img, "crop", 0.5).size == (40, 30)
    assert perturb(img, "blur", 2.0).size == (80, 60)
    assert perturb(img, "jpeg", 30).size == (80, 60) and perturb(img, "jpeg", 30).mode == "RGB"
    assert perturb(Image.new("RGB", (3, 3)), "downscale", 0.1).size == (1, 1)
    with pytest.raises(ValueError, match="quality"):
        validate_levels({"jpeg": (0,)})
    with pytest.raises(ValueError, match="fraction"):
        validate_levels({"crop": (1.5,)})
    with pytest.raises(ValueError, match="unknown robustness family"):
        validate_levels({"rotate": (1,)})


def test_embedding_maps_pca_and_tsne(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = Embeddings(rng.normal(size=(30, 8)).astype(np.float32), np.repeat([0, 1], 15), ["real"] * 15 + ["g"] * 15, [str(i) for i in range(30)])
    for method in ("pca", "tsne"):
        coords, index = embedding_map(emb, method)
        assert coords.shape == (30, 2) and np.isfinite(coords).all() and list(index) == list(range(30))
    png = plot_embedding_map(emb, "t-SNE", tmp_path / "map.png", "tsne")
    with Image.open(png) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="pca or tsne"):
        embedding_map(emb, "umap")
