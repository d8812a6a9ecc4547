"""`d3builder`: the command line, a thin shell over the library functions."""

from __future__ import annotations

import argparse
import sys

from d3builder.core.commandline import build_parser as _build_parser
from d3builder.core.commandline import run

COMMAND_MODULES: list[str] = [
    "d3builder.embedded.photos",
    "d3builder.stages.select",
    "d3builder.stages.fetch_real",
    "d3builder.stages.generate",
    "d3builder.stages.regenerate",
    "d3builder.stages.assemble",
    "d3builder.stages.transform_test",
    "d3builder.stages.extend",
    "d3builder.stages.validate",
    "d3builder.stages.publish",
    "d3builder.stages.status",
    "d3builder.cluster.commands",
]
"""Modules that each define `add_parser(subparsers)`; their order is the order in `--help`."""

DESCRIPTION = (
    "Rebuild the D3 dataset: select LAION records, fetch real images, generate fakes, "
    "assemble paired shards, build the test sets, validate, publish; run the stages on a cluster."
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command as a subcommand."""
    return _build_parser("d3builder", DESCRIPTION, COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
