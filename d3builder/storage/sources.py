"""Input Parquet sources (a path, glob, folder or fsspec URL) and the URL syntax every record source checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from fsspec.implementations.local import LocalFileSystem

URL_PATTERN = r"^https?://([^\s/?#@]*@)?(\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]]+)(:[0-9]*)?([/?#]|$)"
"""A usable URL: http or https, a non-empty host (name, IPv4 or [IPv6]), an optional numeric port (RE2 syntax)."""


class SourceError(ValueError):
    """An input source that does not exist or holds no Parquet file (the message names it)."""


def list_parquet_files(source: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and sorted parquet files of a path, glob, folder (searched recursively) or fsspec URL."""
    fs, path = fsspec.core.url_to_fs(source)
    if any(c in path for c in "*?["):
        files = fs.glob(path)
    elif fs.isdir(path):
        files = [f for f in fs.find(path) if f.endswith(".parquet")]
    elif fs.isfile(path):
        files = [path]
    else:
        raise SourceError(f"{source!r} does not exist")
    files = sorted(files)
    if not files:
        raise SourceError(f"{source!r} holds no parquet files")
    return fs, files


@dataclass(frozen=True)
class InputFile:
    """One input file: its name as the user knows it (with protocol) and its dataset fragment."""

    name: str
    fragment: ds.ParquetFileFragment


def open_parquet_inputs(source: str, required: Sequence[str], kind: str) -> list[InputFile]:
    """Every parquet file of `source`, each checked for the `required` columns (error names file and column)."""
    fs, files = list_parquet_files(source)
    local = isinstance(fs, LocalFileSystem)
    dataset = ds.dataset(files, filesystem=None if local else fs, format="parquet")
    inputs = []
    for fragment in dataset.get_fragments():
        name = fragment.path if local else fs.unstrip_protocol(fragment.path)
        try:
            names = fragment.physical_schema.names
        except (OSError, pa.ArrowInvalid) as exc:
            raise SourceError(f"{name}: not a readable parquet file: {exc}") from exc
        missing = [column for column in required if column not in names]
        if missing:
            more = f" (also missing: {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
            raise SourceError(f"{name}: missing required {kind} column {missing[0]!r}{more}")
        inputs.append(InputFile(name, fragment))
    return inputs
