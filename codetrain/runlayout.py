"""Every file name of a run folder, an evaluation folder, a checkpoint and a bundle, in one place.

```
RUN/model.safetensors  config.yaml  metrics.jsonl  loss_curve.png  tensorboard/
RUN/checkpoints/step-{n}/  model.safetensors optimizer.{json,safetensors} state.json
                           rng-{rank}.{json,safetensors}  complete.json (written last)
RUN/eval/  report.md results.csv results.json roc.json robustness.{csv,png}
           acc_{split}.png roc_{split}.png map_{split}.png map_tsne_{split}.png
           classifiers/{classifiers.json,{name}.skops}  cache/{detector}/{split}.safetensors
           baselines/{detector}/classifiers/
BUNDLE/model.safetensors model.onnx config.json train_config.yaml classifiers/
```
RUN may be a local folder or an fsspec URL (a `d3builder.storage.store.Store`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from d3builder.storage.store import Store, open_store

MODEL_FILE = "model.safetensors"
"""The embedder's weights, in a run folder, a checkpoint and a bundle."""
CLASSIFIERS_DIR = "classifiers"
"""The fitted classifiers' folder, in an evaluation folder and in a bundle."""


class ClassifierFiles:
    """Names inside a classifiers/ folder."""

    MANIFEST = "classifiers.json"

    @staticmethod
    def archive(name: str) -> str:
        """The skops file of classifier `name`."""
        return f"{name}.skops"


class EvalFiles:
    """Names inside an evaluation folder (default RUN/eval)."""

    REPORT = "report.md"
    RESULTS_CSV = "results.csv"
    RESULTS_JSON = "results.json"
    ROC = "roc.json"
    ROBUSTNESS_CSV = "robustness.csv"
    ROBUSTNESS_PLOT = "robustness.png"
    CLASSIFIERS = CLASSIFIERS_DIR
    CACHE = "cache"
    BASELINES = "baselines"

    @staticmethod
    def accuracy_plot(split: str) -> str:
        return f"acc_{split}.png"

    @staticmethod
    def roc_plot(split: str) -> str:
        return f"roc_{split}.png"

    @staticmethod
    def map_plot(split: str, method: str = "pca") -> str:
        return f"map_{split}.png" if method == "pca" else f"map_{method}_{split}.png"

    @staticmethod
    def cache(detector_slug: str) -> str:
        """The embedding cache folder of one detector."""
        return f"{EvalFiles.CACHE}/{detector_slug}"

    @staticmethod
    def cache_file(detector_slug: str, split: str) -> str:
        return f"{EvalFiles.cache(detector_slug)}/{split}.safetensors"

    @staticmethod
    def robustness_cache(detector_slug: str) -> str:
        return f"{EvalFiles.cache(detector_slug)}/robustness"

    @staticmethod
    def baseline_classifiers(detector_slug: str) -> str:
        return f"{EvalFiles.BASELINES}/{detector_slug}/{CLASSIFIERS_DIR}"

    @staticmethod
    def baseline_dir(detector_slug: str) -> str:
        """A baseline's own evaluation folder when it is evaluated alone (RUN/eval/baselines/{slug})."""
        return f"{EvalFiles.BASELINES}/{detector_slug}"


class BundleFiles:
    """Names inside an exported bundle."""

    MODEL = MODEL_FILE
    ONNX = "model.onnx"
    CONFIG = "config.json"
    TRAIN_CONFIG = "train_config.yaml"
    CLASSIFIERS = CLASSIFIERS_DIR


class CheckpointFiles:
    """Names inside one checkpoint folder; `COMPLETE` is written last and marks the folder as usable."""

    MODEL = MODEL_FILE
    OPTIMIZER_JSON = "optimizer.json"
    OPTIMIZER_TENSORS = "optimizer.safetensors"
    STATE = "state.json"
    COMPLETE = "complete.json"

    @staticmethod
    def rng_json(rank: int) -> str:
        return f"rng-{int(rank)}.json"

    @staticmethod
    def rng_tensors(rank: int) -> str:
        return f"rng-{int(rank)}.safetensors"


_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class RunLayout:
    """A training run folder (local or fsspec URL): its files by name and its store for reading and writing."""

    store: Store

    MODEL = MODEL_FILE
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    LOSS_CURVE = "loss_curve.png"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval"

    @classmethod
    def open(cls, root: str | Path | Store, storage_options: Mapping[str, Any] | None = None,
             writable: bool = True) -> RunLayout:
        """The layout of the run folder at a local path or URL (`writable=False`: any URL fsspec reads)."""
        return cls(open_store(root, storage_options, writable))

    def path(self, name: str) -> PurePath:
        """The path of a file of the run folder on its store, e.g. `layout.path(RunLayout.CONFIG)`."""
        return self.store.root / name

    def checkpoint(self, step: int) -> Store:
        """The folder of the checkpoint at `step`."""
        return self.store.child(self.CHECKPOINTS, f"step-{int(step)}")

    def checkpoint_folders(self) -> list[tuple[int, PurePath]]:
        """(step, folder path) of every step-{n} folder, complete or not, oldest first."""
        found = [(int(m.group(1)), path) for path in self.store.listdir(self.path(self.CHECKPOINTS))
                 if (m := _STEP_DIR.match(path.name))]
        return sorted(found)

    def eval_store(self) -> Store:
        """The default evaluation folder, RUN/eval."""
        return self.store.child(self.EVAL)
