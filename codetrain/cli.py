"""`codetrain`: the command line, a thin shell over the library functions."""

from __future__ import annotations

import argparse
import sys

from d3builder.core.commandline import build_parser as _build_parser
from d3builder.core.commandline import run

COMMAND_MODULES: list[str] = [
    "codetrain.train_cli",
    "codetrain.evaluate",
    "codetrain.detect",
    "codetrain.bundle",
    "codetrain.publish",
]
"""Modules that each define `add_parser(subparsers)`; their order is the order in `--help`."""

DESCRIPTION = "Train and evaluate the CoDE detector on D3 shards: train, evaluate, detect, export, publish."


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command as a subcommand."""
    return _build_parser("codetrain", DESCRIPTION, COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
