"""Generator registry: the shipped manifests load, and every kind of bad entry is refused with context."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from d3builder.generators.registry import (
    GeneratorEntry,
    RegistryError,
    load_registries,
    load_registry,
)

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
D3_SIZES = ((256, 256), (512, 512), (640, 480), (640, 360))
COMMIT = re.compile(r"^[0-9a-f]{40}$")

VALID = {
    "pipeline": "StableDiffusionPipeline",
    "model": "tiny://sd14",
    "dtype": "float32",
    "steps": 2,
    "guidance": 7.5,
    "sizes": [[64, 64], [64, 48]],
}


def _write(tmp_path: Path, generators: dict[str, Any], name: str = "reg.yaml") -> Path:
    """Write a manifest holding `generators`."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"generators": generators}), encoding="utf-8")
    return path


def test_shipped_manifests_load_with_the_d3_columns() -> None:
    """generators.yaml and extended.yaml load, merge, and map the four D3 columns to their generators."""
    reg = load_registries(MANIFESTS / "generators.yaml", MANIFESTS / "extended.yaml")
    columns = {e.d3_column: name for name, e in reg.items() if e.d3_column is not None}
    assert columns == {0: "deepfloyd-if", 1: "sd14", 2: "sd21", 3: "sdxl"}
    assert reg["sd14"].model == "CompVis/stable-diffusion-v1-4"
    assert reg["sd21"].model == "stabilityai/stable-diffusion-2-1-base"
    assert reg["sdxl"].model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert [s.model for s in reg["deepfloyd-if"].stages] == [
        "DeepFloyd/IF-II-L-v1.0", "stabilityai/stable-diffusion-x4-upscaler"]
    for name in columns.values():
        entry = reg[name]
        assert entry.sizes == D3_SIZES
        assert all(COMMIT.match(r) for r in [entry.revision, *(s.revision for s in entry.stages)])
        twin = reg[entry.tiny]
        assert twin.is_tiny and twin.steps <= 3
        assert [twin.pipeline, *(s.pipeline for s in twin.stages)] == [
            entry.pipeline, *(s.pipeline for s in entry.stages)]
    assert {"sd15", "sd3-medium", "pixart-alpha", "kandinsky-2.2", "lcm-dreamshaper"} <= set(reg)
    assert {reg[n].tiny for n in ("sd15", "pixart-alpha", "lcm-dreamshaper")} == {
        "sd15-tiny", "pixart-tiny", "lcm-tiny"}
    assert isinstance(reg["sdxl"], GeneratorEntry) and reg["sdxl"].source.endswith("generators.yaml")


def test_entries_are_frozen() -> None:
    """Entries cannot be mutated after validation."""
    entry = load_registry(MANIFESTS / "generators.yaml")["sd14"]
    with pytest.raises(AttributeError):
        entry.steps = 1  # type: ignore[misc]


BAD_ENTRIES = [
    ("unknown key", {"stepz": 3}, "stepz"),
    ("missing key", {"steps": None}, "steps"),
    ("wrong type", {"steps": "fifty"}, "steps"),
    ("bool as int", {"steps": True}, "steps"),
    ("negative guidance", {"guidance": -1}, "guidance"),
    ("unknown pipeline", {"pipeline": "NoSuchPipeline"}, "pipeline"),
    ("model class as pipeline", {"pipeline": "UNet2DConditionModel"}, "pipeline"),
    ("unknown scheduler", {"scheduler": "NoSuchScheduler"}, "scheduler"),
    ("pipeline as scheduler", {"scheduler": "StableDiffusionPipeline"}, "scheduler"),
    ("missing local path", {"model": "./no/such/model"}, "model"),
    ("hub id without revision", {"model": "CompVis/stable-diffusion-v1-4"}, "revision"),
    ("unknown tiny kind", {"model": "tiny://nope"}, "model"),
    ("tiny kind of another pipeline", {"model": "tiny://sdxl"}, "model"),
    ("bad dtype", {"dtype": "float8"}, "dtype"),
    ("size not a pair", {"sizes": [[64]]}, "sizes[0]"),
    ("zero size", {"sizes": [[0, 64]]}, "sizes[0]"),
    ("size off the latent grid", {"sizes": [[64, 48], [63, 64]]}, "sizes[1]"),
    ("empty sizes", {"sizes": []}, "sizes"),
    ("duplicate sizes", {"sizes": [[64, 64], [64, 64]]}, "sizes"),
    ("d3 column out of range", {"d3_column": 4}, "d3_column"),
    ("reserved call argument", {"call_kwargs": {"prompt": "x"}}, "call_kwargs.prompt"),
    ("unknown call argument", {"call_kwargs": {"no_such_arg": 1}}, "call_kwargs.no_such_arg"),
    ("non-scalar call argument", {"call_kwargs": {"eta": [1]}}, "call_kwargs.eta"),
    ("cascade without native size", {"stages": [{"pipeline": "StableDiffusionUpscalePipeline",
                                                 "model": "tiny://x4-upscaler", "dtype": "float32",
                                                 "steps": 2, "guidance": 9.0, "upscale": 4}]},
     "native_size"),
    ("stage missing upscale", {"native_size": [16, 16], "stages": [
        {"pipeline": "StableDiffusionUpscalePipeline", "model": "tiny://x4-upscaler",
         "dtype": "float32", "steps": 2, "guidance": 9.0}]}, "stages[0].upscale"),
    ("stage with bad dtype", {"native_size": [16, 16], "stages": [
        {"pipeline": "StableDiffusionUpscalePipeline", "model": "tiny://x4-upscaler",
         "dtype": "half", "steps": 2, "guidance": 9.0, "upscale": 4}]}, "stages[0].dtype"),
    ("twin not defined", {"tiny": "ghost"}, "tiny"),
]


