"""Folders on any fsspec filesystem (local path, file://, memory://, s3://, gs://, ...) with atomic writes.

A write is atomic on every backend: a local file goes to a temporary sibling, is fsynced and
renamed into place; on an object store it is one complete object upload. Credentials and
endpoints follow fsspec's conventions (the standard environment variables, e.g. AWS_* and
AWS_ENDPOINT_URL for S3) plus optional `storage_options`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from codetrain.errors import InvalidInputError, MissingInputError, UserError
from d3builder.storage.shards import atomic_write_bytes

log = logging.getLogger(__name__)

Location = Path | str
"""Where a file lies: a local Path, or a URL string on a remote filesystem."""


class StorageError(UserError, ValueError):
    """A URL whose filesystem is unknown or not installed."""


def url_scheme(url: str) -> str | None:
    """The protocol of a URL (`s3`, `memory`, ...), None for a plain local path."""
    return fsspec.core.split_protocol(str(url))[0]


def is_remote(url: str | Path) -> bool:
    """Whether `url` names a non-local filesystem."""
    return url_scheme(str(url)) not in (None, "file", "local")


def package_for(scheme: str) -> str:
    """The package that implements an fsspec scheme (e.g. s3 -> s3fs), or the scheme itself when unknown."""
    return known_implementations.get(scheme, {}).get("class", scheme).split(".")[0]


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path on it) of a URL; StorageError in one line naming the scheme and the package to install."""
    scheme = url_scheme(url)
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise StorageError(f"{url}: the {scheme}:// scheme needs a package that is not installed: "
                           f"pip install {package_for(scheme or '')}") from exc
    except ValueError as exc:
        if "not known" not in str(exc):
            raise
        raise StorageError(f"{url}: unsupported URL scheme {scheme}:// (no fsspec filesystem implements it)") from exc
    except TypeError as exc:
        raise StorageError(f"{url}: storage_options do not suit the {scheme}:// filesystem: {exc}") from exc


def _cat(fs: fsspec.AbstractFileSystem, path: str, where: str) -> bytes:
    """The bytes of one file; MissingInputError / InvalidInputError naming `where`."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise MissingInputError(f"{where} does not exist") from exc
    except IsADirectoryError as exc:
        raise InvalidInputError(f"{where} is a folder, not a file") from exc


def read_url(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a local file or a file at an fsspec URL."""
    fs, path = filesystem(str(url), storage_options)
    return _cat(fs, path, str(url))


@contextlib.contextmanager
def storage_defaults(urls: Iterable[str | None], storage_options: Mapping[str, Any] | None) -> Iterator[None]:
    """Make `storage_options` fsspec's defaults for the schemes of the remote `urls` while the block runs.

    Code that opens those URLs without taking options (shard readers, DataLoader workers
    forked meanwhile) then uses the same credentials and endpoint.
    """
    schemes = {url_scheme(u) for u in urls if u and is_remote(u)}
    if not storage_options or not schemes:
        yield
        return
    saved = {s: fsspec.config.conf.get(s) for s in schemes}
    for scheme in schemes:
        fsspec.config.conf[scheme] = {**(saved[scheme] or {}), **storage_options}
    try:
        yield
    finally:
        for scheme, value in saved.items():
            if value is None:
                fsspec.config.conf.pop(scheme, None)
            else:
                fsspec.config.conf[scheme] = value


