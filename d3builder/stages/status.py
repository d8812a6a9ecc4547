"""`status` and `unlock`: where every stage of a recipe stands, and clearing the leases of stuck units.

Read from the output root alone (any store): done units from the stats files, running ones from the leases
(owner and heartbeat age), failed ones from the history of units that are not done, failed records by reason
from the stats, pending = the rest. `unlock` breaks the leases of a stage's units (after asking) so that
the next worker takes them at once; an owner still alive notices at its next heartbeat and stops.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from d3builder.core.commandline import UsageError, shard_list
from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import Manifest
from d3builder.storage.layout import DataLayout, shard_number
from d3builder.storage.lease import LeaseRecord, current, unlock
from d3builder.storage.schema import SOURCE_SPLIT

STAGES = {"select": "select", "fetch-real": "fetch-real", "generate": "generate", "assemble": "assemble",
          "transform-test": "transform_test", "extend": "extend"}
"""Command name -> the stage's folder name under stats/, leases/ and history/."""
REASON_KEYS = ("failures_by_reason", "dropped_by_reason")


@dataclass
class StageStatus:
    """One line of `status`: a stage (per generator where it has several)."""

    name: str
    units: int
    done: int = 0
    running: list[tuple[str, LeaseRecord]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    """Unit key -> the last failure message of units that are not done."""
    records: Counter = field(default_factory=Counter)
    """Records failed or left out by reason, in the done units."""

    @property
    def pending(self) -> int:
        return max(0, self.units - self.done - len(self.running) - len(self.failed))


def _read_all(layout: DataLayout, paths: list[PurePath]) -> list[dict[str, Any]]:
    """Read many small JSON files (in parallel: object stores answer each in a round trip)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(layout.store.read_json, paths))


def _units(layout: DataLayout, folder: str, group: str | None) -> set[str]:
    """Keys of the units (whole shards and parts) that have a lease or history folder."""
    keys = set()
    for kind in ("leases", "history"):
        base = layout.root / kind / folder / (group or "")
        for path in layout.store.glob(base / "*" / "*.json"):
            name = path.parent.name
            keys.add(f"{group}/{name}" if group else name)
    return keys


def stage_status(manifest: Manifest, command: str, group: str | None, expected: int) -> StageStatus:
    """The status of one stage (and generator)."""
    layout, folder = manifest.layout, STAGES[command]
    status = StageStatus(f"{command} {group}" if group else command, expected)
    stats_folder = layout.root / "stats" / folder / (group or "")
    done_stats = _read_all(layout, layout.store.glob(stats_folder / "[0-9]*.json"))
    status.done = len(done_stats)
    done_keys = {s.get("unit") for s in done_stats}
    for stats in done_stats:
        for key in REASON_KEYS:
            status.records.update(stats.get(key) or {})
    now = time.time()
    for key in sorted(_units(layout, folder, group)):
        whole = key.split(".p", 1)[0]
        if whole in done_keys:
            continue
        holder = current(layout.store, layout.leases(folder, key), manifest.units.lease_seconds)
        if holder is not None and not holder.free(now):
            status.running.append((key, holder))
            continue
        events = layout.store.glob(layout.history(folder, key) / "*.json")
        last = layout.store.read_json(events[-1]) if events else None
        if last is not None and last["outcome"] in ("failed", "bad_input"):
            status.failed[key] = f"{last.get('reason') or last['outcome']}: {last['message']}"
    return status


def transform_units(manifest: Manifest) -> int:
    """transform-test's units of the test split: one per d3/test shard."""
    layout = manifest.layout
    return len(layout.store.glob(layout.d3_dir() / SOURCE_SPLIT / f"{SOURCE_SPLIT}-[0-9]*.parquet"))


def recipe_status(manifest: Manifest) -> list[StageStatus]:
    """Every stage of the recipe, in pipeline order."""
    layout = manifest.layout
    shards = len(layout.record_shards())
    tests = transform_units(manifest)
    extended = list(manifest.extended.generators)
    rows = [stage_status(manifest, "select", None, 1), stage_status(manifest, "fetch-real", None, shards)]
    rows += [stage_status(manifest, "generate", g, shards) for g in [*manifest.generators, *extended]]
    rows += [stage_status(manifest, "assemble", None, shards), stage_status(manifest, "transform-test", None, tests)]
    rows += [stage_status(manifest, "extend", g, shards) for g in extended]
    return rows


def status_table(rows: list[StageStatus]) -> str:
    """The status as a table, then the running units, the failed units and the failed records."""
    header = ("stage", "units", "done", "running", "failed", "pending")
    cells = [(r.name, r.units, r.done, len(r.running), len(r.failed), r.pending) for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *cells]]
    now = time.time()
    for row in rows:
        lines += [f"running: {row.name.split()[0]} {key} {holder.describe(now)}" for key, holder in row.running]
    for row in rows:
        lines += [f"failed: {row.name.split()[0]} {key}: {message}" for key, message in row.failed.items()]
    for row in rows:
        if row.records:
            reasons = ", ".join(f"{reason} {n}" for reason, n in row.records.most_common())
            lines.append(f"records failed or left out in {row.name}: {reasons}")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    print(status_table(recipe_status(manifest_from_args(args))))
    return 0


