"""The generate stage: tiny twins really render records shards; encodings, failures, resume, regenerate, errors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from genkit import MANIFESTS, make_records, one_thread, save_manifest  # noqa: F401 - fixtures
from PIL import Image

from d3builder import cli
from d3builder.generators.encoding import (
    FORMATS,
    Encoding,
    draw_encoding,
    encode_image,
    jpeg_quality_for,
)
from d3builder.generators.registry import RegistryError, load_registries
from d3builder.generators.render import (
    Job,
    failure_reason,
    generate_shards,
    plan_batches,
)
from d3builder.generators.results import seed_for, size_for
from d3builder.generators.tiny import build_tiny
from d3builder.recipe.manifest import Manifest
from d3builder.stages.regenerate import file_stem, regenerate
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import GEN_FEATURES
from d3builder.storage.shards import read_features, validate_shard, write_shard

DONE, SKIPPED = UnitOutcome.DONE, UnitOutcome.SKIPPED
TWIN_FORMATS = {"if-tiny": "PNG", "sd14-tiny": "JPEG", "sd21-tiny": "GIF", "sdxl-tiny": "TIFF"}
"""Each D3 twin renders with a mix forcing one format, so every format is checked on real output."""
JPEG_RANGE = [60, 90]


@pytest.fixture(scope="session")
def records(tmp_path_factory: pytest.TempPathFactory) -> Manifest:  # noqa: F811
    """8 records in shards of 3 (records/ and real/ written with write_shard), JPEG quality drawn in JPEG_RANGE."""
    root = tmp_path_factory.mktemp("data")
    manifest = make_records(root, 8, 3)
    manifest.generate.jpeg_quality = JPEG_RANGE
    return save_manifest(manifest, root / "manifest.yaml")


@pytest.fixture(scope="session")
def generated(records: Manifest) -> dict[str, object]:
    """Every D3 twin run through generate_shards on records shard 0, each with a single-format mix."""
    summaries = {}
    for name, fmt in TWIN_FORMATS.items():
        manifest = copy.deepcopy(records)
        manifest.generate.encoding_mix = {fmt: 1.0}
        summaries[name] = generate_shards(manifest, name, shards=[0], progress=False)
    return summaries


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("name", list(TWIN_FORMATS))
def test_each_twin_generates_decodable_images_in_the_forced_format(
    records: Manifest, generated: dict, name: str
) -> None:
    """One row per record, success, the record's seed and size, bytes of the forced format, provenance set."""
    layout, entry = records.layout, load_registries(MANIFESTS / "generators.yaml")[name]
    summary = generated[name]
    assert (summary.shards(DONE), summary.counts["success"], summary.failed) == ([0], 3, 0)
    path = layout.gen(name, 0)
    assert read_features(path) == GEN_FEATURES and validate_shard(path, GEN_FEATURES).ok
    rows = _rows(path)
    assert sorted(r["id"] for r in rows) == ["1000", "1001", "1002"]
    fmt = TWIN_FORMATS[name]
    for row in rows:
        assert row["status"] == "success" and row["error_message"] is None and row["generator"] == name
        assert row["seed"] == seed_for(row["id"], name, records.seed)
        assert (row["width"], row["height"]) == size_for(row["id"], name, records.seed, entry.sizes)
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        image.load()
        assert image.format == fmt == row["encoding"] and image.size == (row["width"], row["height"])
        assert row["prompt"] == f"a photo number {row['id']}" and row["negative_prompt"] == ""
        assert (row["num_inference_steps"], row["guidance_scale"]) == (entry.steps, entry.guidance)
        assert row["model"] == entry.model and row["model_revision"] == "tiny-v1" and row["dtype"] == "float32"
        assert row["safety_checker"] is False and row["watermark"] is False
        assert json.loads(row["software"])["diffusers"] and row["seconds"] > 0
        assert row["pipeline"].split("+")[0] == entry.pipeline
    stats = json.loads(layout.stats("generate", 0, name).read_text())
    assert (stats["records"], stats["success"], stats["failed"], stats["encodings"]) == (3, 3, 0, {fmt: 3})
    assert stats["batch_size"] == 2 and stats["provenance"]["generator"] == name and stats["images_per_second"] > 0


