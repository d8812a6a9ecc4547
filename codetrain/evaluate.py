"""Evaluate a run: embed the splits, fit the paper's three classifiers, score every test split, report.

Outputs in OUT (default RUN/eval): report.md, results.csv, results.json, roc.json,
robustness.csv, PNG plots (acc_{split}, roc_{split}, map_{split}, robustness),
classifiers/ (skops files + classifiers.json, what `codetrain detect` loads) and
cache/ (embeddings as safetensors, reused while the weights and shards are unchanged).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codetrain.classifiers import CLASSIFIERS, FittedClassifier, fit_classifier
from codetrain.config import ConfigError
from codetrain.data import RealImageSource
from codetrain.embed import (
    REAL_GENERATOR,
    Embeddings,
    embed_shards_cached,
    model_device,
    model_fingerprint,
)
from codetrain.metrics import evaluate_predictions, roc_points
from codetrain.model import load_embedder
from codetrain.persistence import load_classifier, save_classifier
from codetrain.realsource import require_real_images
from codetrain.report import (
    CSV_COLUMNS,
    ROBUSTNESS_COLUMNS,
    build_report,
    long_rows,
    plot_embedding_map,
    plot_generator_accuracy,
    plot_robustness,
    plot_roc,
    write_csv,
)
from codetrain.robustness import DEFAULT_LEVELS, robustness_sweep, validate_levels
from codetrain.sources import (
    TEST_VARIANTS,
    DataSource,
    Use,
    default_test_splits,
    open_source,
    refuse_shared_files,
    run_training_files,
)
from d3builder.storage.layout import safe_name
from d3builder.storage.schema import FIT_AUGM_SPLIT
from d3builder.storage.shards import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_CLASSIFIERS = ("linear", "knn", "ocsvm")
DEFAULT_FIT_SPLIT = FIT_AUGM_SPLIT
"""The paper fits its classifiers on a held-out, transformed subset: d3builder's fit_augm split."""
DEFAULT_TEST_SPLITS = ("test", "test_augm")
SPLIT_FLAGS = "--fit-split and --test-splits (--test-data for another source, e.g. the published test folders)"
CODE_DETECTOR = "CoDE"
EXTENDED_SPLIT = "extended"
MODEL_FILE = "model.safetensors"
CLASSIFIERS_DIR = "classifiers"
MANIFEST = "classifiers.json"
MANIFEST_FORMAT = "codetrain.classifiers/1"
RESULTS_FORMAT = "codetrain.evaluation/1"


@dataclass
class EvaluationResult:
    """What `evaluate` produced: metric rows, robustness rows, the fitted classifiers and the files written."""

    out_dir: Path
    results: list[dict[str, Any]]
    robustness: list[dict[str, Any]]
    classifiers: dict[str, FittedClassifier]
    files: dict[str, Path]
    report: str


def detector_name(model: nn.Module) -> str:
    """A model's label in the tables: its `display_name` (baselines) or 'CoDE'."""
    return str(getattr(model, "display_name", CODE_DETECTOR))


