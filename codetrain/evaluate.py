"""Evaluate a run: embed the splits, fit the paper's three classifiers, score every test split, report.

Outputs in the evaluation folder (default RUN/eval; file names in `codetrain.runlayout.EvalFiles`):
report.md, results.csv, results.json, roc.json, robustness.csv, PNG plots (acc_{split},
roc_{split}, map_{split}, robustness), classifiers/ (skops files + classifiers.json, what
`codetrain detect` loads) and cache/ (embeddings as safetensors, reused while the weights and
shards are unchanged). The run, the data and the evaluation folder may be fsspec URLs; a remote
evaluation folder is written locally and uploaded at the end, results.json last. Every input
(weights, splits, shard footers, real images, baselines) is checked before any embedding starts.

The splits come from `codetrain.sources` (a dataset card's configs, the folder layout, a file or
glob, a hub repo id): the classifiers are fitted on `fit_augm` by default (the paper's held-out,
transformed subset) and the test splits are test and test_augm, else the published test
folders no_augm and augm (`test_data` may name another source for them). A missing split and a
file that would be both training (or fitting) and test data are refused naming the split flags.
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

from codetrain.classifiers import FittedClassifier, fit_classifier
from codetrain.config import (
    EvalConfig,
    add_config_flags,
    load_config,
    overrides_from_args,
)
from codetrain.data import RealImageSource, check_shards, list_shards
from codetrain.embed import (
    REAL_GENERATOR,
    Embeddings,
    embed_shards_cached,
    model_device,
    model_fingerprint,
)
from codetrain.errors import InvalidInputError, MissingInputError, reports_user_errors
from codetrain.metrics import evaluate_predictions, roc_points
from codetrain.model import load_embedder
from codetrain.persistence import classifier_bytes, load_classifier
from codetrain.preprocessing import preprocessing_of
from codetrain.release import BASELINE_PREFIX as RELEASE_PREFIX
from codetrain.release import parse_release_baseline
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
from codetrain.robustness import DEFAULT_LEVELS, robustness_sweep
from codetrain.runlayout import CLASSIFIERS_DIR, ClassifierFiles, EvalFiles, RunLayout
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
from d3builder.storage.store import (
    Location,
    Store,
    atomic_write_bytes,
    atomic_write_json,
    open_store,
    storage_defaults,
)

log = logging.getLogger(__name__)

DEFAULT_TEST_SPLITS = ("test", "test_augm")
SPLIT_FLAGS = "--fit-split and --test-splits (--test-data for another source, e.g. the published test folders)"
CODE_DETECTOR = "CoDE"
EXTENDED_SPLIT = "extended"
MANIFEST_FORMAT = "codetrain.classifiers/1"
RESULTS_FORMAT = "codetrain.evaluation/1"


@dataclass
class EvaluationResult:
    """What `evaluate` produced: metric rows, robustness rows, the fitted classifiers and the files written."""

    out_dir: Location
    results: list[dict[str, Any]]
    robustness: list[dict[str, Any]]
    classifiers: dict[str, FittedClassifier]
    files: dict[str, Location]
    report: str


@dataclass(frozen=True)
class SplitScores:
    """One split scored by one detector: a metric row per classifier and the ROC curves keyed 'detector classifier'."""

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, Any] | None]


def detector_name(model: nn.Module) -> str:
    """A model's label in the tables: its `display_name` (baselines) or 'CoDE'."""
    return str(getattr(model, "display_name", CODE_DETECTOR))