@pytest.mark.parametrize(("case", "change", "key"), BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_bad_entry_is_refused_naming_file_entry_and_key(tmp_path: Path, case: str, change: dict,
                                                        key: str) -> None:
    """Each malformed entry raises RegistryError whose message names the file, the entry and the key."""
    raw = copy.deepcopy(VALID)
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    path = _write(tmp_path, {"good": VALID, "broken": raw})
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert str(path) in message
    assert "entry 'broken'" in message
    assert f"key '{key}'" in message


def test_if_pipeline_needs_explicit_clean_caption(tmp_path: Path) -> None:
    """IF's caption cleaning default depends on installed packages, so the entry must pin it."""
    raw = {"pipeline": "IFPipeline", "model": "tiny://if", "dtype": "float32", "steps": 2,
           "guidance": 7.0, "sizes": [[16, 16]]}
    path = _write(tmp_path, {"if-x": raw})
    with pytest.raises(RegistryError, match=r"entry 'if-x': key 'call_kwargs.clean_caption'"):
        load_registry(path)
    raw["call_kwargs"] = {"clean_caption": False}
    assert load_registry(_write(tmp_path, {"if-x": raw})).keys() == {"if-x"}


def test_bad_name_twin_mismatch_and_duplicate_column(tmp_path: Path) -> None:
    """Entry names must be path-safe, twins must run the same classes, D3 columns must be unique."""
    with pytest.raises(RegistryError, match=r"reg.yaml: entry 'Bad Name'"):
        load_registry(_write(tmp_path, {"Bad Name": VALID}))
    lcm = {**VALID, "pipeline": "LatentConsistencyModelPipeline", "model": "tiny://lcm"}
    with pytest.raises(RegistryError, match=r"entry 'real': key 'tiny': twin 'lcm'"):
        load_registry(_write(tmp_path, {"real": {**VALID, "tiny": "lcm"}, "lcm": lcm}))
    with pytest.raises(RegistryError, match=r"entry 'b': key 'd3_column': column 1 is already used by entry 'a'"):
        load_registry(_write(tmp_path, {"a": {**VALID, "d3_column": 1}, "b": {**VALID, "d3_column": 1}}))


def test_malformed_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Missing files, YAML syntax errors and a wrong top level all name the file."""
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RegistryError, match=re.escape(str(missing))):
        load_registry(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("generators: {a: [1, 2\n", encoding="utf-8")
    with pytest.raises(RegistryError, match=r"broken.yaml: invalid YAML"):
        load_registry(broken)
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"sd14": VALID}), encoding="utf-8")
    with pytest.raises(RegistryError, match=r"flat.yaml: must contain exactly one top-level key 'generators'"):
        load_registry(flat)


def test_local_model_paths_resolve_against_the_manifest(tmp_path: Path) -> None:
    """A relative local model path is resolved next to the manifest and stored absolute."""
    (tmp_path / "weights" / "sd").mkdir(parents=True)
    path = _write(tmp_path, {"local": {**VALID, "model": "./weights/sd"}})
    assert load_registry(path)["local"].model == str((tmp_path / "weights" / "sd").resolve())


def test_merging_refuses_duplicate_names(tmp_path: Path) -> None:
    """load_registries merges files but a name defined in two files is an error naming both."""
    first = _write(tmp_path, {"a": VALID}, "first.yaml")
    second = _write(tmp_path, {"a": VALID, "b": VALID}, "second.yaml")
    third = _write(tmp_path, {"c": VALID}, "third.yaml")
    assert set(load_registries(first, third)) == {"a", "c"}
    with pytest.raises(RegistryError) as info:
        load_registries(first, second)
    assert "second.yaml: entry 'a'" in str(info.value) and "first.yaml" in str(info.value)
