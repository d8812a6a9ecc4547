"""The dataset card: d3/README.md with `dataset_info` and `configs`, so the folder loads (and pushes) as a hub repo.

Every function reads through a Store (`d3builder.storage.store`): the output root's for `write_dataset_card`,
plain local paths by default for the others."""

from __future__ import annotations

from collections import Counter, defaultdict
from importlib import metadata
from pathlib import PurePath
from typing import Any

from datasets import DatasetInfo, Features, SplitDict, SplitInfo
from datasets.info import DatasetInfosDict
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData

from d3builder.recipe.manifest import Manifest
from d3builder.storage.layout import shard_number
from d3builder.storage.shards import LOCAL, read_features
from d3builder.storage.store import Store

SPLIT_ORDER = ("train", "validation", "test", "test_augm", "fit", "fit_augm")
SOFTWARE = ("d3code", "torch", "diffusers", "transformers", "datasets", "pyarrow", "pillow")
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


def split_shards(d3_dir: PurePath, store: Store | None = None) -> dict[str, list[PurePath]]:
    """The shards of each split folder, `{split}/{split}-{k}.parquet`, in split then shard order."""
    store = store or LOCAL
    found: dict[str, list[PurePath]] = {}
    for path in store.glob(d3_dir / "*" / "*-[0-9]*.parquet"):
        split = path.parent.name
        if not split.startswith(".") and path.name.startswith(f"{split}-"):
            found.setdefault(split, []).append(path)
    return in_split_order({split: sorted(shards, key=shard_number) for split, shards in found.items()})