@contextlib.contextmanager
def open_text_output(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[tuple[TextIO, Location]]:
    """(handle, location) of a text file to write: a local file (folders created) or a URL (one object, uploaded on close)."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        local = Path(path) if url_scheme(url) else Path(url)
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "w", newline="", encoding="utf-8") as fh:
            yield fh, local
    else:
        with fs.open(path, "w", newline="", encoding="utf-8") as fh:
            yield fh, url


@dataclass(frozen=True)
class Store:
    """A folder at a local path or fsspec URL: names inside it are relative POSIX paths ("a/b.json")."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    """The folder's path on `fs` (no protocol)."""

    @classmethod
    def open(cls, url: str | Path | Store, storage_options: Mapping[str, Any] | None = None) -> Store:
        """The store of a local path or URL (a Store is returned as is)."""
        if isinstance(url, Store):
            return url
        text = str(url)
        fs, root = filesystem(text, storage_options)
        trimmed = text.rstrip("/")
        return cls(trimmed or text, fs, root.rstrip("/") or root)

    @property
    def is_local(self) -> bool:
        """Whether the folder is on the local filesystem (a plain path or file://)."""
        return isinstance(self.fs, LocalFileSystem)

    def _path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def child(self, name: str) -> Store:
        """The store of a sub-folder."""
        return Store(self.location_text(name), self.fs, self._path(name))

    def location_text(self, name: str = "") -> str:
        """The path or URL of `name` as text (for messages and for tools that take URLs)."""
        return f"{self.url}/{name}" if name else self.url

    def location(self, name: str = "") -> Location:
        """A local Path (plain path as given, file:// resolved), or the URL of a remote file."""
        if not self.is_local:
            return self.location_text(name)
        base = Path(self.root) if url_scheme(self.url) else Path(self.url)
        return base / name if name else base

    def local_path(self, name: str = "") -> Path:
        """The local Path of `name`; only for local stores."""
        location = self.location(name)
        if not isinstance(location, Path):
            raise TypeError(f"{location} is not on the local filesystem")
        return location

    def exists(self, name: str = "") -> bool:
        return bool(self.fs.exists(self._path(name)))

    def is_file(self, name: str) -> bool:
        return bool(self.fs.isfile(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        """The bytes of a file; MissingInputError naming it when absent."""
        return _cat(self.fs, self._path(name), self.location_text(name))

    def read_text(self, name: str) -> str:
        """A UTF-8 text file."""
        data = self.read_bytes(name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{self.location_text(name)} is not UTF-8 text: {exc}") from exc

    def write_bytes(self, name: str, data: bytes) -> Location:
        """Write a file atomically (local: temporary sibling, fsync, rename; remote: one object upload)."""
        if self.is_local:
            return atomic_write_bytes(self.local_path(name), data)
        self.fs.pipe_file(self._path(name), data)
        return self.location(name)

    def write_text(self, name: str, text: str) -> Location:
        return self.write_bytes(name, text.encode("utf-8"))

    def remove(self, name: str, recursive: bool = False) -> None:
        """Delete a file (or a folder with `recursive`); nothing happens when it is absent."""
        path = self._path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def names(self, name: str = "") -> list[str]:
        """The entries directly inside a folder (names only, sorted); empty when it does not exist."""
        self.fs.invalidate_cache(self._path(name))
        try:
            entries = self.fs.ls(self._path(name), detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(e.rstrip("/")).name for e in entries if e.rstrip("/") != self._path(name))

    def files(self, name: str = "") -> list[str]:
        """Every file below a folder, as names relative to this store, sorted."""
        base = self._path(name)
        self.fs.invalidate_cache(base)
        found = self.fs.find(base) if self.fs.exists(base) else []
        return sorted(f"{name}/{p[len(base):].lstrip('/')}".lstrip("/") for p in found)

    def upload(self, folder: Path, name: str = "", last: Iterable[str] = ()) -> list[Location]:
        """Copy every file of a local folder into `name`, one atomic write each; the `last` names go last."""
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        late = [n for n in last if n in names]
        written = []
        for rel in [n for n in names if n not in late] + late:
            written.append(self.write_bytes(f"{name}/{rel}".lstrip("/"), (folder / rel).read_bytes()))
        return written

    def download(self, name: str, folder: Path) -> int:
        """Copy every file below `name` into a local folder; returns how many."""
        count = 0
        for rel in self.files(name):
            target = folder / rel[len(name):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(rel))
            count += 1
        return count


@contextlib.contextmanager
def local_folder(store: Store, preload: Iterable[str] = (), last: Iterable[str] = ()) -> Iterator[Path]:
    """A local folder to write `store`'s files into: the folder itself when local, else a temporary one uploaded at the end.

    For a remote store, the files below each `preload` name are downloaded first (e.g. a
    cache), and the `last` files are uploaded after all others. Nothing is uploaded when
    the block raises.
    """
    if store.is_local:
        path = store.local_path()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="codetrain-") as scratch:
        path = Path(scratch)
        for name in preload:
            store.download(name, path / name)
        yield path
        written = store.upload(path, last=last)
        log.info("uploaded %d files to %s", len(written), store.url)
