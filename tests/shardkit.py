"""Write small, realistic D3 shards (ours or the published ELSA_D3 layout) and real-image sources for tests."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from datasets import DatasetInfo, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCardData
from PIL import Image, ImageFilter
from rowkit import d3_row, schema_row
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from d3builder.imaging.augmentations import random_augment
from d3builder.storage.schema import (
    NUM_D3_GENERATORS,
    REAL_FEATURES,
    d3_features,
    elsa_features,
)
from d3builder.storage.shards import image_cell, write_shard

GENERATORS = ("deepfloyd-if", "sd14", "sd21", "sdxl")
MODELS = (
    "DeepFloyd/IF-I-XL-v1.0",
    "CompVis/stable-diffusion-v1-4",
    "stabilityai/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0",
)


@dataclass(frozen=True)
class Sizes:
    """Side-length ranges (px, inclusive) of the real and the generated images."""

    real: tuple[int, int] = (40, 72)
    fake: tuple[int, int] = (32, 64)


REALISTIC = Sizes(real=(300, 800), fake=(256, 640))
"""The sizes of D3: LAION reals of a few hundred pixels, generators at 256-640 px."""


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """The RGB photographs bundled with scikit-image and scikit-learn (no download)."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    return tuple(getattr(skdata, n)() for n in names) + tuple(load_sample_images().images)


