"""The one unit runner every stage uses: skip done units, lease, compute, commit, write stats, release.

A stage describes its units with a `UnitJob` (where a unit's stats and outputs are, how to compute it) and
hands them to `UnitRunner.run`. For each unit the runner:

1. skips it when done: its stats file (the done marker) exists and names outputs that all exist (or the job
   says a later unit already holds its work: a part of a merged shard); a done unit whose input units
   (`job.input_units`) were redone since it ran (a `--retry-failed` upstream) is refreshed (`job.refresh`);
2. waits while an input unit is still being made by a live owner (or, with `wait_inputs`, not started yet: the
   stages of a pipeline run side by side), then takes its lease (`d3builder.storage.lease`), or reports it
   BUSY when a live owner holds it;
3. checks "done" again (another owner may have finished it meanwhile), removes what a killed writer left;
4. calls `job.compute(ctx)` (or `retry`/`refresh`) under a heartbeat; the job writes its outputs through `ctx` (each commit is
   fenced: it happens only while the lease is still ours) and returns a `UnitWork` (stats payload, counts);
5. writes the stats file last (atomically), adding who ran the unit and when (`started_at`, `finished_at`,
   host, pid, rank, lease token), records the completion under `history/`, and releases the lease.

A worker is then just "run the units of a stage until none is left":

    runner = UnitRunner(layout, lease_seconds=300)     # or manifest.runner(): the manifest's lease settings
    summary = runner.run(job, units)      # units busy elsewhere are waited for (wait=False: left as BUSY)
    sys.exit(summary.exit_code)

and `runner.pending(job, units)` says which units still have work (for a launcher deciding how many
workers to start). `d3builder.cluster` starts such workers with local processes, SLURM job arrays or Ray. Every stage module exposes its job (`FetchJob`, `GenerateJob`, `AssembleJob`, ...) and
a function that builds its units and runs them (`fetch_real`, `generate_shards`, `assemble_dataset`, ...),
which is also what its command calls.

Units that other live owners hold are revisited until they are done or their lease expires (then taken
over), so any number of processes on any number of nodes can share a stage: each exits 0 once the stage
is complete. With `wait=False` they are left BUSY (exit code 3). Outcomes are `UnitOutcome`s, results
`UnitResult`s, and a run's totals a `RunSummary` whose `exit_code` is 0 (all good), 1 (a unit failed or
records failed above `max_failed_fraction`), 3 (units left busy by other live owners); 2 (user error) is
raised as `d3builder.core.commandline.UsageError` before any unit runs.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import pyarrow as pa
from datasets import Features
from tqdm import tqdm

from d3builder.core.commandline import UsageError, process_rank
from d3builder.storage.layout import DataLayout, part_name, shard_name
from d3builder.storage.lease import (
    DEFAULT_LEASE_SECONDS,
    Lease,
    LeaseLost,
    LeaseRecord,
    acquire,
    current,
    lease_payload,
)
from d3builder.storage.shards import DEFAULT_ROW_GROUP_SIZE, ShardStream, write_shard

log = logging.getLogger(__name__)

DEFAULT_MAX_FAILED_FRACTION = 0.01
"""Records whose work failed, as a fraction of the records processed, above which a run exits 1."""


class UnitOutcome(enum.Enum):
    """What happened to one unit in this run."""

    DONE = "done"  # computed and committed now
    RETRIED = "retried"  # a done unit's failed records were redone now (--retry-failed)
    SKIPPED = "skipped"  # already done (before, or by another owner meanwhile)
    BUSY = "busy"  # held by another live owner (or this process lost its lease)
    FAILED = "failed"  # an error while computing it; not done
    BAD_INPUT = "bad_input"  # an input is missing or unreadable; not done

    @property
    def finished(self) -> bool:
        return self in (UnitOutcome.DONE, UnitOutcome.RETRIED, UnitOutcome.SKIPPED)


class ExitCode(enum.IntEnum):
    """Process exit codes shared by every d3builder command."""

    OK = 0
    FAILED = 1
    USAGE = 2
    BUSY = 3

    @staticmethod
    def worst(codes: Iterable[int]) -> ExitCode:
        """The code of several runs: a user error first, then a failure, then busy units, else OK."""
        order = [ExitCode.OK, ExitCode.BUSY, ExitCode.FAILED, ExitCode.USAGE]
        return max((ExitCode(c) for c in codes), key=order.index, default=ExitCode.OK)


MEANING = {
    ExitCode.OK: "all good",
    ExitCode.FAILED: "work failed (see above); rerun to redo it",
    ExitCode.USAGE: "user error",
    ExitCode.BUSY: "units left busy by other live owners",
}


class BadInput(Exception):
    """An input of the unit is missing or unreadable; the message names the file."""


class InputsPending(Exception):
    """The unit's inputs are being made by other live owners: come back later (BUSY)."""


