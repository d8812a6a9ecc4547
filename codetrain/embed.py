"""Batched embedding of D3 shard images and image files with the evaluation preprocessing.

Every image, from a shard or a file, goes through the same steps as training's clean views:
`codetrain.views.decode_rgb` (full size, first frame, RGB), optionally a perturbation
(robustness sweeps), then the embedder's own preprocessing (`codetrain.preprocessing`: its
input size and mean/std). A split is a list of files: Parquet shards (a real and fakes per
record) or image files labelled by their folder (`real/` holds reals, any other folder, e.g.
`gen_0/`, fakes of that generator: the published test set's layout). Embeddings of splits are
cached as safetensors, keyed by a fingerprint of the embedder weights, its preprocessing, the
files and the perturbation, so a rerun recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from codetrain.preprocessing import PAPER, Preprocessing, preprocessing_of
from codetrain.realsource import RealImageSource, is_shard, open_parquet
from codetrain.views import decode_rgb
from d3builder.imaging.augmentations import to_rgb
from d3builder.storage.schema import generator_slots
from d3builder.storage.store import atomic_write_bytes

log = logging.getLogger(__name__)

REAL_GENERATOR = "real"
"""The generator tag of real images, and the folder name of reals in an image-folder split."""

CACHE_FORMAT = "codetrain.embeddings/1"
"""Format tag of an embedding cache file (bump when the preprocessing changes)."""

DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises on a corrupt, truncated, foreign or oversized image."""

DECODE_WORKERS = min(8, os.cpu_count() or 1)
"""Threads decoding and preprocessing images while the model runs."""

ImageOp = Callable[[Image.Image], Image.Image]
T = TypeVar("T")


@dataclass
class Embeddings:
    """Embeddings of one split: a row per image with its label (0 real, 1 fake), generator and record id."""

    vectors: np.ndarray
    labels: np.ndarray
    generators: list[str]
    ids: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def save(self, path: str | Path, fingerprint: dict[str, Any]) -> Path:
        """Write as safetensors (vectors, labels) with generators, ids and the fingerprint as metadata."""
        tensors = {"vectors": torch.from_numpy(self.vectors), "labels": torch.from_numpy(self.labels)}
        metadata = {
            "format": CACHE_FORMAT,
            "fingerprint": json.dumps(fingerprint, sort_keys=True),
            "generators": json.dumps(self.generators),
            "ids": json.dumps(self.ids),
            "skipped": json.dumps(self.skipped),
        }
        return atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, fingerprint: dict[str, Any]) -> Embeddings | None:
        """Read a cache file; None when it is missing, unreadable or made from other inputs."""
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
                    return None
                vectors, labels = fh.get_tensor("vectors").numpy(), fh.get_tensor("labels").numpy()
            emb = cls(vectors, labels, json.loads(meta["generators"]), json.loads(meta["ids"]), json.loads(meta["skipped"]))
        except (OSError, KeyError, ValueError, safetensors.SafetensorError) as exc:
            log.debug("embedding cache %s unusable: %s", path, exc)
            return None
        return emb if len(emb.generators) == len(emb) == len(emb.ids) else None


@dataclass(frozen=True)
class ImageRef:
    """One image of a split: record id, label, generator tag, where it came from, and its shard cell or file."""

    id: str
    label: int
    generator: str
    cell: dict | None
    where: str
    file: str | None = None

    def decode(self) -> Image.Image:
        """The image decoded by `decode_rgb` (raises on missing bytes or anything unreadable)."""
        if self.file is not None:
            return open_image_file(self.file)
        if self.cell is None or self.cell.get("bytes") is None:
            raise ValueError("no image bytes")
        return decode_rgb(self.cell["bytes"])


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with dot) of every format Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a parameterless model)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model class and every state tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prepare(img: Image.Image, op: ImageOp | None = None, preprocessing: Preprocessing = PAPER) -> torch.Tensor:
    """RGB, then the optional perturbation, then the embedder's preprocessing: a [3,size,size] tensor."""
    img = to_rgb(img)
    if op is not None:
        img = to_rgb(op(img))
    return preprocessing.transform(img)


