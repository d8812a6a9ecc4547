"""Stream D3 shards (local or fsspec URLs) into CoDE training views, split across processes and workers.

One epoch on one process (rank) is a fixed sequence of records: shards in a seeded random
order, their row groups shuffled, the whole cut into `world_size` contiguous parts, and the
rank's part passed through a shuffle buffer (simulated on indices, so the sequence is known
up front). DataLoader workers take whole batches of that sequence in turn, so the batches
come out in the same order for any number of workers, and a resumed run skips the records
already consumed without reading or decoding them. A worker reads only the row groups that
hold one of its records (with a shuffle buffer about the size of a batch, a row group is
read by two or three workers). Everything random about a record (which fake, its
augmentations and crops) comes from (seed, epoch, record id).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from codetrain.errors import InvalidInputError
from codetrain.realsource import (
    RealImageSource,
    is_local,
    is_shard,
    open_parquet,
    require_real_images,
)
from codetrain.sources import open_source
from codetrain.views import IMAGENET_MEAN, IMAGENET_STD, Stats, ViewMaker, normalise
from d3builder.storage.schema import generator_slots

__all__ = ["D3Records", "RealImageSource", "check_shards", "collate", "list_shards", "record_rng"]

log = logging.getLogger(__name__)

_PLAN, _ORDER = 0x504C414E, 0x4F524452  # tags keeping the plan and order RNG streams apart


def list_shards(data: str | Sequence[str], split: str) -> list[str]:
    """The sorted files of `split` in a data source (`codetrain.sources`: card, layout, file or glob), or a given list."""
    if not isinstance(data, str):
        return sorted(str(d) for d in data)
    return open_source(data).shards(split)


def record_rng(seed: int, epoch: int, record_id: str) -> np.random.Generator:
    """The RNG of one record in one epoch (independent of worker count, rank and position)."""
    digest = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, digest])


def shuffle_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The output order of a shuffle buffer of size `buffer` over a stream of `n` items (item indices)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    held = list(range(min(buffer, n)))
    out = np.empty(n, dtype=np.int64)
    picks = rng.integers(0, len(held), size=n - len(held))
    for t, pick in enumerate(picks):
        out[t] = held[pick]
        held[pick] = len(held) + t
    out[len(picks):] = rng.permutation(held)
    return out


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's footer says: rows per row group and the columns the loader reads."""

    url: str
    row_groups: tuple[int, ...]
    slots: tuple[int, ...]
    has_real: bool
    has_generator: bool

    @property
    def columns(self) -> list[str]:
        names = ["id", *(f"image_gen{s}" for s in self.slots), *(f"model_gen{s}" for s in self.slots)]
        if self.has_generator:
            names += [f"generator_gen{s}" for s in self.slots]
        return names + (["image_real"] if self.has_real else [])


def read_shard_info(url: str) -> ShardInfo:
    """Read one shard's footer (InvalidInputError naming the shard if it is not a usable D3 shard)."""
    try:
        meta = open_parquet(url).metadata
    except Exception as exc:  # any reader error is reported with the shard's name
        raise InvalidInputError(f"cannot read the Parquet footer of {url}: {exc}") from exc
    names = meta.schema.to_arrow_schema().names
    slots = tuple(generator_slots(names))
    if "id" not in names or not slots:
        raise InvalidInputError(f"{url} is not a D3 shard: it needs an `id` column and `image_gen{{i}}` columns")
    groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
    has_generator = all(f"generator_gen{s}" in names for s in slots)
    return ShardInfo(url, groups, slots, "image_real" in names, has_generator)


def read_shard_infos(shards: Sequence[str]) -> list[ShardInfo]:
    """The footers of several shards (remote ones read in parallel), in order."""
    if all(is_local(s) for s in shards):
        return [read_shard_info(s) for s in shards]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read_shard_info, shards))


def check_shards(files: Sequence[str], real_source: RealImageSource | None, data: str) -> None:
    """Check a command's input files before any work: every shard's footer readable (image files aside), reals available.

    InvalidInputError names the first unusable shard; shards without `image_real` need a
    `real_source` holding reals of theirs (`require_real_images`).
    """
    infos = read_shard_infos([f for f in files if is_shard(f)])
    require_real_images([i.url for i in infos if not i.has_real], real_source, data)


@dataclass(frozen=True)
class Piece:
    """Rows [lo, hi) of one row group, at stream offset `start` of a rank's stream."""

    shard: int
    group: int
    lo: int
    hi: int
    start: int


