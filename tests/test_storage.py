"""Storage through fsspec: local paths, file://, memory:// and a real S3 server; atomic commits, exclusive
create, unknown schemes refused in one line, never a local folder named after a URL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq
import pytest
import yaml
from datasets import load_dataset
from stagekit import GENERATORS, make_stage_inputs

from d3builder import cli
from d3builder.recipe.manifest import load_manifest
from d3builder.stages.assemble import assemble_dataset
from d3builder.storage.layout import DataLayout
from d3builder.storage.runner import UnitOutcome
from d3builder.storage.schema import d3_features
from d3builder.storage.store import StorageError, atomic_write_json, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["local", "file", "memory", "s3"])
def test_store_commits_atomically_and_creates_exclusively(kind: str, tmp_path: Path, request) -> None:
    url = {"local": str(tmp_path / "root"), "file": f"file://{tmp_path}/root", "memory": f"memory://{tmp_path.name}/root",
           "s3": None}[kind]
    url = url or f"{request.getfixturevalue('s3_bucket')}/root"
    store = open_store(url)
    target = store.root / "a" / "b.bin"
    assert not store.exists(target)
    half = store.atomic_file(target)
    half.file.write(b"half a shard")
    assert not store.exists(target)  # nothing visible before the commit
    half.discard()
    assert not store.exists(target) and store.glob(store.root / "a" / "*") == []
    with store.atomic_writer(target) as fh:
        fh.write(b"whole")
    assert store.read_bytes(target) == b"whole" and store.glob(store.root / "a" / "*") == [target]
    with pytest.raises(RuntimeError), store.atomic_writer(target) as fh:
        fh.write(b"broken")
        raise RuntimeError("writer died")
    assert store.read_bytes(target) == b"whole"
    claim = store.root / "leases" / "x.json"
    assert store.create_exclusive(claim, b"first") and not store.create_exclusive(claim, b"second")
    assert store.read_bytes(claim) == b"first"
    assert store.url(target).endswith("root/a/b.bin") and (kind in ("local", "file")) == store.local
    if kind == "local":
        assert [p.name for p in (tmp_path / "root" / "a").iterdir()] == ["b.bin"]  # no temporary sibling left


RACER = """
import sys, time
from d3builder.storage.store import open_store
url, start, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
store = open_store(url)
for round_ in range(rounds):
    time.sleep(max(0.0, start + round_ * 0.3 - time.time()))
    print(int(store.create_exclusive(store.root / f"claim-{round_}.json", b"mine")), flush=True)
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_exclusive_create_has_one_winner_among_processes(kind: str, tmp_path: Path, request) -> None:
    """Processes creating the same claim at the same moment: exactly one wins, round after round."""
    url = str(tmp_path) if kind == "local" else f"{request.getfixturevalue('s3_bucket')}/race"
    start, rounds = time.time() + 3.0, 4
    racers = [subprocess.Popen([sys.executable, "-c", RACER, url, str(start), str(rounds)], stdout=subprocess.PIPE,
                               text=True, cwd=REPO) for _ in range(4)]
    results = [racer.communicate(timeout=120)[0].split() for racer in racers]
    assert all(racer.returncode == 0 for racer in racers)
    assert [sum(int(r[i]) for r in results) for i in range(rounds)] == [1] * rounds, results


