"""Tests for the CoDE augmentation library (d3builder.imaging.augmentations)."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from d3builder.imaging.augmentations import (
    FAMILIES,
    Op,
    apply_family,
    apply_ops,
    draw_ops,
    random_augment,
    resize_center_crop,
)

EXPECTED_FAMILIES = {
    "blur": (0.1, 2.0),
    "brightness": (0.5, 2.0),
    "aspect_ratio": (0.75, 2.0),
    "pixelization": (0.3, 1.0),
    "rotation": (90.0, 270.0),
    "contrast": (0.5, 1.5),
    "saturation": (0.5, 1.5),
    "jpeg": (40.0, 100.0),
    "grayscale": (1.0, 1.0),
    "hflip": (1.0, 1.0),
    "opacity": (0.2, 1.0),
    "overlay_stripes": (0.05, 0.35),
    "pad": (0.01, 0.25),
    "resize": (64.0, 512.0),
    "random_crop": (64.0, 512.0),
    "scale": (0.5, 1.5),
    "sharpen": (1.2, 2.0),
    "shuffle_pixels": (0.0, 0.35),
    "skew": (-1.0, 1.0),
}
# (family, level) pairs that leave the pixels (nearly) unchanged; a Gaussian of sigma 0.1
# puts e^-50 on the neighbours, so it is the identity up to Pillow's box approximation.
IDENTITY = {("blur", 0.1), ("pixelization", 1.0), ("opacity", 1.0), ("shuffle_pixels", 0.0), ("skew", 0.0)}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 451x300 RGB photo."""
    return Image.fromarray(skdata.chelsea())


@pytest.fixture(scope="module")
def images(photo: Image.Image) -> dict[str, Image.Image]:
    """A photo, greyscale, RGBA, palette and a tiny 17x23 (HxW) image."""
    rng = np.random.default_rng(1)
    tiny = Image.fromarray(rng.integers(0, 256, size=(17, 23, 3), dtype=np.uint8))  # 17 rows x 23 columns
    return {
        "photo": photo,
        "grey": Image.fromarray(skdata.camera()),
        "rgba": photo.convert("RGBA"),
        "palette": photo.convert("P"),
        "tiny": tiny,
    }


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).mean())


def test_table_matches_published_ranges() -> None:
    assert set(FAMILIES) == set(EXPECTED_FAMILIES)
    for name, (low, high) in EXPECTED_FAMILIES.items():
        fam = FAMILIES[name]
        assert (fam.name, fam.low, fam.high) == (name, low, high)
        expected = [low] if low == high else np.linspace(low, high, 5)
        np.testing.assert_allclose(fam.levels, expected, atol=1e-6)
    assert FAMILIES["jpeg"].levels == (40.0, 55.0, 70.0, 85.0, 100.0)


@pytest.mark.parametrize("family", sorted(EXPECTED_FAMILIES))
def test_each_family_at_both_ends(family: str, images: dict[str, Image.Image]) -> None:
    fam = FAMILIES[family]
    for key, img in images.items():
        rgb = img.convert("RGB")
        for level in {fam.low, fam.high}:
            out = apply_family(img, family, level, np.random.default_rng(3))
            assert isinstance(out, Image.Image) and out.mode == "RGB", (family, key, level)
            assert out.width >= 1 and out.height >= 1
            if (family, level) in IDENTITY:
                assert out.size == rgb.size and _mean_abs_diff(out, rgb) < 1.0, (family, key, level)
            elif family == "random_crop" and level >= max(rgb.size):
                assert _same(out, rgb), "a crop larger than the image must clamp to the whole image"
            elif key in ("photo", "tiny"):
                assert not _same(out, rgb), f"{family} at {level} left {key} unchanged"


def test_geometry_and_effects(photo: Image.Image) -> None:
    w, h = photo.size
    assert apply_family(photo, "resize", 64).size == (96, 64)
    assert apply_family(photo, "random_crop", 64).size == (64, 64)
    assert apply_family(photo, "random_crop", 512).size == (w, h)
    assert apply_family(photo, "scale", 0.5).size == (round(w / 2), round(h / 2))
    assert apply_family(photo, "rotation", 90).size == (h, w)
    assert apply_family(photo, "pad", 0.25).size == (w + 2 * round(w / 4), h + 2 * round(h / 4))
    aw, ah = apply_family(photo, "aspect_ratio", 2.0).size
    assert abs(aw / ah - 2.0) < 0.02 and abs(aw * ah - w * h) / (w * h) < 0.01
    grey = np.asarray(apply_family(photo, "grayscale", 1.0)).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    flipped = apply_family(photo, "hflip", 1.0)
    assert _same(flipped.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo)
    rotated = np.asarray(apply_family(photo, "rotation", 135))
    corners = rotated[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.sum(axis=1) > 0).all(), "rotation left empty (black) corners"
    faded = np.asarray(apply_family(photo, "opacity", 0.2)).astype(int)
    assert faded.min() >= int(0.8 * 255) - 1
    shuffled = np.asarray(apply_family(photo, "shuffle_pixels", 0.35)).reshape(-1, 3)
    original = np.asarray(photo).reshape(-1, 3)
    moved = (shuffled != original).any(axis=1).mean()
    assert 0.2 < moved <= 0.35
    packed = np.array([65536, 256, 1])
    assert np.array_equal(np.sort(shuffled.astype(int) @ packed), np.sort(original.astype(int) @ packed))
    striped = np.asarray(apply_family(photo, "overlay_stripes", 0.35))
    assert (striped == 255).all(axis=2).mean() > 0.6


