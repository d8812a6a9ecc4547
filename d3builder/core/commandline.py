"""The shared shape of both command lines: subcommands from modules, logging, configuration errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from d3builder.core.yamlconfig import ConfigError


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser whose subcommands come from `modules`, each defining `add_parser(subparsers)`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"{parser.prog}: invalid configuration: {exc}", file=sys.stderr)
        return 2
