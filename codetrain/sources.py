"""Where a command's splits come from: a dataset folder, an fsspec URL or a hub repo id, read through its card.

A source offers splits, each a sorted list of files, found in this order:

1. the `configs` of its dataset card (`README.md`'s YAML header): every `data_files` entry of
   every config, each split with all its patterns (the published `elsaEU/ELSA_D3` card lists
   `data/train-*` and `data/val-*` under its train split);
2. without a card, the folder layout: `{split}/*.parquet` (ours), then the hub's
   `{split}-*.parquet`, `data/{split}-*.parquet` and `data/{split}/*.parquet`;
3. a single file or a glob: its files grouped by the split their names start with
   (`validation-00000-of-00011.parquet` is validation; a name without one is train, the hub's rule).

Besides, the published test set's image folders `{no_augm,augm}/{real,gen_0,...}/` are the
splits `no_augm` and `augm`. A hub dataset repo id (`elsaEU/ELSA_D3`) stands for
`hf://datasets/elsaEU/ELSA_D3`. A split a command needs but the source lacks, and a file that
would serve as both training (or fitting) and test data, are refused with one line (a
`codetrain.errors.UserError`) naming the flags that choose the splits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import yaml
from huggingface_hub import DatasetCard

from codetrain.config import load_config
from codetrain.embed import image_extensions
from codetrain.errors import InvalidInputError, MissingInputError, UserError
from codetrain.realsource import full_name, is_shard, join_url
from codetrain.runlayout import RunLayout
from d3builder.storage.layout import safe_name, split_prefix

log = logging.getLogger(__name__)

HUB_DATASETS = "hf://datasets/"
"""The fsspec prefix of hub dataset repos."""
CARD_FILE = "README.md"
DEFAULT_FILE_SPLIT = "train"
"""The split of a file whose name names none (the hub's rule)."""
HUB_FOLDER = "data"
TEST_VARIANTS = ("no_augm", "augm")
"""The published test set's folders: as generated, and with transformations."""
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAGIC = re.compile(r"[*?\[]")


def resolve_data(data: str) -> str:
    """A local path or fsspec URL as given; a hub repo id `owner/name` that is no local path as hf://datasets/owner/name."""
    if "://" in data or not _REPO_ID.fullmatch(data) or Path(data).exists():
        return data
    return HUB_DATASETS + data


@dataclass(frozen=True)
class DataSource:
    """The splits of one data source: split name -> sorted files (Parquet shards or image files)."""

    given: str
    url: str
    splits: dict[str, list[str]]
    found_by: str

    def offered(self) -> str:
        """The split names, for messages."""
        return ", ".join(self.splits) or "none"

    def shards(self, split: str) -> list[str]:
        """The files of `split` (empty when the source has none)."""
        return list(self.splits.get(safe_name(split, "split"), []))

    def require(self, split: str, flag: str, flags: str) -> list[str]:
        """The files of `split`, or a MissingInputError naming `flag`, what the source offers and the flags to choose."""
        files = self.shards(split)
        if not files:
            raise MissingInputError(f"{flag}: no {split!r} split in {self.given} (splits from {self.found_by}: "
                                    f"{self.offered()}); choose the splits with {flags}")
        return files


def open_source(data: str, flag: str = "--data") -> DataSource:
    """The splits of a dataset folder, file, glob, fsspec URL or hub repo id; a UserError naming `flag` if unreadable."""
    url = resolve_data(str(data))
    try:
        fs, root = fsspec.core.url_to_fs(url)
        if _MAGIC.search(url):
            return DataSource(data, url, _by_file_name(full_name(fs, p) for p in fs.glob(root)), "the file names")
        if is_shard(url) or not fs.isdir(root):  # (over http a folder's listing page also passes for a file)
            if fs.isfile(root):
                return DataSource(data, url, _by_file_name([full_name(fs, root)]), "the file name")
            hub = f" (as a hub dataset: {url})" if url != data else ""
            raise MissingInputError(f"{flag} {data}: no such dataset folder or file{hub}")
        splits, found_by = _card_splits(fs, root, data, flag), f"the dataset card's configs ({CARD_FILE})"
        if splits is None:
            splits, found_by = _layout_splits(fs, root), "the folder layout"
        for variant, files in _test_folders(fs, root).items():
            splits.setdefault(variant, files)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader or network error is reported as one line
        raise InvalidInputError(f"{flag} {data}: cannot read {url}: {type(exc).__name__}: {exc}") from exc
    return DataSource(data, url, splits, found_by)


def _by_file_name(files: Iterable[str]) -> dict[str, list[str]]:
    """Files grouped by the split their names start with (DEFAULT_FILE_SPLIT when none)."""
    splits: dict[str, list[str]] = {}
    for path in sorted(files):
        splits.setdefault(split_prefix(PurePosixPath(path).name) or DEFAULT_FILE_SPLIT, []).append(path)
    return splits


def _card_splits(fs: fsspec.AbstractFileSystem, root: str, data: str, flag: str) -> dict[str, list[str]] | None:
    """Every split of every config of the card's `configs`, all patterns of each; None without a card or configs."""
    card = join_url(root, CARD_FILE)
    if not fs.isfile(card):
        return None
    try:
        configs = DatasetCard(fs.cat_file(card).decode("utf-8")).data.to_dict().get("configs")
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"{flag} {data}: the configs of its dataset card {CARD_FILE} do not parse: {exc}") from exc
    if not configs:
        return None
    splits: dict[str, list[str]] = {}
    for config in configs:
        name = config.get("config_name", "default")
        for split, patterns in _data_files(config.get("data_files")).items():
            files = sorted({full_name(fs, p) for pattern in patterns for p in fs.glob(join_url(root, pattern))})
            if split in splits:
                log.warning("%s: split %r of config %r is also in an earlier config: kept the earlier one", card, split, name)
            elif files:
                splits[split] = files
            else:
                log.warning("%s: no file matches split %r of config %r (%s)", card, split, name, ", ".join(patterns))
    return splits