def test_if_cascade_rows_name_the_stages_that_ran(records: Manifest, generated: dict) -> None:
    """IF rows record the pipelines actually run (stage III only when the size needs it)."""
    for row in _rows(records.layout.gen("if-tiny", 0)):
        expected = 2 if (row["width"], row["height"]) == (32, 32) else 3
        assert len(row["pipeline"].split("+")) == expected and row["pipeline"].startswith("IFPipeline+")


def test_jpeg_quality_is_drawn_in_range_and_applied(records: Manifest, generated: dict) -> None:
    """The JPEG bytes carry the drawn quality: re-encoding the decoded pixels at it is stable, others are not."""
    for row in _rows(records.layout.gen("sd14-tiny", 0)):
        quality = jpeg_quality_for(row["id"], "sd14-tiny", row["seed"], JPEG_RANGE)
        assert row["jpeg_quality"] == quality, "the drawn quality is stored with the image"
        assert JPEG_RANGE[0] <= quality <= JPEG_RANGE[1]
        tables = Image.open(io.BytesIO(row["image"]["bytes"])).quantization
        rgb = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        assert Image.open(io.BytesIO(encode_image(rgb, Encoding("JPEG", quality)))).quantization == tables
        other = quality - 10 if quality > 70 else quality + 10
        assert Image.open(io.BytesIO(encode_image(rgb, Encoding("JPEG", other)))).quantization != tables


def test_done_shards_are_skipped(records: Manifest, generated: dict) -> None:
    """A second run renders nothing and leaves the shard file untouched."""
    path = records.layout.gen("sd14-tiny", 0)
    stamp = path.stat().st_mtime_ns
    summary = generate_shards(records, "sd14-tiny", shards=[0], progress=False)
    assert (summary.shards(DONE), summary.shards(SKIPPED), summary.counts["success"]) == ([], [0], 0)
    assert path.stat().st_mtime_ns == stamp


def test_cli_speed_flags_reach_the_pipeline_and_the_stats(records: Manifest, tmp_path: Path) -> None:
    """`d3builder generate` flags: --shards, --batch-size, --no-sdpa, --channels-last are applied and recorded."""
    for folder in ("records", "real", "stats/fetch-real"):  # only fetched records are rendered: reals are read
        shutil.copytree(records.layout.root / folder, tmp_path / folder)
    argv = ["generate", "-m", str(records.path), "--output-root", str(tmp_path), "-g", "sd14-tiny",
            "--shards", "2", "--batch-size", "3", "--no-sdpa", "--channels-last"]
    assert cli.main(argv) == 0
    stats = json.loads((tmp_path / "stats" / "generate" / "sd14-tiny" / "00002.json").read_text())
    assert stats["batch_size"] == 3 and stats["success"] == 2 and stats["splits"] is None
    switches = {k: stats["provenance"][k] for k in ("sdpa", "channels_last", "compile", "vae_slicing", "vae_tiling")}
    assert switches == {"sdpa": False, "channels_last": True, "compile": False, "vae_slicing": False,
                        "vae_tiling": False}
    assert sorted(p.name for p in (tmp_path / "gen" / "sd14-tiny").glob("*.parquet")) == ["00002.parquet"]
    assert cli.main([*argv[:8], "7"]) == 1  # a records shard that does not exist is reported, not invented


