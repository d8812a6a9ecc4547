"""The embedded set: real photos shipped inside PyPI packages, written out and described as LAION-400M metadata."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from d3builder.embedded.server import serve_folder
from d3builder.storage.layout import safe_name
from d3builder.storage.schema import LAION_COLUMNS
from d3builder.storage.store import atomic_write_bytes

CAPTIONS_FILE = "embedded_captions.yaml"
DEFAULT_PORT = 8765
"""`serve-embedded` listens here by default so that URLs in written records stay valid across restarts."""

EMBEDDED_RELEASE = "d3code-embedded-v1"
FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif"}
DEFAULT_JPEG_QUALITY = 90
MIN_SIDE = 64


@dataclass(frozen=True)
class PhotoSpec:
    """One entry of the captions file: where the pixels come from and how they are served."""

    name: str
    source: str
    caption: str
    format: str
    license: str
    crop: tuple[int, int, int, int] | None = None
    scale: float | None = None
    quality: int = DEFAULT_JPEG_QUALITY

    @property
    def filename(self) -> str:
        return f"{self.name}.{FORMATS[self.format]}"

    @property
    def sample_id(self) -> int:
        """A stable 13-digit LAION-like SAMPLE_ID derived from the name."""
        return 10**12 + _hash_int(f"sample-id:{self.name}") % (9 * 10**12)

    @property
    def similarity(self) -> float:
        """A placeholder for LAION's CLIP score, in [0.30, 0.40) (no CLIP model is available here)."""
        return round(0.30 + (_hash_int(f"similarity:{self.name}") % 10_000) / 100_000, 4)


@dataclass(frozen=True)
class PhotoInfo:
    """One prepared photo: its file, size, encoding and LAION metadata."""

    name: str
    filename: str
    path: Path | None
    caption: str
    encoding: str
    width: int
    height: int
    sample_id: int
    license: str
    nsfw: str
    similarity: float
    source: str


def _hash_int(text: str) -> int:
    """A stable 64-bit integer from text."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=1)
def photo_specs() -> tuple[PhotoSpec, ...]:
    """Read and check the captions file shipped in `d3builder/data`."""
    import yaml

    text = resources.files("d3builder.embedded").joinpath("data", CAPTIONS_FILE).read_text(encoding="utf-8")
    entries = yaml.safe_load(text)["photos"]
    specs = []
    for entry in entries:
        entry = dict(entry)
        if "crop" in entry:
            entry["crop"] = tuple(int(v) for v in entry["crop"])
        spec = PhotoSpec(**entry)
        safe_name(spec.name, "embedded photo name")
        if spec.format not in FORMATS:
            raise ValueError(f"{CAPTIONS_FILE}: {spec.name}: format must be one of {sorted(FORMATS)}")
        if not spec.caption.strip():
            raise ValueError(f"{CAPTIONS_FILE}: {spec.name}: empty caption")
        specs.append(spec)
    if len({s.name for s in specs}) != len(specs) or len({s.sample_id for s in specs}) != len(specs):
        raise ValueError(f"{CAPTIONS_FILE}: photo names or their SAMPLE_IDs are not unique")
    return tuple(specs)


@functools.lru_cache(maxsize=8)
def _source_array(source: str) -> np.ndarray:
    """The pixels of a packaged photo: `skimage:<function>` or `sklearn:<sample image>`."""
    package, _, item = source.partition(":")
    if package == "skimage":
        import skimage.data

        array = getattr(skimage.data, item)()
        array = array[0] if isinstance(array, tuple) else array
    elif package == "sklearn":
        from sklearn.datasets import load_sample_image

        array = load_sample_image(item)
    else:
        raise ValueError(f"unknown embedded photo source {source!r} (use skimage:<name> or sklearn:<name>)")
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ValueError(f"embedded photo source {source!r} is not an 8-bit image")
    return array


def render(spec: PhotoSpec) -> Image.Image:
    """The photo of one spec as a PIL image (cropped and scaled, not yet encoded)."""
    image = Image.fromarray(_source_array(spec.source))
    if spec.crop is not None:
        image = image.crop(spec.crop)
    if spec.scale is not None:
        size = (round(image.width * spec.scale), round(image.height * spec.scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"embedded photo {spec.name!r} is {image.size}, smaller than {MIN_SIDE} px")
    if spec.format == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image


def encode(image: Image.Image, spec: PhotoSpec) -> bytes:
    """Encode a rendered photo in its spec's format."""
    buffer = io.BytesIO()
    options = {"quality": spec.quality} if spec.format == "JPEG" else {}
    image.save(buffer, format=spec.format, **options)
    return buffer.getvalue()


def _info(spec: PhotoSpec, size: tuple[int, int], path: Path | None) -> PhotoInfo:
    """The PhotoInfo of a spec whose image has `size`."""
    return PhotoInfo(
        name=spec.name,
        filename=spec.filename,
        path=path,
        caption=spec.caption,
        encoding=spec.format,
        width=size[0],
        height=size[1],
        sample_id=spec.sample_id,
        license=spec.license,
        nsfw="UNLIKELY",
        similarity=spec.similarity,
        source=spec.source,
    )


