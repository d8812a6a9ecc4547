"""`d3builder`: the command line, a thin shell over the library functions."""

from __future__ import annotations

import argparse
import sys

from .commandline import build_parser as _build_parser
from .commandline import run

COMMAND_MODULES: list[str] = [
    "d3builder.embedded",
    "d3builder.select",
    "d3builder.fetch_real",
    "d3builder.generate",
    "d3builder.regenerate",
    "d3builder.assemble",
    "d3builder.transform_test",
    "d3builder.extend",
    "d3builder.validate",
]
"""Modules that each define `add_parser(subparsers)`; their order is the order in `--help`."""

DESCRIPTION = (
    "Rebuild the D3 dataset: select LAION records, fetch real images, generate fakes, "
    "assemble paired shards, build the test sets, validate."
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command as a subcommand."""
    return _build_parser("d3builder", DESCRIPTION, COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