def photo_crop(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop of a random bundled photo, resized to `size` (w, h)."""
    photo = photos()[int(rng.integers(len(photos())))]
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size, Image.Resampling.BILINEAR)


def fake_look(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Make a photo look generated: blurred, then overlaid with visible noise."""
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=2)), dtype=np.int16)
    noise = rng.normal(0, 8, blurred.shape)
    return Image.fromarray(np.clip(blurred + noise, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG-encode an image."""
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def draw_size(rng: np.random.Generator, bounds: tuple[int, int]) -> tuple[int, int]:
    """A random (w, h) with both sides inside `bounds`."""
    return int(rng.integers(bounds[0], bounds[1] + 1)), int(rng.integers(bounds[0], bounds[1] + 1))


def record_id(seed: int, index: int) -> str:
    """A LAION-like numeric sample id, unique per (seed, index)."""
    return str(1_000_000_000_000 + seed * 10_000_000 + index)


def make_record(index: int, split: str, seed: int, sizes: Sizes) -> tuple[dict, bytes]:
    """One row of our D3 schema and its real image's JPEG bytes."""
    rng = np.random.default_rng([seed, index])
    rid = record_id(seed, index)
    real = jpeg(photo_crop(rng, draw_size(rng, sizes.real)))
    fakes = []
    for _ in range(NUM_D3_GENERATORS):
        size = draw_size(rng, sizes.fake)
        fakes.append((jpeg(fake_look(photo_crop(rng, size), rng)), size))
    row = d3_row(
        rid, real, fakes, split=split, models=MODELS, generators=GENERATORS,
        original_prompt=f"a photo number {index}", positive_prompt=f"a photo number {index}, high quality",
        **{f"seed_gen{slot}": index for slot in range(NUM_D3_GENERATORS)},
    )
    return row, real


def make_d3_shards(
    folder: str | Path,
    n_records: int,
    split: str = "train",
    shard_size: int = 16,
    seed: int = 0,
    sizes: Sizes = Sizes(),
    elsa_layout: bool = False,
    row_group_size: int = 8,
) -> list[Path]:
    """Write `folder/{split}/{split}-{k:05d}.parquet` shards of `n_records` records; returns their paths.

    With `elsa_layout` the shards follow the published ELSA_D3 schema (no real image, no
    provenance) and the reals are written by `write_real_sources` instead.
    """
    features = elsa_features() if elsa_layout else d3_features()
    paths = []
    for shard, start in enumerate(range(0, n_records, shard_size)):
        rows = [make_record(i, split, seed, sizes)[0] for i in range(start, min(n_records, start + shard_size))]
        path = Path(folder) / split / f"{split}-{shard:05d}.parquet"
        paths.append(write_shard(rows, path, features, row_group_size=row_group_size))
    return paths


def real_row(record_id: str, url: str | None, data: bytes, encoding: str | None = "JPEG") -> dict:
    """A `real/` shard row of a successful download of `data` (as fetch-real writes it, served by its own URL)."""
    return schema_row(REAL_FEATURES, id=record_id, url=url, status="success", error_message=None, image=image_cell(data),
                      width=None, height=None, encoding=encoding, sha256=None, num_bytes=len(data), url_index=0,
                      served_url=url)


def write_real_sources(
    folder: str | Path, n_records: int, seed: int = 0, sizes: Sizes = Sizes(), shard_size: int = 16
) -> tuple[Path, Path]:
    """Write the reals of `make_d3_shards(..., seed, sizes)` as `real/{k}.parquet` shards and as `files/{id}.jpg`."""
    real_dir, files_dir = Path(folder) / "real", Path(folder) / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n_records):
        row, real = make_record(index, "train", seed, sizes)
        (files_dir / f"{row['id']}.jpg").write_bytes(real)
        rows.append(real_row(row["id"], row["url"], real))
    order = np.random.default_rng(seed).permutation(n_records)  # reals are not in record order
    shuffled = [rows[i] for i in order]
    for shard, start in enumerate(range(0, n_records, shard_size)):
        write_shard(shuffled[start : start + shard_size], real_dir / f"{shard:05d}.parquet", REAL_FEATURES, row_group_size=8)
    return real_dir, files_dir


def shard_ids(paths: Sequence[str | Path]) -> list[str]:
    """Every record id in the given shards, in file order."""
    return [i for p in paths for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


ELSA_DATA_FILES = [{"split": "train", "path": ["data/train-*", "data/val-*"]}, {"split": "validation", "path": "data/validation-*"}]
"""The `configs` of the published elsaEU/ELSA_D3 card: its train split also holds the `val-*` files."""


@dataclass(frozen=True)
class ElsaRepo:
    """A folder in the published ELSA_D3 hub layout, the files of each card split, and its reals' `real/` folder."""

    root: Path
    train: list[Path]
    validation: list[Path]
    reals: Path


def write_elsa_repo(folder: str | Path, seed: int = 3, train: int = 16, val: int = 8, validation: int = 8) -> ElsaRepo:
    """Write `folder` like a download of elsaEU/ELSA_D3: README.md card, data/train-*, data/val-*, data/validation-*.

    Records (published schema, no real image) are `make_record(i, ..., seed)` for i in order: `train` in two
    `train-0000k-of-00002-<hash>` files, `val` in one `val-*` file (in the card's train split), `validation` in
    one `validation-*` file. Their reals go to `{folder}-fetched/real/` (fetch-real's layout), as `--real-source` takes them.
    """
    root = Path(folder)
    features = elsa_features()
    files = {
        "data/train-00000-of-00002-3f2a9c1d7e6b5a40.parquet": range(0, train // 2),
        "data/train-00001-of-00002-8c1e2b3d4f5a6978.parquet": range(train // 2, train),
        "data/val-00000-of-00001-4216d2c5edf4484e.parquet": range(train, train + val),
        "data/validation-00000-of-00001-2a42d4f5845b2762.parquet": range(train + val, train + val + validation),
    }
    for name, indices in files.items():
        write_shard([make_record(i, "train", seed, Sizes())[0] for i in indices], root / name, features, row_group_size=4)
    paths = {name: root / name for name in files}
    counts = {"train": train + val, "validation": validation}
    info = DatasetInfo(features=features, splits=SplitDict({s: SplitInfo(name=s, num_examples=n) for s, n in counts.items()}))
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    header = {"configs": [{"config_name": "default", "data_files": ELSA_DATA_FILES}], **card_data.to_dict()}
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n# ELSA D3 (test copy)\n")
    reals = write_real_sources(root.with_name(f"{root.name}-fetched"), train + val + validation, seed=seed)[0]
    return ElsaRepo(root, [p for n, p in paths.items() if not n.startswith("data/validation-")],
                    [p for n, p in paths.items() if n.startswith("data/validation-")], reals)


def write_elsa_test_folders(folder: str | Path, indices: range, seed: int = 3) -> Path:
    """The published test set's layout: `{no_augm,augm}/{real,gen_0..gen_3}/{id}.jpg|png` of records `indices`."""
    root = Path(folder)
    for index in indices:
        row, real = make_record(index, "test", seed, Sizes())
        images = {"real": (real, "jpg"), **{f"gen_{s}": (row[f"image_gen{s}"]["bytes"], "png") for s in range(NUM_D3_GENERATORS)}}
        for name, (data, ext) in images.items():
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
            for variant, out in (("no_augm", img), ("augm", random_augment(img, np.random.default_rng([seed, index]))[0])):
                path = root / variant / name / f"{row['id']}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                out.save(path)
    return root