def slug(name: str) -> str:
    """A file-name-safe lower-case form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower() or "detector"


def extended_shards(extended_dir: str | Path) -> list[str]:
    """Shards `{generator}/test-*.parquet` under `extended_dir/extended` or `extended_dir` itself."""
    root = Path(extended_dir)
    if (root / "extended").is_dir():
        root = root / "extended"
    if not root.is_dir():
        raise FileNotFoundError(f"extended test set folder {root} does not exist")
    return sorted(str(p) for p in root.glob("*/test-*.parquet"))


def fit_description(split: str) -> str:
    """How the classifiers' fit split relates to the paper's protocol, for the report."""
    if split == DEFAULT_FIT_SPLIT:
        return "the held-out, transformed fit subset, as in the paper"
    return "a departure from the paper, which fits on a held-out, transformed subset (d3builder's fit_augm)"


def collect_test_splits(
    source: DataSource, test_splits: Sequence[str] | None, extended_dir: str | Path | None
) -> dict[str, list[str]]:
    """The files of each test split: the named ones (each must exist), else the defaults the source offers.

    The defaults are test and test_augm (a missing one is logged and skipped), else the published
    test folders no_augm and augm; a source with none of them is refused naming the split flags.
    """
    if test_splits is None:
        names = default_test_splits(source, DEFAULT_TEST_SPLITS)
        if not names:
            raise ConfigError(
                source.given, "--test-splits",
                f"none of the test splits {', '.join(DEFAULT_TEST_SPLITS + TEST_VARIANTS)} here (splits from "
                f"{source.found_by}: {source.offered()}); choose the splits with {SPLIT_FLAGS}",
            )
        for split in DEFAULT_TEST_SPLITS:
            if split not in names and names[0] in DEFAULT_TEST_SPLITS:
                log.warning("no %s split in %s: split skipped", split, source.given)
    else:
        names = list(dict.fromkeys(test_splits))
    splits = {split: source.require(split, "--test-splits", SPLIT_FLAGS) for split in names}
    if extended_dir is not None:
        shards = extended_shards(extended_dir)
        if not shards:
            raise FileNotFoundError(f"no {{generator}}/test-*.parquet shards under {extended_dir}")
        splits[EXTENDED_SPLIT] = shards
    return splits


def fit_classifiers(
    fit: Embeddings, names: Sequence[str], folder: str | Path, fingerprint: str, detector: str = CODE_DETECTOR, fit_split: str = "validation"
) -> dict[str, FittedClassifier]:
    """Fit each named classifier on `fit`, save it as folder/{name}.skops and write folder/classifiers.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fitted = {}
    for name in names:
        log.info("fitting %s on %d embeddings of %s", name, len(fit), fit_split)
        fitted[name] = fit_classifier(name, fit.vectors, fit.labels)
        save_classifier(fitted[name], folder / f"{name}.skops")
    atomic_write_json(folder / MANIFEST, {
        "format": MANIFEST_FORMAT,
        "detector": detector,
        "embedder_sha256": fingerprint,
        "fit_split": fit_split,
        "n_real": int((fit.labels == 0).sum()),
        "n_fake": int((fit.labels == 1).sum()),
        "generators": sorted(set(fit.generators) - {REAL_GENERATOR}),
        "classifiers": {name: {"file": f"{name}.skops", "threshold": clf.threshold} for name, clf in fitted.items()},
    })
    return fitted


def load_fitted_classifiers(
    folder: str | Path, names: Sequence[str] | None = None, fingerprint: str | None = None
) -> dict[str, FittedClassifier]:
    """Load classifiers saved by `fit_classifiers`; refuses ones fitted on another embedder."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no fitted classifiers in {folder} (no {MANIFEST}): run `codetrain evaluate` first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
    if fingerprint is not None and manifest.get("embedder_sha256") != fingerprint:
        raise ValueError(
            f"the classifiers in {folder} were fitted on other embedder weights than the ones loaded "
            "(retrained since?): run `codetrain evaluate` again"
        )
    available = manifest.get("classifiers", {})
    wanted = list(available) if names is None else list(names)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise FileNotFoundError(f"no fitted classifier {missing} in {folder}; available: {sorted(available)}")
    return {name: load_classifier(folder / safe_name(available[name]["file"], "classifier file")) for name in wanted}


def score_split(
    detector: str, classifiers: Mapping[str, FittedClassifier], emb: Embeddings, split: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any] | None]]:
    """Metric rows (one per classifier) and ROC curves (keyed 'detector classifier') of one split."""
    rows, curves = [], {}
    for name, clf in classifiers.items():
        scores = clf.score(emb.vectors)
        metrics = evaluate_predictions(emb.labels, (scores > clf.threshold).astype(int), scores, emb.generators)
        rows.append({"detector": detector, "classifier": name, "split": split, "threshold": float(clf.threshold), **metrics})
        roc = roc_points(emb.labels, scores)
        curves[f"{detector} {name}"] = None if roc is None else {**roc, "auc": metrics["auc"]}
    return rows, curves


@dataclass
class _DetectorRun:
    """One detector's evaluation: its rows, curves, classifiers and test embeddings."""

    results: list[dict[str, Any]]
    curves: dict[str, dict[str, dict[str, Any] | None]]
    classifiers: dict[str, FittedClassifier]
    tests: dict[str, Embeddings]
    fit: Embeddings
    fingerprint: str


