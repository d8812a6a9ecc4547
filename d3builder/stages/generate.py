"""`generate`: render one generator's image for every record, shard by shard, under Accelerate."""

from __future__ import annotations

import argparse

from d3builder.generators.registry import RegistryError
from d3builder.generators.render import generate_shards, print_summary
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_speed_args,
    manifest_from_args,
    speed_from_args,
)


def _run(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    try:
        summary = generate_shards(manifest, args.generator, shards=args.shards, batch_size=args.batch_size,
                                  speed=speed_from_args(args))
    except (RegistryError, ValueError) as exc:
        print(f"d3builder generate: {exc}", flush=True)
        return 2
    print_summary(summary)
    return 0 if summary.complete else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder generate`."""
    parser = subparsers.add_parser(
        "generate",
        help="render one generator's image for every record into gen/{generator}/{k}.parquet",
        description="Render every records shard with one registry generator (batched by output size, seeded per "
        "record, encoded per the LAION mix) into gen/{g}/{k}.parquet with stats/generate/{g}/{k}.json. "
        "Resumable; failures are recorded per image. Distributed: accelerate launch --multi_gpu "
        "--num_processes N -m d3builder generate ...",
    )
    add_manifest_args(parser)
    parser.add_argument("--generator", "-g", required=True, help="registry entry name, e.g. sd14 or sd14-tiny")
    parser.add_argument("--shards", type=int, nargs="+", help="only these records shard numbers (default: all)")
    add_speed_args(parser)
    parser.set_defaults(func=_run)
