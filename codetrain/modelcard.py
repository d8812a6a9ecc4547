"""The model card (README.md with hub metadata and model-index) of a published detector, from its evaluation report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from codetrain.embed import REAL_GENERATOR
from codetrain.evaluate import CODE_DETECTOR, EXTENDED_SPLIT
from codetrain.report import (
    generator_auc_table,
    generator_table,
    pct,
    robustness_table,
    summary_table,
)
from d3builder.core.paper import CITATION, PAPER_URL
from d3builder.storage.store import atomic_write_bytes

SPLIT_TITLES = {
    "test": "without transformations (`test`)",
    "test_augm": "with transformations (`test_augm`)",
    EXTENDED_SPLIT: "extended test set: further generators (`extended`)",
}
TRAIN_KEYS = ("data", "model", "img_size", "local_size", "global_local", "epochs", "max_steps", "batch_size", "lr", "seed")
"""Training settings shown in the card (the whole config ships as train_config.yaml)."""


def eval_results(results: Sequence[Mapping[str, Any]], dataset: str | None) -> list[EvalResult]:
    """model-index entries: accuracy and ROC AUC of every CoDE classifier on every evaluated split."""
    entries = []
    for row in results:
        if row["detector"] != CODE_DETECTOR:
            continue
        common = dict(task_type="image-classification", task_name="Real vs generated image detection",
                      dataset_type=dataset or "d3", dataset_name=f"D3 {row['split']}", dataset_split=row["split"])
        for metric, key in (("accuracy", "acc"), ("roc_auc", "auc")):
            if row.get(key) is not None:
                entries.append(EvalResult(metric_type=metric, metric_value=round(float(row[key]), 4),
                                          metric_name=f"{row['classifier']} {metric}", **common))
    return entries


def _training(train_config: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    fit_split = results.get("fit_split", "validation")
    fits = results.get("fit", {}).get(CODE_DETECTOR, {})
    lines = [f"- `{key}`: {train_config[key]}" for key in TRAIN_KEYS if key in train_config]
    if fits:
        lines.append(f"- classifiers fitted on `{fit_split}`: {fits['n_real']} real and {fits['n_fake']} generated "
                     f"images from {', '.join(f'`{g}`' for g in fits['generators'])}")
    return lines or ["- not recorded"]


def _evaluation(results: Mapping[str, Any]) -> list[str]:
    rows = results.get("results", [])
    parts = ["Accuracies in %, on real images, on generated ones and overall; AUC and AP rank reals against fakes.",
             summary_table(rows)]
    for split in dict.fromkeys(r["split"] for r in rows):
        title = SPLIT_TITLES.get(split, f"`{split}`")
        parts += [f"### Accuracy per generator, {title}", generator_table(rows, split),
                  f"### AUC per generator, {title}", generator_auc_table(rows, split)]
    sweep = results.get("robustness", [])
    if sweep:
        clean = [r for r in rows if r["split"] == sweep[0]["split"]]
        parts += [f"### Robustness (`{sweep[0]['split']}` under JPEG, downscaling, blur, cropping)", robustness_table(sweep, clean)]
    return parts


def _headline(results: Mapping[str, Any]) -> str:
    best = max((r for r in results.get("results", []) if r["detector"] == CODE_DETECTOR and r["split"] == "test"),
               key=lambda r: r["acc"] or 0.0, default=None)
    if best is None:
        return ""
    return f" On the `test` split its best classifier ({best['classifier']}) reaches {pct(best['acc'])}% accuracy."


def model_card(
    results: Mapping[str, Any],
    bundle_config: Mapping[str, Any],
    train_config: Mapping[str, Any],
    license: str,
    dataset: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card: metadata (library timm, license, datasets, model-index) and a body built from results.json."""
    embedder, pre = bundle_config["embedder"], bundle_config["preprocessing"]
    name = repo_id.split("/")[-1] if repo_id else f"code-{embedder['model_name']}"
    data = ModelCardData(
        model_name=name, library_name="timm", license=license, pipeline_tag="image-feature-extraction",
        tags=["deepfake-detection", "ai-generated-image-detection", "image-forensics", "code", "d3", "timm"],
        datasets=[dataset] if dataset else None, metrics=["accuracy", "roc_auc"],
        eval_results=eval_results(results.get("results", []), dataset) or None,
    )
    repo = repo_id or "path/to/this/folder"
    timm_name = f"hf-hub:{repo}" if repo_id else "local-dir:path/to/this/folder"
    classifiers = bundle_config["classifiers"]["classifiers"]
    generators = sorted({g for r in results.get("results", []) for g in r["per_generator"]} - {REAL_GENERATOR})
    sections = [
        f"# {name}: a CoDE detector of AI-generated images",
        f"A `{embedder['model_name']}` embedder trained from scratch with CoDE's contrastive global and global-local "
        f"objective (Baraldi et al., ECCV 2024, [arXiv 2407.20337]({PAPER_URL})) on D3-style real/generated pairs, and the "
        f"paper's three classifiers fitted on its frozen, L2-normalised {embedder['embed_dim']}-d embeddings: "
        f"{', '.join(f'`{c}`' for c in classifiers)} (score > 0 means generated).{_headline(results)} Built with d3code.",
        "## How to use",
        "```python\nfrom codetrain import Detector  # the d3code toolkit\n\n"
        f'det = Detector.from_pretrained("{repo}")  # classifier="linear" (default), "knn" or "ocsvm"\n'
        'for p in det.predict(["photo.jpg", "maybe_generated.png"]):  # paths or PIL images, any size\n'
        "    print(p.label, p.score, p.classifier)\n```",
        "With timm alone (the embedding; the classifiers are the skops files in `classifiers/`):",
        "```python\nimport timm\nimport torch.nn.functional as F\nfrom PIL import Image\n\n"
        f'model = timm.create_model("{timm_name}", pretrained=True).eval()\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n"
        'embedding = F.normalize(model(transform(Image.open("photo.jpg").convert("RGB"))[None]), dim=-1)\n```',
        f"`model.onnx` takes `image` {bundle_config['onnx']['input_shape']} and returns `embedding` "
        f"{bundle_config['onnx']['output_shape']} (checked against PyTorch). Preprocessing everywhere: RGB, shorter "
        f"side resized to {pre['resize_shorter_side']} px (bilinear, antialiased), {pre['center_crop']} px centre crop, "
        f"mean {pre['mean']} and std {pre['std']}.",
        "## Training",
        "\n".join(_training(train_config, results)),
        "## Evaluation",
        *_evaluation(results),
        "## Intended use",
        "Research on detecting images made by diffusion models, and a baseline for such work. A score is evidence, "
        "not proof: do not take decisions about people or content from it alone.",
        "## Limitations",
        f"- It was evaluated on the generators above ({', '.join(f'`{g}`' for g in generators) or 'none'}); "
        "accuracy on other generators, GANs, edited or heavily compressed images can be much lower.\n"
        "- The classifiers were fitted on a small held-out split of the training recipe; refit them "
        "(`codetrain evaluate`) for another domain.\n"
        "- Real images come from LAION-400M (web photos, mostly English captions) with its biases.",
        "## Citation",
        f"```bibtex\n{CITATION}\n```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(folder: str | Path, card: ModelCard) -> Path:
    """Write the card as folder/README.md, atomically."""
    return atomic_write_bytes(Path(folder) / "README.md", str(card).encode())