def test_regenerate_reproduces_stored_bytes(records: Manifest, generated: dict, tmp_path: Path) -> None:
    """Re-rendering from the stored provenance gives byte-identical JPEG and GIF files, named by id."""
    out = tmp_path / "out"
    for name in ("sd14-tiny", "sd21-tiny"):  # 1000 and 1002 share one 64x64 batch for both
        results = regenerate(records, name, ["1002", "1000", "missing-id"], out_dir=out / name)
        assert [r.id for r in results] == ["1002", "1000", "missing-id"]
        stored = {r["id"]: r["image"]["bytes"] for r in _rows(records.layout.gen(name, 0))}
        for result in results[:2]:
            assert result.error is None and result.match and result.notes == []
            assert result.path == out / name / f"{result.id}.{'jpg' if name == 'sd14-tiny' else 'gif'}"
            assert result.path.read_bytes() == stored[result.id]
        assert results[2].error and "not found" in results[2].error and not results[2].match
    assert cli.main(["regenerate", "-m", str(records.path), "-g", "sd14-tiny", "--out-dir", str(out / "cli"), "1001"]) == 0
    assert (out / "cli" / "1001.jpg").read_bytes() == {r["id"]: r["image"]["bytes"] for r in
                                                       _rows(records.layout.gen("sd14-tiny", 0))}["1001"]


def test_regenerate_notices_changed_bytes(records: Manifest, generated: dict, tmp_path: Path) -> None:
    """A stored image that does not match what its provenance renders is reported as differing."""
    root = tmp_path / "copy"
    manifest = copy.deepcopy(records)
    manifest.output_root = str(root)
    source = records.layout
    rows = sorted(_rows(source.gen("sd14-tiny", 0)), key=lambda r: r["id"])
    original = rows[0]["image"]["bytes"]
    rows[0]["image"]["bytes"] = encode_image(Image.new("RGB", (8, 8), "red"), Encoding("JPEG", 80))
    write_shard(rows, manifest.layout.gen("sd14-tiny", 0), GEN_FEATURES)
    stats = manifest.layout.stats("generate", 0, "sd14-tiny")
    stats.parent.mkdir(parents=True)
    stats.write_bytes(source.stats("generate", 0, "sd14-tiny").read_bytes())
    by_id = {r["id"]: r for r in rows}
    assert by_id["1000"]["width"] == by_id["1002"]["width"] == 64  # one batch: rendered once
    results = regenerate(manifest, "sd14-tiny", ["1000", "1002"], out_dir=tmp_path / "out")
    assert [r.match for r in results] == [False, True]
    assert results[0].sha256 == hashlib.sha256(original).hexdigest() != results[0].stored_sha256


def test_nan_output_is_recorded_and_the_run_goes_on(records: Manifest, tmp_path: Path) -> None:
    """A model decoding NaN yields failed rows with their reason; the shard is still written and done."""
    pipe = build_tiny("sd14")
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "sd14-nan", safe_serialization=True)
    base = load_registries(MANIFESTS / "generators.yaml")["sd14-tiny"]
    entry = dataclasses.replace(base, name="sd14-nan", model=str(tmp_path / "sd14-nan"))
    summary = generate_shards(records, "sd14-nan", registry={"sd14-nan": entry}, shards=[2], progress=False)
    assert (summary.shards(DONE), summary.counts["success"], summary.failed) == ([2], 0, 2)
    assert summary.reasons == Counter({"nan_output": 2})
    rows = _rows(records.layout.gen("sd14-nan", 2))
    assert [(r["status"], r["error_message"], r["image"]) for r in rows] == [("failed", "nan_output", None)] * 2
    assert sorted(r["id"] for r in rows) == ["1006", "1007"]
    assert all(r["seed"] == seed_for(r["id"], "sd14-nan", records.seed) for r in rows)
    stats = json.loads(records.layout.stats("generate", 2, "sd14-nan").read_text())
    assert stats["failures_by_reason"] == {"nan_output": 2} and stats["success"] == 0


