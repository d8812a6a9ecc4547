"""The hub helpers: paths or repo ids to local folders, and uploads that stop at a missing token."""

from __future__ import annotations

from pathlib import Path

import pytest
from hubkit import RecordingApi, cached_repo, no_token  # noqa: F401 - no_token is a fixture

from d3builder.storage.hub import HubError, check_upload, local_folder, upload_folder


def test_local_paths_are_used_as_they_are(tmp_path: Path) -> None:
    assert local_folder(tmp_path) == tmp_path
    (tmp_path / "w.safetensors").write_bytes(b"x")
    assert local_folder(str(tmp_path / "w.safetensors")) == tmp_path / "w.safetensors"
    with pytest.raises(FileNotFoundError, match="not a hub repo id"):
        local_folder(tmp_path / "no" / "such" / "folder")


def test_a_repo_id_resolves_through_the_hub_cache(tmp_path: Path) -> None:
    snapshot = cached_repo(tmp_path / "cache", "someone/detector", {"config.json": b"{}", "model.safetensors": b"w"})
    folder = local_folder("someone/detector", cache_dir=tmp_path / "cache", local_files_only=True)
    assert folder == snapshot and (folder / "model.safetensors").read_bytes() == b"w"


@pytest.mark.usefixtures("no_token")
def test_missing_token_and_bad_repo_ids_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(HubError, match="no Hugging Face token") as info:
        check_upload("someone/data")
    assert "\n" not in str(info.value)
    with pytest.raises(HubError, match="not a hub repo id"):
        check_upload("no spaces allowed/x", RecordingApi())
    with pytest.raises(HubError, match="user/name"):
        check_upload("justaname", RecordingApi())


@pytest.mark.usefixtures("no_token")
def test_upload_creates_the_repo_and_uploads_the_folder(tmp_path: Path) -> None:
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "README.md").write_text("card")
    (tmp_path / "out" / "sub" / "a.parquet").write_bytes(b"x")
    api = RecordingApi()
    url = upload_folder(tmp_path / "out", "someone/data", "dataset", api=api)
    assert url == "http://127.0.0.1:9/someone/data/commit/0123"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/data", "token": "hf_test_token", "repo_type": "dataset",
                               "private": False, "exist_ok": True}
    upload = api.calls[1][1]
    assert (upload["repo_id"], upload["repo_type"], upload["token"]) == ("someone/data", "dataset", "hf_test_token")
    assert Path(upload["folder_path"]) == tmp_path / "out" and api.uploaded == ["README.md", "sub/a.parquet"]


@pytest.mark.usefixtures("no_token")
def test_a_failing_upload_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    class Refusing(RecordingApi):
        def upload_folder(self, **kwargs):  # type: ignore[override]
            raise OSError("403 Forbidden: you cannot write to someone/data\nmore details")

    (tmp_path / "out").mkdir()
    with pytest.raises(HubError, match=r"upload of .*out to someone/data failed \(OSError: 403 Forbidden") as info:
        upload_folder(tmp_path / "out", "someone/data", "dataset", api=Refusing())
    assert "\n" not in str(info.value) and "the folder is complete" in str(info.value)
