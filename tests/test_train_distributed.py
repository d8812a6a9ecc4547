"""Two CPU processes under torchrun (gloo): disjoint records per rank, weights in sync, shared validation.

The file is also the worker: torchrun runs it as a script with a config JSON and an output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codetrain import checkpoint as ckpt
from codetrain.runlog import read_metrics


class RecordingLoader:
    """Wraps a DataLoader and records the ids of every batch it hands out."""

    def __init__(self, loader) -> None:
        self.loader, self.ids = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.ids.append(list(batch["id"]))
            yield batch


def worker(config_json: str, out_dir: str) -> None:
    """Train on this rank and write the ids it saw, its parameter digest and its losses."""
    import torch

    from codetrain.config import TrainConfig
    from codetrain.train import Trainer

    trainer = Trainer(TrainConfig(**json.loads(config_json)))
    initial = hashlib.sha256(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]).numpy().tobytes())
    trainer.loader = recorder = RecordingLoader(trainer.loader)
    result = trainer.fit()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    report = {
        "rank": trainer.rank, "world": trainer.world, "batches": recorder.ids,
        "initial_sha": initial.hexdigest(), "sha": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
        "checksum": float(params.double().sum()), "losses": result.losses, "steps": result.steps,
        "val": result.val_history,
    }
    Path(out_dir, f"rank-{trainer.rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_two_processes_split_records_and_keep_weights_in_sync(tmp_path: Path) -> None:
    from shardkit import make_d3_shards, shard_ids

    data = tmp_path / "d3"
    train_shards = make_d3_shards(data, 48, "train", shard_size=16)
    make_d3_shards(data, 16, "validation", shard_size=8, seed=1)
    run = tmp_path / "run"
    config = dict(data=str(data), run=str(run), model="test_vit", img_size=64, local_size=32, batch_size=8,
                  epochs=2, checkpoint_every=2, keep_checkpoints=0, log_every=1, progress=False, tensorboard=False,
                  precision="fp32", warmup_epochs=0.5, val_batch_size=32, cpu=True)
    tests = Path(__file__).resolve().parent  # the workers import this checkout (not another install) and shardkit
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, json.dumps(config), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 48 records / 2 ranks / batch 8 = 3 steps per epoch, 2 epochs.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    all_ids = set(shard_ids(train_shards))
    for epoch in range(2):
        seen = [[i for batch in r["batches"][epoch * 3:(epoch + 1) * 3] for i in batch] for r in ranks]
        assert all(len(s) == len(set(s)) == 24 for s in seen)
        assert not set(seen[0]) & set(seen[1]), "ranks must see disjoint records"
        assert set(seen[0]) | set(seen[1]) == all_ids
    assert ranks[0]["initial_sha"] == ranks[1]["initial_sha"]
    assert ranks[0]["sha"] == ranks[1]["sha"] != ranks[0]["initial_sha"], "weights must train and stay in sync"
    assert ranks[0]["losses"] == ranks[1]["losses"], "logged losses are the mean over ranks"
    assert len(ranks[0]["val"]) == 2 and ranks[0]["val"] == ranks[1]["val"]
    assert ranks[0]["val"][0]["val_images"] == 16 * 5, "both ranks' validation shards were gathered"
    step6 = ckpt.checkpoint_dir(run, 6)
    assert {p.name for p in step6.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