def _evaluate_detector(
    model: nn.Module,
    names: Sequence[str],
    fit_split: str,
    fit_shards: Sequence[str],
    splits: Mapping[str, Sequence[str]],
    classifiers_dir: Path,
    cache_dir: Path,
    batch_size: int,
    real_source: RealImageSource | None,
) -> _DetectorRun:
    """Embed the fit split and every test split, fit and save the classifiers, score each split."""
    detector, fingerprint = detector_name(model), model_fingerprint(model)

    def embed(split: str, shards: Sequence[str]) -> Embeddings:
        return embed_shards_cached(model, shards, cache_dir / f"{split}.safetensors", batch_size=batch_size,
                                   real_source=real_source, desc=f"{detector} {split}", fingerprint=fingerprint)

    fit = embed(fit_split, fit_shards)
    classifiers = fit_classifiers(fit, names, classifiers_dir, fingerprint, detector, fit_split)
    run = _DetectorRun([], {}, classifiers, {}, fit, fingerprint)
    for split, shards in splits.items():
        emb = embed(split, shards)
        if not len(emb):
            log.warning("%s: no readable image in split %s", detector, split)
            continue
        rows, curves = score_split(detector, classifiers, emb, split)
        run.results += rows
        run.curves[split] = curves
        run.tests[split] = emb
    return run


