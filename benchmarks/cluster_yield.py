"""Generated images that end in assembled shards, per generated image: ours (render only fetched reals) against
the render-everything baseline (`generate.render_failed_reals: true`), plus the plan's GPU-hours before and after.

The input is LAION-format metadata whose URLs point at the embedded photos served on 127.0.0.1, a quarter of
them (every fourth row) at names the server does not have (404), as link rot does to LAION today. Both runs do
select -> fetch-real -> generate (sd14-tiny) -> assemble in this one process on the same input; the figure is
rows of d3/ x generators / images the generate stage rendered. The plan's GPU-hours are those of
`manifests/d3.yaml` on `manifests/throughput-h100.yaml` (estimated H100 figures), each way.

    python benchmarks/cluster_yield.py [--records 64] [--missing-every 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from common import emit, machine

from d3builder.embedded.photos import embedded_server, metadata_table
from d3builder.generators.render import generate_shards
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.recipe.plan import load_throughput, make_plan
from d3builder.stages.assemble import assemble_dataset
from d3builder.stages.fetch_real import fetch_real
from d3builder.stages.select import select_records

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = "sd14-tiny"


def laion_input(path: Path, base_url: str, records: int, missing_every: int) -> int:
    """`records` LAION rows cycling over the embedded photos (distinct ids, `?copy=n` URLs), every
    `missing_every`-th pointing at a name the server does not have; returns how many URLs will 404."""
    photos = metadata_table(base_url).to_pylist()
    rows = []
    for n in range(records):
        row = dict(photos[n % len(photos)], SAMPLE_ID=2 * 10**12 + n)
        row["URL"] = f"{base_url}/missing-{n}.jpg" if n % missing_every == missing_every - 1 else f"{row['URL']}?copy={n}"
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=metadata_table(base_url).schema), path)
    return sum(n % missing_every == missing_every - 1 for n in range(records))


def build(root: Path, metadata: Path, render_failed_reals: bool) -> Manifest:
    """A recipe on the input: the tiny recipe's settings, one tiny generator, shards of 16."""
    recipe = yaml.safe_load((ROOT / "manifests" / "tiny.yaml").read_text())
    recipe.update(output_root=str(root / "data"), generators=[GENERATOR], registry=[str(ROOT / "manifests" / "generators.yaml")],
                  metadata={"source": str(metadata), "release": "cluster-yield-benchmark"},
                  extended={"registry": str(ROOT / "manifests" / "extended.yaml"), "generators": []})
    recipe["generate"]["render_failed_reals"] = render_failed_reals
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_manifest(root / "recipe.yaml")


def run(manifest: Manifest) -> dict[str, int]:
    """select -> fetch-real -> generate -> assemble; images rendered and images in the assembled shards."""
    select_records(manifest, progress=False)
    fetch_real(manifest, progress=False)
    generate_shards(manifest, GENERATOR, progress=False)
    assemble_dataset(manifest, progress=False)
    layout = manifest.layout
    rendered = sum(json.loads(Path(layout.stats("generate", k, GENERATOR)).read_text())["success"]
                   for k in layout.record_shards())
    assembled_rows = sum(pq.read_metadata(p).num_rows for p in Path(layout.d3_dir()).glob("*/*.parquet"))
    return {"selected": sum(pq.read_metadata(layout.records(k)).num_rows for k in layout.record_shards()),
            "rendered": rendered, "assembled": assembled_rows * len(manifest.generators)}


def plan_hours(render_failed_reals: bool) -> float:
    """The GPU-hours of manifests/d3.yaml's plan on the H100 throughput table."""
    with tempfile.TemporaryDirectory() as empty:
        manifest = load_manifest(ROOT / "manifests" / "d3.yaml", output_root=empty)
        manifest.generate.render_failed_reals = render_failed_reals
        return make_plan(manifest, load_throughput(ROOT / "manifests" / "throughput-h100.yaml")).gpu_hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--missing-every", type=int, default=4, help="every N-th URL answers 404 (default 4: 25%%)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp, embedded_server() as base_url:
        metadata = Path(tmp) / "laion.parquet"
        missing = laion_input(metadata, base_url, args.records, args.missing_every)
        print(f"input: {args.records} LAION rows, {missing} URLs answer 404")
        for name, everything in (("ours", False), ("baseline", True)):
            figures[name] = run(build(Path(tmp) / name, metadata, everything))
            f = figures[name]
            print(f"{name}: {f['selected']} selected, {f['rendered']} images generated, {f['assembled']} of them in "
                  f"assembled shards: {f['assembled'] / f['rendered']:.3f}")
    before, after = plan_hours(True), plan_hours(False)
    print(f"plan of manifests/d3.yaml (H100 estimates): {before:,.1f} GPU-hours rendering every record, "
          f"{after:,.1f} rendering fetched records only ({1 - after / before:.1%} less)")
    ours, base = figures["ours"], figures["baseline"]
    emit("cluster_yield", [
        {"case": "generated images in assembled shards / generated images (25% of URLs 404)",
         "ours": ours["assembled"] / ours["rendered"], "baseline": base["assembled"] / base["rendered"],
         "unit": "fraction", "target": ">= 0.98",
         "note": f"ours {ours['assembled']}/{ours['rendered']}, baseline {base['assembled']}/{base['rendered']}"},
        {"case": "plan GPU-hours, manifests/d3.yaml on H100 (estimates)", "ours": after, "baseline": before,
         "unit": "GPU-hours", "note": "baseline: generate.render_failed_reals: true"},
    ])


if __name__ == "__main__":
    main()
