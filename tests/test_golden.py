"""Golden values of every function whose output decides the dataset: a change that would reshuffle D3
(other records, splits, seeds, sizes, encodings or transformations for the same inputs) fails here.

If one of these changes on purpose, the dataset changes: bump the recipe's release and say so."""

from __future__ import annotations

import pytest

from codetrain.data import record_rng
from d3builder.generators.encoding import draw_encoding
from d3builder.generators.results import seed_for, size_for
from d3builder.imaging.augmentations import draw_ops
from d3builder.recipe.manifest import LAION_ENCODING_MIX
from d3builder.stages.select import selection_hash, split_of
from d3builder.stages.transform_test import image_rng

IDS = [0, 1, 42, 1275001022128, 987654321]


def test_selection_hash() -> None:
    assert [round(selection_hash(i, 42), 15) for i in IDS] == pytest.approx(
        [0.353478847798795, 0.937653293795877, 0.630072458117081, 0.763922534283203, 0.314962722450332], abs=1e-15
    )


def test_split_of() -> None:
    tiny = {"train": 0.5, "validation": 0.25, "test": 0.25}
    assert [split_of(i, 42, tiny) for i in range(12)] == [
        "validation", "validation", "train", "validation", "test", "validation",
        "test", "validation", "test", "train", "test", "validation",
    ]  # fmt: skip
    assert [split_of(i, 7, {"train": 0.998, "validation": 0.001, "test": 0.001}) for i in range(3)] == ["train"] * 3


def test_encoding_draw() -> None:
    drawn = [draw_encoding(str(i), "sd14", 42, LAION_ENCODING_MIX, [75, 95]) for i in range(8)]
    assert [(e.format, e.quality) for e in drawn] == [
        ("JPEG", 75), ("JPEG", 79), ("PNG", None), ("JPEG", 95), ("JPEG", 93), ("JPEG", 93), ("JPEG", 89), ("JPEG", 84),
    ]  # fmt: skip
    other = [draw_encoding(str(i), "sdxl", 1, {"PNG": 0.5, "GIF": 0.5}, [75, 95]).format for i in range(8)]
    assert other == ["GIF", "GIF", "PNG", "PNG", "PNG", "PNG", "PNG", "PNG"]


def test_per_image_seeds_and_sizes() -> None:
    assert [seed_for(str(i), "sd14", 42) for i in IDS] == [2991090315, 3837815053, 546581614, 4205957087, 2488674060]
    sizes = [(512, 512), (640, 480), (640, 360), (256, 256)]
    assert [size_for(str(i), "sdxl", 42, sizes) for i in IDS] == [
        (256, 256), (512, 512), (512, 512), (256, 256), (640, 480),
    ]  # fmt: skip


def test_per_record_rngs() -> None:
    assert image_rng(1234, "1000", "image_gen0").integers(0, 2**31, 3).tolist() == [771972393, 1113187260, 985007760]
    assert record_rng(42, 3, "1275001022128").integers(0, 2**31, 3).tolist() == [1808182127, 888691382, 471751239]


def test_recorded_test_set_transformations() -> None:
    drawn = [[op.to_dict() for op in draw_ops(image_rng(1234, str(i), "image_real"), 2)] for i in range(4)]
    assert drawn == [
        [{"family": "grayscale", "level": 1.0, "extra": {}}, {"family": "sharpen", "level": 1.6, "extra": {}}],
        [{"family": "sharpen", "level": 1.2, "extra": {}}],
        [
            {"family": "random_crop", "level": 400.0, "extra": {"x": 0.5520248226279523, "y": 0.11259224583507221}},
            {"family": "jpeg", "level": 100.0, "extra": {}},
        ],
        [],
    ]
