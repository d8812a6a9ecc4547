"""The Python API: `Detector.from_pretrained(path_or_repo).predict(images)` on a folder of mixed images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hubkit import cached_repo
from PIL import Image
from test_detect import BAD, GOOD, fit_run, write_images

from codetrain import Detector, Prediction
from codetrain.bundle import make_bundle
from codetrain.detect import detect


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run with fitted classifiers, its bundle, and a folder of good and bad image files."""
    root = tmp_path_factory.mktemp("detector")
    fit_run(root / "run")
    write_images(root / "images")
    return {"run": root / "run", "bundle": make_bundle(root / "run", root / "bundle"), "images": root / "images", "root": root}


def test_predict_takes_pil_images_and_paths_of_any_size_like_detect(setup: dict[str, Path]) -> None:
    images = setup["images"]
    files = [images / name for name in GOOD]
    expected = detect(setup["run"], files)
    mixed = [Image.open(files[0]), str(files[1]), *files[2:-1], Image.open(files[-1]).convert("L").resize((300, 17))]
    det = Detector.from_pretrained(setup["run"])
    predictions = det.predict(mixed, batch_size=4)
    assert len(predictions) == len(GOOD) and all(isinstance(p, Prediction) for p in predictions)
    np.testing.assert_allclose([p.score for p in predictions[:-1]], [d.score for d in expected.detections[:-1]], rtol=1e-5, atol=1e-6)
    assert [p.label for p in predictions[:-1]] == [d.label for d in expected.detections[:-1]]
    assert {p.classifier for p in predictions} == {"linear"}
    for p in predictions:
        assert p.label == ("fake" if p.score > 0 else "real")
    one_by_one = [det.predict(image, batch_size=1)[0].score for image in mixed]
    np.testing.assert_allclose(one_by_one, [p.score for p in predictions], rtol=1e-4, atol=1e-5)
    assert det.embed(mixed[:3]).shape == (3, 64) and det.predict([]) == []


def test_bundle_hub_repo_and_other_classifiers_give_the_same_verdicts(setup: dict[str, Path], tmp_path: Path) -> None:
    files = [setup["images"] / name for name in GOOD]
    from_run = Detector.from_pretrained(setup["run"], classifier="knn").predict(files)
    from_bundle = Detector.from_pretrained(setup["bundle"], classifier="knn").predict(files)
    assert from_bundle == from_run and {p.classifier for p in from_run} == {"knn"}
    bundle = setup["bundle"]
    cached_repo(tmp_path / "cache", "someone/code-detector",
                {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()})
    from_hub = Detector.from_pretrained("someone/code-detector", classifier="knn", cache_dir=tmp_path / "cache",
                                        local_files_only=True).predict(files)
    assert from_hub == from_run


def test_unreadable_images_are_named(setup: dict[str, Path]) -> None:
    det = Detector.from_pretrained(setup["bundle"], classifier="ocsvm")
    bad = [setup["images"] / name for name in BAD]
    with pytest.raises(ValueError, match="2 unreadable image") as info:
        det.predict([setup["images"] / GOOD[0], *bad])
    assert all(name in str(info.value) for name in BAD)
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        Detector.from_pretrained(setup["images"])
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        Detector.from_pretrained(setup["root"] / "missing" / "run")
