"""Parquet over fsspec (local paths or URLs) and real images by record id for shards without `image_real`."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from codetrain.errors import InvalidInputError, MissingInputError
from d3builder.storage.layout import safe_name

log = logging.getLogger(__name__)

OK_STATUS = "success"
"""img2dataset's status of a downloaded image; other rows of a `real/` shard hold no usable image."""
SHARD_SUFFIX = ".parquet"
"""Files of a split with this suffix are shards; any other file is one image."""
FETCH_REALS = "d3builder fetch-real --elsa DATA --output-root DIR, then pass --real-source DIR/real"
"""How a user gets the reals of the published ELSA_D3 layout (it keeps only their `url`)."""


def is_shard(path: str) -> bool:
    """Whether a split's file is a Parquet shard (else it is one image file)."""
    return str(path).lower().endswith(SHARD_SUFFIX)


def is_local(url: str) -> bool:
    """Whether `url` is a plain local path (no fsspec protocol)."""
    return "://" not in url


def open_parquet(url: str) -> pq.ParquetFile:
    """Open a Parquet file for row-group reads: a local path memory-mapped, a URL through fsspec with range reads.

    A server without HTTP range support (ValueError from fsspec) gets the file fetched whole
    into memory instead, one file at a time.
    """
    if is_local(url):
        return pq.ParquetFile(url, memory_map=True)  # reads straight from the page cache, no copy
    fs, path = fsspec.core.url_to_fs(url)
    try:
        return pq.ParquetFile(fs.open(path, "rb"))
    except pa.ArrowException:
        raise
    except ValueError as exc:
        log.debug("%s: no range reads (%s); fetching it whole", url, exc)
        return pq.ParquetFile(pa.BufferReader(fs.cat_file(path)))


def join_url(base: str, name: str) -> str:
    """`base/name` for a local path or an fsspec URL."""
    return f"{base.rstrip('/')}/{name}"


def full_name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as fsspec listed it, turned back into something `fsspec.open` (or open) accepts."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


class RealImageSource:
    """Real image bytes by record id from `real/{k}.parquet` shards (id, status, image) or a folder of `{id}.<ext>` files.

    `source` is a local folder or an fsspec URL: the `real/` folder itself, a folder holding
    `real/`, or a folder of image files. The id index is built on first use in each process.
    """

    def __init__(self, source: str, cached_row_groups: int = 4) -> None:
        self.source = str(source).rstrip("/")
        self.cached_row_groups = cached_row_groups
        self._index: dict[str, Any] | None = None
        self._shards: list[str] = []
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the index or cached row groups (each process builds its own)."""
        return {**self.__dict__, "_index": None, "_shards": [], "_cache": OrderedDict(), "_files": OrderedDict()}

    def get(self, record_id: str) -> bytes | None:
        """The real image's encoded bytes, or None when the source has no (successful) image for it."""
        safe_name(record_id, "record id")
        index = self._ensure_index()
        where = index.get(record_id)
        if where is None:
            return None
        if isinstance(where, str):
            with fsspec.open(where, "rb") as fh:
                return fh.read()
        return self._parquet_image(*where)

    def __len__(self) -> int:
        return len(self._ensure_index())

    def has(self, record_id: str) -> bool:
        """Whether the source holds a (successful) real image for `record_id` (an unsafe id: False)."""
        try:
            safe_name(record_id, "record id")
        except ValueError:
            return False
        return record_id in self._ensure_index()

    def describe(self) -> str:
        """Where this source looked for reals and what it found, for messages."""
        index = self._ensure_index()
        if self._shards:
            return f"{len(self._shards)} real/ shard(s) under {self.source} ({len(index)} rows with status {OK_STATUS})"
        return f"files named {{id}}.<ext> or real/*.parquet shards in {self.source} ({len(index)} image files found)"

    def _ensure_index(self) -> dict[str, Any]:
        if self._index is None:
            fs, root = fsspec.core.url_to_fs(self.source)
            for folder in (root, join_url(root, "real")):
                shards = sorted(fs.glob(join_url(folder, "*.parquet")))
                if shards:
                    self._shards = [full_name(fs, s) for s in shards]
                    self._index = self._index_parquet()
                    break
            else:
                self._index = self._index_files(fs, root)
            log.info("real images: %d ids indexed from %s", len(self._index), self.source)
        return self._index

    def _index_parquet(self) -> dict[str, Any]:
        """id -> (shard, row group, row) of every successful row."""
        index: dict[str, Any] = {}
        for k in range(len(self._shards)):
            parquet = self._file(k)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=["id", "status"])
                ok = pc.equal(table["status"], OK_STATUS).to_pylist()
                for row, (rid, good) in enumerate(zip(table["id"].to_pylist(), ok, strict=True)):
                    if good and rid is not None:
                        index[rid] = (k, group, row)
        return index

    def _index_files(self, fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any]:
        """id -> file URL of every `{id}.<ext>` file with a safe name."""
        index: dict[str, Any] = {}
        for path in sorted(fs.ls(root, detail=False)):
            name = PurePosixPath(path.rstrip("/")).name
            stem = name.rsplit(".", 1)[0] if "." in name else ""
            try:
                safe_name(name, "file name")
                safe_name(stem, "record id")
            except ValueError:
                continue
            index.setdefault(stem, full_name(fs, path))
        return index

    def _parquet_image(self, shard: int, group: int, row: int) -> bytes | None:
        key = (shard, group)
        images = self._cache.get(key)
        if images is not None:
            self._cache.move_to_end(key)
        else:
            table = self._file(shard).read_row_group(group, columns=["image"])
            images = pc.struct_field(table["image"].combine_chunks(), "bytes")
            _remember(self._cache, key, images, self.cached_row_groups)
        return images[row].as_py()

    def _file(self, shard: int) -> pq.ParquetFile:
        parquet = self._files.get(shard)
        if parquet is None:
            parquet = open_parquet(self._shards[shard])
            _remember(self._files, shard, parquet, self.cached_row_groups)
        return parquet


def _remember(cache: OrderedDict, key: Any, value: Any, size: int) -> None:
    """Put `value` in an LRU dict, evicting the oldest entries beyond `size`."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def require_real_images(without_real: Sequence[str], real_source: RealImageSource | None, data: str) -> None:
    """Refuse shards without `image_real` (the published ELSA_D3 layout) unless `real_source` has a real of theirs.

    `without_real` lists those shards (from their footers); the one-line UserError names `--real-source`,
    where the reals were looked for and how to provide them.
    """
    if not without_real:
        return
    if real_source is None:
        raise MissingInputError(f"--real-source: {len(without_real)} shard(s) of {data} (e.g. {without_real[0]}) carry no "
                                f"real image (the published ELSA_D3 layout keeps only `url`): {FETCH_REALS}")
    try:
        for shard in without_real:
            if any(real_source.has(str(i)) for i in open_parquet(shard).read(columns=["id"]).column("id").to_pylist()):
                return
        where = real_source.describe()
    except OSError as exc:
        raise InvalidInputError(f"--real-source {real_source.source}: cannot read it: {exc}; {FETCH_REALS}") from exc
    raise InvalidInputError(f"--real-source {real_source.source}: no real image for any record of {data}: "
                            f"looked in {where}; {FETCH_REALS}")
