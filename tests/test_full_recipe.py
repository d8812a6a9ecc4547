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
    assert "3,100,000 records" in out and "620 shards" in out
    units = {  # each shard cut into parts of at most 30 H100-minutes (5,000 images x seconds per image)
        "deepfloyd-if": "| 10,540 | 3,100,000 | 295 images, 30 GPU-min |",
        "sd14": "| 1,240 | 3,100,000 | 2,500 images, 21 GPU-min |",
        "sd21": "| 1,240 | 3,100,000 | 2,500 images, 21 GPU-min |",
        "sdxl": "| 3,100 | 3,100,000 | 1,000 images, 25 GPU-min |",
    }
    for name, row in units.items():
        assert f"| generate {name} {row}" in out
        assert "-m d3builder generate --manifest" in out and f"--generator {name}" in out
    assert "| fetch-real | 620 | 3,100,000 | 5,000 URLs |" in out
    assert "| **total** |" in out
    assert not list(tmp_path.iterdir()), "a dry run must not write anything"


def test_plan_hours_follow_the_throughput_table(tmp_path: Path) -> None:
    manifest = load_manifest(ROOT / "manifests" / "d3.yaml", output_root=tmp_path)
    table = load_throughput(ROOT / "manifests" / "throughput-h100.yaml")
    plan = make_plan(manifest, table)
    hours = {s.stage: s.gpu_hours for s in plan.stages}
    assert hours["generate sd14"] == pytest.approx(plan.records * table.generators["sd14"].seconds_per_image / 3600)
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
