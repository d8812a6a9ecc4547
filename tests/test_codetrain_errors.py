"""User errors through the real `codetrain` command line: one line naming the file or flag, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from codetrain.cli import main
from codetrain.model import create_embedder, save_weights

TINY = ["--model", "test_vit", "--img-size", "32", "--local-size", "16", "--no-progress", "--no-tensorboard",
        "--precision", "fp32", "--max-steps", "1"]


def truncated_copy(d3: Path, folder: Path, split: str) -> tuple[Path, Path]:
    """A copy of the D3 folder whose first `split` shard is cut in half; returns (root, truncated shard)."""
    for shard in sorted(d3.rglob("*.parquet")):
        target = folder / shard.relative_to(d3)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shard.read_bytes())
    victim = sorted((folder / split).glob("*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return folder, victim


def one_error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    """The single stderr line of a failed command, checked for its shape."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"codetrain {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_train_names_a_truncated_shard(small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, victim = truncated_copy(small_d3, tmp_path / "d3", "train")
    assert main(["train", "--data", str(data), "--run", str(tmp_path / "run"), *TINY]) == 2
    line = one_error_line(capsys, "train")
    assert str(victim) in line and "Parquet" in line
    assert not (tmp_path / "run").exists()


def test_evaluate_names_a_truncated_shard_before_embedding_anything(small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, victim = truncated_copy(small_d3, tmp_path / "d3", "test")
    run = tmp_path / "run"
    save_weights(create_embedder("test_vit", 32), run / "model.safetensors")
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--fit-split", "validation", "--no-robustness",
                 "--no-progress"]) == 2
    line = one_error_line(capsys, "evaluate")
    assert str(victim) in line
    assert not (run / "eval").exists(), "no classifier fitted, no embedding cached before the inputs were checked"


def test_missing_data_and_run(small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--run", str(tmp_path / "run"), *TINY]) == 2
    assert "missing --data" in one_error_line(capsys, "train")
    assert main(["train", "--data", str(small_d3), *TINY]) == 2
    assert "missing --run" in one_error_line(capsys, "train")
    config = tmp_path / "eval.yaml"
    config.write_text(f"data: {small_d3}\n")
    assert main(["evaluate", "-c", str(config)]) == 2
    assert "missing --run" in one_error_line(capsys, "evaluate")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.yaml"], "nothing written when an input is missing"


def test_checkpoints_without_resume(small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(small_d3), "--run", str(run), "--batch-size", "4", "--checkpoint-every", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(small_d3), "--run", str(run), "--batch-size", "4", *TINY]) == 2
    line = one_error_line(capsys, "train")
    assert str(run) in line and "--resume" in line


def test_batch_larger_than_the_dataset(small_d3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(small_d3), "--run", str(tmp_path / "run"), "--batch-size", "64", *TINY]) == 2
    line = one_error_line(capsys, "train")
    assert "16 training records cannot fill one step" in line and "--batch-size" in line


def test_unreadable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xff\xfe\x00binary \x80 garbage")
    for command in ("train", "evaluate"):
        assert main([command, "-c", str(config), "--data", str(tmp_path), "--run", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert str(config) in err and "UTF-8" in err
