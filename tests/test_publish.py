"""`d3builder publish`: the hub copy of an assembled dataset, with no real image bytes, sized shards and a full card."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset
from hubkit import RecordingApi, no_token  # noqa: F401 - no_token is a fixture
from huggingface_hub import DatasetCard
from PIL import Image
from stagekit import GENERATORS, make_stage_inputs

from d3builder import cli
from d3builder.generators.registry import RegistryError
from d3builder.recipe.manifest import load_manifest
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.publish import generator_terms, publish_dataset
from d3builder.stages.transform_test import transform_test
from d3builder.storage.card import card_split_counts
from d3builder.storage.schema import augm_features, d3_features, published_features

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test", "test_augm")
MAX_BYTES = 90_000
"""A shard limit small enough to cut the tiny train split into several shards (some test_augm rows are larger)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """An assembled dataset (two incomplete records dropped) with its test_augm split, on the repo's registry."""
    root = tmp_path_factory.mktemp("publish")
    inputs = make_stage_inputs(root / "data", n_records=24, shard_size=8,
                               fail={"1003": "real_failed", "1006": "gen_missing:sd14-tiny"})
    recipe = yaml.safe_load(inputs.manifest.path.read_text())
    recipe["registry"] = [str(ROOT / "manifests" / "generators.yaml")]
    inputs.manifest.path.write_text(yaml.safe_dump(recipe))
    inputs.manifest = load_manifest(inputs.manifest.path)
    assemble_dataset(inputs.manifest, progress=False)
    transform_test(inputs.manifest, progress=False)
    return inputs


