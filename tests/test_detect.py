"""Tests for `codetrain detect`: many image formats, bad files listed, same preprocessing as evaluation."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardkit import fake_look, photo_crop

from codetrain.cli import main
from codetrain.detect import (
    CSV_COLUMNS,
    SkipReason,
    Unscored,
    detect,
    find_images,
    load_detector,
)
from codetrain.embed import (
    REAL_GENERATOR,
    Embeddings,
    embed_images,
    model_fingerprint,
    open_image_file,
)
from codetrain.evaluate import fit_classifiers
from codetrain.model import CoDEEmbedder, create_embedder, save_weights
from codetrain.preprocessing import Preprocessing
from codetrain.views import eval_transform

GOOD = ("photo.jpg", "alpha.png", "photo.webp", "photo.bmp", "anim.gif", "photo.tiff", "sub/grey.png", "sub/deep/tiny.jpg", "upper.JPEG")
BAD = ("corrupt.jpg", "text.png")


def fit_run(run: Path, n: int = 12, model: CoDEEmbedder | None = None) -> None:
    """Save a tiny embedder (a fresh test_vit by default) and fit all three classifiers on photo crops (real) vs blurred noisy crops (fake)."""
    model = model if model is not None else create_embedder("test_vit")
    save_weights(model, run / "model.safetensors")
    rng = np.random.default_rng(0)
    reals = [photo_crop(rng, (64, 48)) for _ in range(n)]
    fakes = [fake_look(photo_crop(rng, (64, 48)), rng) for _ in range(n)]
    emb = Embeddings(embed_images(model, reals + fakes), np.array([0] * n + [1] * n), [REAL_GENERATOR] * n + ["blurry"] * n, [str(i) for i in range(2 * n)])
    fit_classifiers(emb, ("linear", "knn", "ocsvm"), run / "eval" / "classifiers", model_fingerprint(model))


def write_images(folder: Path) -> None:
    """The GOOD images (several formats, modes and sizes), the BAD files, and a non-image file to ignore."""
    rng = np.random.default_rng(1)
    photo = photo_crop(rng, (64, 48))
    (folder / "sub" / "deep").mkdir(parents=True)
    photo.save(folder / "photo.jpg", quality=90)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "alpha.png")
    photo.save(folder / "photo.webp")
    photo.save(folder / "photo.bmp")
    frames = [photo.convert("P"), photo.rotate(90).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    photo.save(folder / "photo.tiff")
    photo.convert("L").save(folder / "sub" / "grey.png")
    photo.resize((17, 23)).save(folder / "sub" / "deep" / "tiny.jpg")
    photo.save(folder / "upper.JPEG", format="JPEG")
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    (folder / "corrupt.jpg").write_bytes(buffer.getvalue()[:200])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image extension\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run with fitted classifiers and a folder of good and bad files."""
    root = tmp_path_factory.mktemp("detect")
    fit_run(root / "run")
    write_images(root / "images")
    return {"run": root / "run", "images": root / "images", "root": root}


