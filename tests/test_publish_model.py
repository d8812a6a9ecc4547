"""`codetrain publish`: a hub-ready model folder with a model card built from the evaluation; uploads stop at the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hubkit import RecordingApi, no_token  # noqa: F401 - no_token is a fixture
from huggingface_hub import ModelCard
from PIL import Image
from shardkit import GENERATORS, make_d3_shards

from codetrain import Detector
from codetrain.cli import main
from codetrain.config import EvalConfig
from codetrain.evaluate import evaluate
from codetrain.model import create_embedder, load_embedder, save_weights
from codetrain.publish import publish_model

FILES = ["README.md", "classifiers/classifiers.json", "classifiers/knn.skops", "classifiers/linear.skops",
         "classifiers/ocsvm.skops", "config.json", "model.onnx", "model.safetensors", "train_config.yaml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An evaluated run (tiny ViT, validation/test/test_augm shards, a short robustness sweep) with a training config."""
    root = tmp_path_factory.mktemp("publish-model")
    for split, n, seed in (("validation", 8, 1), ("test", 6, 2), ("test_augm", 6, 3)):
        make_d3_shards(root / "d3", n, split, seed=seed)
    save_weights(create_embedder("test_vit"), root / "run" / "model.safetensors")
    (root / "run" / "config.yaml").write_text(f"data: {root / 'd3'}\nmodel: test_vit\nmax_steps: 60\nlocal_size: 96\n")
    evaluate(EvalConfig(run=str(root / "run"), data=str(root / "d3"), robustness_levels={"jpeg": [50]}, progress=False, fit_split="validation"))
    return root / "run"


@pytest.mark.usefixtures("no_token")
def test_published_folder_loads_everywhere_and_its_card_reports_the_evaluation(run: Path, tmp_path: Path) -> None:
    published = publish_model(run, tmp_path / "hub", dataset="someone/my-d3")
    folder = published.folder
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == FILES
    assert published.url is None
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(F.normalize(backbone(x), dim=-1), load_embedder(run / "model.safetensors")(x))
    image = Image.fromarray((torch.rand(40, 70, 3) * 255).to(torch.uint8).numpy())
    assert [p.classifier for p in Detector.from_pretrained(folder, "ocsvm").predict([image, image])] == ["ocsvm"] * 2

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and card.data.license == "apache-2.0"
    assert card.data.datasets == ["someone/my-d3"]
    results = json.loads((run / "eval" / "results.json").read_text())["results"]
    code = [r for r in results if r["detector"] == "CoDE"]
    metrics = {(e.dataset_split, e.metric_name): e.metric_value for e in card.data.eval_results}
    assert len(metrics) == 2 * len(code)
    for row in code:
        assert metrics[(row["split"], f"{row['classifier']} accuracy")] == pytest.approx(row["acc"], abs=1e-4)
        assert metrics[(row["split"], f"{row['classifier']} roc_auc")] == pytest.approx(row["auc"], abs=1e-4)
    text = card.text
    for heading in ("## How to use", "## Training", "## Evaluation", "## Intended use", "## Limitations", "## Citation",
                    "Accuracy per generator, without transformations (`test`)", "AUC per generator, with transformations (`test_augm`)",
                    "### Robustness (`test`"):
        assert heading in text, heading
    assert "arxiv.org/abs/2407.20337" in text and "@inproceedings{baraldi2024contrasting" in text
    assert all(g in text for g in GENERATORS) and "`max_steps`: 60" in text and "| CoDE | knn | test_augm |" in text


@pytest.mark.usefixtures("no_token")
def test_upload_and_its_refusals(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    api = RecordingApi()
    published = publish_model(run, tmp_path / "up", repo_id="someone/code-tiny", api=api)
    assert published.url.endswith("/someone/code-tiny/commit/0123")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][1]["repo_type"] == "model" and api.uploaded == FILES
    card = ModelCard.load(published.card)
    assert card.data.model_name == "code-tiny" and 'Detector.from_pretrained("someone/code-tiny")' in card.text
    assert 'timm.create_model("hf-hub:someone/code-tiny"' in card.text

    assert main(["publish", "--run", str(run), "--bundle", str(tmp_path / "cli"), "--repo", "someone/code-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("codetrain publish: error: no Hugging Face token") and "\n" not in err
    assert not (tmp_path / "cli").exists(), "nothing is written before the token check"
    assert main(["publish", "--run", str(run), "--bundle", str(tmp_path / "up")]) == 2
    assert "already exists" in capsys.readouterr().err
    bare = tmp_path / "bare"
    save_weights(create_embedder("test_vit"), bare / "model.safetensors")
    assert main(["publish", "--run", str(bare), "--bundle", str(tmp_path / "bare-out")]) == 2
    assert "codetrain evaluate" in capsys.readouterr().err
    assert main(["publish", "--run", str(run), "--bundle", str(tmp_path / "cli"), "--license", "cc-by-nc-4.0"]) == 0
    assert ModelCard.load(tmp_path / "cli" / "README.md").data.license == "cc-by-nc-4.0"