def test_extra_randomness_recorded_and_replayed(photo: Image.Image) -> None:
    ops = {
        f: Op(f, FAMILIES[f].high, FAMILIES[f].draw_extra(np.random.default_rng(s)))
        for s, f in enumerate(["overlay_stripes", "pad", "random_crop", "shuffle_pixels", "skew"])
    }
    assert ops["overlay_stripes"].extra["orientation"] in ("horizontal", "vertical")
    assert len(ops["pad"].extra["colour"]) == 3
    assert 0 <= ops["random_crop"].extra["x"] < 1 and 0 <= ops["random_crop"].extra["y"] < 1
    assert isinstance(ops["shuffle_pixels"].extra["seed"], int)
    assert ops["skew"].extra["axis"] in (0, 1)
    for op in ops.values():
        assert _same(apply_ops(photo, [op]), apply_ops(photo, [op]))
    other = Op("pad", 0.25, {"colour": [(c + 128) % 256 for c in ops["pad"].extra["colour"]]})
    assert not _same(apply_ops(photo, [ops["pad"]]), apply_ops(photo, [other]))
    seen_orientations = {draw_ops_single("overlay_stripes", s).extra["orientation"] for s in range(20)}
    assert seen_orientations == {"horizontal", "vertical"}


def draw_ops_single(family: str, seed: int) -> Op:
    """Draw exactly one op of ``family`` with ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        ops = draw_ops(rng, max_ops=1, families=[family])
        if ops:
            return ops[0]


def test_determinism_and_json_replay(images: dict[str, Image.Image]) -> None:
    for key, img in images.items():
        before = img.tobytes()
        for seed in range(25):
            out1, ops1 = random_augment(img, np.random.default_rng(seed))
            out2, ops2 = random_augment(img, np.random.default_rng(seed))
            assert ops1 == ops2 and _same(out1, out2)
            records = json.loads(json.dumps([op.to_dict() for op in ops1]))
            replayed = apply_ops(img, [Op.from_dict(r) for r in records])
            assert _same(replayed, out1), (key, seed, records)
        assert img.tobytes() == before, f"augmenting mutated the {key} input"


def test_draw_ops_counts_levels_and_distinct() -> None:
    rng = np.random.default_rng(0)
    counts: Counter[int] = Counter()
    families: Counter[str] = Counter()
    for _ in range(3000):
        ops = draw_ops(rng)
        counts[len(ops)] += 1
        assert len({op.family for op in ops}) == len(ops)
        for op in ops:
            assert op.level in FAMILIES[op.family].levels
            families[op.family] += 1
    assert set(counts) == {0, 1, 2}
    assert all(900 < counts[k] < 1100 for k in range(3)), counts
    assert set(families) == set(FAMILIES)
    subset = [op.family for _ in range(200) for op in draw_ops(rng, 2, ["blur", "jpeg"])]
    assert set(subset) == {"blur", "jpeg"}
    levels = Counter(draw_ops_single("jpeg", s).level for s in range(200))
    assert set(levels) == set(FAMILIES["jpeg"].levels)


def test_bad_input_gives_clear_errors(photo: Image.Image) -> None:
    with pytest.raises(ValueError, match="unknown augmentation family 'nope'"):
        apply_family(photo, "nope", 1.0)
    with pytest.raises(ValueError, match="outside its range"):
        apply_family(photo, "blur", 5.0)
    with pytest.raises(ValueError, match="lacks its extra field"):
        apply_ops(photo, [Op("pad", 0.1, {})])
    with pytest.raises(ValueError, match="needs 'family' and 'level'"):
        Op.from_dict({"level": 1.0})
    with pytest.raises(ValueError, match="unknown augmentation family"):
        draw_ops(np.random.default_rng(0), families=["blur", "nope"])
    with pytest.raises(ValueError, match="max_ops"):
        draw_ops(np.random.default_rng(0), max_ops=3, families=["blur"])


@pytest.mark.parametrize("size", [(17, 23), (23, 17), (1, 1), (1, 300), (451, 300), (2000, 60)])
def test_resize_center_crop_any_size(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (10, 200, 30))
    out = resize_center_crop(img)
    assert out.size == (224, 224) and out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - (10, 200, 30)).max() <= 1


def test_resize_center_crop_matches_resize_then_crop(photo: Image.Image) -> None:
    out = np.asarray(resize_center_crop(photo)).astype(int)
    w = round(photo.width * 248 / photo.height)
    ref = photo.resize((w, 248), Image.Resampling.BILINEAR)
    left = (w - 224) // 2
    ref_arr = np.asarray(ref.crop((left, 12, left + 224, 236))).astype(int)
    assert np.abs(out - ref_arr).mean() < 4
    assert resize_center_crop(Image.fromarray(skdata.camera())).mode == "RGB"
    assert resize_center_crop(photo.convert("RGBA"), 64, 32).size == (32, 32)


def test_speed_sanity(photo: Image.Image) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(100):
        out, _ = random_augment(photo, rng)
        assert resize_center_crop(out).size == (224, 224)
    per_view_ms = (time.perf_counter() - start) * 10
    print(f"augment + resize_center_crop: {per_view_ms:.2f} ms per view on {photo.size}")