def slug(name: str) -> str:
    """A file-name-safe lower-case form of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.").lower() or "detector"


def extended_shards(extended_dir: str | Path) -> list[str]:
    """Shards `{generator}/test-*.parquet` under `extended_dir/extended` or `extended_dir` itself (local or URL)."""
    root = open_store(extended_dir, writable=False)
    if root.exists(root.root / "extended"):
        root = root.child("extended")
    if not root.exists(root.root):
        raise MissingInputError(f"extended test set folder {root.url()} does not exist (--extended)")
    return list_shards(root.url(root.root / "*" / "test-*.parquet"), "test")


def fit_description(split: str) -> str:
    """How the classifiers' fit split relates to the paper's protocol, for the report."""
    if split == FIT_AUGM_SPLIT:
        return "the held-out, transformed fit subset, as in the paper"
    return f"a departure from the paper, which fits on a held-out, transformed subset (d3builder's {FIT_AUGM_SPLIT})"


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
            raise MissingInputError(
                f"--test-splits: none of the test splits {', '.join(DEFAULT_TEST_SPLITS + TEST_VARIANTS)} in "
                f"{source.given} (splits from {source.found_by}: {source.offered()}); choose the splits with {SPLIT_FLAGS}"
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
            raise MissingInputError(f"no {{generator}}/test-*.parquet shards under {extended_dir} (--extended)")
        splits[EXTENDED_SPLIT] = shards
    return splits


def fit_classifiers(
    fit: Embeddings, names: Sequence[str], folder: str | Path, fingerprint: str, detector: str = CODE_DETECTOR, fit_split: str = "validation"
) -> dict[str, FittedClassifier]:
    """Fit each named classifier on `fit`, save it in a local folder as {name}.skops, and write classifiers.json."""
    folder = Path(folder)
    fitted = {}
    for name in names:
        log.info("fitting %s on %d embeddings of %s", name, len(fit), fit_split)
        fitted[name] = fit_classifier(name, fit.vectors, fit.labels)
        atomic_write_bytes(folder / ClassifierFiles.archive(name), classifier_bytes(fitted[name]))
    atomic_write_json(folder / ClassifierFiles.MANIFEST, {
        "format": MANIFEST_FORMAT,
        "detector": detector,
        "embedder_sha256": fingerprint,
        "fit_split": fit_split,
        "n_real": int((fit.labels == 0).sum()),
        "n_fake": int((fit.labels == 1).sum()),
        "generators": sorted(set(fit.generators) - {REAL_GENERATOR}),
        "classifiers": {name: {"file": ClassifierFiles.archive(name), "threshold": clf.threshold} for name, clf in fitted.items()},
    })
    return fitted


def read_classifier_manifest(folder: str | Path | Store) -> dict[str, Any]:
    """The classifiers.json of a classifiers folder (local or URL); MissingInputError when there is none."""
    store = open_store(folder, writable=False)
    path = store.root / ClassifierFiles.MANIFEST
    if not store.exists(path):
        raise MissingInputError(f"no fitted classifiers in {store.url()} (no {ClassifierFiles.MANIFEST}): "
                                "run `codetrain evaluate` first")
    try:
        manifest = store.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{store.url(path)} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidInputError(f"{store.url(path)} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def load_fitted_classifiers(
    folder: str | Path | Store, names: Sequence[str] | None = None, fingerprint: str | None = None
) -> dict[str, FittedClassifier]:
    """Load classifiers saved by `fit_classifiers` (local folder or URL); refuses ones fitted on another embedder."""
    store = open_store(folder, writable=False)
    manifest = read_classifier_manifest(store)
    if fingerprint is not None and manifest.get("embedder_sha256") != fingerprint:
        raise InvalidInputError(
            f"the classifiers in {store.url()} were fitted on other embedder weights than the ones loaded "
            "(retrained since?): run `codetrain evaluate` again"
        )
    available = manifest.get("classifiers", {})
    wanted = list(available) if names is None else list(names)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise MissingInputError(f"no fitted classifier {missing} in {store.url()}; available: {sorted(available)}")
    return {name: load_classifier(store.location(store.root / safe_name(available[name]["file"], "classifier file")))
            for name in wanted}


def score_split(detector: str, classifiers: Mapping[str, FittedClassifier], emb: Embeddings, split: str) -> SplitScores:
    """The metric rows (one per classifier) and ROC curves of one split."""
    scores = SplitScores([], {})
    for name, clf in classifiers.items():
        values = clf.score(emb.vectors)
        metrics = evaluate_predictions(emb.labels, (values > clf.threshold).astype(int), values, emb.generators)
        scores.rows.append({"detector": detector, "classifier": name, "split": split, "threshold": float(clf.threshold), **metrics})
        roc = roc_points(emb.labels, values)
        scores.curves[f"{detector} {name}"] = None if roc is None else {**roc, "auc": metrics["auc"]}
    return scores


@dataclass
class _DetectorRun:
    """One detector's evaluation: its rows, curves, classifiers and test embeddings."""

    results: list[dict[str, Any]]
    curves: dict[str, dict[str, dict[str, Any] | None]]
    classifiers: dict[str, FittedClassifier]
    tests: dict[str, Embeddings]
    fit: Embeddings
    fingerprint: str


