"""`publish`: a hub-ready copy of the assembled dataset, ELSA_D3 style, uploaded with --repo.

Reads DATA/d3/{split}/*.parquet and writes OUT/{split}/{split}-{k}.parquet shards of at most
--max-shard-mb (default 500 MB, about ELSA_D3's), every split as a config of its own (plus the
default config), OUT/README.md (a complete card) and OUT/LICENSE.md. The real LAION images
are left out unless --with-real-images: rows keep `url`, `sha256_real`, width, height and
encoding, so the reals can be fetched again and verified. The copy is built in a hidden
sibling folder and renamed into place, so OUT is either complete or untouched. A whole-dataset
operation: it reads the finished `d3/` folder and writes nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from tqdm import tqdm

from d3builder.generators.registry import RegistryError, load_registries
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_progress_arg,
    manifest_from_args,
)
from d3builder.recipe.manifest import Manifest
from d3builder.storage.card import split_shards
from d3builder.storage.hub import HubError, check_upload, upload_folder
from d3builder.storage.hubcard import GeneratorTerms, write_published_card
from d3builder.storage.layout import shard_name
from d3builder.storage.schema import published_features
from d3builder.storage.shards import iter_rows, read_features, write_sized_shards

logger = logging.getLogger(__name__)

MB = 1_000_000
DEFAULT_MAX_SHARD_MB = 500.0
REAL_IMAGES_WARNING = (
    "--with-real-images: the copy holds the real LAION images, which belong to their owners; "
    "check that you may redistribute them before sharing it"
)


@dataclass
class PublishSummary:
    """What `publish_dataset` wrote: shards and rows per split, the card, and the commit URL when uploaded."""

    out: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    card: Path | None = None
    url: str | None = None


def generator_terms(manifest: Manifest) -> list[GeneratorTerms]:
    """Each generator slot's model and licence, from the recipe's registries."""
    entries = load_registries(*manifest.registry_paths())
    return [
        GeneratorTerms(slot, name, entries[name].model, entries[name].license) if name in entries
        else GeneratorTerms(slot, name, "unknown", "")
        for slot, name in enumerate(manifest.generators)
    ]


def _counted(rows: Iterator[dict], counts: dict[str, int], split: str, bar: tqdm) -> Iterator[dict]:
    for row in rows:
        counts[split] = counts.get(split, 0) + 1
        bar.update(1)
        yield row


def publish_dataset(
    manifest: Manifest,
    out: str | Path,
    max_shard_bytes: int = int(DEFAULT_MAX_SHARD_MB * MB),
    with_real_images: bool = False,
    overwrite: bool = False,
    repo_id: str | None = None,
    api: HfApi | None = None,
    progress: bool = True,
) -> PublishSummary:
    """Write the hub copy of the recipe's d3/ folder to `out` and upload it to `repo_id` when given.

    A missing token, a malformed repo id, a missing d3/ folder, an unreadable registry or an
    existing `out` fail before anything is written.
    """
    api = check_upload(repo_id, api) if repo_id else None
    store, source, out = manifest.layout.store, manifest.layout.d3_dir(), Path(out)
    splits = split_shards(source, store) if store.isdir(source) else {}
    if not splits:
        raise FileNotFoundError(f"no assembled shards under {store.url(source)}: "
                                f"run `d3builder assemble -m {manifest.path}` first")
    if store.local and out.resolve() == Path(source).resolve():
        raise FileExistsError(f"{out} is the assembled dataset itself: publish into another folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    terms = generator_terms(manifest)  # a broken registry fails here, before any work
    if with_real_images:
        logger.warning(REAL_IMAGES_WARNING)
    summary = PublishSummary(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    total = sum(store.parquet_file(path).metadata.num_rows for shards in splits.values() for path in shards)
    try:
        with tqdm(total=total, desc="publish", unit="record", disable=not progress) as bar:
            for split, shards in splits.items():
                features = read_features(shards[0], store)
                if features is None:
                    raise ValueError(f"{store.url(shards[0])}: no `datasets` features in the Parquet metadata "
                                     "(not written by d3builder?)")
                features = published_features(features, with_real_images)
                rows = (row for path in shards for row in iter_rows(path, columns=list(features), store=store))
                written = write_sized_shards(_counted(rows, summary.rows, split, bar),
                                             lambda k, s=split: tmp / s / f"{s}-{shard_name(k)}.parquet",
                                             features, max_shard_bytes)
                summary.shards[split] = [out / p.relative_to(tmp) for p in written]
        write_published_card(manifest, tmp, terms, with_real_images, repo_id)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary.card = out / "README.md"
    summary.url = upload_folder(out, repo_id, "dataset", api) if repo_id else None
    return summary


def _positive_mb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MB, got {text}")
    return value


def _run(args: argparse.Namespace) -> int:
    if args.with_real_images:
        print(f"WARNING: {REAL_IMAGES_WARNING}", file=sys.stderr)
    try:
        summary = publish_dataset(manifest_from_args(args), args.out, int(args.max_shard_mb * MB), args.with_real_images,
                                  args.force, args.repo, progress=args.progress)
    except (HubError, FileExistsError, FileNotFoundError, RegistryError) as exc:
        print(f"d3builder publish: {exc}", file=sys.stderr)
        return 2
    for split, shards in summary.shards.items():
        print(f"{split}: {summary.rows.get(split, 0)} records in {len(shards)} shard(s)")
    print(f"hub-ready dataset: {summary.out} (card {summary.card})")
    if summary.url:
        print(f"uploaded: {summary.url}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder publish`."""
    parser = subparsers.add_parser(
        "publish",
        help="write a hub-ready copy of d3/ (no real image bytes by default, ~500 MB shards, full card); --repo uploads it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_manifest_args(parser)
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to create (must not exist unless --force)")
    parser.add_argument("--max-shard-mb", type=_positive_mb, default=DEFAULT_MAX_SHARD_MB,
                        help=f"largest shard, in MB of 10^6 bytes (default {DEFAULT_MAX_SHARD_MB:g})")
    parser.add_argument("--with-real-images", action="store_true",
                        help="keep the real LAION image bytes (their owners' copyright applies: a warning is printed)")
    parser.add_argument("--repo", help="upload to this hub dataset repo (user/name; needs `hf auth login` or HF_TOKEN)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    add_progress_arg(parser)
    parser.set_defaults(func=_run)
