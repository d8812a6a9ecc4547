"""CoDE training under Accelerate: stream D3 shards, contrastive steps, checkpoints, validation, early stopping."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from codetrain import checkpoint as ckpt
from codetrain.config import TrainConfig, config_yaml
from codetrain.errors import InvalidInputError, MissingInputError
from codetrain.losses import GLOBAL_KEYS, LOCAL_KEYS, LossOutput, code_loss
from codetrain.model import CoDEEmbedder, create_embedder, load_weights, weights_bytes
from codetrain.runlayout import CheckpointFiles, RunLayout
from codetrain.runlog import RowKind, RunLog, loss_curve_png
from d3builder.storage.store import Location, Store, storage_defaults

log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (avx512_bf16 or AMX), where bf16 autocast beats fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """Accelerate's `mixed_precision` ("no", "bf16", "fp16") for a config precision on this device."""
    if precision == "auto":
        if on_gpu:
            return "fp16"
        return "bf16" if cpu_has_native_bf16() else "no"
    if precision == "fp16" and not on_gpu:
        raise ValueError("fp16 autocast needs a GPU; on a CPU use bf16 or fp32")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator on the GPU (unless config.cpu) with the resolved mixed precision."""
    on_gpu = torch.cuda.is_available() and not config.cpu
    return Accelerator(
        cpu=not on_gpu,
        mixed_precision=resolve_precision(config.precision, on_gpu),
        gradient_accumulation_steps=config.grad_accum,
    )


def view_keys(global_local: bool) -> tuple[str, ...]:
    """The batch views a step embeds: 4 global, plus 4 crops for the global-local term."""
    return GLOBAL_KEYS + (LOCAL_KEYS if global_local else ())


def embed_views(
    model: nn.Module, batch: Mapping[str, Any], keys: tuple[str, ...], device: torch.device
) -> dict[str, torch.Tensor]:
    """Embed every view, one forward pass per image size (a ViT has no batch statistics, so this is exact)."""
    by_size: dict[tuple[int, ...], list[str]] = {}
    for key in keys:
        by_size.setdefault(tuple(batch[key].shape[1:]), []).append(key)
    emb: dict[str, torch.Tensor] = {}
    for group in by_size.values():
        x = torch.cat([batch[k] for k in group]).to(device, non_blocking=True)
        out = model(x).float()
        for key, part in zip(group, out.chunk(len(group)), strict=True):
            emb[key] = part
    return emb


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The CPU generator that draws the derangements of one micro-batch, seeded from (seed, step, rank)."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def compute_loss(model: nn.Module, batch: Mapping[str, Any], generator: torch.Generator, device: torch.device,
                 global_local: bool = True, temperature: float = 0.1) -> LossOutput:
    """The CoDE loss of one batch."""
    emb = embed_views(model, batch, view_keys(global_local), device)
    return code_loss(emb, generator, global_local=global_local, temperature=temperature)


def estimate_steps_per_epoch(rows: int, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch: full batches of the smallest process share (bad records not yet known)."""
    steps = (rows // world_size // batch_size) // grad_accum
    if steps == 0:
        raise InvalidInputError(
            f"{rows} training records cannot fill one step of {batch_size} x {grad_accum} records "
            f"on each of {world_size} process(es): use a smaller --batch-size or --grad-accum"
        )
    return steps


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Location
    model_path: Location
    """RUN/model.safetensors: the best embedder by validation accuracy (the last one without validation)."""
    steps: int
    epochs: int
    """Epochs completed."""
    best_val_acc: float | None
    best_step: int | None
    stopped_early: bool
    losses: dict[int, float] = field(default_factory=dict)
    """Total loss per optimizer step run in this call (mean over micro-batches and processes)."""
    val_history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    """Process index that returned this result (0 = the main process)."""


@dataclass
class _Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_val_acc: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    last_val_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """One training run: owns the accelerator, model, optimizer, data and logs."""

    def __init__(self, config: TrainConfig) -> None:
        """Check the inputs, build everything; on `config.resume` restore the newest checkpoint."""
        from codetrain.data import D3Records, RealImageSource, check_shards, collate
        from codetrain.sources import Use, open_source, refuse_shared_files

        config.validate()
        if not config.data:
            raise MissingInputError("missing --data: the dataset to train on, a folder, URL or hub repo id (or `data:` in the config)")
        if not config.run:
            raise MissingInputError("missing --run: the run folder training writes (or `run:` in the config)")
        self.config = config
        self.layout = RunLayout.open(config.run, config.storage_options)
        self.store = self.layout.store
        checkpoints = ckpt.list_checkpoints(self.layout)
        if checkpoints and not config.resume:
            raise InvalidInputError(f"{self.store.url()} already holds checkpoints: pass --resume to continue, "
                                    "or choose another --run")
        self.accelerator = make_accelerator(config)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        set_seed(config.seed)
        self.model: CoDEEmbedder = create_embedder(config.model, config.img_size, config.normalisation)
        preprocessing = self.model.preprocessing
        self.real_source = RealImageSource(config.real_source) if config.real_source else None
        source = open_source(config.data)
        flags = "--train-split and --val-split (none: no validation)"
        shards = source.require(config.train_split, "--train-split", flags)
        self.val_shards = source.shards(config.val_split) if config.val_split else []
        refuse_shared_files([Use("train", f"the train split {config.train_split!r}", shards),
                             Use("validation", f"the validation split {config.val_split!r}", self.val_shards)], flags)
        check_shards(shards, self.real_source, config.data)
        self.dataset = D3Records(
            shards, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
            views=preprocessing.view_maker(config.local_size, config.max_ops),
            real_source=self.real_source, rank=self.rank, world_size=self.world, batch_size=config.batch_size,
        )
        estimated = estimate_steps_per_epoch(self.dataset.total, config.batch_size, self.world, config.grad_accum)
        self.steps_per_epoch = config.steps_per_epoch or estimated
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=config.batch_size, num_workers=config.num_workers,
            collate_fn=functools.partial(collate, mean=preprocessing.mean, std=preprocessing.std),
            drop_last=True, pin_memory=self.accelerator.device.type == "cuda",
        )
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warmup = min(self.total_steps - 1, round(config.warmup_epochs * self.steps_per_epoch))
        self.scheduler = CosineLRScheduler(
            optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=config.min_lr, warmup_t=warmup,
            warmup_lr_init=min(1e-6, config.lr), warmup_prefix=True, t_in_epochs=False,
        )
        self.progress = _Progress()
        resume_from = self.layout.checkpoint(checkpoints[-1].step) if config.resume and checkpoints else None
        if config.resume and resume_from is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.store.url(self.layout.path(RunLayout.CHECKPOINTS)))
        if resume_from is not None:
            load_weights(self.model, resume_from.url(resume_from.root / CheckpointFiles.MODEL), config.storage_options)
        self.ddp_model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        if resume_from is not None:
            self._restore(resume_from)
        self.losses: dict[int, float] = {}
        self.val_history: list[dict[str, Any]] = []
        self.runlog: RunLog | None = None
        if self.accelerator.is_main_process:
            self.store.write_text(self.layout.path(RunLayout.CONFIG), config_yaml(config))
            self.runlog = RunLog(self.store, config.tensorboard, self.progress.step if resume_from else None)
        self.accelerator.wait_for_everyone()

    # --- checkpoints -------------------------------------------------------------------------

    def _restore(self, folder: Store) -> None:
        """Load optimizer, scaler, counters, data position and RNG from a checkpoint folder."""
        optimizer_state, state = ckpt.load_train_state(folder)
        saved = (state.get("world_size"), state.get("config", {}).get("batch_size"))
        if saved != (self.world, self.config.batch_size):
            raise InvalidInputError(f"{folder.url()} was written by {saved[0]} process(es) at batch_size {saved[1]}; "
                                    f"resume with the same (now {self.world} at {self.config.batch_size})")
        self.optimizer.load_state_dict(optimizer_state)
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.progress = _Progress(**state["progress"])
        ckpt.load_process_rng(folder, self.rank)
        log.info("resumed from %s (step %d, epoch %d)", folder.url(), self.progress.step, self.progress.epoch)

    def save_checkpoint(self) -> Location:
        """Write RUN/checkpoints/step-{n} (all processes take part), mark it complete, prune old ones."""
        step = self.progress.step
        folder = self.layout.checkpoint(step)
        if self.accelerator.is_main_process:
            ckpt.begin(self.layout, step)
        self.accelerator.wait_for_everyone()
        ckpt.save_process_rng(folder, self.rank)
        if self.accelerator.is_main_process:
            folder.write_bytes(folder.root / CheckpointFiles.MODEL, weights_bytes(self.model))
            scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
            ckpt.save_train_state(folder, self.optimizer.state_dict(), {
                "progress": self.progress.to_dict(), "scaler": scaler, "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch, "config": self.config.to_dict(),
            })
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            ckpt.mark_complete(folder, step)
            ckpt.prune(self.layout, self.config.keep_checkpoints, step)
            if self.runlog is not None:
                self.runlog.flush()
        self.accelerator.wait_for_everyone()
        return folder.location()

    # --- data --------------------------------------------------------------------------------

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """This process's batches of the current epoch, from the saved position on."""
        self.dataset.set_epoch(self.progress.epoch)
        self.dataset.set_position(self.progress.batches_in_epoch * self.config.batch_size)
        return iter(self.loader)

    def _all_have(self, batch: Any) -> bool:
        """Whether every process got a batch (streams may end unevenly; all must stop together)."""
        if self.world == 1:
            return batch is not None
        flag = torch.tensor([0 if batch is None else 1], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).min().item())

    # --- one optimizer step ------------------------------------------------------------------

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> dict[str, float] | None:
        """Accumulate `grad_accum` micro-batches and step; None when the epoch's stream ended first."""
        config, acc = self.config, self.accelerator
        parts: list[dict[str, float]] = []
        skipped = 0
        self.ddp_model.train()
        for micro in range(config.grad_accum):
            batch = next(batches, None)
            if not self._all_have(batch):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            skipped += int(torch.as_tensor(batch.get("skipped", 0)).sum())
            last = micro == config.grad_accum - 1
            generator = step_generator(config.seed, self.progress.step * config.grad_accum + micro, self.rank)
            with contextlib.nullcontext() if last else acc.no_sync(self.ddp_model):
                out = compute_loss(self.ddp_model, batch, generator, acc.device, config.global_local, config.temperature)
                acc.backward(out.total)
            parts.append(out.log_dict())
            self.progress.batches_in_epoch += 1
        self.scheduler.step_update(self.progress.step)
        lr = self.optimizer.param_groups[0]["lr"]
        # The global gradient norm is logged every step; with grad_clip none (the paper) an infinite bound
        # scales every gradient by exactly 1.0, i.e. leaves it untouched.
        max_norm = math.inf if config.grad_clip is None else config.grad_clip
        grad_norm = float(acc.clip_grad_norm_(self.ddp_model.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        row = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
        if self.world > 1:
            keys = sorted(row)
            values = acc.reduce(torch.tensor([row[k] for k in keys], device=acc.device), reduction="mean")
            row = dict(zip(keys, values.tolist(), strict=True))
        if self.world > 1:
            skipped = int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum").item())
        row.update(lr=lr, skipped=skipped, grad_norm=grad_norm)
        return row

    # --- validation --------------------------------------------------------------------------

    def validate(self) -> dict[str, Any] | None:
        """Linear-probe metrics of the current embedder on the validation split (None: no usable split)."""
        from codetrain.validation import probe_accuracy, validation_embeddings

        if self.config.val_split is None:
            return None
        embedded = validation_embeddings(self.model, self.val_shards, self.config, self.accelerator, self.real_source)
        result: list[dict[str, Any] | None] = [None]
        if self.accelerator.is_main_process:
            if embedded is None:
                log.warning("no %s split under %s: validation skipped", self.config.val_split, self.config.data)
            else:
                result[0] = probe_accuracy(embedded, seed=self.config.seed)
        broadcast_object_list(result)
        return result[0]

    def _after_validation(self, metrics: dict[str, Any]) -> bool:
        """Keep the best model; True when early stopping triggers."""
        p = self.progress
        p.last_val_step = p.step
        acc = metrics["val_acc"]
        if p.best_val_acc is None or acc > p.best_val_acc:
            p.best_val_acc, p.best_step, p.bad_validations = acc, p.step, 0
            if self.accelerator.is_main_process:
                self.store.write_bytes(self.layout.path(RunLayout.MODEL), weights_bytes(self.model))
        else:
            p.bad_validations += 1
        row = {"kind": RowKind.VAL.value, "step": p.step, "epoch": p.epoch, **metrics,
               "best_val_acc": p.best_val_acc, "best_step": p.best_step}
        self.val_history.append(row)
        if self.runlog is not None:
            self.runlog.write(row)
        return self.config.patience > 0 and p.bad_validations >= self.config.patience

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until max_steps, the last epoch or early stopping; returns what was produced."""
        config, p = self.config, self.progress
        main = self.accelerator.is_main_process
        bar = tqdm(total=self.total_steps, initial=p.step, disable=not (main and config.progress),
                   desc="train", unit="step", dynamic_ncols=True)
        records_per_step = config.batch_size * config.grad_accum * self.world
        stopped_early, last_saved = False, p.step if config.resume else None
        window_start, window_steps = time.perf_counter(), 0
        while p.epoch < config.epochs and p.step < self.total_steps and not stopped_early:
            batches = self._epoch_batches() if not self._epoch_full() else iter(())
            stream_ended, fresh_epoch, epoch_start_step = False, p.batches_in_epoch == 0, p.step
            while p.step < self.total_steps and not self._epoch_full():
                row = self._optimizer_step(batches)
                if row is None:
                    stream_ended = True
                    break
                self.losses[p.step] = row["loss"]
                window_steps += 1
                bar.update(1)
                if p.step % config.log_every == 0 or p.step == self.total_steps:
                    now = time.perf_counter()
                    rate = window_steps * records_per_step / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    bar.set_postfix(loss=f"{row['loss']:.3f}", rec_s=f"{rate:.1f}")
                    if self.runlog is not None:
                        self.runlog.write({"kind": RowKind.TRAIN.value, "step": p.step, "epoch": p.epoch,
                                           "records_per_s": rate, **row})
                if p.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                    last_saved = p.step
            del batches
            if stream_ended and fresh_epoch and p.step == epoch_start_step:
                self._refuse_empty_epoch()
            if stream_ended or self._epoch_full():
                started = time.perf_counter()
                metrics = self.validate()
                if metrics is not None:
                    stopped_early = self._after_validation(metrics)
                p.epoch += 1
                p.batches_in_epoch = 0
                window_start += time.perf_counter() - started  # records/s counts training time only
        if config.val_split is not None and p.last_val_step != p.step:
            metrics = self.validate()
            if metrics is not None:
                stopped_early = self._after_validation(metrics) or stopped_early
        if last_saved != p.step or p.last_val_step == p.step:
            self.save_checkpoint()
        bar.close()
        return self._finish(stopped_early)

    def _refuse_empty_epoch(self) -> None:
        """A whole epoch gave no batch (every record skipped, or fewer usable than a batch): stop before any model is written."""
        reals = f"; the reals were looked for in {self.real_source.describe()}" if self.real_source is not None else ""
        if self.runlog is not None:
            self.runlog.close()
        flag = f"--real-source {self.config.real_source}" if self.real_source is not None else f"--data {self.config.data}"
        raise InvalidInputError(
            f"{flag}: no training step could run: of the {self.dataset.total} records, fewer than a batch "
            f"({self.config.batch_size}) were usable, the others skipped (each logged with its reason){reals}"
        )

    def _epoch_full(self) -> bool:
        """Whether an explicit `steps_per_epoch` has been reached in the current epoch."""
        limit = self.config.steps_per_epoch
        return limit is not None and self.progress.batches_in_epoch >= limit * self.config.grad_accum

    def _finish(self, stopped_early: bool) -> TrainResult:
        """Write the final model (if no validation chose one), the loss curve, and the result."""
        p = self.progress
        if self.accelerator.is_main_process:
            if p.best_step is None:
                self.store.write_bytes(self.layout.path(RunLayout.MODEL), weights_bytes(self.model))
            if self.runlog is not None:
                self.runlog.close()
                png = loss_curve_png(self.runlog.rows)
                if png is not None:
                    self.store.write_bytes(self.layout.path(RunLayout.LOSS_CURVE), png)
        self.accelerator.wait_for_everyone()
        return TrainResult(self.store.location(), self.store.location(self.layout.path(RunLayout.MODEL)), p.step, p.epoch, p.best_val_acc,
                           p.best_step, stopped_early, dict(self.losses), list(self.val_history), self.rank)


def train(config: TrainConfig) -> TrainResult:
    """Train a CoDE embedder as `config` says; outputs go to the run folder `config.run` (see TrainResult)."""
    try:
        with storage_defaults([config.run, config.data, config.real_source], config.storage_options):
            return Trainer(config).fit()
    finally:
        # Accelerate keeps one global state per process and refuses another precision or device;
        # dropping it (the process group stays) lets a process run train() again with other settings.
        AcceleratorState._reset_state()
