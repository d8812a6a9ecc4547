"""Generators that are not diffusers pipelines (python, http, folder) run through `extend` into evaluation."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from apiserver import FakeImageApi
from genkit import make_records, one_thread  # noqa: F401 - fixtures
from kindkit import JPEG_OF_1019, encoded
from PIL import Image
from shardkit import make_d3_shards
from test_fetch_real import png_claiming

from codetrain.config import EvalConfig
from codetrain.evaluate import evaluate
from codetrain.model import create_embedder, save_weights
from d3builder import cli
from d3builder.generators.encoding import draw_encoding, encode_image
from d3builder.generators.examples.tiny_gan import generate as tiny_gan
from d3builder.generators.registry import load_registries
from d3builder.generators.results import seed_for, size_for
from d3builder.recipe.manifest import Manifest
from d3builder.stages.extend import extend, list_generators
from d3builder.storage.runner import RunSummary, UnitOutcome

SECRET = "sk-test-9f3c1a7e5b2d4c6a8e0f"
KEY_ENV = "D3CODE_TEST_IMAGE_API_KEY"
TEST_IDS = [str(1003 + 4 * i) for i in range(10)]  # 40 records, split cycle train, train, validation, test
RATE = 600  # requests per minute: starts at least 0.1 s apart
API_SIZES = [[64, 64], [48, 32]]
B64 = {"1003": "ok", "1007": "429_then_ok", "1011": "500_then_ok", "1015": "always_500", "1019": "slow",
       "1023": "malformed", "1027": "no_field", "1031": "huge", "1035": "not_image", "1039": "unauthorized"}
B64_OUTCOME = {"1003": "success", "1007": "success", "1011": "success", "1015": "http_status", "1019": "timeout",
               "1023": "bad_response", "1027": "bad_response", "1031": "too_large", "1035": "bad_image",
               "1039": "http_status"}
URL = {"1007": "file_url", "1011": "redirect_file"}
FOLDER_OUTCOME = {"1003": "PNG", "1007": "JPEG", "1011": "WEBP", "1015": "GIF", "1019": "missing", "1023": "bad_image",
                  "1027": "ambiguous", "1031": "BMP", "1035": "TIFF", "1039": "refused_url"}
FLAKY_OUTCOME = {"1007": "exception:RuntimeError", "1011": "bad_output", "1015": "bad_image", "1023": "bad_output"}
NAMES = ("tiny-gan", "flaky-fn", "fake-api", "fake-api-url", "fake-api-capped", "collab")


def _gen_rows(data: Manifest, name: str) -> dict[str, dict]:
    """Every gen row of one generator, by id."""
    folder = data.layout.root / "gen" / name
    return {r["id"]: r for p in sorted(folder.glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def _extended_rows(data: Manifest, name: str) -> dict[str, dict]:
    folder = data.layout.root / "extended" / name
    return {r["id"]: r for p in sorted(folder.glob("test-*.parquet")) for r in pq.read_table(p).to_pylist()}


def _reason(row: dict) -> str:
    return "success" if row["status"] == "success" else row["error_message"].split(":", 1)[0]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """40 records in shards of 8: test records 1003, 1007, ..., 1039 (two per shard)."""
    return make_records(tmp_path_factory.mktemp("kinds"), 40, 8)


@pytest.fixture(scope="module")
def api() -> Iterator[FakeImageApi]:
    """The fake API (base64 and URL endpoints) and a second server, another origin, hosting image URLs."""
    host = FakeImageApi()
    server = FakeImageApi(secret=SECRET, behaviours={"/v1/b64": B64, "/v1/url": URL}, image_host=host)
    yield server
    server.close()
    host.close()


@pytest.fixture(scope="module")
def folder_entry(tmp_path_factory: pytest.TempPathFactory, api: FakeImageApi) -> dict:
    """A collaborator's folder and index: every case of FOLDER_OUTCOME plus images of no test record."""
    root = tmp_path_factory.mktemp("collab")
    images = root / "images"
    images.mkdir()
    files = {"1003.png": encoded(3, (40, 30), "PNG"), "1007.jpg": encoded(7, (64, 48), "JPEG", quality=77),
             "1011.webp": encoded(11, (32, 32), "WEBP"), "1015.gif": encoded(15, (30, 20), "GIF"),
             "1023.png": png_claiming(30_000, 30_000), "1027.png": encoded(27, (8, 8), "PNG"),
             "1027.jpg": encoded(27, (8, 8), "JPEG"), "9999.png": encoded(99, (8, 8), "PNG")}
    for name, content in files.items():
        (images / name).write_bytes(content)
    (images / "notes.txt").write_text("not an image")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "x.bmp").write_bytes(encoded(31, (20, 10), "BMP"))
    api.image_host.files["/images/1035.tiff"] = encoded(35, (24, 24), "TIFF")
    index = root / "index.csv"
    index.write_text("id,path,url,seed,model\n"
                     "1003,,,77,\n"
                     "1031,elsewhere/x.bmp,,,collab/other-gan\n"
                     f"1035,,{api.image_host.url('/images/1035.tiff')},,\n"
                     "1039,,file:///etc/passwd,,\n"
                     "8888,,,,\n")
    expected = {"1003": files["1003.png"], "1007": files["1007.jpg"], "1011": files["1011.webp"],
                "1015": files["1015.gif"], "1031": (root / "elsewhere" / "x.bmp").read_bytes(),
                "1035": api.image_host.files["/images/1035.tiff"]}
    return {"folder": str(images), "index": str(index), "bytes": expected}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, api: FakeImageApi, folder_entry: dict) -> Path:
    """One registry file with an entry of each kind (and three HTTP variants)."""
    def http(path: str, **extra: object) -> dict:
        return {"kind": "http", "endpoint": api.url(path), "auth": {"env": KEY_ENV},
                "request": {"prompt": "{prompt}", "negative_prompt": "{negative_prompt}", "width": "{width}",
                            "height": "{height}", "seed": "{seed}", "size": "{width}x{height}", "steps": "{steps}"},
                "image": {"base64": "data.0.b64_json"}, "steps": 8, "model": "fake/image-api-v1",
                "concurrency": 3, "rate_limit": RATE, "timeout_s": 0.6, "retries": 2, "backoff_s": 0.05,
                "max_requests": 100, "max_response_bytes": 200_000, "sizes": API_SIZES, **extra}

    generators = {
        "tiny-gan": {"kind": "python", "callable": "d3builder.generators.examples.tiny_gan:generate",
                     "sizes": [[64, 64], [64, 48]]},
        "flaky-fn": {"kind": "python", "callable": "kindkit:flaky", "sizes": [[32, 32]], "revision": "v0.1"},
        "fake-api": http("/v1/b64"),
        "fake-api-url": http("/v1/url", image={"url": "data.0.url"}),
        "fake-api-capped": http("/v1/capped", max_requests=4),
        "collab": {"kind": "folder", "folder": folder_entry["folder"], "index": folder_entry["index"],
                   "provenance": {"model": "collab/stylegan", "model_revision": "v1", "watermark": False}},
        # Entries that load but cannot run here.
        "missing-pkg": {"kind": "python", "callable": "no_such_package.generators:render", "sizes": [[8, 8]]},
        "bad-signature": {"kind": "python", "callable": "kindkit:wrong_signature", "sizes": [[8, 8]]},
        "gone-folder": {"kind": "folder", "folder": "./no-such-folder"},
    }
    path = tmp_path_factory.mktemp("registry") / "kinds.yaml"
    path.write_text(yaml.safe_dump({"generators": generators}, sort_keys=False))
    return path


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def runs(data: Manifest, registry: Path) -> dict:
    """Every kind through `extend` (the base64 API through the CLI with -v), logs and output captured."""
    summaries: dict[str, list[RunSummary]] = {}  # each: the generate and the extend (join) summary
    collect, root = _Collect(), logging.getLogger()
    level, out = root.level, io.StringIO()
    root.addHandler(collect)
    root.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(KEY_ENV, SECRET)
            with redirect_stdout(out), redirect_stderr(out):
                code = cli.main(["-v", "extend", "-m", str(data.path), "--registry", str(registry),
                                 "--only", "fake-api"])
            for name in ("tiny-gan", "fake-api-url", "fake-api-capped", "collab"):
                summaries[name] = extend(data, registry, [name], progress=False)
            summaries["flaky-fn"] = extend(data, registry, ["flaky-fn"], batch_size=1, progress=False)
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    return {"summaries": summaries, "cli_code": code, "output": out.getvalue(), "logs": collect.lines}


