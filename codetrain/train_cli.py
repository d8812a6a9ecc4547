"""`codetrain train`: the command-line shell over `codetrain.train.train`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codetrain.config import add_config_flags, load_config, overrides_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `train`: every TrainConfig field is a flag; --config names a YAML file of defaults."""
    parser = subparsers.add_parser(
        "train",
        help="train the CoDE embedder on D3 shards",
        description="Train CoDE (ViT-Tiny from scratch, InfoNCE global + global-local) under Accelerate. "
        "Settings: defaults < --config YAML < flags. With --resume and no --config, RUN/config.yaml is the base.",
    )
    parser.add_argument("--config", "-c", help="YAML file of TrainConfig keys, e.g. configs/code_tiny.yaml")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the config, train, print the result summary as JSON (main process only)."""
    from codetrain.train import train

    overrides = overrides_from_args(args)
    base = args.config
    if base is None and overrides.get("resume") and overrides.get("out"):
        saved = Path(overrides["out"]) / "config.yaml"
        base = str(saved) if saved.is_file() else None
    result = train(load_config(base, overrides))
    if result.rank != 0:
        return 0
    print(json.dumps({
        "run_dir": str(result.run_dir), "model": str(result.model_path), "steps": result.steps,
        "epochs": result.epochs, "best_val_acc": result.best_val_acc, "best_step": result.best_step,
        "stopped_early": result.stopped_early,
    }, indent=2))
    return 0
