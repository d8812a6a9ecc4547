"""`regenerate`: re-render stored records from their provenance and check the bytes against the stored ones.

Everything comes from what `generate` stored: the gen row (seed, size, prompts, steps, guidance, scheduler,
encoding) and the shard's stats (batch size, encoding mix and JPEG quality range, sampler configs, dtype and
speed switches, batches rendered other than planned). The image's batch is rebuilt from the stored rows
(`replay_batches`: the same plan, and the recorded re-batchings), because CPU and GPU kernels differ slightly
between batch sizes; on the same machine and versions the bytes then match.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d3builder.core.commandline import UsageError
from d3builder.generators.encoding import (
    Encoding,
    draw_encoding,
    encode_image,
    jpeg_quality_for,
)
from d3builder.generators.registry import Entry, GeneratorEntry, RegistryError
from d3builder.generators.render import (
    STAGE,
    Job,
    manifest_registry,
    registry_entry,
    replay_batches,
)
from d3builder.recipe.cliargs import add_manifest_args, manifest_from_args
from d3builder.recipe.manifest import Manifest
from d3builder.storage.layout import DataLayout, extension, shard_number
from d3builder.storage.store import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from d3builder.generators.runtime import LoadedGenerator

META_COLUMNS = ["id", "status", "seed", "width", "height", "prompt", "negative_prompt", "encoding",
                "num_inference_steps", "guidance_scale", "scheduler", "model", "model_revision"]
SWITCHES = ("sdpa", "compile", "channels_last", "vae_slicing", "vae_tiling")
COMPARED = ("revision", "scheduler", "scheduler_config", "dtype", "steps", "guidance", "call_kwargs")


@dataclass
class Regenerated:
    """One re-rendered record: where it was written and whether its bytes equal the stored ones."""

    id: str
    shard: int | None = None
    path: Path | None = None
    encoding: str | None = None
    stored_sha256: str | None = None
    sha256: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def match(self) -> bool:
        """True when both images exist and their bytes are identical."""
        return self.sha256 is not None and self.sha256 == self.stored_sha256


def file_stem(record_id: str) -> str:
    """A safe file name stem for a record id (a hash suffix when characters had to be replaced)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", record_id).lstrip(".")[:100] or "_"
    if stem != record_id:
        stem += "-" + hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:10]
    return stem


def locate(layout: DataLayout, generator: str, ids: Sequence[str]) -> dict[str, int]:
    """The gen shard number holding each id (ids not found are left out)."""
    wanted, found = set(ids), {}
    folder = layout.gen(generator, 0).parent
    for path in layout.store.glob(folder / "[0-9]*.parquet"):
        for record in layout.store.read_table(path, columns=["id"]).column("id").to_pylist():
            if record in wanted and record not in found:
                found[record] = shard_number(path)
    return found


def stored_entry(entry: GeneratorEntry, provenance: dict[str, Any]) -> GeneratorEntry:
    """The registry entry with the sampler settings stored in the shard's provenance."""
    stages = tuple(
        dataclasses.replace(spec, steps=p["steps"], guidance=p["guidance"], scheduler=p["scheduler"],
                            call_kwargs=dict(p["call_kwargs"]))
        for spec, p in zip(entry.stages, provenance.get("stages", []), strict=False)
    )
    return dataclasses.replace(entry, steps=provenance["steps"], guidance=provenance["guidance"],
                               scheduler=provenance["scheduler"], call_kwargs=dict(provenance["call_kwargs"]),
                               stages=stages or entry.stages)