def test_bad_registry_entry_fails_before_any_work(records: Manifest, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A malformed entry or an unknown generator raises RegistryError naming it; nothing is written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("generators:\n  broken:\n    pipeline: NoSuchPipeline\n    model: tiny://sd14\n    dtype: float32\n"
                   "    steps: 2\n    guidance: 7.5\n    sizes: [[64, 64]]\n")
    manifest = copy.deepcopy(records)
    manifest.output_root = str(tmp_path / "data")
    manifest.registry = [str(bad)]
    with pytest.raises(RegistryError, match=r"bad\.yaml: entry 'broken': key 'pipeline'"):
        generate_shards(manifest, "broken", progress=False)
    with pytest.raises(RegistryError, match="generator 'sd99' is not in the registry.*known: .*sd14-tiny"):
        generate_shards(records, "sd99", progress=False)
    assert not (tmp_path / "data").exists() and not (records.layout.root / "gen" / "sd99").exists()
    code = cli.main(["generate", "-m", str(records.path), "-g", "sd99", "--output-root", str(tmp_path / "d2")])
    assert code == 2 and "not in the registry" in capsys.readouterr().err and not (tmp_path / "d2").exists()


def test_plan_batches_groups_by_size_in_order() -> None:
    """Batches hold one size each, keep record order, and are at most batch_size long."""
    sizes = [(64, 64), (64, 48), (64, 64), (64, 64), (64, 48), (64, 64)]
    jobs = [Job(str(i), "p", "", i, w, h) for i, (w, h) in enumerate(sizes)]
    batches = [[j.id for j in b] for b in plan_batches(jobs, 2)]
    assert batches == [["0", "2"], ["3", "5"], ["1", "4"]]
    replay = [j for b in plan_batches(jobs, 2) for j in b]
    assert [[j.id for j in b] for b in plan_batches(replay, 2)] == batches  # stored order rebuilds the batches
    with pytest.raises(ValueError):
        plan_batches(jobs, 0)


def test_encoding_draw_follows_the_mix_deterministically() -> None:
    """Formats follow the weights, qualities cover the range, the draw is a pure function of its inputs."""
    mix = {"JPEG": 0.6, "PNG": 0.2, "GIF": 0.1, "BMP": 0.05, "TIFF": 0.05}
    draws = [draw_encoding(str(i), "g", i, mix, [70, 72]) for i in range(4000)]
    counts = Counter(d.format for d in draws)
    for fmt, weight in mix.items():
        assert abs(counts[fmt] / 4000 - weight) < 0.03
    assert {d.quality for d in draws if d.format == "JPEG"} == {70, 71, 72}
    assert all(d.quality is None for d in draws if d.format != "JPEG")
    assert draws == [draw_encoding(str(i), "g", i, mix, [70, 72]) for i in range(4000)]
    assert {draw_encoding(str(i), "g", i, {"BMP": 1.0}, [70, 72]).format for i in range(50)} == {"BMP"}
    with pytest.raises(ValueError, match="WEBP"):
        draw_encoding("1", "g", 1, {"WEBP": 1.0}, [70, 72])
    with pytest.raises(ValueError, match="jpeg_quality"):
        draw_encoding("1", "g", 1, {"JPEG": 1.0}, [90, 70])


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_image_writes_each_format(fmt: str) -> None:
    """Every format of the mix encodes an RGB image that decodes as that format, at its size."""
    image = Image.effect_mandelbrot((40, 30), (-2, -1, 1, 1), 50).convert("RGB")
    decoded = Image.open(io.BytesIO(encode_image(image, Encoding(fmt, 85 if fmt == "JPEG" else None))))
    decoded.load()
    assert decoded.format == fmt and decoded.size == (40, 30)
    assert (decoded.mode == "P") == (fmt == "GIF")


def test_failure_reasons_and_file_stems() -> None:
    """Failure messages map to counted reasons; ids become safe, distinct file names."""
    assert failure_reason("nan_output") == "nan_output"
    assert failure_reason("encode_error: OSError: disk") == "encode_error"
    assert failure_reason("OutOfMemoryError: CUDA out of memory") == "exception:OutOfMemoryError"
    assert file_stem("1275001022128") == "1275001022128"
    stems = {file_stem(i) for i in ("../etc/passwd", "a/b", "a_b", ".hidden")}
    assert len(stems) == 4 and all("/" not in s and not s.startswith(".") for s in stems)
