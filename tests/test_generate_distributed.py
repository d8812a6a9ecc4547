"""generate as separate processes: two Accelerate CPU processes split the shards; a SIGKILLed run resumes cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from genkit import make_records, one_thread  # noqa: F401 - fixtures

from d3builder.recipe.manifest import Manifest

pytestmark = pytest.mark.slow
GENERATOR = "sd14-tiny"


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def _check_complete(manifest: Manifest) -> None:
    """Every records shard has its gen shard and stats, with each record exactly once and no temporary file."""
    layout = manifest.layout
    for shard in layout.record_shards():
        gen = _ids(layout.gen(GENERATOR, shard))
        assert sorted(gen) == sorted(_ids(layout.records(shard))) and len(set(gen)) == len(gen)
        stats = json.loads(layout.stats("generate", shard, GENERATOR).read_text())
        assert stats["success"] == len(gen) and stats["failed"] == 0
    # A claim lock may survive a kill (harmless: its process is gone); a temporary shard may not.
    assert [p.name for p in (layout.root / "gen" / GENERATOR).iterdir() if ".tmp-" in p.name] == []


def test_two_accelerate_processes_split_the_shards(tmp_path: Path) -> None:  # noqa: F811
    """accelerate launch --multi_gpu --num_processes 2 on CPU: disjoint shard sets whose union is complete."""
    manifest = make_records(tmp_path / "data", 8, 2, batch_size=2)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate is not None
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               "-m", "d3builder", "generate", "--manifest", str(manifest.path), "--generator", GENERATOR]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[process 0/2]" in done.stdout and "[process 1/2]" in done.stdout
    by_process: dict[int, list[int]] = {0: [], 1: []}
    for shard in manifest.layout.record_shards():
        stats = json.loads(manifest.layout.stats("generate", shard, GENERATOR).read_text())
        by_process[stats["process_index"]].append(shard)
    assert by_process == {0: [0, 2], 1: [1, 3]}
    _check_complete(manifest)


def test_sigkill_mid_run_then_rerun_completes_without_duplicates(tmp_path: Path) -> None:  # noqa: F811
    """Kill -9 once shard 0 is done: no half shard is ever in place; a rerun finishes only what is missing."""
    manifest = make_records(tmp_path / "data", 18, 6, batch_size=1)
    layout = manifest.layout
    command = [sys.executable, "-m", "d3builder", "generate", "-m", str(manifest.path), "-g", GENERATOR]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first_stats = layout.stats("generate", 0, GENERATOR)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while not first_stats.is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "generate finished before it could be killed mid-run"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    unfinished = [k for k in (1, 2) if not layout.stats("generate", k, GENERATOR).is_file()]
    assert unfinished, "every shard finished before the kill"
    for shard in unfinished:  # an unfinished unit is absent, or (killed between rename and stats) whole
        assert not layout.gen(GENERATOR, shard).exists() or len(_ids(layout.gen(GENERATOR, shard))) == 6
    first_done = json.loads(first_stats.read_text())["finished_at"]
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"generated {len(unfinished)} shard(s), {3 - len(unfinished)} already done" in rerun.stdout
    assert json.loads(first_stats.read_text())["finished_at"] == first_done  # shard 0 was not redone
    _check_complete(manifest)
