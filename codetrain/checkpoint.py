"""Run-state checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `RUN/checkpoints/step-{n}/` (names in `codetrain.runlayout.CheckpointFiles`)
holding the embedder's weights, the optimizer state (safetensors + JSON), the run state (JSON:
scheduler, scaler, step, epoch, data position, best score) and each process's RNG states. Every
file is written atomically (one complete object on an object store) and `complete.json` last:
only a folder holding it counts, so a crash mid-save leaves the previous checkpoint in charge.
RUN may be a local folder or an fsspec URL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import torch

from codetrain.errors import InvalidInputError, MissingInputError
from codetrain.runlayout import CheckpointFiles, RunLayout
from d3builder.storage.store import Location, Store, open_store

STATE_FORMAT = "codetrain.checkpoint/1"


def split_tensors(obj: Any, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested state by a reference; returns (JSON-able state, tensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return walk(obj, prefix), tensors


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`: put the tensors back into the JSON state."""
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"malformed checkpoint state node {sorted(obj)}")
    return obj


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) global RNG states of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(py_state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class TrainState(NamedTuple):
    """What `load_train_state` reads back: the optimizer's state dict and the run state."""

    optimizer: dict
    run: dict[str, Any]


class Checkpoint(NamedTuple):
    """A complete checkpoint: its step and folder."""

    step: int
    folder: Location


def _save_split(folder: Store, obj: Any, json_name: str, tensor_name: str, prefix: str) -> None:
    """Write a nested state as JSON + safetensors."""
    meta, tensors = split_tensors(obj, prefix)
    folder.write_bytes(folder.root / tensor_name, safetensors.torch.save(tensors))
    folder.write_bytes(folder.root / json_name, json.dumps(meta).encode("utf-8"))


def _read(folder: Store, name: str) -> bytes:
    """The bytes of one checkpoint file; MissingInputError naming it when absent."""
    try:
        return folder.read_bytes(folder.root / name)
    except FileNotFoundError as exc:
        raise MissingInputError(f"checkpoint file missing: {folder.url(folder.root / name)}") from exc


def _read_json(folder: Store, name: str) -> Any:
    try:
        return json.loads(_read(folder, name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{folder.url(folder.root / name)} is not valid JSON: {exc}") from exc


def _load_split(folder: Store, json_name: str, tensor_name: str) -> Any:
    """Read a nested state written by `_save_split` (no pickle anywhere)."""
    meta = _read_json(folder, json_name)
    data = _read(folder, tensor_name)
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{folder.url(folder.root / tensor_name)} is not a valid safetensors file: {exc}") from exc
    return join_tensors(meta, tensors)


def _run(run: str | Path | RunLayout) -> RunLayout:
    return run if isinstance(run, RunLayout) else RunLayout.open(run)


def checkpoint_dir(run: str | Path | RunLayout, step: int) -> Location:
    """`RUN/checkpoints/step-{step}`."""
    return _run(run).checkpoint(step).location()


def begin(run: RunLayout, step: int) -> Store:
    """The folder of a checkpoint about to be (re)written, no longer marked complete."""
    folder = run.checkpoint(step)
    folder.remove(folder.root / CheckpointFiles.COMPLETE)
    return folder


def mark_complete(folder: Store, step: int) -> None:
    """Write `complete.json` (last, after every other file of the checkpoint) listing the files."""
    files = sorted(folder.relative(p) for p in folder.find() if p.name != CheckpointFiles.COMPLETE)
    folder.write_bytes(folder.root / CheckpointFiles.COMPLETE,
                       json.dumps({"format": STATE_FORMAT, "step": step, "files": files}).encode())


def save_process_rng(folder: str | Path | Store, rank: int) -> None:
    """Write this process's RNG states into a checkpoint folder."""
    _save_split(open_store(folder), rng_state(), CheckpointFiles.rng_json(rank), CheckpointFiles.rng_tensors(rank), "rng")


def load_process_rng(folder: str | Path | Store, rank: int) -> None:
    """Restore this process's RNG states; a checkpoint from fewer processes falls back to rank 0's."""
    store = open_store(folder)
    if not store.exists(store.root / CheckpointFiles.rng_json(rank)):
        rank = 0
    set_rng_state(_load_split(store, CheckpointFiles.rng_json(rank), CheckpointFiles.rng_tensors(rank)))


def save_train_state(folder: str | Path | Store, optimizer_state: dict, state: dict[str, Any]) -> None:
    """Write the optimizer state (safetensors + JSON) and the run state (JSON) into `folder`."""
    store = open_store(folder)
    _save_split(store, optimizer_state, CheckpointFiles.OPTIMIZER_JSON, CheckpointFiles.OPTIMIZER_TENSORS, "opt")
    store.write_bytes(store.root / CheckpointFiles.STATE, json.dumps({"format": STATE_FORMAT, **state}).encode("utf-8"))


def load_train_state(folder: str | Path | Store) -> TrainState:
    """Read back the optimizer state and the run state from a checkpoint folder."""
    store = open_store(folder)
    state = _read_json(store, CheckpointFiles.STATE)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InvalidInputError(f"{store.url(store.root / CheckpointFiles.STATE)} is not a {STATE_FORMAT} checkpoint")
    return TrainState(_load_split(store, CheckpointFiles.OPTIMIZER_JSON, CheckpointFiles.OPTIMIZER_TENSORS), state)


def list_checkpoints(run: str | Path | RunLayout) -> list[Checkpoint]:
    """Complete checkpoints of a run (those holding `complete.json`), oldest first."""
    layout = _run(run)
    return [Checkpoint(step, layout.store.location(folder)) for step, folder in layout.checkpoint_folders()
            if layout.store.exists(folder / CheckpointFiles.COMPLETE)]


def latest_checkpoint(run: str | Path | RunLayout) -> Location | None:
    """The newest complete checkpoint folder of a run, if any."""
    found = list_checkpoints(run)
    return found[-1].folder if found else None


def prune(run: str | Path | RunLayout, keep: int, current: int) -> None:
    """Delete incomplete checkpoint folders (except `current`'s) and all but the newest `keep` complete ones (0: keep all)."""
    layout = _run(run)
    complete = {c.step for c in list_checkpoints(layout)}
    newest = sorted(complete)[-keep:] if keep > 0 else sorted(complete)
    for step, folder in layout.checkpoint_folders():
        if step != current and step not in newest:
            layout.store.remove_tree(folder)