def evaluate(
    run_dir: str | Path,
    data_dir: str,
    out_dir: str | Path | None = None,
    fit_split: str | None = None,
    test_splits: Sequence[str] | None = None,
    extended_dir: str | Path | None = None,
    classifiers: Sequence[str] = DEFAULT_CLASSIFIERS,
    embedder: nn.Module | None = None,
    *,
    robustness: bool = True,
    robustness_levels: Mapping[str, Sequence[float]] = DEFAULT_LEVELS,
    robustness_split: str = "test",
    baselines: Sequence[str | nn.Module] = (),
    batch_size: int = 32,
    device: str | None = None,
    tsne: bool = False,
    real_source: RealImageSource | None = None,
    test_data: str | None = None,
) -> EvaluationResult:
    """Evaluate the run's embedder (or `embedder`) with the three classifiers on every test split.

    `data_dir` (a folder, fsspec URL or hub repo id: `codetrain.sources`) gives the fit split
    (default fit_augm, the paper's held-out transformed subset) and, unless `test_data` names
    another source (e.g. the published test folders), the test splits (default test and
    test_augm, else no_augm and augm). The fit split gives reals (label 0) and every fake
    (label 1, tagged with its generator); each classifier is fitted on its embeddings and
    saved in OUT/classifiers. A file is never both fit (or training) and test data. Each test
    split (and the extended set) is scored per classifier: accuracy on reals, fakes, overall
    and per generator, AUC, AP. With `robustness`, the fitted classifiers are also scored on `robustness_split` under
    JPEG/downscale/blur/crop. `baselines` (e.g. "clip:ViT-B-32:/w.safetensors") add
    linear-probe rows to the same tables.
    """
    run_dir = Path(run_dir)
    for name in classifiers:
        if name not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {name!r}; choose from {sorted(CLASSIFIERS)}")
    levels = validate_levels(robustness_levels) if robustness else {}
    model = embedder if embedder is not None else load_embedder(run_dir / MODEL_FILE)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector = detector_name(model)
    if out_dir is None:
        out_dir = run_dir / "eval" if detector == CODE_DETECTOR else run_dir / "eval" / "baselines" / slug(detector)
    fit_split = fit_split or DEFAULT_FIT_SPLIT
    source = open_source(data_dir)
    fit_shards = source.require(fit_split, "--fit-split", SPLIT_FLAGS)
    splits = collect_test_splits(open_source(test_data, "--test-data") if test_data else source, test_splits, extended_dir)
    refuse_shared_files([
        Use("train", "the run's training split", run_training_files(run_dir)),
        Use("train", f"the fit split {fit_split!r}", fit_shards),
        *(Use("test", f"the test split {split!r}", files) for split, files in splits.items()),
    ], SPLIT_FLAGS)
    for files in (fit_shards, *splits.values()):
        require_real_images(files, real_source, data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases = [_load_baseline(spec) for spec in baselines]  # bad specs fail before any embedding

    main = _evaluate_detector(model, classifiers, fit_split, fit_shards, splits, out / CLASSIFIERS_DIR,
                              out / "cache" / slug(detector), batch_size, real_source)
    results, curves = list(main.results), {s: dict(c) for s, c in main.curves.items()}
    fits = {detector: main.fit}
    for base in bases:
        base.to(model_device(model))
        name = detector_name(base)
        log.info("baseline %s: linear probe", name)
        extra = _evaluate_detector(base, ("linear",), fit_split, fit_shards, splits, out / "baselines" / slug(name) / CLASSIFIERS_DIR,
                                   out / "cache" / slug(name), batch_size, real_source)
        results += extra.results
        for split, c in extra.curves.items():
            curves.setdefault(split, {}).update(c)
        fits[name] = extra.fit

    sweep: list[dict[str, Any]] = []
    if levels:
        split = robustness_split if robustness_split in main.tests else next(iter(main.tests), None)
        if split is not None:
            sweep = robustness_sweep(model, splits[split], main.classifiers, levels, detector=detector, split=split,
                                     batch_size=batch_size, cache_dir=out / "cache" / slug(detector) / "robustness",
                                     real_source=real_source)

    files, report = _write_outputs(out, run_dir, data_dir, fit_split, fits, results, curves, sweep, main, tsne)
    return EvaluationResult(out, results, sweep, main.classifiers, files, report)


def _load_baseline(spec: str | nn.Module) -> nn.Module:
    """A baseline embedder from a spec string ('clip:MODEL[:WEIGHTS]') or as given."""
    if isinstance(spec, nn.Module):
        return spec
    from codetrain.clip_baseline import parse_baseline

    return parse_baseline(spec)


def _write_outputs(
    out: Path,
    run_dir: Path,
    data_dir: str,
    fit_split: str,
    fits: Mapping[str, Embeddings],
    results: list[dict[str, Any]],
    curves: Mapping[str, Mapping[str, dict[str, Any] | None]],
    sweep: list[dict[str, Any]],
    main: _DetectorRun,
    tsne: bool,
) -> tuple[dict[str, Path], str]:
    """Write plots, CSV, JSON and the Markdown report; returns ({name: path}, report text)."""
    files: dict[str, Path] = {}
    plots: list[Path] = []
    detector = next(iter(fits))
    for split in curves:
        plots.append(plot_generator_accuracy(results, split, out / f"acc_{split}.png"))
        plots.append(plot_roc(curves[split], split, out / f"roc_{split}.png"))
    for split, emb in main.tests.items():
        plots.append(plot_embedding_map(emb, f"{detector} embeddings, PCA: {split}", out / f"map_{split}.png"))
        if tsne:
            plots.append(plot_embedding_map(emb, f"{detector} embeddings, t-SNE: {split}", out / f"map_tsne_{split}.png", "tsne"))
    if sweep:
        clean = [r for r in results if r["split"] == sweep[0]["split"] and r["detector"] == detector]
        plots.append(plot_robustness(sweep, clean, out / "robustness.png"))
        files["robustness.csv"] = write_csv(out / "robustness.csv", sweep, ROBUSTNESS_COLUMNS)
    files.update({p.name: p for p in plots})
    files["results.csv"] = write_csv(out / "results.csv", long_rows(results), CSV_COLUMNS)
    files["roc.json"] = atomic_write_json(out / "roc.json", curves)
    skipped = {f"{fit_split} (fit, {name})": emb.skipped for name, emb in fits.items()}
    skipped.update({split: emb.skipped for split, emb in main.tests.items()})
    intro = [
        f"Run: `{run_dir}`; data: `{data_dir}`.",
        f"Fit split: `{fit_split}`, {fit_description(fit_split)}.",
        *(f"{name}: classifiers fitted on `{fit_split}`: {int((e.labels == 0).sum())} real, {int((e.labels == 1).sum())} fake "
          f"({', '.join(sorted(set(e.generators) - {REAL_GENERATOR}))})." for name, e in fits.items()),
        ("Preprocessing: RGB, resize shorter side to 248, centre-crop 224, ImageNet mean/std. "
         "Accuracies in %; AUC/AP rank reals against fakes (fake = positive)."),
    ]
    report = build_report("Evaluation", intro, results, sweep, skipped, plots)
    files["report.md"] = atomic_write_bytes(out / "report.md", (report + "\n").encode())
    files["results.json"] = atomic_write_json(out / "results.json", {
        "format": RESULTS_FORMAT,
        "run": str(run_dir),
        "data": str(data_dir),
        "fit_split": fit_split,
        "fit_protocol": fit_description(fit_split),
        "fit": {name: {"n_real": int((e.labels == 0).sum()), "n_fake": int((e.labels == 1).sum()),
                       "generators": sorted(set(e.generators) - {REAL_GENERATOR})} for name, e in fits.items()},
        "embedder_sha256": main.fingerprint,
        "results": results,
        "robustness": sweep,
        "skipped": skipped,
        "files": sorted(files),
    })
    files["classifiers"] = out / CLASSIFIERS_DIR
    return files, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain evaluate`."""
    parser = subparsers.add_parser(
        "evaluate",
        help="fit linear/kNN/OCSVM on embeddings and report accuracy per generator, AUC/AP, robustness",
        description="Embed the fit split and the test splits with the run's embedder, fit the classifiers, and write "
        "report.md, results.csv/json, plots and classifiers/ to OUT (default RUN/eval).",
    )
    parser.add_argument("--run", required=True, type=Path, help="run folder holding model.safetensors")
    parser.add_argument("--data", required=True,
                        help="dataset folder, file, fsspec URL or hub repo id (elsaEU/ELSA_D3); splits from its card's configs")
    parser.add_argument("--test-data", help="take the test splits from this source instead (e.g. the published test "
                                            "folders {no_augm,augm}/{real,gen_0..gen_3}/)")
    parser.add_argument("--extended", help="extended test set root (extended/{generator}/test-*.parquet)")
    parser.add_argument("--fit-split", help=f"split the classifiers are fitted on (default {DEFAULT_FIT_SPLIT}, the paper's "
                                            "held-out transformed subset; validation = the clean validation split)")
    parser.add_argument("--test-splits", nargs="+", metavar="SPLIT",
                        help="test splits (default test and test_augm, else the published no_augm and augm)")
    parser.add_argument("--classifiers", nargs="+", default=list(DEFAULT_CLASSIFIERS), choices=sorted(CLASSIFIERS))
    parser.add_argument("--out", type=Path, help="output folder (default RUN/eval)")
    parser.add_argument("--robustness", action=argparse.BooleanOptionalAction, default=True,
                        help="sweep JPEG/downscale/blur/crop on the test split (default on)")
    parser.add_argument("--robustness-split", default="test")
    for family, values in DEFAULT_LEVELS.items():
        parser.add_argument(f"--{family}", nargs="*", type=float, default=list(values), metavar="LEVEL",
                            help=f"{family} levels (default {' '.join(f'{v:g}' for v in values)}; none to skip)")
    parser.add_argument("--baseline", action="append", default=[], metavar="clip:MODEL[:WEIGHTS]",
                        help="add a CLIP linear-probe baseline (open_clip model name or config .json, local weights)")
    parser.add_argument("--real-source", help="real images for ELSA_D3-layout shards (fetch-real's real/ shards or a folder)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="torch device (default cuda when available)")
    parser.add_argument("--tsne", action="store_true", help="also draw t-SNE maps (slow)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Run `codetrain evaluate` and print the report."""
    real_source = RealImageSource(args.real_source) if args.real_source else None
    levels = {f: getattr(args, f) for f in DEFAULT_LEVELS if getattr(args, f)}
    result = evaluate(
        args.run, args.data, args.out, args.fit_split, args.test_splits, args.extended, args.classifiers,
        robustness=args.robustness and bool(levels), robustness_levels=levels, robustness_split=args.robustness_split,
        baselines=args.baseline, batch_size=args.batch_size, device=args.device, tsne=args.tsne, real_source=real_source,
        test_data=args.test_data,
    )
    print(result.report)
    print(f"\nwritten to {result.out_dir}")
    return 0
