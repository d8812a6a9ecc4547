"""The authors' CoDE release as a baseline: a transformers ViTModel checkpoint in the release's layout (random
weights), read without ever unpickling the released classifiers, refitted and reported beside our model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hubkit import cached_repo
from shardkit import GENERATORS, make_d3_shards
from transformers import ViTConfig, ViTModel

from codetrain.cli import main
from codetrain.config import EvalConfig
from codetrain.evaluate import evaluate
from codetrain.model import CoDEEmbedder, create_embedder, save_weights
from codetrain.release import load_release, parse_release_baseline

CLASSIFIER_FILES = ("sklearn/linear_tot_classifier_epoch-32.sav", "sklearn/knn_tot_classifier_epoch-32.sav",
                    "sklearn/ocsvm_kernel_poly_gamma_auto_nu_0_1_crop.joblib")
"""Where the release keeps its pickled scikit-learn classifiers."""


class Trap:
    """Unpickling this object creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def plant_traps(folder: Path, marker: Path) -> None:
    """The release's classifier files, each a pickle that creates `marker` when loaded (checked once here)."""
    data = pickle.dumps(Trap(marker), protocol=4)
    pickle.loads(data)
    assert marker.exists(), "the trap works"
    marker.unlink()
    for name in CLASSIFIER_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A random ViT-Tiny saved by transformers as the release is (config.json + model.safetensors + sklearn/ pickles)."""
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(3)
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                       image_size=224, patch_size=16, layer_norm_eps=1e-12)
    hf = ViTModel(config).eval()
    hf.save_pretrained(root / "CoDE")
    marker = root / "UNPICKLED"
    plant_traps(root / "CoDE", marker)
    return {"folder": root / "CoDE", "hf": hf, "marker": marker, "root": root}


def test_release_backbone_gives_the_transformers_cls_embedding(release: dict) -> None:
    model = load_release(release["folder"])
    assert model.display_name == "CoDE release" and model.model_name == "vit_tiny_patch16_224"
    assert model.backbone.norm.eps == 1e-12 and model.backbone.blocks[0].norm1.eps == 1e-12
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = F.normalize(release["hf"](pixel_values=x).last_hidden_state[:, 0], dim=-1)
        torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(CoDEEmbedder().eval()(x), expected, atol=1e-2)
    assert not release["marker"].exists()


def test_a_hub_repo_id_reads_the_weights_only(release: dict, tmp_path: Path) -> None:
    folder = release["folder"]
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert set(CLASSIFIER_FILES) < set(files)
    cached_repo(tmp_path / "cache", "someone/CoDE", files)
    model = load_release("someone/CoDE", cache_dir=tmp_path / "cache", local_files_only=True)
    expected = load_release(folder).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert not release["marker"].exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_timm_layouts_in_torch_files_load_with_weights_only(tmp_path: Path) -> None:
    timm_state = CoDEEmbedder().backbone.state_dict()
    layouts = {"plain.bin": timm_state, "module.pth": {"state_dict": {f"module.{k}": v for k, v in timm_state.items()}, "epoch": 31},
               "model.pt": {"model": {f"model.{k}": v for k, v in timm_state.items()}}}
    for name, payload in layouts.items():
        torch.save(payload, tmp_path / name)
        loaded = load_release(tmp_path / name).backbone.state_dict()
        assert loaded.keys() == timm_state.keys() and all(torch.equal(loaded[k], v) for k, v in timm_state.items()), name
    marker = tmp_path / "UNPICKLED"
    torch.save({"weights": Trap(marker)}, tmp_path / "evil.pth", pickle_protocol=4)
    with pytest.raises(ValueError, match="evil.pth: not a readable weights file"):
        load_release(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "linear.sav").write_bytes(pickle.dumps(Trap(marker), protocol=4))
    with pytest.raises(ValueError, match="never pickles"):
        load_release(tmp_path / "linear.sav")
    with pytest.raises(ValueError, match="code-release:PATH_OR_REPO"):
        parse_release_baseline("code-release:")
    assert not marker.exists()


def test_release_baseline_joins_our_tables_with_all_three_classifiers(release: dict, tmp_path: Path) -> None:
    d3 = tmp_path / "d3"
    make_d3_shards(d3, 8, "validation", seed=1)
    make_d3_shards(d3, 6, "test", seed=2)
    save_weights(create_embedder("test_vit"), tmp_path / "run" / "model.safetensors")
    out = tmp_path / "eval"
    result = evaluate(EvalConfig(run=str(tmp_path / "run"), data=str(d3), eval_dir=str(out), robustness=False, fit_split="validation",
                                 baselines=[f"code-release:{release['folder']}"], progress=False))
    classifiers = ["linear", "knn", "ocsvm"]
    assert [(r["detector"], r["classifier"]) for r in result.results] == [("CoDE", c) for c in classifiers] + [
        ("CoDE release", c) for c in classifiers]
    for row in result.results:
        assert (row["n_real"], row["n_fake"]) == (6, 24) and set(row["per_generator"]) == set(GENERATORS)
    report = (out / "report.md").read_text()
    for c in classifiers:
        assert f"| CoDE release | {c} | test | 6 | 24 |" in report
        assert (out / "baselines" / "code-release" / "classifiers" / f"{c}.skops").is_file()
    assert set(json.loads((out / "roc.json").read_text())["test"]) == {f"{d} {c}" for d in ("CoDE", "CoDE release") for c in classifiers}
    assert (out / "acc_test.png").is_file() and (out / "roc_test.png").is_file()
    assert json.loads((out / "results.json").read_text())["fit"]["CoDE release"]["n_real"] == 8
    assert not release["marker"].exists(), "the released classifiers were never unpickled"


def test_a_bad_release_path_is_one_line_and_exit_2(release: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_d3_shards(tmp_path / "d3", 2, "validation", seed=1)
    make_d3_shards(tmp_path / "d3", 2, "test", seed=2)
    save_weights(create_embedder("test_vit"), tmp_path / "run" / "model.safetensors")
    missing = tmp_path / "no" / "such" / "CoDE"
    args = ["evaluate", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "d3"), "--no-robustness", "--fit-split", "validation"]
    assert main([*args, "--baseline", f"code-release:{missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("codetrain evaluate: error: --baseline") and str(missing) in err and "\n" not in err
    assert main([*args, "--baseline", f"code-release:{release['folder'] / CLASSIFIER_FILES[0]}"]) == 2
    assert "never pickles" in capsys.readouterr().err and not release["marker"].exists()