@dataclass
class Loaded:
    """A record read from its shard: the real and the drawn fake (still encoded) and its RNG."""

    id: str
    rng: np.random.Generator
    real: bytes | None = None
    fake: bytes | None = None
    generator: str = ""
    error: str | None = None


class D3Records(IterableDataset):
    """The records of D3 shards as dicts of uint8 [3,H,W] views plus `id`, `generator` and `skipped`.

    `collate` turns a list of them into the training batch (float32 views, normalised).

    Set `batch_size` to the DataLoader's: workers then take whole batches of the sequence in
    turn, matching the DataLoader's round robin, so the batches (and `set_position`) do not
    depend on `num_workers`. Call `set_epoch` (and `set_position` when resuming) before
    creating each epoch's iterator; workers copy the dataset when it is created, so do not use
    `persistent_workers`. A skipped (bad) record shifts the later batches of its worker by one
    record, so a resume after it is exact only up to the number of records skipped.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        seed: int = 42,
        shuffle_buffer: int = 256,
        views: ViewMaker | None = None,
        real_source: RealImageSource | None = None,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int | None = None,
    ) -> None:
        if not shards:
            raise ValueError("no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.shards = [str(s) for s in shards]
        self.seed, self.shuffle_buffer, self.rank, self.world_size = seed, shuffle_buffer, rank, world_size
        self.views = views or ViewMaker()
        self.real_source = real_source
        self.batch_size = batch_size
        self.epoch, self.position, self.skipped = 0, 0, 0
        self.infos = read_shard_infos(self.shards)
        missing = [i.url for i in self.infos if not i.has_real]
        if missing and real_source is None:
            raise ValueError(f"{missing[0]} (and {len(missing) - 1} more) has no image_real column: pass a real_source")
        self.total = sum(sum(i.row_groups) for i in self.infos)

    # --- position ------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order and per-record randomness); a new epoch starts at position 0."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def set_position(self, records: int) -> None:
        """Start the epoch after the first `records` records the DataLoader yielded on this process (consumed)."""
        if not 0 <= records <= len(self):
            raise ValueError(f"position {records} is outside 0..{len(self)} (records of rank {self.rank})")
        self.position = records

    def state_dict(self) -> dict[str, int]:
        """The data position: epoch and records of it consumed (as set by `set_position`)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a `state_dict()` position."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the saved data position is for seed {state['seed']}, this dataset has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self.set_position(int(state["position"]))

    def __len__(self) -> int:
        """Records of this rank per epoch (before skipping bad ones)."""
        return (self.rank + 1) * self.total // self.world_size - self.rank * self.total // self.world_size

    # --- the epoch's plan ----------------------------------------------------------------------

    def pieces(self) -> list[Piece]:
        """This rank's stream for the current epoch: row-group pieces in order."""
        rng = np.random.default_rng([self.seed, self.epoch, _PLAN])
        lo = self.rank * self.total // self.world_size
        hi = lo + len(self)
        out, offset = [], 0
        for shard in rng.permutation(len(self.infos)):
            groups = self.infos[shard].row_groups
            for group in rng.permutation(len(groups)):
                a, b = max(offset, lo), min(offset + groups[group], hi)
                if a < b:
                    out.append(Piece(int(shard), int(group), a - offset, b - offset, a - lo))
                offset += groups[group]
        return out

    def order(self) -> np.ndarray:
        """This rank's record sequence for the current epoch, as stream positions."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, _ORDER])
        return shuffle_order(len(self), self.shuffle_buffer, rng)

    def worker_order(self, worker: int, workers: int) -> np.ndarray:
        """The stream positions DataLoader worker `worker` of `workers` yields, in order, from the current position.

        Worker w takes batches w, w + workers, ... of the sequence (counted from the position),
        which is the DataLoader's round robin: the batches come out in sequence order for any
        number of workers.
        """
        if workers > 1 and self.position and not self.batch_size:
            raise ValueError(
                f"resuming at record {self.position} with {workers} DataLoader workers needs "
                "D3Records(batch_size=<the DataLoader's batch size>)"
            )
        q = np.arange(self.position, len(self))
        mine = q[((q - self.position) // (self.batch_size or 1)) % workers == worker]
        return self.order()[mine]

    # --- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        wanted = self.worker_order(worker, workers)
        pending = 0
        for record in self._read(self.pieces(), wanted):
            views = self._views(record)
            if views is None:
                pending += 1
                self.skipped += 1
                continue
            yield {**views, "id": record.id, "generator": record.generator, "skipped": pending}
            pending = 0

    def _views(self, record: Loaded) -> dict[str, torch.Tensor] | None:
        """The record's views, or None (with a warning naming it) when it cannot be used."""
        try:
            if record.error:
                raise ValueError(record.error)
            real = record.real if record.real is not None else self._real(record.id)
            return self.views.make_encoded(real, record.fake, record.rng, normalised=False)
        except Exception as exc:  # noqa: BLE001 - a bad image skips its record, never the epoch
            log.warning("skipping record %r: %s: %s", record.id, type(exc).__name__, exc)
            return None

    def _real(self, record_id: str) -> bytes:
        data = self.real_source.get(record_id) if self.real_source is not None else None
        if data is None:
            raise ValueError("no real image (not in the shard nor in the real source)")
        return data

    def _read(self, pieces: list[Piece], wanted: np.ndarray) -> Iterator[Loaded]:
        """The records at stream positions `wanted`, in that order, reading only row groups that hold one."""
        needed = np.sort(wanted)
        held: dict[int, Loaded] = {}
        upcoming = iter(pieces)
        files: dict[int, pq.ParquetFile] = {}
        for position in wanted.tolist():
            while position not in held:
                piece = next(upcoming)
                a, b = np.searchsorted(needed, [piece.start, piece.start + piece.hi - piece.lo])
                if a < b:
                    positions = needed[a:b].tolist()
                    rows = [p - piece.start + piece.lo for p in positions]
                    held.update(zip(positions, self._load(files, piece, rows), strict=True))
            yield held.pop(position)

    def _load(self, files: dict[int, pq.ParquetFile], piece: Piece, rows: list[int]) -> list[Loaded]:
        """Read `rows` of a piece's row group, keeping the real and one fake drawn per record."""
        info = self.infos[piece.shard]
        try:
            if piece.shard not in files:
                files.clear()
                files[piece.shard] = open_parquet(info.url)
            table = files[piece.shard].read_row_group(piece.group, columns=info.columns).take(rows)
        except Exception as exc:  # noqa: BLE001 - an unreadable row group skips its records
            where = f"{info.url} row group {piece.group}"
            log.warning("cannot read %s: %s", where, exc)
            return [Loaded(f"{where} row {r}", np.random.default_rng(), error=f"unreadable: {exc}") for r in rows]
        column = {name: table[name] for name in info.columns}
        ids = column["id"].to_pylist()
        fakes = {s: pc.struct_field(column[f"image_gen{s}"], "bytes").to_pylist() for s in info.slots}
        names = {s: column[f"generator_gen{s}" if info.has_generator else f"model_gen{s}"].to_pylist() for s in info.slots}
        reals = pc.struct_field(column["image_real"], "bytes").to_pylist() if info.has_real else [None] * len(rows)
        out = []
        for i, rid in enumerate(ids):
            record = Loaded(str(rid), record_rng(self.seed, self.epoch, str(rid)), real=reals[i])
            present = [s for s in info.slots if fakes[s][i]]
            if not present:
                record.error = "no generated image"
            else:
                slot = present[int(record.rng.integers(len(present)))]
                record.fake, record.generator = fakes[slot][i], names[slot][i] or f"gen{slot}"
            out.append(record)
        return out


def collate(samples: list[dict[str, Any]], mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> dict[str, Any]:
    """Torch's default collation, except that uint8 views become one normalised float32 [B,3,H,W] tensor each.

    The normalisation (the model's `mean`/`std`: bind them with functools.partial for a
    DataLoader) writes straight into the batch tensor, in shared memory inside a DataLoader
    worker (as `default_collate` does), so a view is converted and copied once.
    """
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dtype == torch.uint8 and first.dim() == 3:
            out = _batch_tensor((len(values), 3, *first.shape[1:]))
            array = out.numpy()
            for i, view in enumerate(values):
                normalise(view, array[i], mean, std)
            batch[key] = out
        else:
            batch[key] = default_collate(values)
    return batch


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor, in shared memory when built in a DataLoader worker (as `default_collate` does)."""
    if get_worker_info() is None:
        return torch.empty(shape)
    template = torch.empty(0)
    storage = template._typed_storage()._new_shared(math.prod(shape), device=template.device)
    return template.new(storage).resize_(shape)