@dataclass(frozen=True)
class _Inputs:
    """The checked inputs of an evaluation."""

    fit_shards: list[str]
    splits: dict[str, list[str]]
    real_source: RealImageSource | None


def _evaluate_detector(
    model: nn.Module, names: Sequence[str], inputs: _Inputs, config: EvalConfig, classifiers_dir: Path, cache_dir: Path
) -> _DetectorRun:
    """Embed the fit split and every test split, fit and save the classifiers, score each split."""
    detector, fingerprint = detector_name(model), model_fingerprint(model)

    def embed(split: str, shards: Sequence[str]) -> Embeddings:
        return embed_shards_cached(model, shards, cache_dir / f"{split}.safetensors", batch_size=config.batch_size,
                                   real_source=inputs.real_source, desc=f"{detector} {split}", fingerprint=fingerprint,
                                   progress=config.progress)

    fit = embed(config.fit_split, inputs.fit_shards)
    classifiers = fit_classifiers(fit, names, classifiers_dir, fingerprint, detector, config.fit_split)
    run = _DetectorRun([], {}, classifiers, {}, fit, fingerprint)
    for split, shards in inputs.splits.items():
        emb = embed(split, shards)
        if not len(emb):
            log.warning("%s: no readable image in split %s", detector, split)
            continue
        scores = score_split(detector, classifiers, emb, split)
        run.results += scores.rows
        run.curves[split] = scores.curves
        run.tests[split] = emb
    return run


def evaluate(config: EvalConfig, embedder: nn.Module | None = None) -> EvaluationResult:
    """Evaluate the run's embedder (or `embedder`) with the classifiers of `config` on every test split.

    The fit split gives reals (label 0) and every fake (label 1, tagged with its
    generator); each classifier is fitted on its embeddings and saved in
    EVAL/classifiers. Each present test split (and the extended set) is scored per
    classifier: accuracy on reals, fakes, overall and per generator, AUC, AP. With
    `robustness`, the fitted classifiers are also scored on `robustness_split` under
    JPEG/downscale/blur/crop. `baselines` add rows to the same tables: a CLIP linear
    probe ("clip:ViT-B-32:/w.safetensors") or the authors' released backbone with every
    classifier refitted ("code-release:aimagelab/CoDE").
    """
    try:
        config.validate()
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc
    if embedder is None and not config.run:
        raise MissingInputError("missing --run: the run folder holding model.safetensors (or `run:` in the config)")
    if not config.data:
        raise MissingInputError("missing --data: the dataset folder, URL or hub repo id (or `data:` in the config)")
    urls = [config.run, config.data, config.test_data, config.eval_dir, config.extended, config.real_source]
    with storage_defaults(urls, config.storage_options):
        return _evaluate(config, embedder)


def _inputs(config: EvalConfig, run: RunLayout | None, real_source: RealImageSource | None) -> _Inputs:
    """The fit and test splits of `config`, checked: present, no file both training/fit and test data, readable, with reals."""
    source = open_source(config.data)
    fit_shards = source.require(config.fit_split, "--fit-split", SPLIT_FLAGS)
    tests = open_source(config.test_data, "--test-data") if config.test_data else source
    splits = collect_test_splits(tests, config.test_splits, config.extended)
    refuse_shared_files([
        Use("train", "the run's training split", run_training_files(run) if run is not None else []),
        Use("train", f"the fit split {config.fit_split!r}", fit_shards),
        *(Use("test", f"the test split {split!r}", files) for split, files in splits.items()),
    ], SPLIT_FLAGS)
    check_shards(sorted({f for files in [fit_shards, *splits.values()] for f in files}), real_source, config.data)
    return _Inputs(fit_shards, splits, real_source)


