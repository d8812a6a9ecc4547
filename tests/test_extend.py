"""The extend stage: further generators render the test records into loadable one-slot D3 shards."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from genkit import MANIFESTS, make_records, one_thread  # noqa: F401 - fixtures
from PIL import Image

from d3builder import cli
from d3builder.generators.registry import RegistryError
from d3builder.generators.results import seed_for
from d3builder.recipe.manifest import Manifest
from d3builder.stages.extend import extend
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import d3_features


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Manifest:  # noqa: F811
    """8 records in shards of 3: test records 1003 (shard 1) and 1007 (shard 2, its real image failed)."""
    return make_records(tmp_path_factory.mktemp("data"), 8, 3, **{"1007": "real_failed"})


def test_extend_writes_loadable_one_slot_test_shards(records: Manifest, tmp_path: Path) -> None:
    """sd15-tiny (from extended.yaml) renders only test records; shards load with `datasets`, images decode."""
    layout = records.layout
    render, join = extend(records, progress=False)
    assert (render.group, join.group) == ("sd15-tiny", "sd15-tiny")
    assert render.complete and join.complete and render.counts["success"] == 1  # 1003: 1007's real was not fetched
    assert join.counts["test"] == 1 and join.reasons == {"real_failed": 1}
    assert [layout.gen("sd15-tiny", k).is_file() for k in (0, 1, 2)] == [True, True, True]
    assert pq.read_metadata(layout.gen("sd15-tiny", 0)).num_rows == 0  # no test record in shard 0
    assert [layout.extended("sd15-tiny", k).is_file() for k in (0, 1, 2)] == [False, True, False]
    path = layout.extended("sd15-tiny", 1)
    data = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert data.features == d3_features(1) and data.num_rows == 1
    row = data[0]
    assert row["id"] == "1003" and row["split"] == "test" and row["generator_gen0"] == "sd15-tiny"
    assert row["seed_gen0"] == seed_for("1003", "sd15-tiny", records.seed)
    assert isinstance(row["image_real"], Image.Image) and isinstance(row["image_gen0"], Image.Image)
    assert row["image_gen0"].size == (row["width_gen0"], row["height_gen0"])
    assert row["model_gen0"] == "tiny://sd14" and row["encoding_gen0"] == row["image_gen0"].format
    stats = json.loads(layout.stats("extend", 2, "sd15-tiny").read_text())
    assert stats["dropped_by_reason"] == {"real_failed": 1} and stats["outputs"] == {}
    render_again, join_again = extend(records, progress=False)
    assert join_again.shards(UnitOutcome.DONE) == [] and join_again.shards(UnitOutcome.SKIPPED) == [0, 1, 2]
    assert render_again.shards(UnitOutcome.SKIPPED) == [0, 1, 2]


def test_a_new_generator_is_one_yaml_entry(records: Manifest, tmp_path: Path) -> None:
    """A registry file with one new entry, named on the command line, extends the test set."""
    extra = tmp_path / "more.yaml"
    extra.write_text("generators:\n  my-sd-tiny:\n    pipeline: StableDiffusionPipeline\n    model: tiny://sd21\n"
                     "    dtype: float32\n    steps: 1\n    guidance: 3.0\n    sizes: [[48, 48]]\n")
    argv = ["extend", "-m", str(records.path), "--registry", str(extra), "--only", "my-sd-tiny"]
    assert cli.main(argv) == 0
    shard = pq.read_table(records.layout.extended("my-sd-tiny", 1)).to_pylist()
    assert [(r["id"], r["generator_gen0"], r["width_gen0"], r["num_inference_steps_gen0"]) for r in shard] == [
        ("1003", "my-sd-tiny", 48, 1)]


def test_unknown_extended_generator_fails_before_work(records: Manifest, capsys: pytest.CaptureFixture) -> None:
    """A name missing from the registries is a RegistryError; the CLI exits 2 and writes nothing."""
    with pytest.raises(RegistryError, match="'nope' is not in the registry"):
        extend(records, MANIFESTS / "extended.yaml", ["sd15-tiny", "nope"], progress=False)
    assert cli.main(["extend", "-m", str(records.path), "--only", "nope"]) == 2
    assert "not in the registry" in capsys.readouterr().err
    assert not (records.layout.root / "gen" / "nope").exists()