def prepare_parallel(
    items: Iterable[T], load: Callable[[T], torch.Tensor], on_error: Callable[[T, Exception], None], chunk: int = 64
) -> Iterator[tuple[T, torch.Tensor]]:
    """`(item, load(item))` in input order, decoded on DECODE_WORKERS threads (Pillow releases the GIL).

    At most two chunks are in flight (the next is decoded while the current one is
    consumed); items whose load raises a decode error go to `on_error` instead.
    """

    def safe(item: T) -> tuple[T, torch.Tensor | None, Exception | None]:
        try:
            return item, load(item), None
        except DECODE_ERRORS as exc:
            return item, None, exc

    source = iter(items)
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
        pending = [pool.submit(safe, item) for item in islice(source, chunk)]
        while pending:
            upcoming = [pool.submit(safe, item) for item in islice(source, chunk)]
            for future in pending:
                item, tensor, exc = future.result()
                if tensor is None:
                    on_error(item, exc)  # type: ignore[arg-type]
                else:
                    yield item, tensor
            pending = upcoming


def embed_batches(
    model: nn.Module, items: Iterable[tuple[T, torch.Tensor]], batch_size: int = 32
) -> Iterator[tuple[list[T], np.ndarray]]:
    """Group (tag, image tensor) pairs into batches and yield (tags, float32 embeddings)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = model_device(model)
    tags: list[T] = []
    tensors: list[torch.Tensor] = []

    def run() -> tuple[list[T], np.ndarray]:
        with torch.inference_mode():
            out = model(torch.stack(tensors).to(device)).float().cpu().numpy()
        return list(tags), out

    for tag, tensor in items:
        tags.append(tag)
        tensors.append(tensor)
        if len(tags) == batch_size:
            yield run()
            tags.clear()
            tensors.clear()
    if tags:
        yield run()


def embed_images(model: nn.Module, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """Embed PIL images with the model's preprocessing; returns float32 (n, d)."""
    pre = preprocessing_of(model)
    chunks = [emb for _, emb in embed_batches(model, ((i, prepare(img, None, pre)) for i, img in enumerate(images)), batch_size)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def open_image_file(path: str | Path) -> Image.Image:
    """Decode an image file (a local path or fsspec URL) with `decode_rgb`; raises on anything unreadable."""
    with fsspec.open(str(path), "rb") as fh:
        return decode_rgb(fh.read())


def embed_files(
    model: nn.Module, paths: Iterable[Path], failures: list[tuple[Path, str]], batch_size: int = 32
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Embed image files in batches; unreadable files are appended to `failures` with the reason."""

    def failed(path: Path, exc: Exception) -> None:
        failures.append((path, f"{type(exc).__name__}: {exc}"))

    pre = preprocessing_of(model)
    items = prepare_parallel(paths, lambda path: prepare(open_image_file(path), None, pre), failed, 2 * batch_size)
    yield from embed_batches(model, items, batch_size)


def _name(row: dict, slot: int) -> str:
    """A fake's generator name: our `generator_gen{i}`, else the published `model_gen{i}`, else `gen{i}`."""
    for key in (f"generator_gen{slot}", f"model_gen{slot}"):
        if row.get(key):
            return str(row[key])
    return f"gen{slot}"


def shard_image_count(shards: Sequence[str]) -> int:
    """Images in a split's files: rows x (real + generator slots) of each shard (footers only), 1 per image file."""
    total = 0
    for shard in shards:
        if not is_shard(shard):
            total += 1
            continue
        pf = open_parquet(shard)
        total += pf.metadata.num_rows * (len(generator_slots(pf.schema_arrow.names)) + 1)
    return total


def file_image(path: str) -> ImageRef:
    """An image file of an image-folder split: a real in a `real/` folder, else a fake named by its folder."""
    parts = str(path).rstrip("/").split("/")
    folder, stem = (parts[-2] if len(parts) > 1 else ""), parts[-1].rsplit(".", 1)[0]
    label = 0 if folder == REAL_GENERATOR else 1
    return ImageRef(stem, label, folder if label else REAL_GENERATOR, None, str(path), file=str(path))


def _source_cell(real_source: RealImageSource, record_id: str) -> dict | None:
    """The real image of `record_id` from a real-image source as an Image cell (None if it has none)."""
    try:
        data = real_source.get(record_id)
    except ValueError as exc:  # an id unusable as a file name
        log.warning("no real image for record %r: %s", record_id, exc)
        return None
    return None if data is None else {"bytes": data, "path": None}


def iter_shard_images(shards: Sequence[str], real_source: RealImageSource | None = None) -> Iterator[ImageRef]:
    """Every real (once per record id) and every fake of a split's shards and image files, undecoded.

    Shards in the published ELSA_D3 layout carry no `image_real`; their reals come from
    `real_source`, else a ValueError names the shard.
    """
    seen_reals: set[str] = set()
    for shard in shards:
        if not is_shard(shard):
            yield file_image(shard)
            continue
        pf = open_parquet(shard)
        names = pf.schema_arrow.names
        slots = generator_slots(names)
        has_real = "image_real" in names
        if not has_real and real_source is None:
            raise ValueError(f"{shard} has no image_real column (ELSA_D3 layout): pass a real-image source")
        wanted = ["id", "image_real", *(f"{k}_gen{s}" for s in slots for k in ("image", "generator", "model"))]
        for batch in pf.iter_batches(batch_size=16, columns=[c for c in wanted if c in names]):
            for row in batch.to_pylist():
                rid = str(row["id"])
                if rid not in seen_reals:
                    seen_reals.add(rid)
                    cell = row["image_real"] if has_real else _source_cell(real_source, rid)
                    yield ImageRef(rid, 0, REAL_GENERATOR, cell, f"{shard} record {rid} real")
                for slot in slots:
                    cell = row[f"image_gen{slot}"]
                    yield ImageRef(rid, 1, _name(row, slot), cell, f"{shard} record {rid} image_gen{slot}")


def embed_shards(
    model: nn.Module,
    shards: Sequence[str],
    op: ImageOp | None = None,
    batch_size: int = 32,
    real_source: RealImageSource | None = None,
    desc: str = "embed",
    progress: bool = True,
) -> Embeddings:
    """Embed every real and fake of the shards; corrupt or missing images are skipped and listed."""
    skipped: list[str] = []
    pre = preprocessing_of(model)
    bar = tqdm(total=shard_image_count(shards), desc=desc, unit="img", leave=False, disable=not progress)

    def failed(ref: ImageRef, exc: Exception) -> None:
        skipped.append(f"{ref.where}: {type(exc).__name__}: {exc}")
        log.warning("skipped %s: %s", ref.where, exc)

    def counted() -> Iterator[ImageRef]:
        for ref in iter_shard_images(shards, real_source):
            bar.update(1)
            yield ref

    items = prepare_parallel(counted(), lambda ref: prepare(ref.decode(), op, pre), failed, 2 * batch_size)
    refs: list[ImageRef] = []
    chunks: list[np.ndarray] = []
    with bar:
        for batch_refs, emb in embed_batches(model, items, batch_size):
            refs.extend(batch_refs)
            chunks.append(emb)
    dim = chunks[0].shape[1] if chunks else 0
    return Embeddings(
        vectors=np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32),
        labels=np.asarray([r.label for r in refs], dtype=np.int64),
        generators=[r.generator for r in refs],
        ids=[r.id for r in refs],
        skipped=skipped,
    )


def shard_signature(shards: Sequence[str]) -> list[list[Any]]:
    """(path, size, modification stamp) of every shard: changes whenever a shard is rewritten."""
    signature = []
    for shard in shards:
        fs, path = fsspec.core.url_to_fs(shard)
        info = fs.info(path)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("last_modified")
        signature.append([shard, info.get("size"), str(stamp)])
    return signature


def embed_shards_cached(
    model: nn.Module,
    shards: Sequence[str],
    cache_path: str | Path | None,
    op: ImageOp | None = None,
    op_key: str = "clean",
    batch_size: int = 32,
    real_source: RealImageSource | None = None,
    desc: str = "embed",
    fingerprint: str | None = None,
    progress: bool = True,
) -> Embeddings:
    """`embed_shards`, reusing `cache_path` when it was made from the same model, shards and op."""
    key = {
        "model": fingerprint or model_fingerprint(model),
        "preprocessing": preprocessing_of(model).describe(),
        "shards": shard_signature(shards),
        "op": op_key,
        "real_source": real_source.source if real_source is not None else None,
    }
    if cache_path is not None:
        cached = Embeddings.load(cache_path, key)
        if cached is not None:
            log.info("%s: %d embeddings from cache %s", desc, len(cached), cache_path)
            return cached
    emb = embed_shards(model, shards, op, batch_size, real_source, desc, progress)
    if cache_path is not None and len(emb):
        emb.save(cache_path, key)
    return emb
