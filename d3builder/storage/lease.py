"""Leases: which owner works on a unit, until when; expired leases are taken over, never held twice.

A unit's lease lives in its own folder of epoch files, `DATA/leases/{stage}/{unit}/{epoch:08d}.json`; the
highest epoch is the current lease. Each file records its owner (host, pid, the process's start time, a
unique token, the rank), when it was renewed and for how long it is valid (`ttl_s`):

- Acquire: read the current epoch; if it is held (not released, not expired, owner not known dead) the unit
  is busy. Otherwise create the next epoch with an exclusive create (O_EXCL on POSIX, `If-None-Match` on S3):
  of several racers breaking the same expired lease exactly one creates that epoch, the others are busy.
- Heartbeat: while the unit runs, a background thread rewrites the owner's epoch file every `ttl_s / 3`.
- Expiry: a lease whose heartbeat is older than `ttl_s` may be taken over; on the owner's host a lease whose
  process is gone (or whose pid now belongs to another process: start times differ) is free at once.
- Fencing: before each commit the owner checks that the current epoch is still its own and that its lease
  has a safety margin left (`ttl_s / 4`, by its own clock); otherwise `LeaseLost` is raised and the work is
  abandoned. A taker waits the full `ttl_s`, so the two never overlap (clocks within the margin).
- Release: a finished unit's lease folder is deleted; an unfinished one is marked released. `unlock` writes a
  released epoch above the current one, so its owner notices at its next heartbeat and stops.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

from d3builder.core.commandline import process_rank
from d3builder.storage.store import Store

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 300.0
"""A lease not renewed for this long may be taken over (the manifest's `units.lease_seconds`)."""
SAFETY = 0.25
"""An owner stops committing when less than this fraction of its lease is left since its last renewal."""


class LeaseLost(Exception):
    """This process no longer holds the unit's lease (expired, taken over or unlocked): abandon the unit."""


def host_key() -> str:
    """This host's identity for liveness checks: hostname, kernel boot id and pid namespace."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, from /proc), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether `pid` is a live process started at `start` (when known) on this host."""
    if pid <= 0:
        return True  # not a pid we can check: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


@dataclass(frozen=True)
class LeaseRecord:
    """One epoch file: who holds (or held) a unit's lease and until when."""

    epoch: int
    token: str
    stage: str
    unit: str
    host: str
    host_key: str
    pid: int
    process_start: str | None
    rank: int
    acquired_at: float
    renewed_at: float
    ttl_s: float
    released: bool = False
    note: str = ""
    path: str = field(default="", compare=False)

    def to_bytes(self) -> bytes:
        payload = {k: v for k, v in asdict(self).items() if k != "path"}
        return (json.dumps(payload, sort_keys=True) + "\n").encode()

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def owner(self) -> str:
        """`host:pid (rank r)` for messages."""
        return f"{self.host}:{self.pid} (rank {self.rank})"

    def owner_dead(self) -> bool:
        """True when the owner ran on this host and its process is gone (or the pid was reused)."""
        return self.host_key == host_key() and not pid_alive(self.pid, self.process_start)

    def free(self, now: float | None = None) -> bool:
        """Whether the unit may be taken: released, expired, or its owner known dead."""
        now = time.time() if now is None else now
        return self.released or now > self.expires_at or self.owner_dead()

    def describe(self, now: float | None = None) -> str:
        """`leased by host:pid (rank r), heartbeat 3 s ago, expires in 297 s: PATH`."""
        now = time.time() if now is None else now
        return (f"leased by {self.owner()}, heartbeat {now - self.renewed_at:.0f} s ago, "
                f"expires in {max(0.0, self.expires_at - now):.0f} s: {self.path}")


def _epoch_path(folder: PurePath, epoch: int) -> PurePath:
    return folder / f"{epoch:08d}.json"


def _epochs(store: Store, folder: PurePath) -> list[int]:
    return sorted(int(p.stem) for p in store.listdir(folder) if p.suffix == ".json" and p.stem.isdigit())


def _read(store: Store, folder: PurePath, epoch: int, ttl_s: float) -> LeaseRecord | None:
    """The record of one epoch; an unreadable one (being created, or cut by a crash) counts as held for ttl_s."""
    path = _epoch_path(folder, epoch)
    try:
        payload = store.read_json(path)
        return LeaseRecord(**{**payload, "epoch": epoch}, path=store.url(path))  # the file name is the epoch
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, OSError):
        try:
            modified = store.fs.modified(str(path)).timestamp()
        except (OSError, NotImplementedError, FileNotFoundError):
            modified = time.time()
        return LeaseRecord(epoch, "", "", "", "?", "", -1, None, -1, modified, modified, ttl_s,
                           note="unreadable lease file", path=store.url(path))


def current(store: Store, folder: PurePath, ttl_s: float = DEFAULT_LEASE_SECONDS) -> LeaseRecord | None:
    """The current (highest) epoch of a unit's lease folder, or None when there is none."""
    for _ in range(3):  # an epoch deleted between listing and reading: list again
        epochs = _epochs(store, folder)
        if not epochs:
            return None
        record = _read(store, folder, epochs[-1], ttl_s)
        if record is not None:
            return record
    return None