def test_python_kind_renders_through_extend(data: Manifest, registry: Path, runs: dict) -> None:
    """The tiny GAN renders every test record at a drawn size; its images are the function's, encoded per the mix."""
    render, join = runs["summaries"]["tiny-gan"]
    assert render.complete and join.complete and render.counts["success"] == 10 and join.counts["test"] == 10
    rows = _extended_rows(data, "tiny-gan")
    assert sorted(rows) == TEST_IDS
    for record, row in rows.items():
        seed = seed_for(record, "tiny-gan", data.seed)
        size = size_for(record, "tiny-gan", data.seed, ((64, 64), (64, 48)))
        assert (row["generator_gen0"], row["seed_gen0"], (row["width_gen0"], row["height_gen0"])) == (
            "tiny-gan", seed, size)
        assert row["model_gen0"] == "python:d3builder.generators.examples.tiny_gan:generate"
        assert row["scheduler_gen0"] is None and row["num_inference_steps_gen0"] is None
        encoding = draw_encoding(record, "tiny-gan", seed, data.generate.encoding_mix, data.generate.jpeg_quality)
        image = tiny_gan([f"a photo number {record}"], [None], [size], [seed])[0]
        assert row["image_gen0"]["bytes"] == encode_image(image, encoding) and row["encoding_gen0"] == encoding.format
    stats = json.loads(data.layout.stats("generate", 0, "tiny-gan").read_text())
    assert stats["kind"] == "python" and stats["provenance"]["callable"].endswith("tiny_gan:generate")
    assert set(stats["not_recorded"]) == {"scheduler", "dtype", "safety_checker", "watermark", "num_inference_steps",
                                          "guidance_scale", "model_revision"}
    render_again, join_again = extend(data, registry, ["tiny-gan"], progress=False)
    assert render_again.shards(UnitOutcome.SKIPPED) == [0, 1, 2, 3, 4] and join_again.shards(UnitOutcome.DONE) == []