FAILED_EVENTS = ("failed", "bad_input")
"""History outcomes of a unit that ended without being done."""


@dataclass(frozen=True)
class Unit:
    """One unit of work: (stage, shard), per generator where a stage has several, a part where a shard is split."""

    stage: str
    shard: int
    group: str | None = None
    part: tuple[int, int] | None = None
    """(index, count) of a shard split into parts by work; None for the whole shard."""

    @property
    def key(self) -> str:
        """The unit's name under leases/ and history/: `[group/]00003[.p001of005]`."""
        name = shard_name(self.shard) if self.part is None else part_name(self.shard, *self.part)
        return name if self.group is None else f"{self.group}/{name}"

    @property
    def label(self) -> str:
        """`generate sd14 shard 3 part 2/5`, for messages."""
        text = f"{self.stage}{' ' + self.group if self.group else ''} shard {self.shard}"
        return text if self.part is None else f"{text} part {self.part[0] + 1}/{self.part[1]}"


@dataclass
class UnitWork:
    """What computing a unit produced: the stage's stats payload and its counts."""

    stats: dict[str, Any]
    records: int = 0
    """Items (records) processed."""
    failed: int = 0
    """Records whose work failed (counted against max_failed_fraction); the unit is still done."""
    reasons: Counter = field(default_factory=Counter)
    """Records failed or left out, by reason."""
    counts: Counter = field(default_factory=Counter)
    """The stage's own tallies: rows written per split, images generated, URLs fetched..."""


