"""Run-state checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `RUN/checkpoints/step-{n}/` holding
`model.safetensors` (the embedder, `codetrain.model.save_weights`), `optimizer.safetensors`
+ `state.json` (optimizer/scheduler/scaler state, step, epoch, data position, best score)
and `rng-{rank}.safetensors` + `rng-{rank}.json` per process. It is written under a
temporary name and renamed into place, so a folder named `step-{n}` is always complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from d3builder.storage.shards import atomic_write_bytes, atomic_write_json, fsync_dir

STATE_FORMAT = "codetrain.checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def _save_split(obj: Any, json_path: Path, tensor_path: Path, prefix: str) -> None:
    """Write a nested state as JSON + safetensors."""
    meta, tensors = split_tensors(obj, prefix)
    atomic_write_bytes(tensor_path, safetensors.torch.save(tensors))
    atomic_write_json(json_path, meta)


def _load_split(json_path: Path, tensor_path: Path) -> Any:
    """Read a nested state written by `_save_split` (no pickle anywhere)."""
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        tensors = safetensors.torch.load_file(str(tensor_path), device="cpu")
    except (safetensors.SafetensorError, OSError) as exc:
        raise ValueError(f"{tensor_path} is not a valid safetensors file: {exc}") from exc
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    return join_tensors(meta, tensors)


def checkpoint_dir(run: str | Path, step: int) -> Path:
    """`RUN/checkpoints/step-{step}`."""
    return Path(run) / "checkpoints" / f"step-{int(step)}"


def staging_dir(run: str | Path, step: int) -> Path:
    """The temporary folder a checkpoint is written into before its rename."""
    return Path(run) / "checkpoints" / f".step-{int(step)}.partial"


def save_process_rng(folder: Path, rank: int) -> None:
    """Write this process's RNG states into a (staging) checkpoint folder."""
    _save_split(rng_state(), folder / f"rng-{rank}.json", folder / f"rng-{rank}.safetensors", "rng")


def load_process_rng(folder: Path, rank: int) -> None:
    """Restore this process's RNG states; a checkpoint from fewer processes falls back to rank 0's."""
    name = f"rng-{rank}" if (folder / f"rng-{rank}.json").is_file() else "rng-0"
    set_rng_state(_load_split(folder / f"{name}.json", folder / f"{name}.safetensors"))


def save_train_state(folder: Path, optimizer_state: dict, state: dict[str, Any]) -> None:
    """Write the optimizer state (safetensors + JSON) and the run state (JSON) into `folder`."""
    _save_split(optimizer_state, folder / "optimizer.json", folder / "optimizer.safetensors", "opt")
    atomic_write_json(folder / "state.json", {"format": STATE_FORMAT, **state})


def load_train_state(folder: Path) -> tuple[dict, dict[str, Any]]:
    """Read back (optimizer state, run state) from a checkpoint folder."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {state_path}")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{state_path} is not valid JSON: {exc}") from exc
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{state_path} is not a {STATE_FORMAT} checkpoint")
    return _load_split(folder / "optimizer.json", folder / "optimizer.safetensors"), state


def publish(run: str | Path, step: int) -> Path:
    """Rename a complete staging folder to `step-{step}` (replacing an older one of that step)."""
    final, staging = checkpoint_dir(run, step), staging_dir(run, step)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    fsync_dir(final.parent)
    return final


def list_checkpoints(run: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    folder = Path(run) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, if any."""
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def prune(run: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep=0: delete none) and stale staging folders."""
    folder = Path(run) / "checkpoints"
    for stale in folder.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for _, path in list_checkpoints(run)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