def test_python_failures_are_recorded_per_record(data: Manifest, runs: dict) -> None:
    """A raising batch, a wrong return value, garbage bytes and a short list fail their records with the reason;
    bytes the function encoded itself are kept exactly."""
    rows = _gen_rows(data, "flaky-fn")
    assert sorted(rows) == TEST_IDS
    outcome = {record: _reason(row) if row["status"] == "failed" else "success" for record, row in rows.items()}
    assert {r: o for r, o in outcome.items() if o != "success"} == {
        "1007": "RuntimeError", "1011": "bad_output", "1015": "bad_image", "1023": "bad_output"}
    assert rows["1007"]["error_message"] == "RuntimeError: the research code crashed"
    assert "returned 0 images for 1 prompts" in rows["1023"]["error_message"]
    kept = rows["1019"]
    assert kept["image"]["bytes"] == JPEG_OF_1019 and (kept["encoding"], kept["jpeg_quality"]) == ("JPEG", None)
    assert (kept["width"], kept["height"], kept["model_revision"]) == (40, 30, "v0.1")
    assert runs["summaries"]["flaky-fn"][0].reasons == Counter(FLAKY_OUTCOME.values())
    assert sorted(_extended_rows(data, "flaky-fn")) == sorted(set(TEST_IDS) - set(FLAKY_OUTCOME))


def test_http_kind_stores_every_record_or_its_reason(data: Manifest, runs: dict, api: FakeImageApi) -> None:
    """Each behaviour of the API ends as a stored image (the exact bytes sent) or a failure with its reason;
    429 and 5xx are retried, 401 is not; the request carries the record's prompt, size, seed and steps."""
    assert runs["cli_code"] == 1  # done, but more than units.max_failed_fraction of its records failed
    assert "generate fake-api: 5 unit(s) done" in runs["output"] and "exit 1: work failed" in runs["output"]
    rows = _gen_rows(data, "fake-api")
    assert {record: _reason(row) for record, row in rows.items()} == B64_OUTCOME
    assert rows["1015"]["error_message"] == "http_status: HTTP 500 (after 3 attempts)"
    assert rows["1039"]["error_message"] == "http_status: HTTP 401"
    attempts = Counter(re.findall(r"(\d+)$", s.body["prompt"])[0] for s in api.posts("/v1/b64"))
    assert attempts == {"1003": 1, "1007": 2, "1011": 2, "1015": 3, "1019": 3, "1023": 1, "1027": 1, "1031": 1,
                        "1035": 1, "1039": 1}
    extended = _extended_rows(data, "fake-api")
    assert sorted(extended) == ["1003", "1007", "1011"]
    for record, row in extended.items():
        seed = seed_for(record, "fake-api", data.seed)
        size = size_for(record, "fake-api", data.seed, tuple(map(tuple, API_SIZES)))
        assert row["image_gen0"]["bytes"] == api.sent[("/v1/b64", record)]
        assert (row["encoding_gen0"], row["jpeg_quality_gen0"], row["seed_gen0"]) == ("PNG", None, seed)
        assert (row["width_gen0"], row["height_gen0"], row["num_inference_steps_gen0"]) == (*size, 8)
        assert row["model_gen0"] == "fake/image-api-v1" and row["scheduler_gen0"] is None
        body = next(s.body for s in api.posts("/v1/b64") if s.body["prompt"].endswith(record))
        assert body == {"prompt": f"a photo number {record}", "width": size[0], "height": size[1], "seed": seed,
                        "size": f"{size[0]}x{size[1]}", "steps": 8}  # no negative prompt: the key is left out
    stats = json.loads(data.layout.stats("generate", 1, "fake-api").read_text())
    assert stats["provenance"]["auth_env"] == KEY_ENV and stats["provenance"]["endpoint"] == api.url("/v1/b64")


