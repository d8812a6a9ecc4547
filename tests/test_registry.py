"""Generator registry: the shipped manifests load, and every kind of bad entry is refused with context."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path
from typing import Any

import diffusers
import pytest
import yaml

from d3builder.generators.registry import (
    FolderEntry,
    GeneratorEntry,
    HttpEntry,
    PythonEntry,
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


SOURCES = {k: "published: a test note" for k in ("model", "steps", "guidance", "scheduler", "negative_prompt", "sizes")}
"""A source note for every setting of VALID."""


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
    column = {**VALID, "d3_column": 1, "sources": SOURCES}  # a D3 column cites its evidence (see below)
    with pytest.raises(RegistryError, match=r"entry 'b': key 'd3_column': column 1 is already used by entry 'a'"):
        load_registry(_write(tmp_path, {"a": column, "b": column}))


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


CALL_ARGUMENT = {"steps": "num_inference_steps", "guidance": "guidance_scale", "negative_prompt": "negative_prompt"}


def test_d3_generators_cite_evidence_for_every_setting() -> None:
    """Each setting of the four D3 entries (and of IF's stages) has a source; every 'default:' one equals the
    pipeline's own default, checked here against the __call__ signature; SD 2.1 is the published base model."""
    reg = load_registry(MANIFESTS / "generators.yaml")
    checked = 0
    for name in ("deepfloyd-if", "sd14", "sd21", "sdxl"):
        entry = reg[name]
        for spec, extra in ((entry, {"sizes"}), *((s, set()) for s in entry.stages)):
            settings = {"model", "steps", "guidance", "scheduler", "negative_prompt", *extra,
                        *(f"call_kwargs.{k}" for k in spec.call_kwargs)}
            assert set(spec.sources) == settings, (name, spec.pipeline)
            defaults = {k: p.default for k, p in inspect.signature(getattr(diffusers, spec.pipeline).__call__)
                        .parameters.items()}
            for key, note in spec.sources.items():
                assert note.split(":", 1)[0] in ("published", "default", "card") and len(note) > 20
                if not note.startswith("default:"):
                    continue
                if key == "scheduler":
                    assert spec.scheduler is None
                elif key == "negative_prompt":
                    assert defaults["negative_prompt"] is None  # an empty negative prompt is not passed at all
                else:
                    argument = key.removeprefix("call_kwargs.") if "." in key else CALL_ARGUMENT[key]
                    value = spec.call_kwargs[argument] if "." in key else getattr(spec, key)
                    assert value == defaults[argument], (name, key)
                checked += 1
    assert checked >= 20
    assert reg["sd21"].model == "stabilityai/stable-diffusion-2-1-base" and reg["sd21"].sources["model"].startswith(
        "published:")
    assert (reg["sdxl"].steps, reg["sdxl"].guidance) == (50, 5.0)


BAD_SOURCES = [
    ("a D3 column without a note", {"sizes": None}, "sources.sizes", "missing"),
    ("a default that is not the default", {"guidance": "default: the pipeline's"}, "sources.guidance", "differs"),
    ("an unknown kind of evidence", {"steps": "trust me: it is fine"}, "sources.steps", "must read"),
    ("a note for no setting", {"eta": "default: 0.0"}, "sources.eta", "names no setting"),
    ("a default for the model", {"model": "default: whatever"}, "sources.model", "no pipeline default"),
]


@pytest.mark.parametrize(("case", "change", "key", "problem"), BAD_SOURCES, ids=[c[0] for c in BAD_SOURCES])
def test_bad_sources_are_refused(tmp_path: Path, case: str, change: dict, key: str, problem: str) -> None:
    """Source notes are validated: complete for a D3 column, of a known kind, and 'default:' must be true."""
    sources = {k: v for k, v in {**SOURCES, **change}.items() if v is not None}
    raw = {**VALID, "guidance": 6.0, "d3_column": 1, "sources": sources}
    with pytest.raises(RegistryError, match=rf"entry 'g': key '{re.escape(key)}': .*{problem}"):
        load_registry(_write(tmp_path, {"g": raw}))


PYTHON = {"kind": "python", "callable": "d3builder.generators.examples.tiny_gan:generate", "sizes": [[64, 48]]}
HTTP = {"kind": "http", "endpoint": "https://api.example.com/v1/images", "request": {"prompt": "{prompt}"},
        "image": {"base64": "data.0.b64_json"}, "rate_limit": 60, "max_requests": 10, "sizes": [[512, 512]]}
FOLDER = {"kind": "folder", "folder": "./made-elsewhere"}
BAD_KIND_ENTRIES = [
    ("unknown kind", {**PYTHON, "kind": "gan"}, "kind"),
    ("callable without a function", {**PYTHON, "callable": "some.module"}, "callable"),
    ("python without sizes", {k: v for k, v in PYTHON.items() if k != "sizes"}, "sizes"),
    ("python with a diffusers key", {**PYTHON, "pipeline": "StableDiffusionPipeline"}, "pipeline"),
    ("non-http endpoint", {**HTTP, "endpoint": "ftp://api.example.com/x"}, "endpoint"),
    ("credentials in the endpoint", {**HTTP, "endpoint": "https://me:pw@api.example.com/x"}, "endpoint"),
    ("unknown placeholder", {**HTTP, "request": {"prompt": "{prompt}", "q": "{quality}"}}, "request.q"),
    ("steps placeholder without steps", {**HTTP, "request": {"prompt": "{prompt}", "n": ["{steps}"]}},
     "request.n[0]"),
    ("no prompt sent", {**HTTP, "request": {"text": "a cat"}}, "request"),
    ("two image forms", {**HTTP, "image": {"base64": "a", "url": "b"}}, "image"),
    ("unknown image form", {**HTTP, "image": {"bytes": "a"}}, "image.bytes"),
    ("zero rate limit", {**HTTP, "rate_limit": 0}, "rate_limit"),
    ("no spend cap", {k: v for k, v in HTTP.items() if k != "max_requests"}, "max_requests"),
    ("a credential in the headers", {**HTTP, "headers": {"X-Api-Key": "abc"}}, "headers.X-Api-Key"),
    ("auth env not a variable name", {**HTTP, "auth": {"env": "MY KEY"}}, "auth.env"),
    ("auth without env", {**HTTP, "auth": {"header": "X-Key"}}, "auth.env"),
    ("auth header not a string", {**HTTP, "auth": {"env": "K", "header": 3}}, "auth.header"),
    ("zero concurrency", {**HTTP, "concurrency": 0}, "concurrency"),
    ("folder with neither folder nor index", {"kind": "folder"}, "folder"),
    ("index neither csv nor parquet", {**FOLDER, "index": "ids.txt"}, "index"),
    ("unknown provenance column", {**FOLDER, "provenance": {"sampler": "x"}}, "provenance.sampler"),
    ("provenance of the wrong type", {**FOLDER, "provenance": {"seed": "seven"}}, "provenance.seed"),
]


@pytest.mark.parametrize(("case", "raw", "key"), BAD_KIND_ENTRIES, ids=[c[0] for c in BAD_KIND_ENTRIES])
def test_bad_entries_of_other_kinds_are_refused(tmp_path: Path, case: str, raw: dict, key: str) -> None:
    """python, http and folder entries are validated on load, with errors naming the file, entry and key."""
    path = _write(tmp_path, {"good": PYTHON, "broken": raw})
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    message = str(info.value)
    assert message.startswith(f"{path}: entry 'broken': key '{key}': ") and "\n" not in message


def test_entries_of_every_kind_load_with_their_defaults(tmp_path: Path) -> None:
    """Valid python, http and folder entries load (no import, no request, no folder check yet) with defaults."""
    reg = load_registry(_write(tmp_path, {"gan": PYTHON, "api": {**HTTP, "auth": {"env": "MY_KEY"}},
                                          "collab": {**FOLDER, "index": "ids.csv", "provenance": {"seed": 3}}}))
    gan, api, collab = reg["gan"], reg["api"], reg["collab"]
    assert isinstance(gan, PythonEntry) and gan.model == f"python:{PYTHON['callable']}" and gan.sizes == ((64, 48),)
    assert isinstance(api, HttpEntry) and (api.concurrency, api.retries, api.timeout_s, api.model) == (
        1, 3, 60.0, HTTP["endpoint"])
    assert (api.auth.env, api.auth.header, api.auth.prefix) == ("MY_KEY", "Authorization", "Bearer ")
    assert (api.image.path, api.image.form) == (("data", 0, "b64_json"), "base64")
    assert isinstance(collab, FolderEntry) and collab.folder == str((tmp_path / "made-elsewhere").resolve())
    assert collab.index == str((tmp_path / "ids.csv").resolve()) and collab.provenance == {"seed": 3}
    assert {e.kind for e in reg.values()} == {"python", "http", "folder"}


def test_readme_entries_of_every_kind_load(tmp_path: Path) -> None:
    """The copy-paste entries of the README's "Adding a generator" section are valid registry files."""
    readme = (MANIFESTS.parent / "README.md").read_text()
    section = readme.split("## Adding a generator", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    kinds = []
    for index, block in enumerate(blocks):
        path = tmp_path / f"block{index}.yaml"
        path.write_text(block)
        kinds += [entry.kind for entry in load_registry(path).values()]
    assert kinds == ["diffusers", "python", "http", "folder"]
