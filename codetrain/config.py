"""Every knob of CoDE training and of its evaluation as typed dataclasses: YAML file, then command-line flags on top.

A config file may be a local path or an fsspec URL. The optional `storage_options:` mapping
(YAML only) goes to the filesystem of every remote URL of the config; it is never written
into a run folder.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from codetrain.classifiers import CLASSIFIERS
from codetrain.errors import UserError, read_input
from codetrain.preprocessing import NORMALISATIONS
from codetrain.robustness import DEFAULT_LEVELS, validate_levels
from d3builder.core.yamlconfig import ConfigError, from_mapping, parse_yaml
from d3builder.storage.layout import safe_name
from d3builder.storage.schema import FIT_AUGM_SPLIT

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""`auto` = fp16 autocast on a GPU (the paper), bf16 on a CPU with native bf16, else fp32."""

SECRET_FIELDS = ("storage_options",)
"""Fields left out of every file written from a config (they may hold credentials)."""

REAL_SOURCE_HELP = ("real images for shards without image_real (the published ELSA_D3 layout): "
                    "fetch-real's real/ shard folder or a folder of {id}.<ext> files")

C = TypeVar("C")


def knob(default: Any, help_text: str, flag: str | None = None) -> Any:
    """A dataclass field with its `--help` text (and optionally its flag name) in the metadata; lists are copied."""
    metadata = {"help": help_text, **({"flag": flag} if flag else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Settings of one CoDE training run (defaults = the paper's, with 96 px local crops)."""

    data: str = knob("", "training data: a dataset folder (splits from its card's configs, else {split}/*.parquet), "
                         "a file or glob, an fsspec URL, or a hub dataset repo id (elsaEU/ELSA_D3)")
    run: str = knob("", "run folder written by training (model, config, metrics, checkpoints): a local folder or "
                        "an fsspec URL (s3://, memory://, file://)")
    real_source: str | None = knob(None, REAL_SOURCE_HELP)
    train_split: str = knob("train", "split trained on")
    val_split: str | None = knob("validation", "split embedded for the linear probe each epoch; none disables it")
    model: str = knob("vit_tiny_patch16_224", "timm model name (trained from scratch)")
    img_size: int | None = knob(None, "size of the clean, augmented and global views and of evaluation; "
                                      "none: the model's input size from timm's data config (224 for ViT-Tiny)")
    normalisation: str = knob("imagenet", "input mean/std: imagenet (the paper) or model (timm's data config)")
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
    resume: bool = knob(False, "continue from the newest checkpoint in {run}/checkpoints")
    storage_options: dict[str, Any] | None = knob(None, "fsspec options (credentials, endpoint) for the remote URLs "
                                                        "of this config; YAML only, never saved in the run")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        if self.img_size is not None and self.img_size <= 0:
            raise ValueError(f"img_size must be positive or null, got {self.img_size}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        positive = ("local_size", "epochs", "batch_size", "grad_accum", "val_batch_size",
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
        """A plain mapping of every field but `storage_options` (YAML/JSON-serialisable)."""
        return public_dict(self)


@dataclass
class EvalConfig:
    """Settings of one evaluation: the run, the data, the classifiers, the robustness sweep, the outputs."""

    run: str = knob("", "run folder holding model.safetensors: a local folder or an fsspec URL")
    data: str = knob("", "dataset folder, file or glob, fsspec URL or hub dataset repo id (elsaEU/ELSA_D3): "
                         "splits from its card's configs, else {split}/*.parquet")
    test_data: str | None = knob(None, "take the test splits from this source instead (e.g. the published test "
                                       "folders {no_augm,augm}/{real,gen_0..gen_3}/)")
    eval_dir: str | None = knob(None, "evaluation folder written: report, tables, plots, classifiers/, cache/ "
                                      "(default RUN/eval)")
    extended: str | None = knob(None, "extended test set root (extended/{generator}/test-*.parquet)")
    fit_split: str = knob(FIT_AUGM_SPLIT, "split the classifiers are fitted on: fit_augm is the paper's held-out, "
                                          "transformed subset; validation (the clean validation split) departs from it")
    test_splits: list[str] | None = knob(None, "splits scored; none: test and test_augm (a missing one is skipped), "
                                               "else the published no_augm and augm")
    classifiers: list[str] = knob(["linear", "knn", "ocsvm"], "classifiers fitted: linear, knn, ocsvm")
    robustness: bool = knob(True, "sweep JPEG/downscale/blur/crop on the robustness split")
    robustness_split: str = knob("test", "split of the robustness sweep")
    robustness_levels: dict[str, list[float]] = knob(
        {family: list(levels) for family, levels in DEFAULT_LEVELS.items()},
        "levels per family: JPEG quality, downscale factor, blur sigma (px), kept crop fraction")
    baselines: list[str] = knob([], "baselines in the same tables: clip:MODEL[:WEIGHTS] (a CLIP linear probe; open_clip "
                                    "name or config .json, local weights) or code-release:PATH_OR_REPO (the authors' "
                                    "released backbone, its pickled classifiers never read, all classifiers refitted)",
                                flag="baseline")
    real_source: str | None = knob(None, REAL_SOURCE_HELP)
    batch_size: int = knob(32, "images per forward pass")
    device: str | None = knob(None, "torch device (default cuda when available)")
    tsne: bool = knob(False, "also draw t-SNE maps (slow)")
    progress: bool = knob(True, "show tqdm progress bars")
    storage_options: dict[str, Any] | None = knob(None, "fsspec options (credentials, endpoint) for the remote URLs "
                                                        "of this config; YAML only")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent setting."""
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
        if unknown or not self.classifiers:
            raise ValueError(f"classifiers must be some of {sorted(CLASSIFIERS)}, got {self.classifiers}")
        if self.test_splits is not None and not self.test_splits:
            raise ValueError("test_splits must name at least one split (or be none for the defaults)")
        for split in (self.fit_split, self.robustness_split, *(self.test_splits or ())):
            safe_name(split, "split")
        validate_levels(self.robustness_levels)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of every field but `storage_options`."""
        return public_dict(self)


def public_dict(config: Any) -> dict[str, Any]:
    """A config's fields as a plain mapping, without the SECRET_FIELDS."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in SECRET_FIELDS}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML file at a local path or URL; ConfigError naming the file when unreadable."""
    try:
        data = read_input(path)
    except UserError as exc:
        raise ConfigError(path, "", str(exc)) from exc
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read: {exc.strerror or exc}") from exc
    try:
        return parse_yaml(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text: {exc}") from exc


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, cls: type[C] = TrainConfig) -> C:
    """Defaults, then the YAML file (if any), then `overrides`; ConfigError names the file and key."""
    data = read_config_file(path) if path is not None else {}
    data.update(overrides or {})
    return from_mapping(cls, data, path if path is not None else "<flags>")


def config_yaml(config: Any) -> str:
    """A config as YAML (without secrets), loadable again with `load_config`."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """The type of a field annotation without its None option, and whether None is allowed."""
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


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def add_config_flags(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per field of a config dataclass (`--local-size`, `--no-global-local`, `--test-splits A B`, ...).

    Unset flags stay absent from the namespace; mapping fields (e.g. storage_options) are YAML-only.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, nullable = _flag_type(hints[field.name])
        if get_origin(kind) is dict:
            continue
        flag = "--" + field.metadata.get("flag", field.name).replace("_", "-")
        help_text = f"{field.metadata['help']} (default: {_default(field)})"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif get_origin(kind) is list:
            (item,) = get_args(kind)
            parser.add_argument(flag, dest=field.name, nargs="*", type=_parser_for(item, False, field.name),
                                default=argparse.SUPPRESS, metavar=item.__name__.upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=_parser_for(kind, nullable, field.name),
                                default=argparse.SUPPRESS, metavar=kind.__name__.upper(), help=help_text)


def overrides_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> dict[str, Any]:
    """The fields of a config dataclass that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


__all__ = ["ConfigError", "EvalConfig", "PRECISIONS", "TrainConfig", "knob", "add_config_flags", "config_yaml",
           "load_config", "overrides_from_args", "read_config_file"]