def test_http_rate_limit_holds(api: FakeImageApi, runs: dict) -> None:
    """Requests to one API start at least 60 / rate_limit seconds apart, retries included."""
    for path in ("/v1/b64", "/v1/url"):
        times = sorted(s.time for s in api.posts(path))
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(times) >= 10 and min(gaps) >= 0.8 * 60 / RATE, (path, gaps)


def test_http_spend_cap_is_honoured(data: Manifest, api: FakeImageApi, runs: dict) -> None:
    """max_requests=4: the API sees four requests; the other records fail with spend_cap, to be retried later."""
    assert len(api.posts("/v1/capped")) == 4
    rows = _gen_rows(data, "fake-api-capped")
    assert Counter(_reason(r) for r in rows.values()) == {"success": 4, "spend_cap": 6}
    assert runs["summaries"]["fake-api-capped"][0].reasons == {"spend_cap": 6}


def test_http_image_urls_are_http_only_and_get_no_key(data: Manifest, api: FakeImageApi, runs: dict) -> None:
    """An image URL or a redirect to file:// is refused; image URLs on another host never see the API key."""
    rows = _gen_rows(data, "fake-api-url")
    assert {r: _reason(row) for r, row in rows.items() if row["status"] == "failed"} == {
        "1007": "refused_url", "1011": "refused_url"}
    for record in set(TEST_IDS) - {"1007", "1011"}:
        assert rows[record]["image"]["bytes"] == api.sent[("/v1/url", record)] and rows[record]["encoding"] == "JPEG"
    gets = [s for s in api.image_host.seen if s.method == "GET" and s.path.startswith("/images/1")]
    assert len(gets) >= 8 and all("Authorization" not in s.headers for s in gets)
    assert all(s.headers.get("Authorization") == f"Bearer {SECRET}" for s in api.posts("/v1/url"))


def test_the_api_key_is_never_written(data: Manifest, runs: dict, api: FakeImageApi) -> None:
    """Not in any file under the output root (shards, stats), nor in the printed output or the logs."""
    files = [p for p in data.layout.root.rglob("*") if p.is_file()]
    assert len(files) > 50
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    text = runs["output"] + "\n".join(runs["logs"])
    assert "generate fake-api: 5 unit(s) done" in runs["output"] and "/v1/b64" in text  # the capture saw the run
    assert SECRET not in text
    assert any(SECRET in json.dumps(s.headers) for s in api.posts("/v1/b64"))  # it was sent, to the API only


def test_folder_kind_keeps_bytes_and_reports_missing_and_unmatched(data: Manifest, runs: dict,
                                                                   folder_entry: dict) -> None:
    """Files, index paths and index URLs are kept byte for byte in their own format; ids without an image are
    missing; files of no test record are listed; provenance comes from the entry and the index."""
    rows = _gen_rows(data, "collab")
    outcome = {r: row["encoding"] if row["status"] == "success" else _reason(row) for r, row in rows.items()}
    assert outcome == FOLDER_OUTCOME
    for record, content in folder_entry["bytes"].items():
        row = rows[record]
        image = Image.open(io.BytesIO(content))
        assert row["image"]["bytes"] == content and (row["width"], row["height"]) == image.size
        assert row["jpeg_quality"] is None and row["watermark"] is False and row["model_revision"] == "v1"
    assert rows["1023"]["error_message"].startswith("bad_image: decompression bomb guard: ")
    assert rows["1003"]["seed"] == 77 and rows["1007"]["seed"] is None
    assert rows["1031"]["model"] == "collab/other-gan" and rows["1007"]["model"] == "collab/stylegan"
    join = runs["summaries"]["collab"][1]
    assert join.notes == ["2 image(s) match no test record: 9999.png, index:8888"]
    saved = json.loads((data.layout.root / "stats" / "extend" / "collab" / "unmatched.json").read_text())
    assert saved["unmatched"] == ["9999.png", "index:8888"]
    assert sorted(_extended_rows(data, "collab")) == sorted(folder_entry["bytes"])
    stats = json.loads(data.layout.stats("generate", 0, "collab").read_text())
    assert "scheduler" in stats["not_recorded"] and "watermark" not in stats["not_recorded"]


