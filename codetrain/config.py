"""Every knob of CoDE training as one typed dataclass: YAML file, then command-line flags on top."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from d3builder.core.yamlconfig import ConfigError, from_mapping, read_yaml
from d3builder.storage.shards import atomic_write_bytes

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""`auto` = fp16 autocast on a GPU (the paper), bf16 on a CPU with native bf16, else fp32."""


def knob(default: Any, help_text: str) -> Any:
    """A dataclass field with its `--help` text in the metadata."""
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Settings of one CoDE training run (defaults = the paper's, with 96 px local crops)."""

    data: str = knob("", "training data: a dataset folder (splits from its card's configs, else {split}/*.parquet), "
                         "a file or glob, an fsspec URL, or a hub dataset repo id (elsaEU/ELSA_D3)")
    out: str = knob("runs/code", "run folder: checkpoints, metrics, config.yaml, model.safetensors")
    real_source: str | None = knob(None, "real images for shards without image_real (the published ELSA_D3 layout): "
                                         "fetch-real's real/ shard folder or a folder of {id}.<ext> files")
    train_split: str = knob("train", "split trained on")
    val_split: str | None = knob("validation", "split embedded for the linear probe each epoch; none disables it")
    model: str = knob("vit_tiny_patch16_224", "timm model name (trained from scratch)")
    img_size: int = knob(224, "size of the clean, augmented and global views")
    local_size: int = knob(96, "size of the local crops; 224 reproduces the authors' code")
    global_local: bool = knob(True, "add the local/global crop term; false = the global-only ablation")
    temperature: float = knob(0.1, "InfoNCE temperature")
    max_ops: int = knob(2, "at most this many random transformations per augmented view")
    epochs: int = knob(150, "passes over the training split")
    max_steps: int | None = knob(None, "stop after this many optimizer steps (none: run all epochs)")
    steps_per_epoch: int | None = knob(None, "optimizer steps per epoch (none: from the shards' Parquet row counts)")
    batch_size: int = knob(256, "records per process per micro-batch")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    lr: float = knob(2e-3, "peak AdamW learning rate")
    weight_decay: float = knob(2e-5, "AdamW weight decay")
    warmup_epochs: float = knob(5.0, "linear warm-up length in epochs (converted to steps)")
    min_lr: float = knob(0.0, "learning rate at the end of the cosine schedule")
    grad_clip: float | None = knob(None, "maximum global gradient norm; none (the paper) clips nothing, "
                                         "a number is a departure from the paper")
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 autocast; auto = fp16 on a GPU, "
                                  "bf16 on a CPU with native bf16, else fp32")
    seed: int = knob(42, "seed of the model init, data order, views and derangements")
    patience: int = knob(6, "stop after this many validations without a better probe accuracy (0: never)")
    num_workers: int = knob(0, "DataLoader worker processes per training process")
    shuffle_buffer: int = knob(256, "records in the streaming shuffle buffer")
    val_batch_size: int = knob(64, "images per forward pass during validation")
    checkpoint_every: int = knob(1000, "save a checkpoint every this many optimizer steps (and at the end)")
    keep_checkpoints: int = knob(3, "keep the newest this many step checkpoints (0: all)")
    log_every: int = knob(10, "write a metrics line every this many optimizer steps")
    cpu: bool = knob(False, "train on the CPU even when a GPU is present")
    tensorboard: bool = knob(True, "also log to TensorBoard when it is installed")
    progress: bool = knob(True, "show a tqdm progress bar on the main process")
    resume: bool = knob(False, "continue from the newest checkpoint in {out}/checkpoints")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        positive = ("img_size", "local_size", "epochs", "batch_size", "grad_accum", "val_batch_size",
                    "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or null, got {value}")
        for name in ("num_workers", "shuffle_buffer", "max_ops", "keep_checkpoints", "patience",
                     "weight_decay", "warmup_epochs", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the contrastive loss needs another sample as positive")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be positive")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of every field (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then `overrides`; ConfigError names the file and key."""
    data = read_yaml(path) if path is not None else {}
    data.update(overrides or {})
    return from_mapping(TrainConfig, data, path if path is not None else "<flags>")


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the config as YAML (atomic), loadable again with `load_config`."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    return atomic_write_bytes(path, text.encode("utf-8"))


def _flag_type(annotation: Any) -> tuple[type, bool]:
    """The scalar type of a field annotation and whether None is allowed."""
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return options[0], True
    return annotation, False


def _parser_for(kind: type, nullable: bool, name: str) -> Any:
    """An argparse `type` callable for one field; `none`/`null` gives None where allowed."""

    def parse(text: str) -> Any:
        if nullable and text.lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--{name}: expected {kind.__name__}, got {text!r}") from exc

    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (`--local-size`, `--no-global-local`, ...); unset flags stay absent."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        kind, nullable = _flag_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {field.default})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=_parser_for(kind, nullable, field.name),
                                default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text)
    parser.add_argument("--global-only", dest="global_local", action="store_false", default=argparse.SUPPRESS,
                        help="the global-only ablation (same as --no-global-local)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


__all__ = ["ConfigError", "PRECISIONS", "TrainConfig", "knob", "add_config_flags", "load_config",
           "overrides_from_args", "save_config"]
