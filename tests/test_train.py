"""CoDE training loop: config, checkpoints without pickle, exact resume, validation/early stopping, CLI, ELSA layout."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from shardkit import make_d3_shards, write_real_sources

from codetrain import checkpoint as ckpt
from codetrain.cli import main as cli_main
from codetrain.config import ConfigError, TrainConfig, load_config
from codetrain.model import create_embedder, load_embedder
from codetrain.preprocessing import Preprocessing
from codetrain.runlog import read_metrics
from codetrain.train import (
    cpu_has_native_bf16,
    embed_views,
    estimate_steps_per_epoch,
    resolve_precision,
    step_generator,
    train,
)
from codetrain.views import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model="test_vit", img_size=64, local_size=32, batch_size=8, log_every=1, progress=False,
             tensorboard=False, val_batch_size=32)
"""A tiny timm ViT at 64/32 px keeps each CPU step well under a second."""


@pytest.fixture(scope="module")
def d3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train records (3 shards) and 16 validation records in our layout."""
    root = tmp_path_factory.mktemp("d3")
    make_d3_shards(root, 48, "train", shard_size=16)
    make_d3_shards(root, 16, "validation", shard_size=16, seed=1)
    return root


def small(data: Path, out: Path, **kw) -> TrainConfig:
    """A small CPU config (fp32 unless asked) on `data`, writing to `out`."""
    return TrainConfig(**{**SMALL, "data": str(data), "run": str(out), "precision": "fp32", **kw})


# --- config --------------------------------------------------------------------------------------


def test_paper_config_holds_the_published_settings() -> None:
    cfg = load_config(ROOT / "configs" / "code_d3.yaml")
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.epochs) == (2e-3, 2e-5, 5.0, 150)
    assert (cfg.batch_size, cfg.seed, cfg.patience, cfg.temperature) == (256, 42, 6, 0.1)
    assert cfg.model == "vit_tiny_patch16_224" and cfg.global_local and cfg.local_size == 96
    assert resolve_precision(cfg.precision, on_gpu=True) == "fp16"
    assert cfg.grad_clip is None and TrainConfig().grad_clip is None  # the paper clips no gradient
    # The views' geometry and normalisation come from the model's config: the paper's 248 -> 224, ImageNet mean/std.
    assert cfg.img_size is None and cfg.normalisation == "imagenet"
    assert create_embedder(cfg.model, cfg.img_size, cfg.normalisation).preprocessing == Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD)
    assert Preprocessing(224).resize == 248
    tiny = load_config(ROOT / "configs" / "code_tiny.yaml")
    assert tiny.max_steps is not None and tiny.batch_size <= 16
    assert tiny.grad_clip == 1.0  # the documented departure of the CPU quickstart config