@dataclass
class UnitResult:
    """One unit's outcome in this run, with its counts when it was computed now."""

    unit: Unit
    outcome: UnitOutcome
    message: str = ""
    records: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)
    counts: Counter = field(default_factory=Counter)
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class RunSummary:
    """Every unit's result in one run of one stage (for one generator where it has several)."""

    stage: str
    group: str | None = None
    results: list[UnitResult] = field(default_factory=list)
    seconds: float = 0.0
    max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION
    rank: int = 0
    world: int = 1
    item: str = "record"
    notes: list[str] = field(default_factory=list)
    """Further lines for the summary (e.g. a folder generator's images that match no record)."""

    def units(self, *outcomes: UnitOutcome) -> list[Unit]:
        """Units with one of `outcomes` (all when none is given), in the order they were run."""
        return [r.unit for r in self.results if not outcomes or r.outcome in outcomes]

    def shards(self, *outcomes: UnitOutcome) -> list[int]:
        """Shard numbers with one of `outcomes`, in order, each once."""
        return sorted({u.shard for u in self.units(*outcomes)})

    def _computed(self) -> list[UnitResult]:
        return [r for r in self.results if r.outcome in (UnitOutcome.DONE, UnitOutcome.RETRIED)]

    @property
    def records(self) -> int:
        return sum(r.records for r in self._computed())

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self._computed())

    @property
    def reasons(self) -> Counter:
        return sum((r.reasons for r in self._computed()), Counter())

    @property
    def counts(self) -> Counter:
        return sum((r.counts for r in self._computed()), Counter())

    @property
    def problems(self) -> dict[int, str]:
        """The message of every FAILED or BAD_INPUT unit, by shard."""
        return {r.unit.shard: r.message for r in self.results
                if r.outcome in (UnitOutcome.FAILED, UnitOutcome.BAD_INPUT)}

    @property
    def complete(self) -> bool:
        """True when every unit is done (now, before, or by another owner)."""
        return all(r.outcome.finished for r in self.results)

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.records if self.records else 0.0

    @property
    def exit_code(self) -> ExitCode:
        if self.problems or self.failed_fraction > self.max_failed_fraction:
            return ExitCode.FAILED
        if self.units(UnitOutcome.BUSY):
            return ExitCode.BUSY
        return ExitCode.OK

    @property
    def name(self) -> str:
        return f"{self.stage} {self.group}" if self.group else self.stage

    def describe(self) -> str:
        """The run's summary line (its exit code and why), then one line per problem and busy unit."""
        prefix = f"[process {self.rank}/{self.world}] " if self.world > 1 else ""
        count = Counter(r.outcome for r in self.results)
        parts = [f"{count[UnitOutcome.DONE]} unit(s) done", f"{count[UnitOutcome.SKIPPED]} already done"]
        parts += [f"{count[o]} {o.value.replace('_', ' ')}" for o in
                  (UnitOutcome.RETRIED, UnitOutcome.BUSY, UnitOutcome.FAILED, UnitOutcome.BAD_INPUT) if count[o]]
        rate = f", {self.records / self.seconds:.2f} {self.item}s/s" if self.seconds > 0 and self.records else ""
        failed = f"{self.failed} failed ({100 * self.failed_fraction:.1f}%, max {100 * self.max_failed_fraction:g}%)"
        code = self.exit_code
        lines = [f"{prefix}{self.name}: {', '.join(parts)}; {self.records} {self.item}(s), {failed}; "
                 f"{self.seconds:.1f} s{rate}; exit {int(code)}: {MEANING[code]}"]
        lines += [f"{prefix}  {reason}: {n}" for reason, n in sorted(self.reasons.items())]
        lines += [f"{prefix}  {note}" for note in self.notes]
        lines += [f"{prefix}{r.unit.label}: NOT done, {r.message}" for r in self.results
                  if r.outcome in (UnitOutcome.FAILED, UnitOutcome.BAD_INPUT)]
        lines += [f"{prefix}{r.unit.label}: busy, {r.message}" for r in self.results if r.outcome is UnitOutcome.BUSY]
        return "\n".join(lines)