def _existing_size(path: Path, spec: PhotoSpec) -> tuple[int, int] | None:
    """The size of an already written photo, if it is there, decodes fully and has the right format."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size if image.format == spec.format else None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


@functools.lru_cache(maxsize=1)
def photo_infos() -> tuple[PhotoInfo, ...]:
    """Every photo's metadata, computed in memory (no files written)."""
    return tuple(_info(spec, render(spec).size, None) for spec in photo_specs())


def default_photo_folder() -> Path:
    """Where the photos are written when no folder is given: the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "d3code" / EMBEDDED_RELEASE


def prepare_photos(folder: str | Path | None = None) -> list[PhotoInfo]:
    """Write every embedded photo into `folder` (skipping those already there); returns their info."""
    folder = Path(folder) if folder is not None else default_photo_folder()
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for spec, expected in zip(photo_specs(), photo_infos(), strict=True):
        path = folder / spec.filename
        size = _existing_size(path, spec) if path.is_file() else None
        if size != (expected.width, expected.height):
            image = render(spec)
            atomic_write_bytes(path, encode(image, spec))
            size = image.size
        infos.append(_info(spec, size, path))
    return infos


def metadata_filename(part: int) -> str:
    """LAION-style part file name with a uuid fixed by the embedded release."""
    tag = uuid.uuid5(uuid.NAMESPACE_URL, f"https://github.com/d3code/{EMBEDDED_RELEASE}")
    return f"part-{part:05d}-{tag}-c000.snappy.parquet"


def metadata_table(base_url: str, photos: Sequence[PhotoInfo] | None = None) -> pa.Table:
    """The embedded set as one LAION-400M table, URLs under `base_url`."""
    photos = photo_infos() if photos is None else photos
    base_url = base_url.rstrip("/")
    columns = {
        "SAMPLE_ID": [p.sample_id for p in photos],
        "URL": [f"{base_url}/{p.filename}" for p in photos],
        "TEXT": [p.caption for p in photos],
        "LICENSE": [p.license for p in photos],
        "NSFW": [p.nsfw for p in photos],
        "similarity": [p.similarity for p in photos],
        "WIDTH": [p.width for p in photos],
        "HEIGHT": [p.height for p in photos],
    }
    return pa.table(columns, schema=LAION_COLUMNS.arrow_schema.remove_metadata())


def write_metadata(folder_or_file: str | Path, base_url: str, num_files: int = 2) -> list[Path]:
    """Write the embedded set as LAION-400M parquet: `num_files` parts in a folder, or one `.parquet` file."""
    target = Path(folder_or_file)
    table = metadata_table(base_url)
    if target.suffix == ".parquet":
        paths, parts = [target], [table]
    else:
        if not 1 <= num_files <= table.num_rows:
            raise ValueError(f"num_files must be between 1 and {table.num_rows}, got {num_files}")
        bounds = np.linspace(0, table.num_rows, num_files + 1).round().astype(int)
        parts = [table.slice(start, stop - start) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
        paths = [target / metadata_filename(i) for i in range(num_files)]
        stale = set(target.glob(metadata_filename(0).replace("part-00000", "part-*"))) - set(paths)
        for path in stale:
            path.unlink()
    for path, part in zip(paths, parts, strict=True):
        buffer = io.BytesIO()
        pq.write_table(part, buffer, compression="snappy")
        atomic_write_bytes(path, buffer.getvalue())
    return paths


@contextmanager
def embedded_server(folder: str | Path | None = None, port: int = 0) -> Iterator[str]:
    """Prepare the photos in `folder` and serve them on 127.0.0.1; yields the base URL."""
    folder = Path(folder) if folder is not None else default_photo_folder()
    prepare_photos(folder)
    with serve_folder(folder, port) as base_url:
        yield base_url


def _run(args: argparse.Namespace) -> int:
    """`serve-embedded`: serve the photos until Ctrl-C."""
    with embedded_server(args.folder, args.port) as base_url:
        print(f"serving {len(photo_specs())} embedded photos at {base_url}", flush=True)
        print(f"run stages with: d3builder select --manifest manifests/tiny.yaml --embedded-base-url {base_url}", flush=True)
        print("press Ctrl-C to stop", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve-embedded`."""
    parser = subparsers.add_parser(
        "serve-embedded",
        help="serve the embedded photos on 127.0.0.1 (for `metadata.source: embedded`)",
        description="Write the embedded photos (real photos shipped in scikit-image and scikit-learn) "
        "and serve them over HTTP on 127.0.0.1 until Ctrl-C; prints the base URL to pass to "
        "`d3builder select --embedded-base-url`.",
    )
    parser.add_argument("--folder", type=Path, help=f"where to write the photos (default {default_photo_folder()})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0 = any free port; a busy port falls back to a free one)")
    parser.set_defaults(func=_run)
