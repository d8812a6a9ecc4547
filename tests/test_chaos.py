"""Chaos (slow): four workers share generate + assemble on one recipe, each SIGKILLed at random moments and
restarted, on the S3 server and on a local folder. Afterwards every record is in the assembled shards exactly
once, no temporary object is visible, the bytes equal an undisturbed run's, and no unit was completed twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from genkit import make_records, one_thread, save_manifest  # noqa: F401 - fixtures

from d3builder.recipe.manifest import Manifest
from d3builder.storage.layout import DataLayout

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GENERATOR = "sd14-tiny"
WORKERS, KILLS_EACH, SHARDS = 4, 1, 6
WORKER = """
import sys
import torch
torch.set_num_threads(1)
from d3builder.generators.render import generate_shards
from d3builder.recipe.manifest import load_manifest
from d3builder.stages.assemble import assemble_dataset
manifest = load_manifest(sys.argv[1], output_root=sys.argv[2])
codes = [generate_shards(manifest, "sd14-tiny", progress=False).exit_code,
         assemble_dataset(manifest, progress=False).exit_code]
sys.exit(max(codes))
"""


def recipe(root: Path) -> Manifest:
    """12 records in 6 shards (records/ and real/ written), one tiny generator, 2-second leases."""
    manifest = make_records(root, 2 * SHARDS, 2, batch_size=2)
    manifest.generators = [GENERATOR]
    manifest.units.lease_seconds = 2.0
    return save_manifest(manifest, root / "manifest.yaml")


def worker(manifest: Manifest, root: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(manifest.path), root], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_with_chaos(manifest: Manifest, root: str, seed: int) -> int:
    """Run WORKERS workers, SIGKILL each KILLS_EACH times at random moments and restart it; returns the kills."""
    rng = random.Random(seed)
    running = [(worker(manifest, root), time.time() + rng.uniform(2.0, 10.0), KILLS_EACH) for _ in range(WORKERS)]
    kills, deadline = 0, time.time() + 300
    while any(process.poll() is None for process, _, _ in running):
        assert time.time() < deadline, "workers did not finish"
        for index, (process, kill_at, kills_left) in enumerate(running):
            if process.poll() is None and kills_left and time.time() >= kill_at:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                running[index] = (worker(manifest, root), time.time() + rng.uniform(2.0, 10.0), kills_left - 1)
        time.sleep(0.05)
    errors = [process.stderr.read()[-2000:] for process, _, _ in running if process.returncode != 0]
    assert not errors, errors  # each last life ran to the end and exited 0: together they completed the stages
    return kills


def objects(root: str) -> dict[str, bytes]:
    """Every file under a local root or an S3 prefix, by relative path."""
    if root.startswith("s3://"):
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        prefix = root.removeprefix("s3://")
        return {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}
    return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def check(root: str, reference: dict[str, bytes]) -> None:
    files = objects(root)
    layout = DataLayout(root)
    assert not [name for name in files if ".tmp" in name], "a temporary object is visible"
    shards = sorted(name for name in files if name.startswith("d3/") and name.endswith(".parquet"))
    assert shards == sorted(name for name in reference if name.startswith("d3/") and name.endswith(".parquet"))
    assert all(files[name] == reference[name] for name in shards), "assembled bytes differ from the undisturbed run"
    ids = [i for name in shards for i in pq.read_table(layout.store.open(layout.root / name), columns=["id"])["id"]
           .to_pylist()]
    assert sorted(ids) == [str(1000 + i) for i in range(2 * SHARDS)]  # every record exactly once
    for stage, group in (("generate", GENERATOR), ("assemble", None)):
        for shard in range(SHARDS):
            unit = f"{group}/{shard:05d}" if group else f"{shard:05d}"
            stats = json.loads(files[f"stats/{stage}/{unit}.json"])
            events = [json.loads(files[name]) for name in files if name.startswith(f"history/{stage}/{unit}/")]
            completions = [e for e in events if e["outcome"] == "done"]
            assert len(completions) <= 1, f"{stage} {unit} completed twice: {completions}"
            assert all(e["token"] == stats["lease"]["token"] for e in completions)
    for shard in range(SHARDS):  # generated rows equal too (but for their timings)
        name = f"gen/{GENERATOR}/{shard:05d}.parquet"
        ours, theirs = (pq.read_table(pa.BufferReader(data[name])).drop_columns(["seconds"]) for data in (files, reference))
        assert ours.equals(theirs), name


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every file of one undisturbed worker's run of the recipe."""
    root = tmp_path_factory.mktemp("undisturbed")
    manifest = recipe(root)
    assert worker(manifest, str(root)).wait(timeout=300) == 0
    return objects(str(root))


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_workers_killed_at_random_still_build_the_dataset_exactly_once(
        backend: str, tmp_path: Path, undisturbed: dict[str, bytes], request: pytest.FixtureRequest) -> None:
    manifest = recipe(tmp_path / "data")
    if backend == "s3":
        root = f"{request.getfixturevalue('s3_bucket')}/chaos"
        for folder in ("records", "real"):
            request.getfixturevalue("s3").upload(tmp_path / "data" / folder, f"{root}/{folder}")
    else:
        root = str(tmp_path / "data")
    kills = run_with_chaos(manifest, root, seed=7 if backend == "local" else 11)
    assert kills == WORKERS * KILLS_EACH
    check(root, undisturbed)
