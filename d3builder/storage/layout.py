"""Where every stage reads and writes: the DATA folder layout of DESIGN.md."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from d3builder.core.commandline import UsageError
from d3builder.storage.schema import SOURCE_SPLIT
from d3builder.storage.store import Store, open_store

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


def shard_number(path: PurePath) -> int:
    """The shard number of a `{k}.parquet` or `{split}-{k}.parquet` file."""
    return int(path.stem.rsplit("-", 1)[-1])


def part_name(shard: int, part: int, parts: int) -> str:
    """The file stem of part `part` (0-based) of `parts` of shard `shard`: `{k}.p{j}of{n}`."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} outside 0..{parts - 1}")
    return f"{shard_name(shard)}.p{part + 1:03d}of{parts:03d}"


class DataLayout:
    """Paths of every (stage, shard) unit under one output root, on any store (see `d3builder.storage.store`).

    Paths are `pathlib.Path`s under a local root and PurePosixPaths under a URL root: read and write them
    through `layout.store`, and show them with `layout.url(path)`."""

    def __init__(self, root: str | PurePath | Store, storage_options: dict[str, Any] | None = None) -> None:
        self.store = open_store(root if isinstance(root, Store) else str(root), storage_options)
        self.root: PurePath = self.store.root

    def __repr__(self) -> str:
        return f"DataLayout({self.store.url_text!r})"

    def url(self, path: PurePath) -> str:
        """A path of this layout as the user knows it (local path or URL)."""
        return self.store.url(path)

    def records(self, shard: int) -> PurePath:
        return self.root / "records" / f"{shard_name(shard)}.parquet"

    def real(self, shard: int) -> PurePath:
        return self.root / "real" / f"{shard_name(shard)}.parquet"

    def gen(self, generator: str, shard: int) -> PurePath:
        return self.root / "gen" / safe_name(generator, "generator") / f"{shard_name(shard)}.parquet"

    def gen_part(self, generator: str, shard: int, part: int, parts: int) -> PurePath:
        """One part of a generated shard split by work (merged into `gen(generator, shard)` when all are done)."""
        return self.gen(generator, shard).parent / "parts" / f"{part_name(shard, part, parts)}.parquet"

    def d3_dir(self) -> PurePath:
        return self.root / "d3"

    def d3(self, split: str, shard: int) -> PurePath:
        split = safe_name(split, "split")
        return self.d3_dir() / split / f"{split}-{shard_name(shard)}.parquet"

    def extended(self, generator: str, shard: int) -> PurePath:
        return self.root / "extended" / safe_name(generator, "generator") / f"test-{shard_name(shard)}.parquet"

    def stats(self, stage: str, shard: int, unit: str | None = None, part: tuple[int, int] | None = None) -> PurePath:
        folder = self.root / "stats" / safe_name(stage, "stage")
        if unit is not None:
            folder = folder / safe_name(unit, "unit")
        if part is not None:
            return folder / "parts" / f"{part_name(shard, *part)}.json"
        return folder / f"{shard_name(shard)}.json"

    def transform_stats(self, split: str, shard: int) -> PurePath:
        """The stats of transform-test's unit (source split, shard): stats/transform_test/{k}.json for test, .../{split}/{k}.json else."""
        return self.stats(TRANSFORM_STAGE, shard, None if split == SOURCE_SPLIT else split)

    def leases(self, stage: str, unit_key: str) -> PurePath:
        """The folder of one unit's lease files (`{epoch}.json`, the highest is current)."""
        return self.root / "leases" / safe_name(stage, "stage") / unit_key

    def history(self, stage: str, unit_key: str) -> PurePath:
        """The folder of one unit's completion and failure records (one file per event)."""
        return self.root / "history" / safe_name(stage, "stage") / unit_key

    def record_shards(self) -> list[int]:
        """Shard numbers written by `select`, in order."""
        return sorted(shard_number(p) for p in self.store.glob(self.root / "records" / "[0-9]*.parquet"))

    def wanted_shards(self, shards: Sequence[int] | None) -> list[int]:
        """The records shards a stage runs on: `shards` (sorted, distinct) or every one; UsageError when none."""
        wanted = self.record_shards() if shards is None else sorted(set(shards))
        if not wanted:
            raise UsageError(f"no records shards under {self.url(self.root / 'records')}: run `d3builder select` first")
        return wanted