def test_flags_override_yaml_and_bad_values_are_config_errors(tmp_path: Path) -> None:
    from codetrain.cli import build_parser
    from codetrain.config import overrides_from_args

    args = build_parser().parse_args(["train", "--config", str(ROOT / "configs" / "code_tiny.yaml"), "--local-size",
                                      "224", "--global-only", "--grad-clip", "none", "--max-steps", "7"])
    cfg = load_config(args.config, overrides_from_args(args))
    assert (cfg.local_size, cfg.global_local, cfg.grad_clip, cfg.max_steps) == (224, False, None, 7)
    assert cfg.batch_size == load_config(args.config).batch_size
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"lr": 1e-3, "learning_rate": 2}))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, {"precision": "fp8"})
    assert cli_main(["train", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--batch-size", "1"]) == 2


def test_cpu_precision_is_bf16_only_with_native_bf16() -> None:
    assert resolve_precision("auto", on_gpu=False) == ("bf16" if cpu_has_native_bf16() else "no")
    assert resolve_precision("fp32", on_gpu=False) == "no"
    assert resolve_precision("bf16", on_gpu=False) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", on_gpu=False)


def test_steps_per_epoch_from_row_counts() -> None:
    assert estimate_steps_per_epoch(1000, 32, 1, 1) == 31
    assert estimate_steps_per_epoch(1000, 32, 2, 1) == 15
    assert estimate_steps_per_epoch(1000, 32, 2, 2) == 7
    with pytest.raises(ValueError, match="cannot fill one step"):
        estimate_steps_per_epoch(10, 8, 2, 1)


# --- pieces of a step ----------------------------------------------------------------------------


def test_views_of_one_size_share_a_forward_pass_exactly() -> None:
    torch.manual_seed(0)
    model = create_embedder("test_vit", 64).eval()
    batch = {k: torch.randn(3, 3, 64, 64) for k in ("x_r", "x_f", "a_r", "a_f", "g_r", "g_f")}
    batch.update({k: torch.randn(3, 3, 32, 32) for k in ("l_r", "l_f")})
    with torch.no_grad():
        emb = embed_views(model, batch, tuple(batch), torch.device("cpu"))
        for key, x in batch.items():
            torch.testing.assert_close(emb[key], model(x), atol=1e-5, rtol=1e-5)


def test_step_generators_repeat_per_step_and_differ_across_steps_and_ranks() -> None:
    def draw(*args: int) -> list[int]:
        return torch.randperm(50, generator=step_generator(*args)).tolist()

    assert draw(42, 5, 0) == draw(42, 5, 0)
    assert len({tuple(draw(42, 5, 0)), tuple(draw(42, 6, 0)), tuple(draw(42, 5, 1)), tuple(draw(43, 5, 0))}) == 4


def test_optimizer_and_rng_state_round_trip_through_safetensors_and_json(tmp_path: Path) -> None:
    model = create_embedder("test_vit", 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
    ckpt.save_train_state(tmp_path, optimizer.state_dict(), {"progress": {"step": 2}})
    state, meta = ckpt.load_train_state(tmp_path)
    assert meta["progress"] == {"step": 2}
    fresh = torch.optim.AdamW(create_embedder("test_vit", 32).parameters(), lr=1e-3)
    fresh.load_state_dict(state)
    original = optimizer.state_dict()
    assert fresh.state_dict()["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for name, tensor in values.items():
            torch.testing.assert_close(fresh.state_dict()["state"][index][name], tensor, atol=0, rtol=0)
    ckpt.save_process_rng(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.load_process_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}


# --- training runs -------------------------------------------------------------------------------


def _no_pickle(folder: Path) -> None:
    """Every checkpoint file is JSON or safetensors, and none starts with a pickle opcode."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix in (".json", ".safetensors"), path
        assert path.read_bytes()[:1] != b"\x80", f"{path} looks like a pickle"
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            safetensors.torch.load_file(str(path))


def test_resume_continues_exactly_and_checkpoints_hold_no_pickle(d3: Path, tmp_path: Path) -> None:
    cfg = small(d3, tmp_path / "run", max_steps=6, epochs=3, checkpoint_every=3, keep_checkpoints=0,
                val_split=None, warmup_epochs=0.5)
    full = train(cfg)
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in full.losses.values())
    run = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [3, 6]
    _no_pickle(run / "checkpoints")
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    final = load_embedder(run / "model.safetensors")
    torch.testing.assert_close(final.backbone.state_dict(), safetensors.torch.load_file(str(run / "checkpoints/step-6/model.safetensors")))  # timm key names
    # Crash after step 3: only its checkpoint survives; the resumed run redoes steps 4-6 identically.
    shutil.rmtree(run / "checkpoints" / "step-6")
    with pytest.raises(ValueError, match="--resume"):
        train(cfg)
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.losses == {k: full.losses[k] for k in (4, 5, 6)}
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [full.losses[k] for k in range(1, 7)]
    assert {"lr", "records_per_s", "loss_real", "loss_fake", "loss_local_real", "grad_norm"} <= rows[0].keys()
    assert rows[0]["lr"] < rows[1]["lr"], "linear warm-up"


@pytest.mark.slow
def test_resume_with_two_loader_workers_matches_the_single_process_loader(d3: Path, tmp_path: Path) -> None:
    cfg = small(d3, tmp_path / "w2", max_steps=6, epochs=3, checkpoint_every=3, keep_checkpoints=0,
                val_split=None, warmup_epochs=0.5, num_workers=2)
    full = train(cfg)
    reference = train(small(d3, tmp_path / "w0", max_steps=6, epochs=3, val_split=None, warmup_epochs=0.5))
    assert full.losses == reference.losses, "the batch sequence must not depend on the number of workers"
    shutil.rmtree(tmp_path / "w2" / "checkpoints" / "step-6")
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.losses == {k: full.losses[k] for k in (4, 5, 6)}


@pytest.mark.slow
def test_short_run_lowers_the_loss_below_chance(tmp_path: Path) -> None:
    data = tmp_path / "d3"
    make_d3_shards(data, 32, "train", shard_size=16)
    result = train(small(data, tmp_path / "run", max_steps=40, epochs=100, lr=5e-4, warmup_epochs=0.25,
                         val_split=None, checkpoint_every=100, precision="auto"))
    losses = [result.losses[k] for k in sorted(result.losses)]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    chance = 2 * math.log(SMALL["batch_size"] + 1)  # every logit equal: -log(1/(1+B)) per term, real + fake
    assert first > last + 0.5, (first, last)
    assert last < chance - 0.2, (last, chance)


def test_validation_keeps_the_best_model_and_stops_early(d3: Path, tmp_path: Path) -> None:
    # A vanishing learning rate leaves the probe accuracy flat: never better, so patience 1 stops at the 2nd epoch.
    result = train(small(d3, tmp_path / "run", epochs=5, steps_per_epoch=1, lr=1e-12, warmup_epochs=0,
                         patience=1, checkpoint_every=1, keep_checkpoints=0))
    run = tmp_path / "run"
    assert result.stopped_early and result.steps == 2 and result.epochs == 2
    assert result.best_step == 1 and result.best_val_acc is not None and 0 <= result.best_val_acc <= 1
    vals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert [(r["step"], r["epoch"]) for r in vals] == [(1, 0), (2, 1)]
    assert vals[0]["val_images"] == 16 * 5 and set(vals[0]["val_per_generator"]) == {"deepfloyd-if", "sd14", "sd21", "sdxl"}
    best = safetensors.torch.load_file(str(run / "model.safetensors"))
    torch.testing.assert_close(best, safetensors.torch.load_file(str(run / "checkpoints/step-1/model.safetensors")))


def test_cli_trains_on_the_published_elsa_layout_with_reals_from_real_shards_and_accumulation(tmp_path: Path, capsys) -> None:
    data = tmp_path / "elsa"
    make_d3_shards(data, 16, "train", shard_size=8, elsa_layout=True)
    make_d3_shards(data, 8, "validation", shard_size=8, elsa_layout=True)  # the first 8 records again
    real_dir, _ = write_real_sources(tmp_path / "reals", 16, shard_size=8)
    run = tmp_path / "run"
    code = cli_main(["train", "--config", str(ROOT / "configs" / "code_tiny.yaml"), "--data", str(data),
                     "--real-source", str(real_dir), "--run", str(run), "--model", "test_vit", "--img-size", "64",
                     "--local-size", "32", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "2",
                     "--global-only",
                     "--no-progress", "--no-tensorboard"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and Path(summary["model"]).is_file()
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 2 and "loss_local_real" not in rows[0] and rows[0]["skipped"] == 0
    vals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "val"]
    assert len(vals) == 1 and vals[0]["val_images"] == 8 * 5 and vals[0]["val_skipped"] == 0
    state = json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())
    assert state["progress"]["batches_in_epoch"] == 4, "2 steps x 2 accumulated micro-batches of 4 records"
    assert load_embedder(run / "model.safetensors").embed_dim == 64
