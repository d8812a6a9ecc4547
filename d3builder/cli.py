"""`d3builder`: the command line, a thin shell over the stage functions."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .yamlconfig import ConfigError

COMMAND_MODULES: list[str] = [
    "d3builder.embedded",
    "d3builder.select",
    "d3builder.fetch_real",
    "d3builder.generate",
    "d3builder.regenerate",
    "d3builder.extend",
    "d3builder.assemble",
    "d3builder.transform_test",
    "d3builder.validate",
]
"""Modules that each define `add_parser(subparsers)`; their order is the order in `--help`."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every stage as a subcommand."""
    parser = argparse.ArgumentParser(
        prog="d3builder",
        description="Rebuild the D3 dataset: select LAION records, fetch real images, generate fakes, "
        "assemble paired shards, build the test sets, validate.",
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
        print(f"d3builder: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
