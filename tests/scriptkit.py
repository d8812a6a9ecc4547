"""Run a script of pipelines/ in-process, as `python script.py ARGS` would."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(relative: str, args: list[str]) -> int:
    """Run ROOT/relative as __main__ with `args`; returns its exit code."""
    argv = sys.argv
    sys.argv = [Path(relative).name, *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / relative), run_name="__main__")
    finally:
        sys.argv = argv
    return exit_info.value.code