def test_unknown_or_missing_filesystems_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StorageError, match=r"unknown storage scheme nosuch://"):
        open_store("nosuch://bucket/d3")
    with pytest.raises(StorageError, match=r"https:// is read-only here"):
        open_store("https://example.org/d3")
    manifest = make_stage_inputs(tmp_path / "data", 2, 2).manifest
    monkeypatch.chdir(tmp_path)
    for url, words in (("nosuch://b/d3", "unknown storage scheme nosuch://"), ("hf://datasets/x/y", "read-only")):
        assert cli.main(["assemble", "-m", str(manifest.path), "--output-root", url]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and url in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(manifest.path.read_text().replace(f"output_root: {manifest.output_root}", "output_root: nosuch://b/x"))
    assert cli.main(["assemble", "-m", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}: output_root: nosuch://b/x: unknown storage scheme" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "data"]  # no folder named after a URL


def test_a_scheme_whose_package_is_missing_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = sys.modules["fsspec.registry"]  # the module (fsspec.registry names the registry mapping)
    monkeypatch.setitem(registry.known_implementations, "fakes3",
                        {"class": "no_such_package.FakeFileSystem", "err": "Install no_such_package to access fakes3"})
    with pytest.raises(StorageError) as info:
        open_store("fakes3://bucket/d3")
    assert str(info.value) == "fakes3://bucket/d3: the fakes3:// filesystem is not installed: pip install no_such_package"


def test_memory_and_file_roots_run_a_stage(tmp_path: Path) -> None:
    """assemble writes to memory:// and file:// roots what it writes to a local folder."""
    inputs = make_stage_inputs(tmp_path / "local", 6, 3)
    local = assemble_dataset(inputs.manifest, progress=False)
    for url in (f"memory://{tmp_path.name}-d3", f"file://{tmp_path}/viafile"):
        manifest = load_manifest(inputs.manifest.path, output_root=url)
        source, target = inputs.layout.store, manifest.layout.store
        for path in source.glob(inputs.layout.root / "*" / "*.parquet") + source.glob(
                inputs.layout.root / "gen" / "*" / "*.parquet"):
            target.write_bytes(manifest.layout.root / source.relative(path), source.read_bytes(path))
        summary = assemble_dataset(manifest, progress=False)
        assert summary.shards(UnitOutcome.DONE) == [0, 1] and summary.counts == local.counts
        shards = source.glob(inputs.layout.d3_dir() / "*" / "*.parquet")
        assert len(shards) == 4 and len(target.glob(manifest.layout.d3_dir() / "*" / "*.parquet")) == 4
        for path in shards:
            ours = target.read_table(manifest.layout.root / source.relative(path))
            assert ours.equals(pq.read_table(path)), (url, path)
        card = target.read_bytes(manifest.layout.d3_dir() / "README.md").decode()
        assert "dataset_info" in card and "sd14-tiny" in card
    assert not (tmp_path / "memory:").exists() and (tmp_path / "viafile" / "d3" / "README.md").is_file()


def test_atomic_write_json_takes_paths_and_urls(tmp_path: Path, s3_bucket: str) -> None:  # noqa: F811
    """The helper codetrain writes its run files with: a local path or a URL, atomically."""
    assert atomic_write_json(tmp_path / "run" / "config.json", {"a": 1}) == tmp_path / "run" / "config.json"
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}
    url = f"{s3_bucket}/runs/code/metrics.json"
    assert atomic_write_json(url, {"step": 3}) == url
    assert json.loads(open_store(url).read_bytes(PurePosixPath(url.removeprefix("s3://")))) == {"step": 3}


def test_s3_root_assembles_validates_and_loads_with_datasets(tmp_path: Path, s3_bucket: str, s3,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage inputs uploaded to S3; assemble, validate and publish from there; `datasets` reads the shards; no local
    `s3:`."""
    inputs = make_stage_inputs(tmp_path / "local", 8, 4)
    recipe = yaml.safe_load(inputs.manifest.path.read_text())
    recipe["registry"] = [str(REPO / "manifests" / "generators.yaml")]  # publish names each generator's terms
    inputs.manifest.path.write_text(yaml.safe_dump(recipe))
    root = f"{s3_bucket}/d3run"
    s3.upload(Path(inputs.layout.root), root)
    fs = s3.filesystem()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["assemble", "-m", str(inputs.manifest.path), "--output-root", root, "--no-progress"]) == 0
    assert cli.main(["validate", root, "--no-progress"]) == 0
    layout = DataLayout(root)
    assert layout.store.isfile(layout.d3_dir() / "README.md")
    train = load_dataset("parquet", data_files=f"{root}/d3/train/*.parquet", split="train",
                         storage_options=s3.storage_options, cache_dir=str(tmp_path / "hf"))
    assert train.features == d3_features(len(GENERATORS)) and train["id"] == inputs.complete_ids("train")
    assert cli.main(["publish", "-m", str(inputs.manifest.path), "--output-root", root, "hub", "--no-progress"]) == 0
    published = load_dataset("parquet", data_files=str(tmp_path / "hub" / "train" / "*.parquet"), split="train",
                             cache_dir=str(tmp_path / "hf"))
    assert published["id"] == train["id"] and "image_real" not in published.column_names
    assert (tmp_path / "hub" / "README.md").is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("s3:")]
    assert not [k for k in fs.find(root.removeprefix("s3://")) if ".tmp" in k]


def test_validate_checks_completeness_on_an_s3_root(tmp_path: Path, s3_bucket: str, s3,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """An incomplete output root on S3 fails validate, each gap named by its URL, as on a local folder."""
    inputs = make_stage_inputs(tmp_path / "local", 8, 2, skip=[("sd21-tiny", 3)])
    root = f"{s3_bucket}/partial"
    s3.upload(Path(inputs.layout.root), root)
    assert cli.main(["assemble", "-m", str(inputs.manifest.path), "--output-root", root, "--no-progress"]) == 1
    capsys.readouterr()
    assert cli.main(["validate", root, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"completeness of {root} " in out and "selected     8 records in 4 shards" in out
    assert f"DEFECT {root}/gen/sd21-tiny/00003.parquet: missing: the unit never finished" in out
    assert f"DEFECT {root}/stats/assemble/00003.json: missing: the shard was never assembled" in out


@pytest.mark.slow
def test_quickstart_stages_on_s3(tmp_path: Path, s3_bucket: str, s3) -> None:  # noqa: F811
    """select, fetch-real (img2dataset over loopback), generate with one tiny generator, assemble and validate,
    each a `d3builder` command with `--output-root s3://...`; `datasets` reads the result from S3."""
    recipe = (REPO / "manifests" / "tiny.yaml").read_text()
    recipe = recipe.replace("generators: [if-tiny, sd14-tiny, sd21-tiny, sdxl-tiny]", "generators: [sd14-tiny]")
    recipe = recipe.replace("registry: [generators.yaml]", f"registry: [{REPO / 'manifests' / 'generators.yaml'}]")
    manifest = tmp_path / "tiny-s3.yaml"
    manifest.write_text(recipe)
    root = f"{s3_bucket}/tiny"
    common = ["-m", str(manifest), "--output-root", root, "--no-progress"]
    script = (
        "import sys\n"
        "from d3builder import cli\n"
        "from d3builder.embedded.photos import embedded_server\n"
        "with embedded_server(port=0) as url:\n"
        f"    assert cli.main(['select', *{common!r}, '--embedded-base-url', url]) == 0\n"
        f"    assert cli.main(['fetch-real', *{common!r}]) == 0\n"
        f"assert cli.main(['generate', *{common!r}, '-g', 'sd14-tiny']) == 0\n"
        f"assert cli.main(['assemble', *{common!r}]) == 0\n"
        f"sys.exit(cli.main(['validate', {root!r}, '--no-progress']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK: no defect" in done.stdout
    keys = s3.filesystem().find(root.removeprefix("s3://"))
    assert any(k.endswith("real/00000.parquet") for k in keys) and any("gen/sd14-tiny/" in k for k in keys)
    data = load_dataset("parquet", data_files={s: f"{root}/d3/{s}/*.parquet" for s in ("train", "test")},
                        storage_options=s3.storage_options, cache_dir=str(tmp_path / "hf"))
    assert data["train"].num_rows > 0 and data["train"][0]["image_real"].size[0] > 0
    assert data["train"][0]["generator_gen0"] == "sd14-tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny-s3.yaml"]  # nothing local named after the URL
