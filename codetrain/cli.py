"""`codetrain`: the command line, a thin shell over the library functions."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from d3builder.yamlconfig import ConfigError

COMMAND_MODULES: list[str] = [
    "codetrain.train_cli",
    "codetrain.evaluate",
    "codetrain.detect",
    "codetrain.bundle",
]
"""Modules that each define `add_parser(subparsers)`; their order is the order in `--help`."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command as a subcommand."""
    parser = argparse.ArgumentParser(
        prog="codetrain",
        description="Train and evaluate the CoDE detector on D3 shards: train, evaluate, detect, export."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"codetrain: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
