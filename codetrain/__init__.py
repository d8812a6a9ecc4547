"""`codetrain`: train and evaluate the CoDE detector on D3 shards; `from codetrain import Detector` to use one."""

from __future__ import annotations

from typing import Any

__all__ = ["Detector", "Prediction"]


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (so `import codetrain` stays cheap for the command line)."""
    if name in __all__:
        from codetrain import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'codetrain' has no attribute {name!r}")
