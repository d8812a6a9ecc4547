"""A hub without a network: an HfApi that records the calls an upload makes, and a hand-made hub cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, constants

LOOPBACK = "http://127.0.0.1:9"
"""An endpoint nothing listens on: a call that slipped past the recording would fail, never leave the machine."""


@dataclass
class Commit:
    """What `HfApi.upload_folder` returns, as far as d3code reads it."""

    commit_url: str


class RecordingApi(HfApi):
    """A real HfApi (token, endpoint) whose create_repo and upload_folder record their arguments instead of calling out."""

    def __init__(self, token: str | None = "hf_test_token") -> None:
        super().__init__(endpoint=LOOPBACK, token=token)
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: list[str] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:  # type: ignore[override]
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"{LOOPBACK}/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> Commit:  # type: ignore[override]
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        return Commit(f"{LOOPBACK}/{kwargs['repo_id']}/commit/0123")


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Hugging Face token anywhere: no environment variable, no saved login."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))


def cached_repo(cache_dir: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    """Lay out `files` as the hub cache holds a downloaded snapshot of `repo_id` (refs/main -> snapshots/<commit>)."""
    commit = "0" * 40
    repo = cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot
