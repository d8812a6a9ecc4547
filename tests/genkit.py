"""Inputs for the generate/extend tests: records and real shards (stagekit) under a manifest using the repo registries."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from stagekit import make_stage_inputs

from d3builder.recipe.manifest import Manifest, load_manifest

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"


def save_manifest(manifest: Manifest, path: Path) -> Manifest:
    """Write a manifest as YAML and load it back (so the CLI can read the same recipe)."""
    mapping = {k: v for k, v in dataclasses.asdict(manifest).items() if k != "path"}
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return load_manifest(path)


def make_records(root: Path, n_records: int, shard_size: int, batch_size: int = 2, **fail: str) -> Manifest:
    """records/ and real/ shards of `n_records` ids 1000.. (split cycle train, train, validation, test).

    `fail` maps a record id to a stagekit failure reason (e.g. real_failed). The manifest uses
    manifests/generators.yaml, manifests/extended.yaml (extended generator: sd15-tiny) and `batch_size`."""
    inputs = make_stage_inputs(root, n_records, shard_size, generators=(), fail=fail)
    manifest = inputs.manifest
    manifest.registry = [str(MANIFESTS / "generators.yaml")]
    manifest.extended.registry = str(MANIFESTS / "extended.yaml")
    manifest.extended.generators = ["sd15-tiny"]
    manifest.generate.batch_size = batch_size
    return save_manifest(manifest, root / "manifest.yaml")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Render on one CPU thread: the tiny twins gain nothing from more, and a busy 2-core CI box loses a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