def test_extended_evaluation_gains_a_row_per_added_generator(data: Manifest, runs: dict,
                                                              tmp_path: Path) -> None:
    """`codetrain evaluate --extended` scores every added generator, whatever its kind, in tables and plots."""
    d3 = tmp_path / "d3"
    make_d3_shards(d3, 12, "validation", seed=1)
    make_d3_shards(d3, 4, "test", seed=2)
    save_weights(create_embedder("test_vit"), tmp_path / "run" / "model.safetensors")
    result = evaluate(EvalConfig(run=str(tmp_path / "run"), data=str(d3), extended=str(data.layout.root), fit_split="validation",
                                 robustness=False))
    stored = {name: len(_extended_rows(data, name)) for name in NAMES}
    extended = [r for r in result.results if r["split"] == "extended"]
    assert [r["classifier"] for r in extended] == ["linear", "knn", "ocsvm"]
    for row in extended:
        assert {g: v["n"] for g, v in row["per_generator"].items()} == stored
    report = (result.out_dir / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| detector | classifier | real | c"))
    assert all(name in header for name in NAMES)
    assert (result.out_dir / "acc_extended.png").is_file()


def test_list_shows_each_generator_kind_and_whether_it_runs_here(data: Manifest, registry: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """`extend --list`: every registered generator (the manifest's registries and --registry) with its kind,
    what it runs and whether it can run here: weights, API key, importable callable, folder."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert cli.main(["extend", "-m", str(data.path), "--registry", str(registry), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "RUNS", "HERE", "WHY"]
    table = {line.split()[0]: line.split(maxsplit=4) for line in lines[1:]}
    assert {"sd14", "sd14-tiny", "deepfloyd-if", *NAMES, "missing-pkg", "gone-folder"} <= set(table)
    expected = {
        "tiny-gan": ("python", "d3builder.generators.examples.tiny_gan:generate", "yes", "callable importable"),
        "fake-api": ("http", registry_endpoint(registry, "fake-api"), "no",
                     f"'auth.env': environment variable {KEY_ENV} is not set"),
        "collab": ("folder", folder_of(registry, "collab"), "yes", "images present"),
        "sd14-tiny": ("diffusers", "tiny://sd14", "yes", "tiny twin, built offline"),
        "sd14": ("diffusers", "CompVis/stable-diffusion-v1-4", "no", "weights not in the local Hugging Face cache"),
        "missing-pkg": ("python", "no_such_package.generators:render", "no",
                        "'callable': module 'no_such_package.generators' cannot be imported here"),
        "gone-folder": ("folder", folder_of(registry, "gone-folder"), "no", "'folder': "),
    }
    for name, (kind, runs_what, here, why) in expected.items():
        assert table[name][1:4] == [kind, runs_what, here] and table[name][4].startswith(why), table[name]
    monkeypatch.setenv(KEY_ENV, SECRET)
    rows = {r["name"]: r for r in list_generators(load_registries(registry))}
    assert (rows["fake-api"]["here"], rows["fake-api"]["why"]) == ("yes", f"API key in ${KEY_ENV}")
    assert SECRET not in json.dumps(rows)


def registry_endpoint(registry: Path, name: str) -> str:
    return yaml.safe_load(registry.read_text())["generators"][name]["endpoint"]


def folder_of(registry: Path, name: str) -> str:
    return str((registry.parent / yaml.safe_load(registry.read_text())["generators"][name]["folder"]).resolve())


@pytest.mark.parametrize(("name", "key", "problem"), [
    ("missing-pkg", "callable", "module 'no_such_package.generators' cannot be imported here"),
    ("bad-signature", "callable", "must take (prompts, negative_prompts, sizes, seeds)"),
    ("fake-api", "auth.env", f"environment variable {KEY_ENV} is not set"),
    ("gone-folder", "folder", "is not a folder"),
])
def test_an_entry_that_cannot_run_fails_before_any_work(data: Manifest, registry: Path, runs: dict, name: str,
                                                        key: str, problem: str, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """One line naming the file, the entry and the key, exit code 2, and every file already written unchanged."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    before = _snapshot(data.layout.root)
    code = cli.main(["extend", "-m", str(data.path), "--registry", str(registry), "--only", "sd14-tiny", name])
    out = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(out) == 1, out
    assert out[0].startswith(f"d3builder extend: {registry}: entry '{name}': key '{key}': ") and problem in out[0]
    assert _snapshot(data.layout.root) == before and not (data.layout.root / "gen" / "sd14-tiny").exists()
