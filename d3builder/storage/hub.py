"""The Hugging Face hub: a local folder for a path or a repo id, and the upload of a finished folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id


class HubError(Exception):
    """A hub request the user must fix (no token, a malformed repo id); the message is one line."""


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it names a hub repo as user/name, else HubError."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"--repo {repo_id!r} is not a hub repo id: {str(exc).splitlines()[0]}") from exc
    if repo_id.count("/") != 1:
        raise HubError(f"--repo {repo_id!r} is not a hub repo id: use user/name (or org/name)")
    return repo_id


def hub_token(api: HfApi) -> str:
    """The token `api` will send (its own, else HF_TOKEN or the saved login), or HubError when there is none."""
    token = api.token or get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then rerun with --repo")
    return token


def check_upload(repo_id: str, api: HfApi | None = None) -> HfApi:
    """Fail before any work when `repo_id` is malformed or no token is configured; returns the api to upload with."""
    api = api or HfApi()
    check_repo_id(repo_id)
    hub_token(api)
    return api


def upload_folder(folder: str | Path, repo_id: str, repo_type: str, api: HfApi | None = None, private: bool = False) -> str:
    """Create `repo_id` (kept if it exists) and upload every file of `folder` in one commit; returns the commit URL.

    Any failure of the hub calls (HTTP, network, permissions) becomes one HubError line.
    """
    api = check_upload(repo_id, api)
    token = hub_token(api)
    try:
        api.create_repo(repo_id, token=token, repo_type=repo_type, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, token=token,
            commit_message=f"Upload {Path(folder).name} with d3code",
        )
    except Exception as exc:  # noqa: BLE001 - HTTP, network and hub errors all end the same way: one line
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise HubError(f"upload of {folder} to {repo_id} failed ({type(exc).__name__}: {reason}); the folder is "
                       "complete: upload it again later (--repo, or `hf upload`)") from exc
    return str(getattr(commit, "commit_url", commit))


def local_folder(path_or_repo: str | Path, allow_patterns: list[str] | None = None, **download: Any) -> Path:
    """A local file or folder as is; otherwise a hub repo id, downloaded (only `allow_patterns`) into the hub cache.

    `download` goes to `huggingface_hub.snapshot_download` (revision, repo_type, cache_dir,
    local_files_only, token).
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    try:
        validate_repo_id(str(path_or_repo))
    except HFValidationError as exc:
        raise FileNotFoundError(f"{path_or_repo}: no such file or folder, and not a hub repo id (user/name)") from exc
    return Path(snapshot_download(repo_id=str(path_or_repo), allow_patterns=allow_patterns, **download))


__all__ = ["HubError", "check_repo_id", "check_upload", "hub_token", "local_folder", "upload_folder"]
