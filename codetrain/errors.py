"""User errors: a bad flag, file, folder or URL, reported in one line with exit code 2, never as a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from d3builder.core.commandline import UsageError
from d3builder.storage.store import open_store

UserError = UsageError
"""A problem with what the user gave (a flag, a file, a folder, a URL), not a bug; the message names it.

The same class as d3builder's, so its storage errors (an unknown URL scheme, a missing filesystem package)
are user errors here too."""


class InvalidInputError(UserError, ValueError):
    """An input exists but cannot be used (truncated shard, wrong layout, batch larger than the data, ...)."""


class MissingInputError(UserError, FileNotFoundError):
    """A required input is absent (no --data, no run folder, no fitted classifiers, ...)."""


class OutputExistsError(UserError, FileExistsError):
    """An output that would be overwritten without the flag that allows it."""


def one_line(message: str) -> str:
    """The message with line breaks folded into spaces."""
    return " ".join(str(message).split())


def reports_user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a subcommand: a UserError prints `codetrain COMMAND: error: MESSAGE` on stderr and returns 2."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except UserError as exc:
            print(f"codetrain {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
            return 2

    return wrapper


def read_input(location: str | Path, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of a file the user named (local path or URL); MissingInputError / InvalidInputError naming it."""
    store = open_store(location, storage_options, writable=False)
    try:
        return store.read_bytes(store.root)
    except FileNotFoundError as exc:
        raise MissingInputError(f"{location} does not exist") from exc
    except IsADirectoryError as exc:
        raise InvalidInputError(f"{location} is a folder, not a file") from exc
