"""`kind: folder`: images made elsewhere from our captions, one per record id, kept byte for byte.

An image is found through the entry's `index` (CSV or Parquet: id, then path or url) or else as the one
`{id}.{ext}` file in `folder`. Provenance comes from the entry's `provenance:` mapping, overridden per
record by the index's provenance columns (seed, model, num_inference_steps, ...).
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import requests

from d3builder.generators.backends.base import Columns, Job, failed, ready_encoded
from d3builder.generators.backends.transport import FetchError, Limits, fetch
from d3builder.generators.checker import RegistryError
from d3builder.generators.kinds import (
    PROVENANCE_TYPES,
    FolderEntry,
    check_provenance_value,
)
from d3builder.generators.results import GenerationResult

PIPELINE = "folder"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
INDEX_COLUMNS = ("id", "path", "url", *PROVENANCE_TYPES)
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class IndexRow:
    """One record's line of the index: where its image is (path or url; neither: look in the folder), its provenance."""

    path: str | None = None
    url: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _coerce(column: str, value: Any) -> Any:
    """An index cell as its provenance type (CSV cells arrive as text)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return None
        wanted = PROVENANCE_TYPES[column]
        if wanted is bool and text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        if wanted in (int, float):
            try:
                return wanted(text)
            except ValueError:
                raise ValueError(f"must be {wanted.__name__}, got {value!r}") from None
    return check_provenance_value(column, value)


def _index_rows(path: Path) -> Iterable[dict[str, Any]]:
    """The index file's rows as dicts (CSV with a header line, or Parquet)."""
    if path.suffix.lower() == ".parquet":
        yield from pq.read_table(path).to_pylist()
        return
    with open(path, newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def read_index(entry: FolderEntry) -> dict[str, IndexRow]:
    """The entry's index, id -> IndexRow (RegistryError naming the file, row and column of any problem)."""
    assert entry.index is not None
    path = Path(entry.index)
    where = f"{entry.source}: entry '{entry.name}': key 'index': {path}"
    if not path.is_file():
        raise RegistryError(f"{where}: file does not exist")
    rows: dict[str, IndexRow] = {}
    try:
        for number, raw in enumerate(_index_rows(path), start=1):
            unknown = [c for c in raw if c not in INDEX_COLUMNS]
            if unknown:
                raise RegistryError(f"{where}: unknown column {unknown[0]!r} (allowed: {', '.join(INDEX_COLUMNS)})")
            record = str(raw.get("id") or "").strip()
            if not record:
                raise RegistryError(f"{where}: row {number}: empty id")
            if record in rows:
                raise RegistryError(f"{where}: row {number}: id {record!r} is listed twice")
            location = {k: (str(raw.get(k) or "").strip() or None) for k in ("path", "url")}
            if location["path"] and location["url"]:
                raise RegistryError(f"{where}: row {number}: give path or url, not both")
            fields = {}
            for column in PROVENANCE_TYPES:
                try:
                    fields[column] = _coerce(column, raw.get(column))
                except ValueError as exc:
                    raise RegistryError(f"{where}: row {number}: column {column!r}: {exc}") from None
            image_path = location["path"]
            if image_path is not None and not Path(image_path).is_absolute():
                image_path = str(path.parent / image_path)
            rows[record] = IndexRow(image_path, location["url"], {k: v for k, v in fields.items() if v is not None})
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise RegistryError(f"{where}: unreadable: {type(exc).__name__}: {exc}") from None
    return rows


def list_images(entry: FolderEntry) -> dict[str, list[Path]]:
    """The folder's image files by id (file stem); RegistryError when the folder does not exist."""
    assert entry.folder is not None
    folder = Path(entry.folder)
    if not folder.is_dir():
        raise RegistryError(f"{entry.source}: entry '{entry.name}': key 'folder': {folder} is not a folder")
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(path.stem, []).append(path)
    return files


def unmatched_files(entry: FolderEntry, ids: Iterable[str]) -> list[str]:
    """Images of the folder (file names) and of the index (index:<id>) that belong to none of `ids`."""
    wanted = set(ids)
    names = [p.name for stem, paths in list_images(entry).items() if stem not in wanted for p in paths] \
        if entry.folder else []
    names += [f"index:{record}" for record in read_index(entry) if record not in wanted] if entry.index else []
    return sorted(names)


class FolderBackend:
    """The entry's index and folder listing, read once."""

    def __init__(self, entry: FolderEntry) -> None:
        self.entry = entry
        self.index = read_index(entry) if entry.index else {}
        self.files = list_images(entry) if entry.folder else {}
        self.limits = Limits(entry.timeout_s, entry.max_image_bytes)
        self.session = requests.Session()

    def columns(self) -> Columns:
        """What the entry's provenance states; per-record index values fill in the rest row by row."""
        stated = dict(self.entry.provenance)
        in_index = {k for row in self.index.values() for k in row.fields}
        values = {k: stated.get(k) for k in ("model_revision", "scheduler", "dtype", "num_inference_steps",
                                              "guidance_scale", "safety_checker", "watermark")}
        not_recorded = {k: "stated neither in the folder entry's provenance nor in its index"
                        for k in (*values, "seed") if stated.get(k) is None and k not in in_index}
        not_recorded["jpeg_quality"] = "images made elsewhere are kept as they are; their JPEG quality is not known"
        return Columns(model=self.entry.model, pipeline=stated.get("pipeline") or PIPELINE, **values,
                       not_recorded=not_recorded, encoded_here=False)

    def provenance(self) -> dict[str, Any]:
        """Where the images come from and the provenance the entry states."""
        return {"generator": self.entry.name, "kind": self.entry.kind, "folder": self.entry.folder,
                "index": self.entry.index, "provenance": dict(self.entry.provenance),
                "images_in_folder": sum(len(p) for p in self.files.values()), "index_rows": len(self.index),
                "max_image_bytes": self.entry.max_image_bytes}

    def render(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """Each job's image as its source holds it."""
        return [self._one(job) for job in jobs]

    def _one(self, job: Job) -> GenerationResult:
        row = self.index.get(job.id, IndexRow())
        fields = {**self.entry.provenance, **row.fields}
        seed = fields.pop("seed", None)
        return dataclasses.replace(self._find(job, row), seed=seed, fields=fields)

    def _find(self, job: Job, row: IndexRow) -> GenerationResult:
        """The bytes of the job's image (via url, path or the folder), checked, or why there are none."""
        if row.url is not None:
            try:
                answer = fetch(self.session, "GET", row.url, self.limits)
            except FetchError as exc:
                return failed(job, exc.reason, exc.detail, pipeline=PIPELINE)
            if not 200 <= answer.status < 300:
                return failed(job, "http_status", f"HTTP {answer.status} for {row.url[:200]}", pipeline=PIPELINE)
            return ready_encoded(job, answer.body, self.entry.max_image_bytes, None, PIPELINE)
        if row.path is not None:
            paths = [Path(row.path)]
        else:
            paths = self.files.get(job.id, [])
        if not paths:
            where = " or ".join(str(s) for s in (self.entry.folder, self.entry.index) if s)
            return failed(job, "missing", f"no image for this id in {where}", pipeline=PIPELINE)
        if len(paths) > 1:
            return failed(job, "ambiguous", f"several files: {', '.join(p.name for p in paths)}", pipeline=PIPELINE)
        try:
            size = paths[0].stat().st_size
            if size > self.entry.max_image_bytes:
                return failed(job, "too_large", f"{paths[0].name}: {size} bytes, over max_image_bytes",
                              pipeline=PIPELINE)
            data = paths[0].read_bytes()
        except OSError as exc:
            return failed(job, "missing", f"{paths[0]}: {type(exc).__name__}: {exc.strerror}", pipeline=PIPELINE)
        return ready_encoded(job, data, self.entry.max_image_bytes, None, PIPELINE)