def _evaluate(config: EvalConfig, embedder: nn.Module | None) -> EvaluationResult:
    """`evaluate` once the config is checked and the storage options are in place."""
    run = RunLayout.open(config.run, config.storage_options) if config.run else None
    model = embedder if embedder is not None else load_embedder(run.store.url(run.path(RunLayout.MODEL)), config.storage_options)
    model.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    detector = detector_name(model)
    if config.eval_dir is not None:
        eval_store = open_store(config.eval_dir, config.storage_options)
    elif run is None:
        raise MissingInputError("no evaluation folder: pass --run or --eval-dir")
    else:
        default = run.eval_store()
        eval_store = default if detector == CODE_DETECTOR else default.child(EvalFiles.baseline_dir(slug(detector)))
    real_source = RealImageSource(config.real_source) if config.real_source else None
    inputs = _inputs(config, run, real_source)
    bases = [_load_baseline(spec) for spec in config.baselines]

    with eval_store.local_workspace(preload=[EvalFiles.CACHE], last=[EvalFiles.RESULTS_JSON]) as out:
        main = _evaluate_detector(model, config.classifiers, inputs, config, out / EvalFiles.CLASSIFIERS,
                                  out / EvalFiles.cache(slug(detector)))
        results, curves = list(main.results), {s: dict(c) for s, c in main.curves.items()}
        fits = {detector: main.fit}
        for base in bases:
            base.to(model_device(model))
            name = detector_name(base)
            log.info("baseline %s", name)
            names = getattr(base, "baseline_classifiers", config.classifiers)  # CLIP: the paper's linear probe only
            extra = _evaluate_detector(base, names, inputs, config, out / EvalFiles.baseline_classifiers(slug(name)),
                                       out / EvalFiles.cache(slug(name)))
            results += extra.results
            for split, c in extra.curves.items():
                curves.setdefault(split, {}).update(c)
            fits[name] = extra.fit
        sweep: list[dict[str, Any]] = []
        levels = config.robustness_levels if config.robustness else {}
        if levels:
            split = config.robustness_split if config.robustness_split in main.tests else next(iter(main.tests), None)
            if split is not None:
                sweep = robustness_sweep(model, inputs.splits[split], main.classifiers, levels, detector=detector,
                                         split=split, batch_size=config.batch_size,
                                         cache_dir=out / EvalFiles.robustness_cache(slug(detector)),
                                         real_source=real_source, progress=config.progress)
        files, report = _write_outputs(out, config, fits, results, curves, sweep, main, preprocessing_of(model).summary())
        files = {name: eval_store.location(eval_store.root / path.relative_to(out)) for name, path in files.items()}
    return EvaluationResult(eval_store.location(), results, sweep, main.classifiers, files, report)


