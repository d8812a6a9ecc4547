"""Per-epoch validation: embed the validation split, fit a linear probe on half the records, score the other half."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object

from codetrain.classifiers import fit_classifier
from codetrain.config import TrainConfig
from codetrain.embed import Embeddings, embed_shards
from codetrain.metrics import evaluate_predictions
from codetrain.model import CoDEEmbedder

log = logging.getLogger(__name__)


def validation_embeddings(
    model: CoDEEmbedder, shards: Sequence[str], config: TrainConfig, accelerator: Accelerator, real_source: Any = None
) -> Embeddings | None:
    """Embed the clean real and every fake of the validation split's shards; each process takes a share of them.

    Every process gets the full result (None when the split has no shards).
    """
    if not shards:
        return None
    mine = shards[accelerator.process_index :: accelerator.num_processes]
    was_training = model.training
    with accelerator.autocast():
        part = embed_shards(model, mine, batch_size=config.val_batch_size, real_source=real_source,
                            desc=f"embed {config.val_split}",
                            progress=config.progress and accelerator.is_main_process) if mine else None
    model.train(was_training)
    parts = [p for p in gather_object([part]) if p is not None and len(p)]
    if not parts:
        return None
    return Embeddings(
        vectors=np.concatenate([p.vectors for p in parts]).astype(np.float32),
        labels=np.concatenate([p.labels for p in parts]),
        generators=[g for p in parts for g in p.generators],
        ids=[i for p in parts for i in p.ids],
        skipped=[s for p in parts for s in p.skipped],
    )


def probe_split(ids: list[str], seed: int) -> np.ndarray:
    """True for rows whose record falls in the probe's fit half (a record's real and fakes stay together)."""
    unique = sorted(set(ids))
    order = np.random.default_rng(seed).permutation(len(unique))
    fit_ids = {unique[i] for i in order[: (len(unique) + 1) // 2]}
    return np.array([i in fit_ids for i in ids], dtype=bool)


def probe_accuracy(emb: Embeddings, seed: int = 42) -> dict[str, Any] | None:
    """Linear probe (C=0.316, balanced) fitted on half the records, scored on the others; None if a half lacks a class."""
    fit = probe_split(emb.ids, seed)
    if not all(np.isin([0, 1], emb.labels[part]).all() for part in (fit, ~fit)):
        log.warning("validation split too small for a linear probe (%d images): both halves need reals and fakes", len(emb))
        return None
    classifier = fit_classifier("linear", emb.vectors[fit], emb.labels[fit])
    test = ~fit
    X, y = emb.vectors[test], emb.labels[test]
    generators = [emb.generators[i] for i in np.flatnonzero(test)]
    result = evaluate_predictions(y, classifier.predict(X), classifier.score(X), generators)
    return {
        "val_acc": result["acc_balanced"],
        "val_acc_real": result["acc_real"],
        "val_acc_fake": result["acc_fake"],
        "val_acc_overall": result["acc"],
        "val_auc": result["auc"],
        "val_images": len(emb),
        "val_skipped": len(emb.skipped),
        "val_per_generator": {g: r["acc"] for g, r in result["per_generator"].items()},
    }
