"""`codetrain train`: the command-line shell over `codetrain.train.train`."""

from __future__ import annotations

import argparse
import json

from codetrain.config import (
    TrainConfig,
    add_config_flags,
    load_config,
    overrides_from_args,
)
from codetrain.errors import reports_user_errors
from codetrain.runlayout import RunLayout


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `train`: every TrainConfig field is a flag; --config names a YAML file of defaults."""
    parser = subparsers.add_parser(
        "train",
        help="train the CoDE embedder on D3 shards",
        description="Train CoDE (ViT-Tiny from scratch, InfoNCE global + global-local) under Accelerate. "
        "Settings: defaults < --config YAML < flags. With --resume and no --config, RUN/config.yaml is the base. "
        "--data and --run may be local folders or fsspec URLs (s3://, memory://, file://).",
    )
    parser.add_argument("--config", "-c", help="YAML file of TrainConfig keys, e.g. configs/code_tiny.yaml")
    add_config_flags(parser, TrainConfig)
    parser.add_argument("--global-only", dest="global_local", action="store_false", default=argparse.SUPPRESS,
                        help="the global-only ablation (same as --no-global-local)")
    parser.set_defaults(func=run)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    """Load the config, train, print the result summary as JSON (main process only)."""
    from codetrain.train import train

    overrides = overrides_from_args(args, TrainConfig)
    base = args.config
    if base is None and overrides.get("resume") and overrides.get("run"):
        saved = RunLayout.open(overrides["run"])
        base = saved.store.url(saved.path(RunLayout.CONFIG)) if saved.store.exists(saved.path(RunLayout.CONFIG)) else None
    result = train(load_config(base, overrides, TrainConfig))
    if result.rank != 0:
        return 0
    print(json.dumps({
        "run_dir": str(result.run_dir), "model": str(result.model_path), "steps": result.steps,
        "epochs": result.epochs, "best_val_acc": result.best_val_acc, "best_step": result.best_step,
        "stopped_early": result.stopped_early,
    }, indent=2))
    return 0