class UnitContext:
    """What a job computing one unit may use: its lease (checked at every commit), writers, the progress bar."""

    def __init__(self, runner: UnitRunner, unit: Unit, lease: Lease, bar: tqdm) -> None:
        self.runner, self.unit, self.lease, self.bar = runner, unit, lease, bar
        self.layout, self.store = runner.layout, runner.layout.store
        self.committed: list[PurePath] = []

    def check(self) -> None:
        """Raise LeaseLost if the lease was lost: call between batches to abandon early."""
        self.lease.check()

    def advance(self, items: int) -> None:
        """Count `items` done on the progress bar."""
        self.bar.update(items)

    def _committed(self, path: PurePath | None) -> PurePath | None:
        if path is not None:
            self.committed.append(path)
        return path

    def stream(self, path: PurePath, features: Features, row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> ShardStream:
        """A ShardStream whose commit is fenced by the lease; commit it with `ctx.commit(stream)`."""
        self.store.remove_temporaries(path)
        return ShardStream(path, features, row_group_size, store=self.store, guard=self.lease.ensure)

    def commit(self, stream: ShardStream) -> PurePath | None:
        """Commit a stream (None when it holds no row) and remember its file as an output of the unit."""
        return self._committed(stream.commit())

    def write_shard(self, rows: Sequence[dict] | pa.Table, path: PurePath, features: Features,
                    row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> PurePath:
        """Write a whole shard, fenced by the lease."""
        return self._committed(write_shard(rows, path, features, row_group_size, self.store, self.lease.ensure))

    def remove(self, path: PurePath) -> None:
        """Delete a stale output of an earlier, different run of this unit (under the lease)."""
        self.lease.ensure()
        self.store.remove(path)


class UnitJob:
    """How a stage computes its units; subclasses implement `compute` (and `retry` where it applies)."""

    stage = "unit"
    item = "record"
    """What the progress bar counts."""

    def __init__(self, layout: DataLayout) -> None:
        self.layout, self.store = layout, layout.store

    def stats_path(self, unit: Unit) -> PurePath:
        """The unit's stats file: its done marker."""
        return self.layout.stats(unit.stage, unit.shard, unit.group, unit.part)

    def outputs(self, unit: Unit) -> list[PurePath]:
        """Every file the unit may write (what killed writers left of them is removed before it runs)."""
        return []

    def size(self, unit: Unit) -> int:
        """Items the unit processes (for the progress bar total); 0 when unknown."""
        return 0

    def input_units(self, unit: Unit) -> list[Unit]:
        """The units (of earlier stages) this one reads. A unit waits while they are being made; when one of
        them is redone (e.g. by --retry-failed) after this unit ran, this unit is refreshed (`refresh`)."""
        return []

    def input_stats(self, unit: Unit) -> list[PurePath]:
        """The stats files (done markers) of `input_units`."""
        return [self.layout.stats(u.stage, u.shard, u.group, u.part) for u in self.input_units(unit)]

    def superseded(self, unit: Unit) -> bool:
        """Whether a unit that is not done needs no run because a later unit already holds its work."""
        return False

    def done(self, unit: Unit, stats: dict[str, Any]) -> bool:
        """Whether a unit whose stats file and outputs exist is done for this run (e.g. covers its splits)."""
        return True

    def retryable(self, stats: dict[str, Any]) -> bool:
        """Whether a done unit has failed records that --retry-failed redoes."""
        return False

    def cleanup(self, unit: Unit) -> None:
        """Remove other leftovers of a killed run of `unit` (called with its lease held)."""

    def compute(self, ctx: UnitContext) -> UnitWork:
        raise NotImplementedError

    def retry(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        raise NotImplementedError(f"{self.stage} has no --retry-failed")

    def refresh(self, ctx: UnitContext, stats: dict[str, Any]) -> UnitWork:
        """Bring a done unit up to date after an input unit was redone: by default, compute it again."""
        return self.compute(ctx)


def shards_for_process(shards: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` handles (round robin, disjoint, complete)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return [s for i, s in enumerate(shards) if i % world_size == rank]


class UnitRunner:
    """Runs a stage's units: see the module docstring."""

    def __init__(self, layout: DataLayout, *, lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: bool = True,
                 retry_failed: bool = False, force: bool = False, progress: bool = True,
                 max_failed_fraction: float = DEFAULT_MAX_FAILED_FRACTION, rank: int | None = None,
                 world: int = 1, wait_inputs: bool = False) -> None:
        self.layout, self.store = layout, layout.store
        self.lease_seconds, self.wait, self.retry_failed, self.force = lease_seconds, wait, retry_failed, force
        self.wait_inputs = wait_inputs
        """Also wait for input units nobody has started yet (a worker of a pipeline: the earlier stage's workers
        will make them); otherwise only inputs a live owner is making are waited for."""
        self.progress, self.max_failed_fraction = progress, max_failed_fraction
        self.rank = process_rank() if rank is None else rank
        self.world = world
        self.poll_s = min(max(lease_seconds / 4, 0.05), 10.0)

    def read_done(self, job: UnitJob, unit: Unit) -> dict[str, Any] | None:
        """The unit's stats when it is done and up to date (see `read_state`), else None."""
        stats, stale = self.read_state(job, unit)
        return None if stale else stats

    def read_state(self, job: UnitJob, unit: Unit) -> tuple[dict[str, Any] | None, bool]:
        """(stats, stale): the unit's stats when it is done (stats file, every output it names, the job's own
        check), else None; and whether an input unit was redone since it ran."""
        path = job.stats_path(unit)
        try:
            stats = self.store.read_json(path)
        except FileNotFoundError:
            return None, False
        except ValueError:
            return None, False  # a stats file is written atomically: unparsable means foreign, so redo the unit
        outputs = [self.layout.root / relative for relative in stats.get("committed", [])]
        if not all(self.store.isfile(p) for p in outputs) or not job.done(unit, stats):
            return None, False
        recorded = stats.get("inputs_finished_at", {})
        stale = any(self._finished_at(self.layout.root / relative) not in (None, when)
                    for relative, when in recorded.items())
        return stats, stale

    def _finished_at(self, stats_path: PurePath) -> float | None:
        """When the unit whose stats file this is finished (None when it is not done)."""
        try:
            return self.store.read_json(stats_path).get("finished_at")
        except (FileNotFoundError, ValueError):
            return None

    def pending(self, job: UnitJob, units: Sequence[Unit]) -> list[Unit]:
        """The units that still have work for this runner (not done, or stale; with retry_failed, also done
        units with failed records)."""
        return [u for u in units if self._wanted(job, u, *self.read_state(job, u))]

    def _wanted(self, job: UnitJob, unit: Unit, stats: dict[str, Any] | None, stale: bool) -> bool:
        """Whether a unit in this state has work for this run."""
        if self.force:
            return True
        if stats is None:
            return not job.superseded(unit)
        return stale or (self.retry_failed and job.retryable(stats))

    def waiting_for(self, job: UnitJob, unit: Unit) -> str | None:
        """Why the unit cannot start yet (an input unit a live owner is making, or with wait_inputs one not
        started yet), or None. An input that failed, or that nobody makes, is left to the job (BadInput)."""
        for source in job.input_units(unit):
            if self._finished_at(self.layout.stats(source.stage, source.shard, source.group, source.part)) is not None:
                continue
            holder = current(self.store, self.layout.leases(source.stage, source.key), self.lease_seconds)
            if holder is not None and not holder.free():
                return f"waiting for {source.label}: {holder.describe()}"
            if self.wait_inputs and self.last_event(source).get("outcome") not in FAILED_EVENTS:
                return f"waiting for {source.label} (not started yet)"
        return None

    def last_event(self, unit: Unit) -> dict[str, Any]:
        """The unit's latest history event (completion or failure), {} when it has none."""
        events = self.store.glob(self.layout.history(unit.stage, unit.key) / "*.json")
        for path in reversed(events):
            try:
                return self.store.read_json(path)
            except (FileNotFoundError, ValueError):
                continue
        return {}

    def run(self, job: UnitJob, units: Sequence[Unit], group: str | None = None) -> RunSummary:
        """Run every unit (see the module docstring); `group` labels the summary (e.g. the generator)."""
        started = time.time()
        todo = self.pending(job, units)
        waiting = set(todo)
        results = {u: UnitResult(u, UnitOutcome.SKIPPED) for u in units if u not in waiting}
        total = sum(job.size(u) for u in todo)
        told: set[Unit] = set()
        with tqdm(total=total or None, desc=f"{job.stage} {group}" if group else job.stage, unit=job.item, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            while todo:
                waiting = []
                for unit in todo:
                    result = self.run_unit(job, unit, bar)
                    if result.outcome is UnitOutcome.BUSY and self.wait:
                        waiting.append(unit)
                        if unit not in told:
                            told.add(unit)
                            log.info("%s: %s", unit.label, result.message)
                    results[unit] = result
                if not waiting:
                    break
                log.debug("%d unit(s) of %s held by other owners or waiting for inputs; waiting %.1f s", len(waiting),
                          job.stage, self.poll_s)
                time.sleep(self.poll_s)
                todo = waiting
        return RunSummary(job.stage, group, [results[u] for u in units], time.time() - started,
                          self.max_failed_fraction, self.rank, self.world, job.item)

    def run_unit(self, job: UnitJob, unit: Unit, bar: tqdm | None = None) -> UnitResult:
        """Run one unit through the whole lifecycle; never raises for the unit's own errors."""
        bar = bar if bar is not None else tqdm(disable=True)
        if not self._wanted(job, unit, *self.read_state(job, unit)):
            return UnitResult(unit, UnitOutcome.SKIPPED, "done by another owner")
        waiting = self.waiting_for(job, unit)
        if waiting is not None:
            return UnitResult(unit, UnitOutcome.BUSY, waiting)
        folder = self.layout.leases(unit.stage, unit.key)
        try:
            lease = acquire(self.store, folder, unit.stage, unit.key, self.lease_seconds)
        except OSError as exc:  # the store did not answer: the unit stays pending for this or another worker
            log.error("%s: could not take its lease: %s", unit.label, exc)
            return UnitResult(unit, UnitOutcome.FAILED, f"could not take its lease: {type(exc).__name__}: {exc}")
        if isinstance(lease, LeaseRecord):
            return UnitResult(unit, UnitOutcome.BUSY, lease.describe())
        finished = False
        try:
            with lease.heartbeat():
                stats, stale = (None, False) if self.force else self.read_state(job, unit)
                if not self._wanted(job, unit, stats, stale):
                    finished = True
                    return UnitResult(unit, UnitOutcome.SKIPPED, "done by another owner")
                result = self._compute(job, unit, lease, bar, stats, stale)
                finished = result.outcome.finished
                return result
        finally:
            with contextlib.suppress(Exception):  # a lease that cannot be released expires on its own
                lease.release(finished)

    def _compute(self, job: UnitJob, unit: Unit, lease: Lease, bar: tqdm, stats: dict[str, Any] | None,
                 stale: bool = False) -> UnitResult:
        """Compute (or refresh, or retry) a leased unit, then commit its stats and history."""
        started = time.time()
        for path in [*job.outputs(unit), job.stats_path(unit)]:
            self.store.remove_temporaries(path)
        ctx = UnitContext(self, unit, lease, bar)
        outcome = UnitOutcome.DONE if stats is None or stale else UnitOutcome.RETRIED
        inputs = {self.store.relative(p): self._finished_at(p) for p in job.input_stats(unit)}
        try:
            job.cleanup(unit)
            if stats is None:
                work = job.compute(ctx)
            else:
                work = job.refresh(ctx, stats) if stale else job.retry(ctx, stats)
            finished = time.time()
            previous = [p for p in (stats or {}).get("committed", []) if self.store.isfile(self.layout.root / p)]
            committed = sorted({*previous, *(self.store.relative(p) for p in ctx.committed)})
            payload = {**work.stats, "stage": unit.stage, "unit": unit.key, "started_at": started,
                       "finished_at": finished, "lease": lease_payload(lease), "committed": committed,
                       "inputs_finished_at": {k: v for k, v in inputs.items() if v is not None}}
            lease.ensure()
            self.store.write_json(job.stats_path(unit), payload)
        except LeaseLost as exc:
            log.warning("%s: abandoned: %s", unit.label, exc)
            return UnitResult(unit, UnitOutcome.BUSY, f"lost its lease: {exc}")
        except BadInput as exc:
            log.error("%s: not done: %s", unit.label, exc)
            self._history(unit, lease, UnitOutcome.BAD_INPUT, started, str(exc), "bad_input")
            return UnitResult(unit, UnitOutcome.BAD_INPUT, str(exc))
        except InputsPending as exc:
            return UnitResult(unit, UnitOutcome.BUSY, str(exc))
        except UsageError:
            raise  # a user error stops the whole run (the lease is released on the way out)
        except Exception as exc:  # noqa: BLE001 - one broken unit must not stop the others; reported and recorded
            message = f"{type(exc).__name__}: {exc}"
            log.error("%s: failed: %s", unit.label, message, exc_info=log.isEnabledFor(logging.DEBUG))
            self._history(unit, lease, UnitOutcome.FAILED, started, message, type(exc).__name__)
            return UnitResult(unit, UnitOutcome.FAILED, message)
        self._history(unit, lease, outcome, started, "")
        return UnitResult(unit, outcome, "", work.records, work.failed, Counter(work.reasons), Counter(work.counts),
                          started, finished)

    def _history(self, unit: Unit, lease: Lease, outcome: UnitOutcome, started: float, message: str,
                 reason: str = "") -> None:
        """Record one completion or failure of `unit` (one file per event, never overwritten)."""
        now = time.time()
        event = {"outcome": outcome.value, "unit": unit.key, "stage": unit.stage, "started_at": started,
                 "finished_at": now, "message": message, "reason": reason, **lease_payload(lease)}
        path = self.layout.history(unit.stage, unit.key) / f"{time.time_ns()}-{lease.token}.json"
        try:
            self.store.write_json(path, event)
        except Exception as exc:  # noqa: BLE001 - the history is for status and audits, never worth losing a unit
            log.warning("%s: could not record history: %s", unit.label, exc)
