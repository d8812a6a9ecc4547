"""The card of a dataset's hub copy (`d3builder publish`): terms of use, paper, citation, how to get the real images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData

from d3builder.core.paper import CITATION, PAPER_URL
from d3builder.recipe.manifest import EMBEDDED_SOURCE, Manifest
from d3builder.storage.card import (
    add_dataset_info,
    dataset_sections,
    schema_configs,
    size_category,
    split_info,
    split_shards,
)
from d3builder.storage.shards import LOCAL
from d3builder.storage.store import atomic_write_bytes

LICENSE_NAME = "laion-terms-and-generator-licenses"
LICENSE_FILE = "LICENSE.md"
LAION_REPO = "laion/laion400m"
LAION_TERMS = "https://laion.ai/blog/laion-400-open-dataset/"


@dataclass(frozen=True)
class GeneratorTerms:
    """One generator slot of the dataset: its registry name, model and licence."""

    slot: int
    name: str
    model: str
    license: str

    @property
    def link(self) -> str:
        """The model's hub page (where its licence is), or '-' for a local or tiny model."""
        hub_id = "/" in self.model and "://" not in self.model and not self.model.startswith(("/", "."))
        return f"https://huggingface.co/{self.model}" if hub_id else "-"


def source_datasets(manifest: Manifest) -> list[str]:
    """The card's source_datasets: the hub repo of an hf:// metadata source, LAION-400M, or 'original' (embedded set)."""
    source = manifest.metadata.source
    if source == EMBEDDED_SOURCE:
        return ["original"]
    if source.startswith("hf://datasets/"):
        parts = source[len("hf://datasets/"):].split("/")
        return [f"extended|{parts[0]}/{parts[1].split('@')[0]}"]
    return [f"extended|{LAION_REPO}"]


def published_configs(splits: dict[str, list[Path]]) -> dict[str, list[str]]:
    """The default config (the splits sharing train's schema), then every split as a config of its own, in split order."""
    return {"default": schema_configs(splits)["default"], **{split: [split] for split in splits}}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def terms_of_use(manifest: Manifest, generators: list[GeneratorTerms], with_real_images: bool) -> str:
    """LICENSE.md: LAION's terms for the captions, URLs and real images, and each generator's licence."""
    reals = (
        "This copy INCLUDES the real images (`image_real`): each stays under its owner's copyright and terms. Check that "
        "you may redistribute them before sharing this copy."
        if with_real_images
        else "This copy does NOT include the real images: only their URLs, SHA-256, size and encoding."
    )
    return "\n\n".join([
        f"# Terms of use of {manifest.name}",
        "This dataset combines material under different terms.",
        "## Captions, URLs and real images (LAION)",
        f"The captions, URLs and LAION metadata come from LAION-400M (release `{manifest.metadata.release}`), which "
        f"LAION e.V. distributes under CC BY 4.0 ({LAION_TERMS}). LAION owns none of the images behind the URLs: every "
        f"real image belongs to its owner and is used here for research only. {reals}",
        "## Generated images",
        "Each generated image was made with the model of its slot; its use follows that model's licence (the use "
        "restrictions of the OpenRAIL licences carry over to outputs).",
        _table(["slot", "generator", "model", "licence", "model page"],
               [[f"gen{g.slot}", g.name, f"`{g.model}`", g.license or "see the model page", g.link] for g in generators]),
        "## Everything else",
        "The card, the statistics and the provenance columns were produced with d3code (Apache-2.0). Intended for "
        "research on detecting generated images; not for identifying or profiling people.",
    ]) + "\n"


def _real_images(with_real_images: bool) -> str:
    if with_real_images:
        return ("Included: `image_real` holds the exact bytes each server sent. They remain their owners' property: "
                "see the terms below before sharing this copy.")
    return ("Not included, as in ELSA_D3: each row keeps the real image's `url`, `sha256_real`, `width_real`, "
            "`height_real` and `encoding_real`, so anyone can fetch it again (img2dataset; `d3builder fetch-real` does "
            "it) and verify the bytes. Links rot: LAION's download yield was about 95% at release and is about 70% "
            "today. In `test_augm`, `augm_real` lists the transformations applied to the real image (replay them with "
            "`d3builder.imaging.augmentations.apply_ops`); its sha256, width and height are those of the transformed image.")


def write_published_card(
    manifest: Manifest, out_dir: Path, generators: list[GeneratorTerms], with_real_images: bool, repo_id: str | None = None
) -> Path:
    """Write OUT/README.md (dataset_info, configs, licence metadata, body) and OUT/LICENSE.md for the shards in OUT."""
    splits = split_shards(out_dir)
    infos = {split: split_info(split, shards) for split, shards in splits.items()}
    configs = published_configs(splits)
    total = sum(infos[s].num_examples for s in configs.get("default", ()))
    card_data = DatasetCardData(
        pretty_name=f"{manifest.name}: D3-style real/generated image pairs",
        license="other",
        license_name=LICENSE_NAME,
        license_link=LICENSE_FILE,
        language=["en"],
        source_datasets=source_datasets(manifest),
        task_categories=["image-classification"],
        tags=["deepfake-detection", "synthetic-images", "ai-generated-images", "laion", "d3", "diffusion"],
        size_categories=[size_category(total)],
    )
    add_dataset_info(card_data, splits, infos, configs)
    repo = repo_id or "path/to/this/folder"
    n = len(generators)
    own = [name for name in configs if name != "default"]
    sections = [
        f"# {manifest.name}: D3-style real/generated image pairs",
        "One row per LAION record: its caption, the URL of its real image and one image from each of "
        f"{n} generators (`image_gen0`..`image_gen{n - 1}`), with every column of the published ELSA_D3 parquet plus "
        "the full generation provenance (seed, guidance, scheduler, model revision, encoding, safety checker and "
        f"watermark switches). It follows D3 of Baraldi et al., ECCV 2024 ([arXiv 2407.20337]({PAPER_URL})), and was "
        "built and published with `d3builder` (d3code).",
        "## Real images",
        _real_images(with_real_images),
        *dataset_sections(manifest, splits, infos, with_real_images, LOCAL),  # the shards written to out_dir
        "## Configs",
        f"- `default`: {', '.join(f'`{s}`' for s in configs.get('default', []))}\n"
        + "\n".join(f"- `{name}`: the `{configs[name][0]}` split alone" for name in own),
        "## Loading",
        "```python\nfrom datasets import load_dataset\n\n"
        f'd3 = load_dataset("{repo}")  # the default config\n'
        + "".join(f'{name} = load_dataset("{repo}", "{name}")\n' for name in own if name not in configs["default"])
        + f'test = load_dataset("{repo}", "test", split="test")  # one split without the others\n'
        f'stream = load_dataset("{repo}", split="train", streaming=True)  # row groups of 64 rows\n```',
        "## Terms of use",
        f"`license: other`: see [{LICENSE_FILE}]({LICENSE_FILE}). In short, LAION's captions and URLs are CC BY 4.0, "
        "real images belong to their owners, and generated images follow their generators' licences:",
        _table(["slot", "generator", "licence"], [[f"gen{g.slot}", g.name, g.license or "see the model page"] for g in generators]),
        "## Citation",
        f"```bibtex\n{CITATION}\n```",
    ]
    atomic_write_bytes(out_dir / LICENSE_FILE, terms_of_use(manifest, generators, with_real_images).encode())
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    return atomic_write_bytes(out_dir / "README.md", str(card).encode())


__all__ = ["GeneratorTerms", "write_published_card", "published_configs", "source_datasets", "terms_of_use"]
