"""The full D3 recipe's dry run: the plan and the commands, nothing run."""

from __future__ import annotations

from pathlib import Path

import pytest
from scriptkit import run_script

from d3builder.core.yamlconfig import ConfigError
from d3builder.recipe.manifest import load_manifest
from d3builder.recipe.plan import load_throughput, make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_plan_and_every_stage_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_script("pipelines/full_d3.py", ["--dry-run", "--output-root", str(tmp_path / "d3")])
    out = capsys.readouterr().out
    assert code == 0
    assert "3,100,000 records" in out and "620 shards" in out and "about 2,232,000 real images" in out
    units = {  # each shard cut into parts of at most 30 H100-minutes on all 5,000 records; 72% of them rendered
        "deepfloyd-if": "| 10,540 | 2,232,000 | 212 images, 21 GPU-min |",
        "sd14": "| 1,240 | 2,232,000 | 1,800 images, 15 GPU-min |",
        "sd21": "| 1,240 | 2,232,000 | 1,800 images, 15 GPU-min |",
        "sdxl": "| 3,100 | 2,232,000 | 720 images, 18 GPU-min |",
    }
    for name, row in units.items():
        assert f"| generate {name} {row}" in out
    assert "| fetch-real | 620 | 3,100,000 | 5,000 URLs |" in out
    assert "| **total** | 21,851 | | | GPU-hours on NVIDIA H100 80GB (estimate) | **5,307.3** |" in out
    # one node of 8 GPUs (the defaults): the phases, each worker a command pulling units
    assert "phase 2, build: fetch-real | generate | assemble" in out
    assert "  generate: 8 task(s), 1 GPU each" in out and "  fetch-real: 8 task(s), 0 GPU each" in out
    assert "d3builder worker --manifest" in out and "--stage generate --generator sd14 --generator sd21" in out
    assert "--machine" not in out and "accelerate launch" not in out
    assert not list(tmp_path.iterdir()), "a dry run must not write anything"


def test_dry_run_on_an_object_store_keeps_the_url_in_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Workers, validation, training and evaluation all get the output root as a URL, never a mangled path."""
    assert run_script("pipelines/full_d3.py", ["--dry-run", "--output-root", "memory://recipe-d3"]) == 0
    out = capsys.readouterr().out
    assert "--stage generate --generator sd14" in out and "--output-root memory://recipe-d3" in out
    assert "--data memory://recipe-d3/d3 --run memory://recipe-d3/runs/code" in out
    assert "--extended memory://recipe-d3" in out
    assert "memory:/recipe" not in out


def test_dry_run_for_a_small_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 nodes x 4 GPUs, 3 CPU workers: generation (5,270 GPU-hours on 8 GPUs) outlasts the downloads (3.1M URLs
    at 400/s on 3 workers: 0.72 h), so the build phase is generation plus one fetch unit (5,000 URLs: 12.5 s)."""
    args = ["--dry-run", "--output-root", str(tmp_path / "d3"), "--nodes", "2", "--gpus-per-node", "4",
            "--cpu-workers", "3", "--no-train"]
    assert run_script("pipelines/full_d3.py", args) == 0
    out = capsys.readouterr().out
    assert "Estimated wall-clock on 2 node(s) x 4 GPU(s) (8 generation workers) and 3 CPU workers:" in out
    assert "| fetch-real + generate + assemble (pipelined) | 3 CPU + 8 GPU | 658.8 |" in out  # 5,270 / 8 + 0.003
    assert "| extend + transform-test | 8 GPU + 3 CPU | 0.8 |" in out  # 6.5 GPU-hours of extend / 8
    assert "| codetrain train (one node, Accelerate) | 4 GPU | 7.7 |" in out  # 30.7 / 4
    assert "| **total** | | **667.3** |" in out
    assert "  generate: 8 task(s), 1 GPU each" in out and "  fetch-real: 3 task(s), 0 GPU each" in out
    assert "phase 5" not in out  # --no-train: select, build, finish, validate
    assert run_script("pipelines/full_d3.py", ["--dry-run", "--nodes", "0"]) == 2
    assert "--nodes must be at least 1, got 0" in capsys.readouterr().err


def test_render_failed_reals_plans_every_record(tmp_path: Path) -> None:
    """The baseline that renders every selected record: about 2,050 GPU-hours more, all thrown away by assemble."""
    manifest = load_manifest(ROOT / "manifests" / "d3.yaml", output_root=tmp_path)
    table = load_throughput(ROOT / "manifests" / "throughput-h100.yaml")
    ours = make_plan(manifest, table)
    manifest.generate.render_failed_reals = True
    everything = make_plan(manifest, table)
    assert everything.hours("generate") == pytest.approx(ours.hours("generate") / table.download_yield)
    assert round(ours.gpu_hours, 1) == 5307.3 and round(everything.gpu_hours, 1) == 7359.2


def test_plan_hours_follow_the_throughput_table(tmp_path: Path) -> None:
    manifest = load_manifest(ROOT / "manifests" / "d3.yaml", output_root=tmp_path)
    table = load_throughput(ROOT / "manifests" / "throughput-h100.yaml")
    plan = make_plan(manifest, table)
    hours = {s.stage: s.gpu_hours for s in plan.stages}
    rendered = int(plan.records * table.download_yield)  # only records whose real image was fetched
    assert hours["generate sd14"] == pytest.approx(rendered * table.generators["sd14"].seconds_per_image / 3600)
    table.generators["sd14"].seconds_per_image *= 2
    assert make_plan(manifest, table).gpu_hours == pytest.approx(plan.gpu_hours + hours["generate sd14"])


def test_plan_uses_the_selected_count_once_select_ran(tmp_path: Path) -> None:
    from d3builder.embedded.photos import embedded_server
    from d3builder.stages.select import select_records

    manifest = load_manifest(ROOT / "manifests" / "tiny.yaml", output_root=tmp_path)
    with embedded_server() as base_url:
        stats = select_records(manifest, embedded_base_url=base_url, progress=False)
    table_file = tmp_path / "throughput.yaml"
    table_file.write_text(
        "gpu: test\ngenerators:\n" + "".join(f"  {g}: {{seconds_per_image: 0.1}}\n" for g in manifest.generators)
    )
    plan = make_plan(manifest, load_throughput(table_file))
    assert plan.records == stats.kept and plan.records_source == "selected"
    assert plan.shards == -(-stats.kept // manifest.shard_size)


def test_bad_throughput_table_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("gpu: x\ngenerators: {sd14: {seconds_per_image: fast}}\n")
    with pytest.raises(ConfigError, match="generators.sd14.seconds_per_image"):
        load_throughput(bad)
