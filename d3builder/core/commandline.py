"""The shared shape of both command lines: subcommands from modules, `--version`, `-v` anywhere, logging with
time, host and rank, shard lists, and user errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from importlib import metadata

from d3builder.core.yamlconfig import ConfigError

USAGE_EXIT = 2
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
LOG_FORMAT = "%(asctime)s %(host)s r%(rank)s %(levelname)s %(name)s: %(message)s"


class UsageError(Exception):
    """A user error (bad flag, missing input, a stage run too early): printed as one line, exit code 2."""


def package_version() -> str:
    """The installed d3code version (`unknown` when running from a bare checkout)."""
    try:
        return metadata.version("d3code")
    except metadata.PackageNotFoundError:
        return "unknown"


def shard_list(text: str) -> list[int]:
    """Parse `--shards 0,3,7` (ranges allowed: `0-9,12`) into sorted, distinct shard numbers."""
    shards: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            first, _, last = part.partition("-")
            low, high = int(first), int(last) if last else int(first)
            if low < 0 or high < low:
                raise ValueError(part)
            shards.update(range(low, high + 1))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--shards takes comma-separated shard numbers >= 0 or ranges, e.g. 0,3,7 or 0-9; got {text!r}") from exc
    if not shards:
        raise argparse.ArgumentTypeError(f"--shards takes at least one shard number, got {text!r}")
    return sorted(shards)


def process_rank() -> int:
    """This process's rank in a multi-process launch (Accelerate/torchrun, SLURM, MPI), 0 when alone."""
    return next((int(os.environ[v]) for v in RANK_VARIABLES if os.environ.get(v, "").isdigit()), 0)


class _Context(logging.Filter):
    """Adds the host name and the process rank to every log record."""

    def __init__(self) -> None:
        super().__init__()
        self.host, self.rank = socket.gethostname(), process_rank()

    def filter(self, record: logging.LogRecord) -> bool:
        record.host, record.rank = self.host, self.rank
        return True


def setup_logging(verbose: bool) -> None:
    """Log to stderr with time, host and rank on every line (unless logging is set up already, e.g. by pytest)."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context())
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def build_parser(prog: str, description: str, modules: Sequence[str]) -> argparse.ArgumentParser:
    """A parser whose subcommands come from `modules`, each defining `add_parser(subparsers)`.

    `--version` and `-v/--verbose` belong to the tool; `-v` is accepted after the subcommand too."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} (d3code) {package_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules:
        importlib.import_module(module).add_parser(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                               help="debug logging")
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"{parser.prog}: invalid configuration: {exc}", file=sys.stderr)
        return USAGE_EXIT
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return USAGE_EXIT