def unlock_units(manifest: Manifest, command: str, shards: list[int] | None = None,
                 confirm: Any = None) -> list[tuple[str, LeaseRecord]]:
    """Break the leases of `command`'s units (only `shards` when given); `confirm(held)` may refuse (False).

    Returns the leases that were broken."""
    layout, folder = manifest.layout, STAGES[command]
    held: dict[str, LeaseRecord] = {}
    for path in layout.store.glob(layout.root / "leases" / folder / "**" / "*.json"):
        unit_dir = path.parent
        key = layout.store.relative(unit_dir).split("/", 2)[2]
        if key in held or (shards is not None and shard_number(PurePath(unit_dir.name.split(".")[0])) not in shards):
            continue
        record = current(layout.store, unit_dir)
        if record is not None and not record.released:
            held[key] = record
    if not held or (confirm is not None and not confirm(list(held.items()))):
        return []
    note = f"unlocked by {getpass.getuser()}@{socket.gethostname()}"
    return [(key, record) for key, record in held.items()
            if unlock(layout.store, layout.leases(folder, key), folder, key, note)]


def _ask(held: list[tuple[str, LeaseRecord]]) -> bool:
    now = time.time()
    for key, record in held:
        state = "expired" if record.free(now) else "LIVE"
        print(f"  {key}: {state}, {record.describe(now)}")
    try:
        answer = input(f"unlock these {len(held)} unit(s)? [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _unlock(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    if not args.yes and not sys.stdin.isatty():
        raise UsageError("unlock asks for confirmation on a terminal: pass --yes to unlock without asking")
    broken = unlock_units(manifest, args.stage, args.shards, None if args.yes else _ask)
    print(f"unlocked {len(broken)} unit(s) of {args.stage}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder status` and `d3builder unlock`."""
    status = subparsers.add_parser(
        "status", help="per stage: units done, running (owner, heartbeat age), failed (reasons), pending",
        description="Read the output root (local or storage URL) and print, per stage and generator, how many "
        "units are done, running (with owner and heartbeat age), failed (with reasons) and pending.",
    )
    add_manifest_args(status)
    status.set_defaults(func=_status)
    unlock_parser = subparsers.add_parser(
        "unlock", help="clear the leases of a stage's units (asks first)",
        description="Break the leases of a stage's units (or only --shards), so that the next worker takes them "
        "now instead of after the lease expires. A live owner notices at its next heartbeat and stops.",
    )
    add_manifest_args(unlock_parser)
    unlock_parser.add_argument("--stage", required=True, choices=sorted(STAGES), help="the stage whose units to unlock")
    unlock_parser.add_argument("--shards", type=shard_list, metavar="LIST", help="only these shards, e.g. 0,3 or 0-9")
    unlock_parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    unlock_parser.set_defaults(func=_unlock)
