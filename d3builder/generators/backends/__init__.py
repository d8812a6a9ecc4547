"""One backend per generator kind behind one interface (base.Backend), so that the render engine has one code path.

`check_ready` refuses, before any work, an entry that cannot run here (RegistryError naming file, entry and
key); `availability` says the same for `extend --list` without raising.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from huggingface_hub import try_to_load_from_cache

from d3builder.generators.backends.base import Backend
from d3builder.generators.backends.folder import FolderBackend, list_images, read_index
from d3builder.generators.backends.function import FunctionBackend, load_callable
from d3builder.generators.backends.pipeline import PipelineBackend
from d3builder.generators.backends.webapi import WebApiBackend, api_key
from d3builder.generators.checker import TINY_SCHEME, RegistryError
from d3builder.generators.kinds import FolderEntry, HttpEntry, PythonEntry
from d3builder.generators.registry import Entry, GeneratorEntry

if TYPE_CHECKING:
    import torch


def load_backend(entry: Entry, device: str | torch.device, speed: Mapping[str, Any]) -> Backend:
    """The entry loaded as its kind's backend (`speed`: the diffusers speed switches)."""
    if isinstance(entry, GeneratorEntry):
        return PipelineBackend(entry, device, speed)
    if isinstance(entry, PythonEntry):
        return FunctionBackend(entry)
    if isinstance(entry, HttpEntry):
        return WebApiBackend(entry)
    return FolderBackend(entry)


def check_ready(entry: Entry) -> None:
    """Raise RegistryError when the entry cannot run here: its function does not import, its API key is unset,
    its folder or index is missing or unreadable. Diffusers weights may still be downloaded, so they pass."""
    if isinstance(entry, PythonEntry):
        load_callable(entry)
    elif isinstance(entry, HttpEntry):
        api_key(entry)
    elif isinstance(entry, FolderEntry):
        if entry.folder is not None:
            list_images(entry)
        if entry.index is not None:
            read_index(entry)


def _weights_here(entry: GeneratorEntry) -> tuple[bool, str]:
    """Whether every pipeline of the entry loads without a download."""
    missing = []
    for spec in (entry, *entry.stages):
        if spec.model.startswith(TINY_SCHEME) or spec.model.startswith("/"):
            continue
        if not isinstance(try_to_load_from_cache(spec.model, "model_index.json", revision=spec.revision), str):
            missing.append(spec.model)
    if missing:
        return False, f"weights not in the local Hugging Face cache (would download {', '.join(missing)})"
    if entry.is_tiny:
        return True, "tiny twin, built offline"
    return True, "weights present"


def availability(entry: Entry) -> tuple[bool, str]:
    """(can it run here, why) for `extend --list`."""
    if isinstance(entry, GeneratorEntry):
        return _weights_here(entry)
    try:
        check_ready(entry)
    except RegistryError as exc:
        return False, str(exc).split(": key ", 1)[-1]
    if isinstance(entry, PythonEntry):
        return True, "callable importable"
    if isinstance(entry, HttpEntry):
        return True, f"API key in ${entry.auth.env}" if entry.auth else "no credentials needed"
    return True, "images present"


def describe(entry: Entry) -> str:
    """What the entry runs: model id, callable, endpoint or folder."""
    if isinstance(entry, PythonEntry):
        return entry.callable
    if isinstance(entry, HttpEntry):
        return entry.endpoint
    if isinstance(entry, FolderEntry):
        return entry.folder or entry.index or ""
    return entry.model