def _data_files(spec: Any) -> dict[str, list[str]]:
    """A config's `data_files` (a pattern, a list of them, a list of {split, path} or a {split: path} mapping) per split."""
    def patterns(value: Any) -> list[str]:
        return [value] if isinstance(value, str) else [str(v) for v in value or ()]

    if isinstance(spec, dict):
        return {str(split): patterns(path) for split, path in spec.items()}
    if isinstance(spec, list) and all(isinstance(entry, dict) for entry in spec):
        return {str(entry.get("split", DEFAULT_FILE_SPLIT)): patterns(entry.get("path")) for entry in spec}
    return {DEFAULT_FILE_SPLIT: patterns(spec)} if spec else {}


def _layout_splits(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, list[str]]:
    """Splits from the folder layout: ours first, then the hub's (the first layout that has a split wins it)."""
    splits: dict[str, list[str]] = {}
    for pattern, by_folder in (("*/*.parquet", True), ("*-*.parquet", False),
                               (f"{HUB_FOLDER}/*-*.parquet", False), (f"{HUB_FOLDER}/*/*.parquet", True)):
        found: dict[str, list[str]] = {}
        for path in fs.glob(join_url(root, pattern)):
            parts = PurePosixPath(path).parts
            split = parts[-2] if by_folder else split_prefix(parts[-1])
            if split and split != HUB_FOLDER and not split.startswith("."):
                found.setdefault(split, []).append(full_name(fs, path))
        for split, files in found.items():
            splits.setdefault(split, sorted(files))
    return splits


def _test_folders(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, list[str]]:
    """The published test set's image folders under `root`: variant -> every image file below it."""
    extensions = image_extensions()
    found = {}
    for variant in TEST_VARIANTS:
        folder = join_url(root, variant)
        if fs.isdir(folder):
            files = sorted(full_name(fs, p) for p in fs.find(folder) if PurePosixPath(p).suffix.lower() in extensions)
            if files:
                found[variant] = files
    return found


def default_test_splits(source: DataSource, defaults: Sequence[str]) -> list[str]:
    """The default test splits the source offers, else the published test variants it offers (may be empty)."""
    offered = [s for s in defaults if s in source.splits]
    return offered or [v for v in TEST_VARIANTS if v in source.splits]


@dataclass(frozen=True)
class Use:
    """What a command uses some files for: its kind (train, fit, test), a label for messages, the files."""

    kind: str
    label: str
    files: Sequence[str]


def refuse_shared_files(uses: Sequence[Use], flags: str) -> None:
    """InvalidInputError naming `flags` when one file serves two kinds of use (a test split may share files with another)."""
    owner: dict[str, Use] = {}
    for use in uses:
        for path in use.files:
            first = owner.setdefault(path, use)
            if first.kind != use.kind:
                raise InvalidInputError(f"{path} is in both {first.label} and {use.label}: one file is never used as "
                                        f"both training (or fitting) and test data; choose the splits with {flags}")


def run_training_files(run: RunLayout) -> list[str]:
    """The files a run was trained on, from its saved config (empty when the run or its data cannot be read)."""
    try:
        if not run.store.exists(run.path(RunLayout.CONFIG)):
            return []
        config = load_config(run.store.url(run.path(RunLayout.CONFIG)))
        return open_source(config.data).shards(config.train_split) if config.data else []
    except (UserError, ValueError, OSError) as exc:
        log.warning("cannot list the training data of %s (%s): not checked against the test splits", run.store.url(), exc)
        return []