@pytest.fixture(scope="module")
def published(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default hub copy (real images dropped) with small shards."""
    return publish_dataset(data.manifest, tmp_path_factory.mktemp("hub") / "d3-tiny", MAX_BYTES, progress=False).out


def real_image_bytes(data) -> set[bytes]:
    """Every real image's bytes, as fetched and as transformed for test_augm."""
    found = set()
    for split in ("train", "validation", "test", "test_augm"):
        for path in (data.layout.d3_dir() / split).glob("*.parquet"):
            found.update(cell["bytes"] for cell in pq.read_table(path, columns=["image_real"]).column("image_real").to_pylist())
    return found


def binary_values(path: Path) -> set[bytes]:
    """Every binary value anywhere in a Parquet file (image structs included), read back through Arrow."""
    values: set[bytes] = set()

    def walk(array: pa.Array) -> None:
        if pa.types.is_struct(array.type):
            for i in range(array.type.num_fields):
                walk(array.field(i))
        elif pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
            values.update(v for v in array.to_pylist() if v is not None)

    for column in pq.read_table(path).columns:
        walk(column.combine_chunks())
    return values


def test_no_real_image_bytes_and_shards_within_the_limit(data, published: Path) -> None:
    reals = real_image_bytes(data)
    assert len(reals) > 20
    control = data.layout.d3_dir() / "train" / "train-00000.parquet"
    assert reals & binary_values(control), "the scan finds real images where they are"
    shards = sorted(published.rglob("*.parquet"))
    assert {p.parent.name for p in shards} == set(SPLITS)
    assert len(list((published / "train").glob("*.parquet"))) >= 3
    for path in shards:
        assert path.stat().st_size <= MAX_BYTES or pq.ParquetFile(path).metadata.num_rows == 1, path
        assert "image_real" not in pq.read_schema(path).names
        assert not reals & binary_values(path), path
    assert sorted(p.name for p in published.iterdir()) == ["LICENSE.md", "README.md", *sorted(SPLITS)]


def test_every_split_loads_with_datasets_also_streaming(data, published: Path, tmp_path: Path) -> None:
    cache = str(tmp_path / "hf")
    d3 = load_dataset(str(published), cache_dir=cache)
    assert list(d3) == ["train", "validation", "test"]
    for split in ("train", "validation", "test"):
        assert d3[split]["id"] == data.complete_ids(split)
        assert d3[split].features == published_features(d3_features(4))
    augm = load_dataset(str(published), "test_augm", split="test_augm", cache_dir=cache)
    assert augm.features == published_features(augm_features(4)) and augm["id"] == data.complete_ids("test")
    row = d3["train"][0]
    original = pq.read_table(data.layout.d3("train", 0)).to_pylist()[0]
    assert row["id"] == original["id"] and isinstance(row["image_gen3"], Image.Image)
    for key in ("url", "sha256_real", "width_real", "height_real", "encoding_real", "seed_gen2", "model_gen1"):
        assert row[key] == original[key], key
    for split in SPLITS:
        alone = load_dataset(str(published), split, split=split, cache_dir=cache)
        assert alone["id"] == data.complete_ids("test" if split == "test_augm" else split)
        streamed = load_dataset(str(published), split, split=split, streaming=True)
        assert [r["id"] for r in streamed] == alone["id"]
    streamed = load_dataset(str(published), streaming=True)
    assert {split: sum(1 for _ in rows) for split, rows in streamed.items()} == {s: len(d3[s]) for s in d3}


def test_the_card_is_complete_and_parses(data, published: Path) -> None:
    card = DatasetCard.load(published / "README.md")
    meta = card.data
    assert meta.license == "other" and meta.license_name == "laion-terms-and-generator-licenses"
    assert meta.license_link == "LICENSE.md" and (published / "LICENSE.md").is_file()
    assert meta.language == ["en"] and meta.source_datasets == ["original"]
    assert meta.task_categories == ["image-classification"]
    configs = {c["config_name"]: [f["split"] for f in c["data_files"]] for c in meta.to_dict()["configs"]}
    assert configs == {"default": ["train", "validation", "test"], **{s: [s] for s in SPLITS}}
    counts = card_split_counts(published / "README.md")
    assert counts == {s: len(data.complete_ids("test" if s == "test_augm" else s)) for s in SPLITS}
    text = card.text
    assert "https://arxiv.org/abs/2407.20337" in text and "@inproceedings{baraldi2024contrasting" in text
    assert "| real_failed | 1 |" in text and "| gen_missing:sd14-tiny | 1 |" in text
    for slot, name in enumerate(GENERATORS):
        assert f"| gen{slot} | {name} | tiny/{name} | rev-{slot} | StableDiffusionPipeline | PNDMScheduler | 2 | 7.5 |" in text, name
    assert "Not included, as in ELSA_D3" in text and "sha256_real" in text
    terms = (published / "LICENSE.md").read_text()
    assert "CC BY 4.0" in terms and "does NOT include the real images" in terms
    assert terms.count("Apache-2.0 (random weights built offline by d3code)") == len(GENERATORS)


def test_real_images_only_on_request_with_a_warning(data, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        summary = publish_dataset(data.manifest, tmp_path / "with-reals", progress=False, with_real_images=True)
    assert "belong to their owners" in caplog.text
    assert [len(v) for v in summary.shards.values()] == [1, 1, 1, 1], "500 MB shards hold the tiny splits whole"
    reals = real_image_bytes(data)
    kept = set().union(*(binary_values(p) for p in (tmp_path / "with-reals").rglob("*.parquet")))
    assert reals <= kept
    assert "does NOT" not in (tmp_path / "with-reals" / "LICENSE.md").read_text()


@pytest.mark.usefixtures("no_token")
def test_cli_refusals_and_the_upload_call(data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(data.manifest.path)
    out = tmp_path / "cli"
    assert cli.main(["publish", "-m", manifest, str(out), "--repo", "someone/d3-tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d3builder publish: no Hugging Face token") and "\n" not in err
    assert not out.exists(), "nothing is written before the token check"
    assert cli.main(["publish", "-m", manifest, str(out), "--max-shard-mb", "0.2"]) == 0
    assert "train:" in capsys.readouterr().out
    assert cli.main(["publish", "-m", manifest, str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["publish", "-m", manifest, "--output-root", str(tmp_path / "empty"), str(tmp_path / "x")]) == 2
    assert "run `d3builder assemble" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["publish", "-m", manifest, str(out), "--max-shard-mb", "0"])
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**yaml.safe_load(data.manifest.path.read_text()), "registry": ["nope.yaml"]}))
    assert cli.main(["publish", "-m", str(broken), str(tmp_path / "y")]) == 2
    assert "nope.yaml: registry file does not exist" in capsys.readouterr().err and not (tmp_path / "y").exists()

    api = RecordingApi()
    summary = publish_dataset(data.manifest, out, overwrite=True, repo_id="someone/d3-tiny", api=api, progress=False)
    assert summary.url.endswith("/someone/d3-tiny/commit/0123")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["repo_type"] == "dataset" and api.calls[1][1]["repo_type"] == "dataset"
    assert api.uploaded == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert 'load_dataset("someone/d3-tiny")' in (out / "README.md").read_text()


def test_every_generator_kind_carries_its_licence_into_the_terms(tmp_path: Path) -> None:
    registry = tmp_path / "gens.yaml"
    entry = {"kind": "python", "callable": "d3builder.generators.examples.tiny_gan:generate", "sizes": [[64, 64]]}
    registry.write_text(yaml.safe_dump({"generators": {"tiny-gan": {**entry, "license": "MIT"}}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "gan", "output_root": str(tmp_path / "out"), "shard_size": 4,
                                      "metadata": {"source": "embedded"}, "generators": ["tiny-gan", "sd14"],
                                      "registry": [str(registry), str(ROOT / "manifests" / "generators.yaml")]}))
    terms = generator_terms(load_manifest(recipe))
    assert [(t.slot, t.name, t.license) for t in terms] == [(0, "tiny-gan", "MIT"), (1, "sd14", "CreativeML OpenRAIL-M")]
    assert terms[1].link == "https://huggingface.co/CompVis/stable-diffusion-v1-4" and terms[0].link == "-"
    registry.write_text(yaml.safe_dump({"generators": {"tiny-gan": {**entry, "license": ["MIT"]}}}))
    with pytest.raises(RegistryError, match="entry 'tiny-gan': key 'license': must be a string"):
        generator_terms(load_manifest(recipe))
