"""Every shard schema of the toolkit, declared once as Hugging Face `datasets.Features`."""

from __future__ import annotations

from datasets import Features, Image, List, Value

SPLITS = ("train", "fit", "validation", "test")
"""The record splits of D3, in the order of their hash intervals in `select`.

`fit` (the held-out subset the paper fits its classifiers on) sits right after `train`, so a
recipe that adds it takes its records from the end of train's interval only: validation and
test keep exactly their records.
"""

NUM_D3_GENERATORS = 4

STRING, INT, FLOAT, BOOL = Value("string"), Value("int64"), Value("float64"), Value("bool")

LAION_COLUMNS = Features(
    {
        "SAMPLE_ID": INT,
        "URL": STRING,
        "TEXT": STRING,
        "LICENSE": STRING,
        "NSFW": STRING,
        "similarity": FLOAT,
        "WIDTH": INT,
        "HEIGHT": INT,
    }
)
"""The LAION-400M metadata columns that `select` reads and keeps."""

MAX_ALTERNATE_URLS = 4
"""At most this many alternate URLs per record (each costs `fetch-real` one more pass over its failures)."""

RECORD_FEATURES = Features(
    {
        "id": STRING,
        "url": STRING,
        "alternate_urls": List(STRING),
        "original_prompt": STRING,
        "positive_prompt": STRING,
        "negative_prompt": STRING,
        "split": STRING,
        "shard": INT,
        "selection_hash": FLOAT,
        **LAION_COLUMNS,
    }
)
"""`records/{k}.parquet`: one selected LAION sample per row; `alternate_urls`: its duplicates' other URLs, tried in order."""

REAL_FEATURES = Features(
    {
        "id": STRING,
        "url": STRING,
        "status": STRING,
        "error_message": STRING,
        "image": Image(),
        "width": INT,
        "height": INT,
        "encoding": STRING,
        "sha256": STRING,
        "num_bytes": INT,
        "url_index": INT,
        "served_url": STRING,
    }
)
"""`real/{k}.parquet`: the real image as the server sent it (exact bytes), or why it failed.

`served_url` is the URL that served it, `url_index` its place in [url, *alternate_urls] (0: the record's own URL).
"""

GEN_FEATURES = Features(
    {
        "id": STRING,
        "generator": STRING,
        "status": STRING,
        "error_message": STRING,
        "image": Image(),
        "model": STRING,
        "model_revision": STRING,
        "pipeline": STRING,
        "scheduler": STRING,
        "dtype": STRING,
        "num_inference_steps": INT,
        "guidance_scale": FLOAT,
        "seed": INT,
        "width": INT,
        "height": INT,
        "encoding": STRING,
        "jpeg_quality": INT,
        "safety_checker": BOOL,
        "watermark": BOOL,
        "prompt": STRING,
        "negative_prompt": STRING,
        "software": STRING,
        "seconds": FLOAT,
    }
)
"""`gen/{generator}/{k}.parquet`: one generated image per record with its full provenance."""

ELSA_GENERATOR_COLUMNS = ("model", "width", "height", "num_inference_steps", "filepath", "image")


def generator_columns(slot: int) -> dict:
    """The columns of generator slot `slot` (ELSA_D3's `*_gen{slot}` plus our provenance)."""
    elsa = {
        f"model_gen{slot}": STRING,
        f"width_gen{slot}": INT,
        f"height_gen{slot}": INT,
        f"num_inference_steps_gen{slot}": INT,
        f"filepath_gen{slot}": STRING,
        f"image_gen{slot}": Image(),
    }
    ours = {
        f"generator_gen{slot}": STRING,
        f"seed_gen{slot}": INT,
        f"guidance_scale_gen{slot}": FLOAT,
        f"scheduler_gen{slot}": STRING,
        f"model_revision_gen{slot}": STRING,
        f"encoding_gen{slot}": STRING,
        f"jpeg_quality_gen{slot}": INT,
        f"safety_checker_gen{slot}": BOOL,
        f"watermark_gen{slot}": BOOL,
    }
    return {**elsa, **ours}


def elsa_features(num_generators: int = NUM_D3_GENERATORS) -> Features:
    """The published ELSA_D3 parquet schema (no real image, no provenance)."""
    columns = {
        "id": STRING,
        "original_prompt": STRING,
        "positive_prompt": STRING,
        "negative_prompt": STRING,
        "url": STRING,
    }
    for slot in range(num_generators):
        columns.update({k: v for k, v in generator_columns(slot).items() if k.rsplit("_gen", 1)[0] in ELSA_GENERATOR_COLUMNS})
    return Features(columns)


def d3_features(num_generators: int = NUM_D3_GENERATORS) -> Features:
    """Our final shard schema: every ELSA_D3 column plus the real image, split and provenance."""
    columns = dict(elsa_features(0))
    columns.update(
        {
            "split": STRING,
            "image_real": Image(),
            "width_real": INT,
            "height_real": INT,
            "encoding_real": STRING,
            "sha256_real": STRING,
        }
    )
    for slot in range(num_generators):
        columns.update(generator_columns(slot))
    return Features(columns)


def generator_slots(column_names: list[str] | tuple[str, ...]) -> list[int]:
    """The generator slots present in a shard, from its `image_gen{i}` columns."""
    slots = []
    for name in column_names:
        if name.startswith("image_gen") and name[len("image_gen"):].isdigit():
            slots.append(int(name[len("image_gen"):]))
    return sorted(slots)


SOURCE_SPLIT = "test"
"""The split that `transform-test` transforms."""
AUGM_SPLIT = "test_augm"
"""The test split with transformations."""
FIT_SPLIT = "fit"
"""The held-out split the classifiers are fitted on (after transformations, as in the paper)."""
FIT_AUGM_SPLIT = "fit_augm"
"""The fit split with transformations: what `codetrain evaluate` fits its classifiers on by default."""
AUGM_SPLITS = {SOURCE_SPLIT: AUGM_SPLIT, FIT_SPLIT: FIT_AUGM_SPLIT}
"""Each split `transform-test` transforms, with the name of its transformed copy."""


def augm_features(num_generators: int) -> Features:
    """The `test_augm` schema: the d3 schema plus the ops applied to each image, as JSON strings."""
    columns = dict(d3_features(num_generators))
    columns["augm_real"] = STRING
    columns.update({f"augm_gen{slot}": STRING for slot in range(num_generators)})
    return Features(columns)


REAL_IMAGE_COLUMN = "image_real"
"""The column holding the real (LAION) image bytes, which the hub copy leaves out by default."""


def published_features(features: Features, with_real_images: bool = False) -> Features:
    """The hub copy of a split's schema (ELSA_D3 style): the real image bytes dropped unless kept.

    `url`, `sha256_real`, `width_real`, `height_real` and `encoding_real` stay, so anyone can
    fetch the real image again and verify it; every other column is unchanged.
    """
    if with_real_images:
        return features
    return Features({name: feature for name, feature in features.items() if name != REAL_IMAGE_COLUMN})
