"""`codetrain publish`: a hub-ready model folder (the export bundle plus its model card), uploaded with --repo.

The folder holds model.safetensors (timm key names) and config.json (timm's hub config),
so `timm.create_model("hf-hub:user/name", pretrained=True)` loads the backbone; the fitted
classifiers (skops), model.onnx, train_config.yaml and README.md (the model card with
model-index metadata, built from the evaluation's results.json). `Detector.from_pretrained`
and `codetrain detect --bundle` load it. The run and the evaluation folder may be fsspec
URLs; the folder written is local (it is what gets uploaded).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import HfApi

from codetrain.bundle import DEFAULT_OPSET, make_bundle
from codetrain.errors import InvalidInputError, MissingInputError, reports_user_errors
from codetrain.modelcard import model_card, write_model_card
from codetrain.runlayout import BundleFiles, EvalFiles, RunLayout
from d3builder.storage.hub import HubError, check_upload, upload_folder
from d3builder.storage.store import Store, open_store

DEFAULT_LICENSE = "apache-2.0"
"""The card's license unless --license says otherwise: the weights are yours to license."""


@dataclass
class PublishedModel:
    """The hub-ready folder, its card, and the commit URL when it was uploaded."""

    folder: Path
    card: Path
    url: str | None = None


def _results(evaluation: Store, run_dir: str | Path) -> dict:
    path = evaluation.root / EvalFiles.RESULTS_JSON
    if not evaluation.exists(path):
        raise MissingInputError(f"no {evaluation.url(path)}: run `codetrain evaluate --run {run_dir} "
                                "--data D3DIR` first (the card reports it)")
    return evaluation.read_json(path)


def publish_model(
    run_dir: str | Path,
    out_dir: str | Path,
    eval_dir: str | Path | None = None,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    dataset: str | None = None,
    repo_id: str | None = None,
    api: HfApi | None = None,
    opset: int = DEFAULT_OPSET,
) -> PublishedModel:
    """Export the run as a bundle in the local folder `out_dir`, write its model card, upload it to `repo_id` if given.

    A missing token, a malformed repo id or a missing evaluation fails before anything is written.
    """
    try:
        api = check_upload(repo_id, api) if repo_id else None
    except HubError as exc:
        raise InvalidInputError(str(exc)) from exc
    evaluation = open_store(eval_dir, writable=False) if eval_dir is not None else RunLayout.open(run_dir, writable=False).eval_store()
    results = _results(evaluation, run_dir)
    folder = Path(make_bundle(run_dir, out_dir, evaluation.url(), overwrite, opset))
    train_yaml = folder / BundleFiles.TRAIN_CONFIG
    train_config = (yaml.safe_load(train_yaml.read_text(encoding="utf-8")) or {}) if train_yaml.is_file() else {}
    bundle_config = json.loads((folder / BundleFiles.CONFIG).read_text(encoding="utf-8"))
    card = write_model_card(folder, model_card(results, bundle_config, train_config, license, dataset, repo_id))
    try:
        url = upload_folder(folder, repo_id, "model", api) if repo_id else None
    except HubError as exc:
        raise InvalidInputError(str(exc)) from exc
    return PublishedModel(folder, card, url)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain publish`."""
    parser = subparsers.add_parser(
        "publish",
        help="write a hub-ready model folder (weights, timm config, classifiers, ONNX, model card); --repo uploads it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="run folder (model.safetensors, eval/ from `codetrain evaluate`)")
    parser.add_argument("--bundle", required=True, type=Path, help="local folder to create: the bundle and its card")
    parser.add_argument("--eval-dir", help="evaluation folder (classifiers/, results.json; default RUN/eval)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license of the weights in the card (default {DEFAULT_LICENSE})")
    parser.add_argument("--dataset", help="hub id of the training dataset, linked from the card (e.g. user/my-d3)")
    parser.add_argument("--repo", help="upload to this hub model repo (user/name; needs `hf auth login` or HF_TOKEN)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.set_defaults(func=_run)


@reports_user_errors
def _run(args: argparse.Namespace) -> int:
    """Run `codetrain publish`; user errors (missing evaluation, existing folder, no token) are one line, exit 2."""
    published = publish_model(args.run, args.bundle, args.eval_dir, args.force, args.license, args.dataset, args.repo,
                              opset=args.opset)
    print(f"hub-ready model folder: {published.folder} (card {published.card.name})")
    if published.url:
        print(f"uploaded: {published.url}")
    return 0
