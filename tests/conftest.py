"""Session-wide test setup: the tiny generator twins are built once per test run, in a private folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from d3builder.generators.tiny import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test (and every subprocess it starts) builds and loads tiny twins from one session folder."""
    folder = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder
