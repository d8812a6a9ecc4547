"""Evaluation outputs: Markdown tables, CSV/JSON files and matplotlib PNG plots."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from codetrain.embed import REAL_GENERATOR, Embeddings
from codetrain.robustness import UNITS
from d3builder.storage.store import atomic_write_bytes

CSV_COLUMNS = (
    "detector", "classifier", "split", "subset", "n", "acc", "acc_real", "acc_fake", "acc_balanced", "auc", "ap", "threshold",
)
"""Columns of results.csv: one row per (detector, classifier, split, subset); subset is all, real or a generator."""

ROBUSTNESS_COLUMNS = (
    "detector", "classifier", "split", "family", "level", "n_real", "n_fake", "acc", "acc_real", "acc_fake",
    "acc_balanced", "auc", "ap",
)
"""Columns of robustness.csv: one row per (detector, classifier, family, level)."""

MAX_MAP_POINTS = 5000
"""At most this many embeddings are drawn on the 2-D map (a fixed random subset)."""


def pct(value: float | None) -> str:
    """An accuracy as a percentage with one decimal, or an en dash when undefined."""
    return "–" if value is None else f"{100 * value:.1f}"


def dec(value: float | None) -> str:
    """An AUC/AP with three decimals, or an en dash when undefined."""
    return "–" if value is None else f"{value:.3f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def generators_of(results: Sequence[Mapping[str, Any]], split: str) -> list[str]:
    """The generators with fakes in `split`, sorted."""
    return sorted({g for r in results if r["split"] == split for g in r["per_generator"]})


def splits_of(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """The evaluated splits in first-seen order."""
    return list(dict.fromkeys(r["split"] for r in results))


def summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per (detector, classifier, split): counts, accuracies (%), AUC, AP, threshold."""
    headers = ["detector", "classifier", "split", "n real", "n fake", "acc real", "acc fake", "acc", "acc bal.", "AUC", "AP", "threshold"]
    rows = [
        [r["detector"], r["classifier"], r["split"], r["n_real"], r["n_fake"], pct(r["acc_real"]), pct(r["acc_fake"]),
         pct(r["acc"]), pct(r["acc_balanced"]), dec(r["auc"]), dec(r["ap"]), f"{r['threshold']:g}"]
        for r in results
    ]
    return markdown_table(headers, rows)


def generator_table(results: Sequence[Mapping[str, Any]], split: str) -> str:
    """Accuracy (%) on reals and on each generator's fakes in `split`, one row per (detector, classifier)."""
    gens = generators_of(results, split)
    headers = ["detector", "classifier", "real", *gens, "all fakes", "overall"]
    rows = []
    for r in results:
        if r["split"] == split:
            per = r["per_generator"]
            rows.append([r["detector"], r["classifier"], pct(r["acc_real"]), *(pct(per[g]["acc"]) if g in per else "–" for g in gens),
                         pct(r["acc_fake"]), pct(r["acc"])])
    return markdown_table(headers, rows)


def generator_auc_table(results: Sequence[Mapping[str, Any]], split: str) -> str:
    """ROC AUC of reals against each generator's fakes in `split` (and against all fakes), one row per (detector, classifier)."""
    gens = generators_of(results, split)
    rows = [[r["detector"], r["classifier"], *(dec(r["per_generator"][g]["auc"]) if g in r["per_generator"] else "–" for g in gens),
             dec(r["auc"])] for r in results if r["split"] == split]
    return markdown_table(["detector", "classifier", *gens, "all fakes"], rows)


