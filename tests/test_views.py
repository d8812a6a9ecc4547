"""CoDE views: shapes, normalisation, determinism, the one full-size decode and the evaluation transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision import transforms

from codetrain.views import (
    GLOBAL_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOCAL_SCALE,
    VIEW_KEYS,
    ViewMaker,
    center_crop,
    decode_rgb,
    eval_transform,
    random_resized_crop_box,
    resize_short,
    to_uint8,
)
from d3builder.imaging.augmentations import Op, apply_ops


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def large_photo() -> Image.Image:
    return Image.fromarray(skdata.retina()[:1200, :1400])


@pytest.mark.parametrize("local_size", [96, 224])
def test_views_have_contract_shapes_dtypes_and_normalised_range(photo: Image.Image, local_size: int) -> None:
    fake = Image.fromarray(skdata.coffee())
    views = ViewMaker(local_size=local_size).make(photo, fake, np.random.default_rng(0))
    assert set(views) == set(VIEW_KEYS)
    for key, view in views.items():
        size = local_size if key.startswith("l_") else 224
        assert view.shape == (3, size, size) and view.dtype == torch.float32, key
        assert -2.2 <= float(view.min()) and float(view.max()) <= 2.7, key
        assert float(view.std()) > 0.1, key  # a photo, not a constant
    # The clean view of the real is exactly the evaluation transform of the real.
    assert torch.equal(views["x_r"], eval_transform(photo))


def test_views_are_fixed_by_the_rng_and_change_with_it(photo: Image.Image) -> None:
    maker = ViewMaker()
    fake = Image.fromarray(skdata.chelsea())
    first = maker.make(photo, fake, np.random.default_rng(7))
    again = maker.make(photo, fake, np.random.default_rng(7))
    other = maker.make(photo, fake, np.random.default_rng(8))
    assert all(torch.equal(first[k], again[k]) for k in VIEW_KEYS)
    assert torch.equal(first["x_r"], other["x_r"])  # the clean views have no randomness
    assert not torch.equal(first["g_r"], other["g_r"]) and not torch.equal(first["l_f"], other["l_f"])


def test_eval_mode_gives_only_clean_views(photo: Image.Image) -> None:
    views = ViewMaker(eval_mode=True).make(photo, photo, np.random.default_rng(0))
    assert set(views) == {"x_r", "x_f"} and torch.equal(views["x_r"], views["x_f"])


@pytest.mark.parametrize("size", [(17, 23), (23, 17), (1600, 900)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_eval_transform_gives_224_square_for_any_size_and_mode(size: tuple[int, int], mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = eval_transform(Image.fromarray(pixels).convert(mode))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and -2.2 <= float(out.min()) and float(out.max()) <= 2.7


def test_random_resized_crop_box_stays_inside_and_follows_scale() -> None:
    rng = np.random.default_rng(0)
    for size in [(640, 360), (256, 256), (17, 23), (3000, 40)]:
        for scale in (GLOBAL_SCALE, LOCAL_SCALE):
            for _ in range(50):
                left, top, w, h = random_resized_crop_box(size, scale, rng)
                assert 0 <= left and 0 <= top and left + w <= size[0] and top + h <= size[1] and w > 0 and h > 0
                if size == (640, 360):  # the 10 tries always succeed here, so the area is in range
                    assert scale[0] - 0.02 <= w * h / (size[0] * size[1]) <= scale[1] + 0.02


def test_encoded_path_decodes_at_full_size_and_matches_decoded_path_exactly(large_photo: Image.Image) -> None:
    data = jpeg_bytes(large_photo)
    full = Image.open(io.BytesIO(data))
    full.load()
    maker = ViewMaker()
    fast = maker.make_encoded(data, data, np.random.default_rng(3))
    slow = maker.make(full, full, np.random.default_rng(3))
    assert set(fast) == set(slow) == set(VIEW_KEYS)
    for key in VIEW_KEYS:  # one decode at full size: the same crops, ops and pixels, bit for bit
        assert torch.equal(fast[key], slow[key]), key
    decoded = decode_rgb(data)  # never reduced in JPEG draft mode, whatever the size or the views
    assert decoded.size == (1400, 1200) and decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.asarray(full.convert("RGB")))


@pytest.mark.parametrize(
    "ops",
    [[Op("brightness", 1.625)], [Op("contrast", 0.75), Op("hflip", 1.0)], [Op("grayscale", 1.0), Op("opacity", 0.4)]],
)
def test_pointwise_ops_after_resize_match_ops_before_resize(photo: Image.Image, ops: list[Op]) -> None:
    maker = ViewMaker()
    reference = center_crop(resize_short(to_uint8(apply_ops(photo, ops)), 248), 224)[:3].double()
    fast = maker._augment(photo, to_uint8(photo), ops)[:3].double()
    assert fast.shape == reference.shape == (3, 224, 224)
    assert float((fast - reference).abs().mean()) < 1.5  # rounding differences only (grey levels of 255)


@pytest.mark.parametrize("size", [(400, 300), (300, 517), (17, 23)])
def test_clean_view_matches_torchvision_resize_and_centre_crop_on_pil(photo: Image.Image, size: tuple[int, int]) -> None:
    img = photo.resize(size)
    reference = transforms.Compose([transforms.Resize(248), transforms.CenterCrop(224), transforms.PILToTensor()])(img)
    ours = center_crop(resize_short(to_uint8(img), 248), 224)[:3]
    assert ours.shape == reference.shape == (3, 224, 224)
    assert float((ours.double() - reference.double()).abs().mean()) < 0.5


def test_normalisation_constants_are_timms() -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)