def _differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Provenance fields (base and stages) that differ between the stored run and this one."""
    notes = [f"{key}: stored {stored.get(key)!r}, now {now.get(key)!r}"
             for key in (*COMPARED, *SWITCHES, "diffusers", "torch", "transformers") if stored.get(key) != now.get(key)]
    for index, (old, new) in enumerate(zip(stored.get("stages", []), now.get("stages", []), strict=False)):
        notes += [f"stages[{index}].{key}: stored {old.get(key)!r}, now {new.get(key)!r}"
                  for key in COMPARED if old.get(key) != new.get(key)]
    return notes


class _Renderer:
    """Loads the generator once per distinct stored configuration, on `device` (default: CUDA when available)."""

    def __init__(self, entry: GeneratorEntry, device: str | torch.device | None) -> None:
        import torch  # the model stack loads with the renderer, not when the command line starts

        self.entry, self.device = entry, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache: dict[str, LoadedGenerator] = {}

    def get(self, provenance: dict[str, Any]) -> LoadedGenerator:
        entry = stored_entry(self.entry, provenance)
        dtype = provenance["dtype"] if provenance["dtype"] != entry.dtype else None
        options = {k: bool(provenance.get(k, k == "sdpa")) for k in SWITCHES}
        key = repr((entry, dtype, options))
        if key not in self.cache:
            from d3builder.generators.runtime import load_generator

            self.cache[key] = load_generator(entry, self.device, dtype=dtype, **options)
        return self.cache[key]


def _regenerate_shard(manifest: Manifest, renderer: _Renderer, shard: int, ids: list[str],
                      out_dir: Path) -> list[Regenerated]:
    """Re-render the requested ids of one gen shard, batch by stored batch."""
    layout, name = manifest.layout, renderer.entry.name
    store = layout.store
    stats = store.read_json(layout.stats(STAGE, shard, name))
    path = layout.gen(name, shard)
    rows = store.read_table(path, columns=META_COLUMNS).to_pylist()
    images = store.read_table(path, columns=["image"]).column("image").to_pylist()
    stored = {r["id"]: cell for r, cell in zip(rows, images, strict=True)}
    by_id = {r["id"]: r for r in rows}
    results = {i: Regenerated(i, shard) for i in ids}
    provenance = stats.get("provenance")
    if not provenance:
        for result in results.values():
            result.error = f"{layout.url(layout.stats(STAGE, shard, name))}: no provenance stored"
        return list(results.values())
    loaded = renderer.get(provenance)
    notes = _differences(provenance, loaded.provenance())
    jobs = [Job(r["id"], r["prompt"], r["negative_prompt"], r["seed"], r["width"], r["height"]) for r in rows]
    for batch, owns in replay_batches(jobs, stats["batch_size"], stats.get("rebatched", []), stats.get("added", [])):
        if not any(j.id in results for j in batch if j.id in owns):
            continue
        rendered = loaded.generate([j.prompt for j in batch], [j.negative_prompt for j in batch],
                                   batch[0].width, batch[0].height, [j.seed for j in batch])
        for job, image in zip(batch, rendered, strict=True):
            if job.id not in results or job.id not in owns:
                continue
            result, row = results[job.id], by_id[job.id]
            result.notes = list(notes)
            cell = stored[job.id]
            if cell is not None and cell.get("bytes") is not None:
                result.stored_sha256 = hashlib.sha256(cell["bytes"]).hexdigest()
            else:
                result.notes.append(f"no stored image (status {row['status']})")
            drawn = draw_encoding(job.id, name, job.seed, stats["encoding_mix"], stats["jpeg_quality"])
            if row["encoding"] is not None and drawn.format != row["encoding"]:
                result.notes.append(f"stored encoding {row['encoding']} is not the one drawn ({drawn.format})")
            fmt = row["encoding"] or drawn.format
            quality = jpeg_quality_for(job.id, name, job.seed, stats["jpeg_quality"]) if fmt == "JPEG" else None
            result.encoding = fmt
            if image.image is None:
                result.error = image.error
                continue
            data = encode_image(image.image, Encoding(fmt, quality))
            result.sha256 = hashlib.sha256(data).hexdigest()
            result.path = atomic_write_bytes(out_dir / f"{file_stem(job.id)}.{extension(fmt)}", data)
    return list(results.values())


def regenerate(
    manifest: Manifest,
    generator_name: str,
    ids: Sequence[str],
    *,
    out_dir: str | Path | None = None,
    registry: dict[str, Entry] | None = None,
    device: str | torch.device | None = None,
) -> list[Regenerated]:
    """Re-render records `ids` of one generator from their stored provenance into `out_dir`, in input order.

    `out_dir` defaults to DATA/regenerated/{generator}; `device` to CUDA when available."""
    registry = manifest_registry(manifest) if registry is None else registry
    entry = registry_entry(registry, generator_name)
    if not isinstance(entry, GeneratorEntry):
        raise RegistryError(f"{entry.source}: entry '{entry.name}': key 'kind': regenerate re-renders diffusers "
                            f"pipelines from their provenance, not a {entry.kind} generator")
    layout = manifest.layout
    if out_dir is None and not layout.store.local:
        raise UsageError(f"{layout.url(layout.root)} is not a local folder: pass --out-dir for the regenerated files")
    out = Path(out_dir) if out_dir is not None else Path(layout.root) / "regenerated" / entry.name
    ids = list(dict.fromkeys(ids))
    where = locate(layout, entry.name, ids)
    results = {i: Regenerated(i, error=f"not found in {layout.url(layout.gen(entry.name, 0).parent)}")
               for i in ids if i not in where}
    renderer = _Renderer(entry, device)
    for shard in sorted(set(where.values())):
        wanted = [i for i in ids if where.get(i) == shard]
        results.update({r.id: r for r in _regenerate_shard(manifest, renderer, shard, wanted, out)})
    return [results[i] for i in ids]


def _run(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    try:
        results = regenerate(manifest, args.generator, args.ids, out_dir=args.out_dir)
    except RegistryError as exc:
        raise UsageError(str(exc)) from exc
    for result in results:
        if result.error is not None:
            print(f"{result.id}: FAILED: {result.error}")
        elif result.match:
            print(f"{result.id}: {result.path}: bytes match the stored image ({result.encoding})")
        else:
            print(f"{result.id}: {result.path}: bytes DIFFER from the stored image "
                  f"(stored {result.stored_sha256}, now {result.sha256})")
        for note in result.notes:
            print(f"  note: {note}")
    return 0 if all(r.match for r in results) else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder regenerate`."""
    parser = subparsers.add_parser(
        "regenerate",
        help="re-render stored records from their provenance and compare the bytes",
        description="Re-render records of gen/{generator}/ from their stored seed, size, prompts, sampler, "
        "encoding and JPEG quality (rebuilding each image's original batch), write them to --out-dir (files named "
        "by sanitised id) and report whether the bytes equal the stored ones. Exit 1 if any differ.",
    )
    add_manifest_args(parser)
    parser.add_argument("--generator", "-g", required=True, help="registry entry name")
    parser.add_argument("--out-dir", help="local folder for the regenerated files (default: DATA/regenerated/{generator})")
    parser.add_argument("ids", nargs="+", metavar="ID", help="record ids")
    parser.set_defaults(func=_run)