def _robustness_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(detector, classifier) pairs in first-seen order."""
    return list(dict.fromkeys((r["detector"], r["classifier"]) for r in rows))


def robustness_table(rows: Sequence[Mapping[str, Any]], clean: Sequence[Mapping[str, Any]] = ()) -> str:
    """Accuracy (%) and AUC per (family, level) and classifier; the first row is the clean split."""
    pairs = _robustness_columns(rows)
    headers = ["family", "level"]
    for detector, name in pairs:
        headers += [f"{detector} {name} acc", f"{detector} {name} AUC"]
    by_key = {(r["family"], r["level"], r["detector"], r["classifier"]): r for r in rows}
    clean_by = {(r["detector"], r["classifier"]): r for r in clean}
    table = []
    if clean_by:
        line: list[Any] = ["none (clean)", "–"]
        for pair in pairs:
            r = clean_by.get(pair)
            line += [pct(r["acc"]), dec(r["auc"])] if r else ["–", "–"]
        table.append(line)
    for family, level in dict.fromkeys((r["family"], r["level"]) for r in rows):
        line = [family, f"{level:g}"]
        for detector, name in pairs:
            r = by_key.get((family, level, detector, name))
            line += [pct(r["acc"]), dec(r["auc"])] if r else ["–", "–"]
        table.append(line)
    return markdown_table(headers, table)


def build_report(
    title: str,
    intro: Sequence[str],
    results: Sequence[Mapping[str, Any]],
    robustness: Sequence[Mapping[str, Any]],
    skipped: Mapping[str, Sequence[str]],
    plots: Sequence[Path],
) -> str:
    """The whole Markdown report: summary, per-generator tables, robustness, skipped images, plots."""
    parts = [f"# {title}", "", *intro, "", "## Summary", "", summary_table(results), ""]
    for split in splits_of(results):
        parts += [f"## Accuracy per generator: {split}", "", generator_table(results, split), ""]
    if robustness:
        split = robustness[0]["split"]
        clean = [r for r in results if r["split"] == split]
        parts += [f"## Robustness ({split})", "", robustness_table(robustness, clean), ""]
    bad = {k: v for k, v in skipped.items() if v}
    if bad:
        parts += ["## Skipped images", ""]
        for split, items in bad.items():
            parts += [f"- {split}: {len(items)} unreadable", *(f"  - {item}" for item in items[:20])]
            if len(items) > 20:
                parts.append(f"  - ... and {len(items) - 20} more (results.json lists all)")
        parts.append("")
    if plots:
        parts += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(parts)


def long_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """results.csv rows: per result an 'all' row, a 'real' row and one row per generator."""
    out = []
    for r in results:
        base = {"detector": r["detector"], "classifier": r["classifier"], "split": r["split"], "threshold": r["threshold"]}
        out.append({**base, "subset": "all", "n": r["n_real"] + r["n_fake"], **{k: r[k] for k in ("acc", "acc_real", "acc_fake", "acc_balanced", "auc", "ap")}})
        out.append({**base, "subset": REAL_GENERATOR, "n": r["n_real"], "acc": r["acc_real"], "acc_real": r["acc_real"]})
        for gen, g in r["per_generator"].items():
            out.append({**base, "subset": gen, "n": g["n"], "acc": g["acc"], "acc_fake": g["acc"],
                        "acc_balanced": g["acc_balanced"], "auc": g["auc"], "ap": g["ap"]})
    return out


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write rows (missing or None cells empty) as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return atomic_write_bytes(path, buffer.getvalue().encode())


def _save(fig: Figure, path: str | Path) -> Path:
    """Render a figure to PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def plot_generator_accuracy(results: Sequence[Mapping[str, Any]], split: str, path: str | Path) -> Path:
    """Grouped bars: accuracy on reals and on each generator's fakes, one bar per (detector, classifier)."""
    rows = [r for r in results if r["split"] == split]
    groups = [REAL_GENERATOR, *generators_of(results, split)]
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(groups))
    for i, r in enumerate(rows):
        values = [r["acc_real"], *(r["per_generator"].get(g, {}).get("acc") for g in groups[1:])]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, [np.nan if v is None else 100 * v for v in values], width,
               label=f"{r['detector']} {r['classifier']}")
    ax.set_xticks(x, groups, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy per generator: {split}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_roc(curves: Mapping[str, Mapping[str, Any] | None], split: str, path: str | Path) -> Path:
    """ROC curves (fake = positive) of every (detector, classifier) on one split; legend with AUC."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for label, roc in curves.items():
        if roc is not None:
            ax.plot(roc["fpr"], roc["tpr"], label=f"{label} (AUC {roc['auc']:.3f})")
    ax.set_xlabel("false positive rate (reals called fake)")
    ax.set_ylabel("true positive rate (fakes caught)")
    ax.set_title(f"ROC: {split}")
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def embedding_map(emb: Embeddings, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (a subset of at most MAX_MAP_POINTS) embeddings and the indices drawn."""
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(len(emb), MAX_MAP_POINTS, replace=False)) if len(emb) > MAX_MAP_POINTS else np.arange(len(emb))
    x = emb.vectors[index].astype(np.float64)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x), index
    if method == "tsne":
        perplexity = float(min(30, max(2, (len(index) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), index
    raise ValueError(f"unknown map method {method!r}; choose pca or tsne")


def plot_embedding_map(emb: Embeddings, title: str, path: str | Path, method: str = "pca") -> Path:
    """Scatter of the 2-D map, reals in black, each generator in its own colour."""
    coords, index = embedding_map(emb, method)
    gens = np.asarray(emb.generators, dtype=object)[index]
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.add_subplot()
    names = [REAL_GENERATOR, *sorted(set(gens.tolist()) - {REAL_GENERATOR})]
    for i, name in enumerate(names):
        mine = gens == name
        if mine.any():
            colour = "black" if name == REAL_GENERATOR else f"C{(i - 1) % 10}"
            ax.scatter(coords[mine, 0], coords[mine, 1], s=6, alpha=0.6, color=colour, label=f"{name} ({int(mine.sum())})")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.legend(fontsize="small", markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_robustness(rows: Sequence[Mapping[str, Any]], clean: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One panel per family: accuracy (solid) and AUC (dashed) against level, from 'clean' on."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    pairs = _robustness_columns(rows)
    clean_by = {(r["detector"], r["classifier"]): r for r in clean}
    fig = Figure(figsize=(4 * len(families), 4))
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families, strict=True):
        mine = [r for r in rows if r["family"] == family]
        levels = list(dict.fromkeys(r["level"] for r in mine))
        ticks = ["clean", *(f"{v:g}" for v in levels)]
        for i, pair in enumerate(pairs):
            by_level = {r["level"]: r for r in mine if (r["detector"], r["classifier"]) == pair}
            base = clean_by.get(pair, {})
            for key, style in (("acc", "-"), ("auc", "--")):
                ys = [base.get(key), *(by_level.get(v, {}).get(key) for v in levels)]
                ax.plot(range(len(ticks)), [np.nan if y is None else y for y in ys], style, marker="o", color=f"C{i}",
                        label=f"{' '.join(pair)} {'acc' if key == 'acc' else 'AUC'}")
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_ylim(0, 1.02)
        ax.set_title(family)
        ax.set_xlabel(UNITS.get(family, "level"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (solid) / AUC (dashed)")
    axes[-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path)
