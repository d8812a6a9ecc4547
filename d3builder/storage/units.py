"""The unit of work, (stage, shard): done markers, claims across processes and nodes, stats."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d3builder.storage.shards import atomic_write_json

DEFAULT_CLAIM_TTL_S = 6 * 3600
"""A claim older than this is taken to belong to a dead node and may be taken over."""


def is_done(output: Path, stats: Path) -> bool:
    """A unit is done when its output and its stats file both exist (both are written atomically)."""
    return output.is_file() and stats.is_file()


def read_stats(stats: Path) -> dict[str, Any]:
    """Read one unit's stats JSON."""
    return json.loads(stats.read_text())


def unit_done(stats: Path, root: Path) -> bool:
    """A multi-output unit is done when its stats file exists and names outputs that all exist."""
    if not stats.is_file():
        return False
    outputs = read_stats(stats).get("outputs", {})
    return all((root / relative).is_file() for relative in outputs.values())


def write_stats(stats: Path, payload: dict[str, Any]) -> Path:
    """Write one unit's stats JSON atomically, stamped with host and time."""
    return atomic_write_json(stats, {**payload, "host": socket.gethostname(), "finished_at": time.time()})


def shards_for_process(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` handles (round robin, disjoint, complete)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return [s for i, s in enumerate(shards) if i % world_size == rank]


def _claim_is_stale(lock: Path, ttl_s: float) -> bool:
    """A claim is stale when its process is gone (same host) or it is older than the TTL."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return time.time() - lock.stat().st_mtime > 60
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return time.time() - float(owner.get("time", 0)) > ttl_s


@contextmanager
def claim(output: Path, ttl_s: float = DEFAULT_CLAIM_TTL_S) -> Iterator[bool]:
    """Try to claim a unit with an exclusive lock file beside its output; yields whether we got it."""
    lock = output.with_name(f".{output.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _claim_is_stale(lock, ttl_s):
                lock.unlink(missing_ok=True)
                continue
            yield False
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(owner)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False