def test_folder_scan_scores_good_files_and_lists_bad_ones(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out" / "detections.csv"
    result = detect(setup["run"], [setup["images"]], out_csv=out, batch_size=4)
    images = setup["images"]
    assert sorted(d.path for d in result.detections) == sorted(str(images / p) for p in GOOD)
    reasons = {u.path: u.message for u in result.unscored}
    assert sorted(reasons) == sorted(str(images / p) for p in BAD)
    assert {u.reason for u in result.unscored} == {SkipReason.UNREADABLE}
    assert "truncated" in reasons[str(images / "corrupt.jpg")].lower()
    assert "cannot identify" in reasons[str(images / "text.png")]
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    scored, unscored = rows[1 : 1 + len(GOOD)], rows[1 + len(GOOD) :]
    assert [(r[0], float(r[1]), r[2], r[3], r[4]) for r in scored] == [
        (d.path, pytest.approx(d.score, rel=1e-5), d.label.value, "linear", "") for d in result.detections]
    assert unscored == [[u.path, "", "unscored", "linear", u.message] for u in result.unscored]
    for det in result.detections:
        assert det.label == ("fake" if det.score > 0 else "real")
    counts = result.counts()
    assert counts["real"] + counts["fake"] == len(GOOD) and counts["unscored"] == 2
    summary = result.summary()
    assert f"{len(GOOD)} images scored with linear" in summary and "2 not scored" in summary
    assert "corrupt.jpg" in summary and "text.png" in summary


def test_scores_equal_the_evaluation_preprocessing_and_do_not_depend_on_batching(setup: dict[str, Path]) -> None:
    model, clf = load_detector(setup["run"], "linear")
    assert model.preprocessing == Preprocessing(160)  # test_vit's input size (timm's data config), ImageNet mean/std
    files = [setup["images"] / p for p in GOOD]
    one = detect(setup["run"], files, batch_size=1)
    many = detect(setup["run"], files, batch_size=32)
    np.testing.assert_allclose([d.score for d in one.detections], [d.score for d in many.detections], rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        emb = model(torch.stack([eval_transform(open_image_file(f), 160) for f in files])).numpy()
    np.testing.assert_allclose(clf.score(emb), [d.score for d in many.detections], rtol=1e-4, atol=1e-5)


def test_every_good_format_decodes_to_rgb_224(setup: dict[str, Path]) -> None:
    for name in GOOD:
        img = open_image_file(setup["images"] / name)
        assert img.mode == "RGB"
        assert tuple(eval_transform(img).shape) == (3, 224, 224)
    assert open_image_file(setup["images"] / "sub/deep/tiny.jpg").size == (17, 23)


def test_other_classifiers_missing_paths_and_explicit_files(setup: dict[str, Path]) -> None:
    result = detect(setup["run"], [setup["images"] / "photo.jpg", setup["images"] / "missing.png", setup["images"] / "notes.txt"], "knn")
    assert [d.path for d in result.detections] == [str(setup["images"] / "photo.jpg")]
    assert result.detections[0].classifier == "knn"
    reasons = {u.path: u.message for u in result.unscored}
    assert reasons[str(setup["images"] / "missing.png")] == "no such file or folder"
    assert "cannot identify" in reasons[str(setup["images"] / "notes.txt")]
    missing: list = []
    assert find_images([setup["images"]], missing) == find_images([setup["images"], setup["images"] / "photo.jpg"], missing)


def test_clear_errors_without_usable_classifiers(tmp_path: Path, setup: dict[str, Path]) -> None:
    save_weights(create_embedder("test_vit"), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="codetrain evaluate"):
        detect(tmp_path, [setup["images"]])
    with pytest.raises(FileNotFoundError, match="available"):
        detect(setup["run"], [setup["images"]], classifier="svm")
    stale = tmp_path / "stale"
    (stale / "eval").mkdir(parents=True)
    save_weights(create_embedder("test_vit"), stale / "model.safetensors")
    (stale / "eval" / "classifiers").symlink_to(setup["run"] / "eval" / "classifiers")
    with pytest.raises(ValueError, match="other embedder weights"):
        detect(stale, [setup["images"]])


def test_cli_writes_csv_and_prints_summary(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.csv"
    assert main(["detect", "--run", str(setup["run"]), str(setup["images"]), "--csv", str(out), "--classifier", "ocsvm",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(GOOD)} images scored with ocsvm" in printed and "not scored: " in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows if r["label"] in ("real", "fake")) == sorted(str(setup["images"] / p) for p in GOOD)
    assert sorted(r["path"] for r in rows if r["label"] == "unscored") == sorted(str(setup["images"] / p) for p in BAD)
    assert main(["detect", "--run", str(setup["run"]), str(setup["images"] / "text.png"), "--csv", str(tmp_path / "e.csv")]) == 1


def test_symlink_loops_and_broken_links_are_reported_in_the_csv(setup: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "photo.jpg").symlink_to(setup["images"] / "photo.jpg")
    (folder / "a.jpg").symlink_to(folder / "b.jpg")
    (folder / "b.jpg").symlink_to(folder / "a.jpg")
    (folder / "gone.png").symlink_to(folder / "nothing.png")
    (folder / "self.png").symlink_to(folder / "self.png")
    out = tmp_path / "d.csv"
    result = detect(setup["run"], [folder, folder / "self.png"], out_csv=out)
    assert [d.path for d in result.detections] == [str(folder / "photo.jpg")]
    assert [(u.path, u.reason) for u in result.unscored] == [
        (str(folder / "a.jpg"), SkipReason.LINK_LOOP), (str(folder / "b.jpg"), SkipReason.LINK_LOOP),
        (str(folder / "gone.png"), SkipReason.BROKEN_LINK), (str(folder / "self.png"), SkipReason.LINK_LOOP),
        (str(folder / "self.png"), SkipReason.LINK_LOOP)]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["label"], r["reason"]) for r in rows] == [(str(folder / "photo.jpg"), result.detections[0].label.value, "")] + [
        (u.path, "unscored", u.reason.value) for u in result.unscored]
    unscored: list[Unscored] = []
    assert find_images([folder], unscored) == [folder / "photo.jpg"] and len(unscored) == 4


def test_cli_run_without_classifiers_is_one_line_exit_2(tmp_path: Path, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare"
    save_weights(create_embedder("test_vit"), bare / "model.safetensors")
    assert main(["detect", "--run", str(bare), str(setup["images"]), "--csv", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("codetrain detect: error: no fitted classifiers in ") and str(bare / "eval" / "classifiers") in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "d.csv").exists()
