"""User errors: a bad flag, file, folder or URL, reported in one line with exit code 2, never as a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with what the user gave (a flag, a file, a folder, a URL), not a bug; the message names it."""


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