def in_split_order(groups: dict[str, Any]) -> dict[str, Any]:
    """`groups` keyed by split, reordered train, validation, test, test_augm, fit, fit_augm, then the rest by name."""
    order = {name: i for i, name in enumerate(SPLIT_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _features(path: PurePath, store: Store) -> Features:
    features = read_features(path, store)
    if features is None:
        raise ValueError(f"{store.url(path)}: no `datasets` features in the Parquet metadata (not written by d3builder?)")
    return features


def split_info(split: str, shards: list[PurePath], store: Store | None = None) -> SplitInfo:
    """Rows and bytes of one split (from the shards' footers)."""
    rows = num_bytes = 0
    for path in shards:
        meta = (store or LOCAL).parquet_file(path).metadata
        rows += meta.num_rows
        num_bytes += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return SplitInfo(name=split, num_bytes=num_bytes, num_examples=rows)


def schema_configs(splits: dict[str, list[PurePath]], store: Store | None = None) -> dict[str, list[str]]:
    """Splits grouped by schema: the group holding `train` (or the first) is `default`, others named by split."""
    groups: dict[str, list[str]] = {}
    schemas: dict[str, Features] = {}
    for split, shards in splits.items():
        features = _features(shards[0], store or LOCAL)
        name = next((n for n, f in schemas.items() if f == features), None)
        if name is None:
            name = "default" if not groups else split
            schemas[name] = features
            groups[name] = []
        groups[name].append(split)
    return groups


def _stats(store: Store, stage: str) -> list[dict[str, Any]]:
    return [store.read_json(p) for p in store.glob(store.root / "stats" / stage / "[0-9]*.json")]


def _versions() -> dict[str, str]:
    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _encodings(store: Store, shards: list[PurePath]) -> dict[str, Counter]:
    """Counts of each encoding in the real column and in the generated columns of a split."""
    counts = {"real": Counter(), "generated": Counter()}
    for path in shards:
        names = store.read_schema(path).names
        columns = [c for c in names if c == "encoding_real" or c.startswith("encoding_gen")]
        table = store.read_table(path, columns=columns)
        for column in columns:
            side = "real" if column == "encoding_real" else "generated"
            counts[side].update(str(v) for v in table.column(column).to_pylist())
    return counts


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _provenance(assemble_stats: list[dict[str, Any]], generators: list[str]) -> list[list[Any]]:
    merged: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for stats in assemble_stats:
        for generator, fields in stats.get("provenance", {}).items():
            for key, values in fields.items():
                merged[generator][key].update(str(v) for v in values)
    rows = []
    for slot, generator in enumerate(generators):
        fields = merged.get(generator, {})
        rows.append(
            [f"gen{slot}", generator]
            + [
                ", ".join(sorted(fields.get(k, ()))) or "?"
                for k in ("model", "model_revision", "pipeline", "scheduler", "num_inference_steps", "guidance_scale",
                          "dtype", "safety_checker", "watermark")
            ]
        )
    return rows


def _generation_software(assemble_stats: list[dict[str, Any]]) -> list[str]:
    software = set()
    for stats in assemble_stats:
        for fields in stats.get("provenance", {}).values():
            software.update(str(v) for v in fields.get("software", ()))
    return sorted(software)


def dataset_sections(
    manifest: Manifest, splits: dict[str, list[PurePath]], infos: dict[str, SplitInfo], with_real_images: bool = True,
    shard_store: Store | None = None,
) -> list[str]:
    """The card sections both cards share: splits, dropped records, generators, encodings, test_augm, source, software.

    The stats come from the output root; the shards of `splits` are read from `shard_store` (default: the root's)."""
    store = manifest.layout.store
    n = len(manifest.generators)
    assemble_stats, augm_stats = _stats(store, "assemble"), _stats(store, "transform_test")
    per_record = n + int(with_real_images)
    split_rows = [[s, len(splits[s]), infos[s].num_examples, infos[s].num_examples * per_record] for s in splits]
    reasons: Counter = Counter()
    for stats in assemble_stats:
        reasons.update(stats.get("dropped_by_reason", {}))
    dropped = sum(s.get("dropped", 0) for s in assemble_stats)
    selected = sum(s.get("records", 0) for s in assemble_stats)
    encoding_rows = []
    for split, shards in splits.items():
        for side, counts in _encodings(shard_store or store, shards).items():
            encoding_rows.append([split, side, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"])
    augm = augm_stats[0] if augm_stats else {}
    sections = [
        "## Splits",
        _table(["split", "shards", "records", "images"], split_rows),
        "## Dropped records",
        f"The assembled shards hold {selected} selected records; {dropped} were left out as incomplete. "
        "A record counts under every reason that applies.",
        _table(["reason", "records"], [[r, c] for r, c in sorted(reasons.items())] or [["none", 0]]),
        "## Generators",
        "Column slot `gen{i}` holds the i-th generator of the recipe, in this order, with the generation settings "
        "its images record (every value seen).",
        _table(
            ["slot", "generator", "model", "revision", "pipeline", "scheduler", "steps", "guidance", "dtype",
             "safety checker", "watermark"],
            _provenance(assemble_stats, manifest.generators),
        ),
        "## Encodings",
        "Generated images are encoded following LAION's own encoding mix, so that the file format says nothing "
        "about the label.",
        _table(["split", "images", "encodings"], encoding_rows),
    ]
    if augm:
        sections += [
            "## Test and fit with transformations (`test_augm`, `fit_augm`)",
            "The `test` records (and the `fit` records: the held-out subset the classifiers are fitted on), each image (real and every fake) passed through 0 to "
            f"{augm.get('max_ops')} CoDE augmentation families ({', '.join(augm.get('families', []))}), "
            "the count drawn uniformly and each level from a 5-step grid, by a generator "
            f"seeded by (seed {augm.get('seed')}, record id, column). Each image is re-encoded in its original "
            f"encoding (JPEG and WebP at quality {augm.get('jpeg_quality')}). The ops applied to each image are "
            "recorded as JSON in `augm_real` and `augm_gen{i}` and replay exactly with "
            "`d3builder.imaging.augmentations.apply_ops`.",
        ]
    sections += [
        "## Source",
        f"Captions and URLs: LAION release `{manifest.metadata.release}` (metadata source "
        f"`{manifest.metadata.source}`), selection seed {manifest.seed}, NSFW tags {manifest.filters.nsfw}, "
        f"CLIP similarity >= {manifest.filters.min_similarity}.",
        "## Software",
        _table(["package", "version (assembly)"], [[k, v] for k, v in _versions().items()]),
        "Generation-time software, as recorded in the generated shards:",
        "\n".join(f"- `{s}`" for s in _generation_software(assemble_stats)) or "- not recorded",
    ]
    return sections


def _body(manifest: Manifest, splits: dict[str, list[PurePath]], infos: dict[str, SplitInfo],
          configs: dict[str, list[str]]) -> str:
    n = len(manifest.generators)
    other_configs = [name for name in configs if name != "default"]
    sections = [
        f"# {manifest.name}: a D3-style paired dataset of real and generated images",
        "One row per LAION record: its caption, its real image (`image_real`, the exact bytes the server sent) and "
        f"one image from each of {n} generators (`image_gen0`..`image_gen{n - 1}`), with every column of the published "
        "ELSA_D3 parquet plus the full generation provenance (seed, guidance, scheduler, model revision, encoding, "
        "safety checker and watermark switches). Built with `d3builder` (d3code), following arXiv 2407.20337.",
        *dataset_sections(manifest, splits, infos),
        "## Loading",
        "```python\nfrom datasets import load_dataset\n\n"
        'd3 = load_dataset("path/to/d3")  # or the hub repo id\n'
        'row = d3["train"][0]  # row["image_real"], row["image_gen0"]: PIL images\n'
        + "".join(f'{name} = load_dataset("path/to/d3", "{name}")\n' for name in other_configs)
        + "```",
        "```python\nimport io\n\nimport pandas as pd\nfrom PIL import Image\n\n"
        'frame = pd.read_parquet("path/to/d3/train")\n'
        'image = Image.open(io.BytesIO(frame.loc[0, "image_gen0"]["bytes"]))\n```',
        "## License",
        "Real images remain under the terms of their owners (see each record's URL and LAION's LICENSE column); "
        "generated images follow the licenses of their generators. Research use only. This folder holds the real "
        "image bytes: publish it with `d3builder publish`, which drops them by default.",
    ]
    return "\n\n".join(sections) + "\n"


def size_category(records: int) -> str:
    """The hub's size_categories value for a number of records."""
    return next((c for limit, c in SIZE_CATEGORIES if records < limit), "1M<n<10M")


def add_dataset_info(
    card_data: DatasetCardData, splits: dict[str, list[PurePath]], infos: dict[str, SplitInfo],
    configs: dict[str, list[str]], store: Store | None = None,
) -> None:
    """Fill `dataset_info` (features, split sizes) and `configs` (data files `{split}/{split}-*.parquet`) of a card."""
    store = store or LOCAL
    dataset_infos, metadata_configs = {}, {}
    for name, members in configs.items():
        dataset_infos[name] = DatasetInfo(
            features=_features(splits[members[0]][0], store),
            splits=SplitDict({s: infos[s] for s in members}),
            download_size=sum(store.size(p) for s in members for p in splits[s]),
            dataset_size=sum(infos[s].num_bytes for s in members),
        )
        metadata_configs[name] = {"data_files": [{"split": s, "path": f"{s}/{s}-*.parquet"} for s in members]}
    DatasetInfosDict(dataset_infos).to_dataset_card_data(card_data)
    MetadataConfigs(metadata_configs).to_dataset_card_data(card_data)


def write_dataset_card(manifest: Manifest) -> PurePath | None:
    """Write d3/README.md: YAML front matter (dataset_info, configs, license) and a body of counts and provenance.

    Returns its path, or None (nothing written) when d3/ holds no shard yet."""
    store, d3_dir = manifest.layout.store, manifest.layout.d3_dir()
    splits = split_shards(d3_dir, store)
    if not splits:
        return None
    infos = {split: split_info(split, shards, store) for split, shards in splits.items()}
    configs = schema_configs(splits, store)
    total = sum(info.num_examples for split, info in infos.items() if split in configs.get("default", ()))
    card_data = DatasetCardData(
        license="other",
        pretty_name=f"{manifest.name} (D3-style real/generated pairs)",
        task_categories=["image-classification"],
        tags=["deepfake-detection", "synthetic-images", "laion", "d3"],
        size_categories=[size_category(total)],
    )
    add_dataset_info(card_data, splits, infos, configs, store)
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n{_body(manifest, splits, infos, configs)}")
    return store.write_bytes(d3_dir / "README.md", str(card).encode())


def card_split_counts(card_path: PurePath, store: Store | None = None) -> dict[str, int]:
    """num_examples of every split declared in a card's `dataset_info` (every config)."""
    text = (store or LOCAL).read_bytes(card_path).decode("utf-8")
    info = DatasetCard(text).data.to_dict().get("dataset_info") or []
    counts = {}
    for config in [info] if isinstance(info, dict) else info:
        for split in config.get("splits") or []:
            counts[split["name"]] = int(split["num_examples"])
    return counts


__all__ = [
    "write_dataset_card", "split_shards", "in_split_order", "card_split_counts", "split_info", "schema_configs",
    "size_category", "add_dataset_info", "dataset_sections",
]