class Lease:
    """A held lease: renew it (`heartbeat`), check it before committing (`ensure`), then `release` it."""

    def __init__(self, store: Store, folder: PurePath, record: LeaseRecord) -> None:
        self.store, self.folder, self.record = store, folder, record
        self.path = _epoch_path(folder, record.epoch)
        self._valid_until = time.monotonic() + record.ttl_s * (1 - SAFETY)
        self._lost: str | None = None
        self._lock = threading.Lock()

    @property
    def token(self) -> str:
        return self.record.token

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease gone or it ran out (no I/O: call it often)."""
        if self._lost is None and time.monotonic() > self._valid_until:
            self._lost = f"lease ran out (no heartbeat for {self.record.ttl_s * (1 - SAFETY):.0f} s)"
        if self._lost is not None:
            raise LeaseLost(f"{self.store.url(self.path)}: {self._lost}")

    def ensure(self) -> None:
        """Fencing: raise LeaseLost unless this epoch is still the current one, ours, and not running out."""
        self.check()
        top = current(self.store, self.folder, self.record.ttl_s)
        if top is None or top.epoch != self.record.epoch or top.token != self.token or top.released:
            self._lost = "taken over or unlocked" if top is not None else "lease file removed"
            raise LeaseLost(f"{self.store.url(self.path)}: {self._lost}"
                            + (f" ({top.describe()})" if top is not None and top.epoch != self.record.epoch else ""))
        self.check()

    def renew(self) -> None:
        """Extend the lease by ttl_s from now (after checking it is still ours)."""
        with self._lock:
            self.ensure()
            started = time.monotonic()
            renewed = replace(self.record, renewed_at=time.time())
            self.store.write_bytes(self.path, renewed.to_bytes())
            self.record = renewed
            self._valid_until = started + renewed.ttl_s * (1 - SAFETY)

    @contextlib.contextmanager
    def heartbeat(self, interval_s: float | None = None) -> Iterator[Lease]:
        """Renew the lease in a background thread while the block runs."""
        interval = interval_s if interval_s is not None else self.record.ttl_s / 3
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as exc:
                    log.warning("%s", exc)
                    return
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: retry until the lease runs out
                    log.warning("%s: heartbeat failed (%s: %s); retrying", self.store.url(self.path),
                                type(exc).__name__, exc)

        thread = threading.Thread(target=beat, name=f"lease-{self.record.unit}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def release(self, finished: bool) -> None:
        """Give the lease up: a finished unit's lease folder is deleted, an unfinished one is marked released."""
        with self._lock:
            try:
                self.ensure()
            except LeaseLost:
                return  # somebody else's lease now: leave it alone
            if finished:
                for epoch in _epochs(self.store, self.folder):
                    self.store.remove(_epoch_path(self.folder, epoch))
            else:
                self.store.write_bytes(self.path, replace(self.record, released=True, renewed_at=time.time()).to_bytes())
            self._lost = "released"


def new_record(stage: str, unit: str, epoch: int, ttl_s: float, token: str, note: str = "",
               released: bool = False) -> LeaseRecord:
    """The record of a lease this process takes now."""
    now = time.time()
    pid = os.getpid()
    return LeaseRecord(epoch=epoch, token=token, stage=stage, unit=unit, host=socket.gethostname(),
                       host_key=host_key(), pid=pid, process_start=process_start(pid), rank=process_rank(),
                       acquired_at=now, renewed_at=now, ttl_s=ttl_s, released=released, note=note)


def acquire(store: Store, folder: PurePath, stage: str, unit: str, ttl_s: float = DEFAULT_LEASE_SECONDS,
            token: str | None = None) -> Lease | LeaseRecord:
    """Take the unit's lease: a Lease, or the LeaseRecord of the live owner holding it (busy)."""
    top = current(store, folder, ttl_s)
    if top is not None and not top.free():
        return top
    epoch = top.epoch + 1 if top is not None else 1
    record = new_record(stage, unit, epoch, ttl_s, token or uuid.uuid4().hex)
    if not store.create_exclusive(_epoch_path(folder, epoch), record.to_bytes()):
        return current(store, folder, ttl_s) or record  # another racer took this epoch first
    for older in _epochs(store, folder):
        if older < epoch:
            store.remove(_epoch_path(folder, older))
    return Lease(store, folder, replace(record, path=store.url(_epoch_path(folder, epoch))))


def unlock(store: Store, folder: PurePath, stage: str, unit: str, note: str) -> LeaseRecord | None:
    """Break a unit's lease whatever its state: write a released epoch above the current one; returns the old one."""
    for _ in range(3):
        top = current(store, folder)
        if top is None:
            return None
        marker = new_record(stage, unit, top.epoch + 1, 0.0, uuid.uuid4().hex, note=note, released=True)
        if store.create_exclusive(_epoch_path(folder, top.epoch + 1), marker.to_bytes()):
            return top
    return None


def lease_payload(lease: Lease) -> dict[str, Any]:
    """What stats and history record about the lease a unit ran under."""
    record = lease.record
    return {"token": record.token, "epoch": record.epoch, "host": record.host, "pid": record.pid,
            "rank": record.rank, "acquired_at": record.acquired_at}