def _load_baseline(spec: str | nn.Module) -> nn.Module:
    """A baseline embedder from a spec string ('clip:MODEL[:WEIGHTS]', 'code-release:PATH_OR_REPO') or as given."""
    if isinstance(spec, nn.Module):
        return spec
    from codetrain.clip_baseline import parse_baseline

    try:
        return parse_release_baseline(spec) if spec.startswith(RELEASE_PREFIX) else parse_baseline(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise InvalidInputError(f"--baseline {spec}: {exc}") from exc


def _write_outputs(
    out: Path,
    config: EvalConfig,
    fits: Mapping[str, Embeddings],
    results: list[dict[str, Any]],
    curves: Mapping[str, Mapping[str, dict[str, Any] | None]],
    sweep: list[dict[str, Any]],
    main: _DetectorRun,
    preprocessing: str,
) -> tuple[dict[str, Path], str]:
    """Write plots, CSV, JSON and the Markdown report; returns ({name: path}, report text)."""
    files: dict[str, Path] = {}
    plots: list[Path] = []
    detector = next(iter(fits))
    fit_split = config.fit_split
    for split in curves:
        plots.append(plot_generator_accuracy(results, split, out / EvalFiles.accuracy_plot(split)))
        plots.append(plot_roc(curves[split], split, out / EvalFiles.roc_plot(split)))
    for split, emb in main.tests.items():
        plots.append(plot_embedding_map(emb, f"{detector} embeddings, PCA: {split}", out / EvalFiles.map_plot(split)))
        if config.tsne:
            plots.append(plot_embedding_map(emb, f"{detector} embeddings, t-SNE: {split}",
                                            out / EvalFiles.map_plot(split, "tsne"), "tsne"))
    if sweep:
        clean = [r for r in results if r["split"] == sweep[0]["split"] and r["detector"] == detector]
        plots.append(plot_robustness(sweep, clean, out / EvalFiles.ROBUSTNESS_PLOT))
        files[EvalFiles.ROBUSTNESS_CSV] = write_csv(out / EvalFiles.ROBUSTNESS_CSV, sweep, ROBUSTNESS_COLUMNS)
    files.update({p.name: p for p in plots})
    files[EvalFiles.RESULTS_CSV] = write_csv(out / EvalFiles.RESULTS_CSV, long_rows(results), CSV_COLUMNS)
    files[EvalFiles.ROC] = atomic_write_json(out / EvalFiles.ROC, curves)
    skipped = {f"{fit_split} (fit, {name})": emb.skipped for name, emb in fits.items()}
    skipped.update({split: emb.skipped for split, emb in main.tests.items()})
    intro = [
        f"Run: `{config.run}`; data: `{config.data}`" + (f"; test data: `{config.test_data}`." if config.test_data else "."),
        f"Fit split: `{fit_split}`, {fit_description(fit_split)}.",
        *(f"{name}: classifiers fitted on `{fit_split}`: {int((e.labels == 0).sum())} real, {int((e.labels == 1).sum())} fake "
          f"({', '.join(sorted(set(e.generators) - {REAL_GENERATOR}))})." for name, e in fits.items()),
        f"Preprocessing: {preprocessing}. Accuracies in %; AUC/AP rank reals against fakes (fake = positive).",
    ]
    report = build_report("Evaluation", intro, results, sweep, skipped, plots)
    files[EvalFiles.REPORT] = atomic_write_bytes(out / EvalFiles.REPORT, (report + "\n").encode())
    files[EvalFiles.RESULTS_JSON] = atomic_write_json(out / EvalFiles.RESULTS_JSON, {
        "format": RESULTS_FORMAT,
        "run": str(config.run),
        "data": str(config.data),
        "test_data": config.test_data,
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
    files[CLASSIFIERS_DIR] = out / EvalFiles.CLASSIFIERS
    return files, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `codetrain evaluate`: every EvalConfig field is a flag; --config names a YAML file of defaults."""
    parser = subparsers.add_parser(
        "evaluate",
        help="fit linear/kNN/OCSVM on embeddings and report accuracy per generator, AUC/AP, robustness",
        description="Embed the fit split and the test splits with the run's embedder, fit the classifiers, and write "
        "report.md, results.csv/json, plots and classifiers/ to the evaluation folder (default RUN/eval). "
        "Settings: defaults < --config YAML < flags; --run, --data and --eval-dir may be fsspec URLs.",
    )
    parser.add_argument("--config", "-c", help="YAML file of EvalConfig keys")
    add_config_flags(parser, EvalConfig)
    for family, values in DEFAULT_LEVELS.items():
        parser.add_argument(f"--{family}", nargs="*", type=float, default=argparse.SUPPRESS, metavar="LEVEL",
                            help=f"{family} levels of the robustness sweep (default {' '.join(f'{v:g}' for v in values)}; "
                            "no value: skip the family)")
    parser.set_defaults(func=_run)


@reports_user_errors
def _run(args: argparse.Namespace) -> int:
    """Run `codetrain evaluate` and print the report."""
    overrides = overrides_from_args(args, EvalConfig)
    given = {family: getattr(args, family) for family in DEFAULT_LEVELS if hasattr(args, family)}
    if given:
        base = load_config(args.config, None, EvalConfig).robustness_levels
        overrides["robustness_levels"] = {f: v for f, v in {**base, **given}.items() if v}
    result = evaluate(load_config(args.config, overrides, EvalConfig))
    print(result.report)
    print(f"\nwritten to {result.out_dir}")
    return 0
