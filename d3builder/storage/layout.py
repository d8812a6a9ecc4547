"""Where every stage reads and writes: the DATA folder layout of DESIGN.md."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from d3builder.storage.schema import SOURCE_SPLIT

TRANSFORM_STAGE = "transform_test"
"""The stats folder of `transform-test`."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path component, else raise ValueError naming it."""
    if not _SAFE_NAME.match(name) or name in {".", ".."} or ".." in name:
        raise ValueError(f"unsafe {what} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "WEBP": "webp"}
"""File extension of each image encoding, for the ELSA-style `filepath_gen{i}` and image paths."""

def extension(encoding: str | None) -> str:
    """The file extension of an encoding name (JPEG -> jpg), `bin` when unknown."""
    return EXTENSIONS.get((encoding or "").upper(), "bin")


def shard_name(shard: int) -> str:
    """The zero-padded file stem of shard number `shard`."""
    if shard < 0:
        raise ValueError(f"shard number must be >= 0, got {shard}")
    return f"{shard:05d}"


_SPLIT_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_]*?)-\d")


def split_prefix(file_name: str) -> str | None:
    """The split a shard file's name starts with (`train-00000-of-00002.parquet`: train), or None."""
    match = _SPLIT_PREFIX.match(file_name)
    return match.group(1) if match else None


def shard_number(path: Path) -> int:
    """The shard number of a `{k}.parquet` or `{split}-{k}.parquet` file."""
    return int(path.stem.rsplit("-", 1)[-1])


@dataclass(frozen=True)
class DataLayout:
    """Paths of every (stage, shard) unit under one output root."""

    root: Path

    def records(self, shard: int) -> Path:
        return self.root / "records" / f"{shard_name(shard)}.parquet"

    def real(self, shard: int) -> Path:
        return self.root / "real" / f"{shard_name(shard)}.parquet"

    def gen(self, generator: str, shard: int) -> Path:
        return self.root / "gen" / safe_name(generator, "generator") / f"{shard_name(shard)}.parquet"

    def d3_dir(self) -> Path:
        return self.root / "d3"

    def d3(self, split: str, shard: int) -> Path:
        split = safe_name(split, "split")
        return self.d3_dir() / split / f"{split}-{shard_name(shard)}.parquet"

    def extended(self, generator: str, shard: int) -> Path:
        return self.root / "extended" / safe_name(generator, "generator") / f"test-{shard_name(shard)}.parquet"

    def stats(self, stage: str, shard: int, unit: str | None = None) -> Path:
        folder = self.root / "stats" / safe_name(stage, "stage")
        if unit is not None:
            folder = folder / safe_name(unit, "unit")
        return folder / f"{shard_name(shard)}.json"

    def transform_stats(self, split: str, shard: int) -> Path:
        """The stats of transform-test's unit (source split, shard): stats/transform_test/{k}.json for test, .../{split}/{k}.json else."""
        return self.stats(TRANSFORM_STAGE, shard, None if split == SOURCE_SPLIT else split)

    def record_shards(self) -> list[int]:
        """Shard numbers written by `select`, in order."""
        return sorted(shard_number(p) for p in (self.root / "records").glob("[0-9]*.parquet"))
