"""Storage through fsspec: every input and output of d3builder (and codetrain's run folders) goes through a `Store`.

A `Store` is one root on one filesystem: a local folder (`runs/tiny`, `file:///data/d3`), an object store
(`s3://bucket/d3`, `gs://bucket/d3`), `memory://d3` (in-process, for tests), or, read-only, anything else fsspec
reads (`hf://datasets/...`, `https://...`). Credentials and endpoints follow each ecosystem's conventions
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for S3-compatible servers, which s3fs and
botocore read; `GOOGLE_APPLICATION_CREDENTIALS` for GCS); `storage_options` (the manifest's optional
`storage_options:` block) go to the filesystem's constructor on top of them.

    store = open_store("s3://bucket/d3", {"client_kwargs": {...}})   # StorageError: one line naming the scheme
    path = store.root / "records" / "00000.parquet"   # a pathlib.Path for local roots, a PurePosixPath elsewhere
    store.url(path)                                    # "s3://bucket/d3/records/00000.parquet", for messages
    store.location(path)                               # a local Path, or that URL (what results report)
    store.exists(path), store.isfile(path), store.glob(store.root / "records" / "*.parquet"), store.size(path)
    store.listdir(folder), store.find(folder)          # a folder's entries; every file below it
    with store.open(path) as fh: ...                   # read (binary)
    store.read_bytes(path), store.read_text(path), store.read_json(path), store.read_table(path, columns)
    store.write_bytes(path, data), store.write_text(path, text), store.write_json(path, obj)   # atomic (below)
    with store.atomic_writer(path) as fh: ...          # a large file, committed only if the block succeeds
    store.create_exclusive(path, data) -> bool         # False when the object already exists (claims)
    store.remove(path), store.remove_tree(path), store.remove_temporaries(path)
    store.child("eval")                                # the store of a folder below the root
    store.upload(local_folder, path), store.download(path, local_folder)
    with store.local_workspace() as folder: ...        # a local folder whose files land in the store at the end

Paths of remote stores are PurePosixPaths: they have no I/O methods, so code that forgets the store fails
loudly instead of writing a local folder named `s3:`.

Atomic commit, per backend: local = a hidden temporary sibling, fsync, rename, fsync of the folder; object
stores = one complete object upload (fsspec's `autocommit=False`: a multipart upload completed on commit,
aborted on error; a killed writer leaves no visible object); memory = the whole object stored at once. A
reader never sees a half file. `create_exclusive` is O_EXCL on POSIX and a conditional create
(`If-None-Match: *`) on S3.

`atomic_write_bytes(where, data)` / `atomic_write_json(where, obj)` take a local path or a URL, for callers
without a Store. `storage_defaults(urls, options)` makes a config's `storage_options` fsspec's defaults while
a command runs, for code that opens URLs without taking options (dataset readers, DataLoader workers).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, Any, Callable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import known_implementations

from d3builder.core.commandline import UsageError

WRITABLE_SCHEMES = ("file", "local", "memory", "s3", "s3a", "gs", "gcs")
"""Schemes an output root may use: these commit a file atomically and create claims exclusively."""

TEMP_MARK = ".tmp-"
"""Temporary siblings of a local file are named `.{name}.tmp-{pid}-{random}`."""

Location = Path | str
"""Where a file lies, as results report it: a local Path, or a URL on another filesystem."""

log = logging.getLogger(__name__)


class StorageError(UsageError, ValueError):
    """A storage URL that cannot be used (unknown scheme, filesystem not installed, read-only); one line."""


def json_bytes(obj: Any) -> bytes:
    """`obj` as the JSON documents of a store are written: indented, keys sorted, one trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def _scheme(url: str) -> str | None:
    """The fsspec protocol of `url`, or None for a plain local path."""
    protocol, _ = fsspec.core.split_protocol(str(url))
    return protocol


def is_url(location: str | PurePath) -> bool:
    """Whether `location` names a filesystem other than a plain local path."""
    return _scheme(str(location)) not in (None, "file", "local")


def install_hint(protocol: str) -> str:
    """What to install for `protocol`: `pip install PACKAGE` for a filesystem in its own package, else fsspec's hint."""
    known = known_implementations.get(protocol, {})
    package = known.get("class", "").split(".")[0]
    if package and package != "fsspec":
        return f"pip install {package}"
    return known.get("err") or f"install the fsspec filesystem for {protocol}"


def _filesystem_class(url: str, protocol: str, writable: bool) -> type[fsspec.AbstractFileSystem]:
    """The fsspec class of `protocol`, or a StorageError naming the scheme and the package to install."""
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise StorageError(f"{url}: the {protocol}:// filesystem is not installed: {install_hint(protocol)}") from exc
    except ValueError as exc:
        known = (f"writable: {', '.join(s + '://' for s in WRITABLE_SCHEMES)} or a local path" if writable
                 else "no fsspec filesystem implements it")
        raise StorageError(f"{url}: unknown storage scheme {protocol}:// ({known})") from exc


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_temp(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


class AtomicFile:
    """A file being written that appears at its path only on `commit()`; `discard()` drops it."""

    def __init__(self, store: Store, path: PurePath) -> None:
        self.store, self.path = store, path
        self._temp: Path | None = None
        if store.local:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._temp = _local_temp(path)
            self.file: IO[bytes] = open(self._temp, "wb")
        elif isinstance(store.fs, MemoryFileSystem):
            self.file = io.BytesIO()
        else:
            self.file = store.fs.open(str(path), "wb", autocommit=False)

    def commit(self, guard: Callable[[], None] | None = None) -> PurePath:
        """Finish the upload (or fsync), call `guard` (it may raise to abandon), then make the file visible."""
        try:
            if self._temp is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                if guard is not None:
                    guard()
                os.replace(self._temp, self.path)
                fsync_dir(Path(self.path).parent)
            elif isinstance(self.file, io.BytesIO):
                if guard is not None:
                    guard()
                self.store.fs.pipe_file(str(self.path), self.file.getvalue())
            else:
                self.file.close()  # uploads what is left; with autocommit=False nothing is visible yet
                if guard is not None:
                    guard()
                self.file.commit()
        except BaseException:
            self.discard()
            raise
        return self.path

    def discard(self) -> None:
        """Drop what was written (the temporary file, or the unfinished multipart upload)."""
        if self._temp is not None:
            self.file.close()
            self._temp.unlink(missing_ok=True)
        elif not isinstance(self.file, io.BytesIO):
            with contextlib.suppress(Exception):
                self.file.discard()
            self.file.closed = True  # never flushed (and so committed) when garbage-collected


class Store:
    """One root on one fsspec filesystem; see the module docstring for the API."""

    def __init__(self, url: str | Path, storage_options: Mapping[str, Any] | None = None, writable: bool = True) -> None:
        url = str(url)
        protocol = _scheme(url)
        options = dict(storage_options or {})
        if protocol in (None, "file", "local"):
            self.fs: fsspec.AbstractFileSystem = LocalFileSystem()
            self.root: PurePath = Path(url if protocol is None else LocalFileSystem._strip_protocol(url))
            self.local = True
        else:
            cls = _filesystem_class(url, protocol, writable)  # an unknown or missing filesystem is named first
            if writable and protocol not in WRITABLE_SCHEMES:
                raise StorageError(f"{url}: {protocol}:// is read-only here; write to a local path or one of "
                                   f"{', '.join(s + '://' for s in WRITABLE_SCHEMES if s not in ('file', 'local'))}")
            if protocol in ("s3", "s3a"):
                options.setdefault("use_listings_cache", False)  # other workers change the listings under us
            try:
                self.fs = cls(**options)
            except (TypeError, ValueError) as exc:
                raise StorageError(f"{url}: storage_options rejected by {cls.__name__}: {exc}") from exc
            self.root = PurePosixPath(cls._strip_protocol(url).rstrip("/") or "/")
            self.local = False
        self.url_text, self.storage_options = url, options

    def __repr__(self) -> str:
        return f"Store({self.url_text!r})"

    def url(self, path: PurePath | None = None) -> str:
        """`path` (default: the root) as the user knows it: a local path, or a URL as given (for messages and stats)."""
        path = self.root if path is None else path
        if self.local:
            return str(path)
        if PurePath(path).is_relative_to(self.root):
            relative = self.relative(path)
            return self.url_text.rstrip("/") + ("" if relative == "." else f"/{relative}")
        return self.fs.unstrip_protocol(str(path))

    def location(self, path: PurePath | None = None) -> Location:
        """`path` (default: the root) as results report it: a local Path, or its URL."""
        return Path(self.root if path is None else path) if self.local else self.url(path)

    def child(self, *names: str) -> Store:
        """The store of a folder below the root (same filesystem and options)."""
        sub = copy.copy(self)
        sub.root = self.root.joinpath(*names)
        sub.url_text = self.url(sub.root)
        return sub

    def relative(self, path: PurePath) -> str:
        """`path` relative to the root, POSIX style (what stats files record)."""
        return PurePosixPath(PurePath(path).relative_to(self.root)).as_posix()

    def _fresh(self, path: PurePath) -> None:
        if not self.local:
            self.fs.invalidate_cache(str(path))

    def exists(self, path: PurePath) -> bool:
        self._fresh(path)
        return self.fs.exists(str(path))

    def isfile(self, path: PurePath) -> bool:
        self._fresh(path)
        return self.fs.isfile(str(path))

    def isdir(self, path: PurePath) -> bool:
        self._fresh(path)
        return self.fs.isdir(str(path))

    def size(self, path: PurePath) -> int:
        return int(self.fs.size(str(path)))

    def glob(self, pattern: PurePath) -> list[PurePath]:
        """Files matching `pattern` (`*`, `?`, `[..]` per path component), sorted, as paths of this store."""
        if self.local:  # pathlib keeps a relative root relative
            parts = PurePath(pattern).parts
            fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
            base = Path(*parts[:fixed]) if fixed else Path(".")
            if fixed == len(parts):
                return [base] if base.is_file() else []
            return sorted(p for p in base.glob("/".join(parts[fixed:])) if p.is_file())
        self._fresh(PurePath(pattern).parent)
        return sorted(PurePosixPath(p) for p in self.fs.glob(str(pattern)) if not self.fs.isdir(p))

    def listdir(self, path: PurePath) -> list[PurePath]:
        """The entries of a folder (files and folders), sorted; [] when it does not exist."""
        if self.local:
            return sorted(Path(path).iterdir()) if Path(path).is_dir() else []
        self._fresh(path)
        try:
            names = self.fs.ls(str(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(n) for n in names if PurePosixPath(n) != PurePosixPath(path))

    def find(self, path: PurePath | None = None) -> list[PurePath]:
        """Every file below a folder (default: the root), sorted; [] when it does not exist."""
        path = self.root if path is None else path
        if self.local:
            return sorted(p for p in Path(path).rglob("*") if p.is_file())
        self._fresh(path)
        return sorted(PurePosixPath(p) for p in self.fs.find(str(path))) if self.fs.isdir(str(path)) else []

    def open(self, path: PurePath, mode: str = "rb") -> IO[bytes]:
        """Open a file for reading (binary); writes go through `atomic_file` or `write_bytes`."""
        if "r" not in mode:
            raise ValueError("Store.open reads; write with atomic_file, write_bytes or create_exclusive")
        return self.fs.open(str(path), mode)

    def read_bytes(self, path: PurePath) -> bytes:
        """A whole file; FileNotFoundError naming its URL when it is absent."""
        try:
            return self.fs.cat_file(str(path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(errno.ENOENT, "no such file", self.url(path)) from exc

    def read_text(self, path: PurePath) -> str:
        """A UTF-8 text file."""
        return self.read_bytes(path).decode("utf-8")

    def read_json(self, path: PurePath) -> Any:
        return json.loads(self.read_bytes(path))

    def parquet_file(self, path: PurePath) -> pq.ParquetFile:
        """A ParquetFile for row-group reads (a local path directly; other stores through an open fsspec file)."""
        return pq.ParquetFile(str(path) if self.local else self.open(path))

    def read_table(self, path: PurePath, columns: list[str] | None = None) -> pa.Table:
        """Read a Parquet file (or some of its columns)."""
        if self.local:
            return pq.read_table(str(path), columns=columns)
        with self.open(path) as fh:
            return pq.read_table(fh, columns=columns)

    def read_schema(self, path: PurePath) -> pa.Schema:
        """A Parquet file's Arrow schema (its footer only)."""
        return self.parquet_file(path).schema_arrow

    def atomic_file(self, path: PurePath) -> AtomicFile:
        """Start writing `path`; call `.commit()` (or use as a context manager) to make it visible."""
        return AtomicFile(self, path)

    @contextlib.contextmanager
    def atomic_writer(self, path: PurePath, encoding: str | None = None) -> Iterator[IO]:
        """`with store.atomic_writer(path) as fh:` commits `path` when the block ends without error.

        With `encoding`, `fh` takes text (newlines written as given, as the csv module wants)."""
        target = self.atomic_file(path)
        handle = target.file if encoding is None else io.TextIOWrapper(target.file, encoding=encoding, newline="")
        try:
            yield handle
            if encoding is not None:
                handle.detach()  # flushes the text into the file, which stays open for the commit
        except BaseException:
            target.discard()
            raise
        target.commit()

    def write_bytes(self, path: PurePath, data: bytes) -> PurePath:
        """Write a whole file atomically (local: temp + fsync + rename; elsewhere: one PUT)."""
        if self.local:
            with self.atomic_writer(path) as fh:
                fh.write(data)
        else:
            self.fs.pipe_file(str(path), data)
        return path

    def write_text(self, path: PurePath, text: str) -> PurePath:
        """Write a UTF-8 text file atomically."""
        return self.write_bytes(path, text.encode("utf-8"))

    def write_json(self, path: PurePath, obj: Any) -> PurePath:
        """Write a JSON document atomically."""
        return self.write_bytes(path, json_bytes(obj))

    def create_exclusive(self, path: PurePath, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists (POSIX O_EXCL, S3 If-None-Match); False when it existed."""
        if self.local:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        try:
            self.fs.pipe_file(str(path), data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, path: PurePath) -> None:
        """Delete a file if it exists."""
        try:
            self.fs.rm_file(str(path))
        except FileNotFoundError:
            pass

    def remove_tree(self, path: PurePath) -> None:
        """Delete a folder and everything below it, if it exists."""
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
        elif self.exists(path):
            self.fs.rm(str(path), recursive=True)

    def remove_temporaries(self, path: PurePath) -> list[PurePath]:
        """Delete the temporary files killed writers of `path` (or of any file in folder `path`) left.

        Local only: other stores never show a file before it is complete."""
        if not self.local:
            return []
        path = Path(path)
        if path.is_dir():
            found = list(path.glob(f".*{TEMP_MARK}*"))
        else:
            found = list(path.parent.glob(f".{path.name}{TEMP_MARK}*")) if path.parent.is_dir() else []
        for stale in found:
            stale.unlink(missing_ok=True)
        return found

    def upload(self, folder: Path, path: PurePath | None = None, last: Iterable[str] = ()) -> list[PurePath]:
        """Copy every file of a local folder below `path` (default: the root), one atomic write each.

        The `last` files (names relative to `folder`) are written after all the others."""
        path = self.root if path is None else path
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        late = [n for n in last if n in names]
        return [self.write_bytes(path / name, (folder / name).read_bytes()) for name in
                [n for n in names if n not in late] + late]

    def download(self, path: PurePath, folder: Path) -> int:
        """Copy every file below `path` into a local folder; returns how many."""
        found = self.find(path)
        for source in found:
            target = folder / PurePath(source).relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(source))
        return len(found)

    @contextlib.contextmanager
    def local_workspace(self, preload: Iterable[str] = (), last: Iterable[str] = ()) -> Iterator[Path]:
        """A local folder whose files end up in the store: the root itself when local, else a temporary folder uploaded
        when the block ends (nothing is uploaded when it raises).

        For a remote store the files below each `preload` name are downloaded first (e.g. a cache) and the `last`
        names are uploaded after all the others."""
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            yield Path(self.root)
            return
        with tempfile.TemporaryDirectory(prefix="d3code-") as scratch:
            folder = Path(scratch)
            for name in preload:
                self.download(self.root / name, folder / name)
            yield folder
            log.info("uploaded %d files to %s", len(self.upload(folder, last=last)), self.url())

    def scratch(self, *parts: str) -> Path:
        """A local working folder for one job (img2dataset's files): under the root when local, else under TMPDIR."""
        if self.local:
            return Path(self.root, ".tmp", *parts)
        key = uuid.uuid5(uuid.NAMESPACE_URL, self.url_text).hex[:12]
        return Path(tempfile.gettempdir(), f"d3builder-scratch-{key}", *parts)


def open_store(url: str | Path | Store, storage_options: Mapping[str, Any] | None = None, writable: bool = True) -> Store:
    """The Store of `url` (checked now: an unknown or missing filesystem raises StorageError); a Store as it is."""
    return url if isinstance(url, Store) else Store(url, storage_options, writable)


@contextlib.contextmanager
def storage_defaults(urls: Iterable[str | Path | None], storage_options: Mapping[str, Any] | None) -> Iterator[None]:
    """Make `storage_options` fsspec's defaults for the schemes of the remote `urls` while the block runs.

    Code that opens those URLs without taking options (shard readers, DataLoader workers forked meanwhile)
    then uses the same credentials and endpoint."""
    schemes = {_scheme(str(u)) for u in urls if u and is_url(u)}
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


def atomic_write_bytes(where: str | Path, data: bytes, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Write bytes to a local path (temp sibling, fsync, rename) or a URL (one object); returns its location."""
    store = open_store(where, storage_options)
    return store.location(store.write_bytes(store.root, data))


def atomic_write_json(where: str | Path, obj: Any, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Write a JSON document atomically to a local path or a URL."""
    return atomic_write_bytes(where, json_bytes(obj), storage_options)
