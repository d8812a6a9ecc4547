"""`generate`: render one generator's image for every record, unit by unit (under Accelerate or as workers)."""

from __future__ import annotations

import argparse

from d3builder.core.commandline import UsageError
from d3builder.generators.registry import RegistryError
from d3builder.generators.render import generate_shards
from d3builder.recipe.cliargs import (
    add_manifest_args,
    add_speed_args,
    add_unit_args,
    manifest_from_args,
    report,
    speed_from_args,
)


def _run(args: argparse.Namespace) -> int:
    manifest = manifest_from_args(args)
    try:
        summary = generate_shards(manifest, args.generator, shards=args.shards, batch_size=args.batch_size,
                                  speed=speed_from_args(args), progress=args.progress,
                                  retry_failed=args.retry_failed, wait=args.wait)
    except (RegistryError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return report(summary)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `d3builder generate`."""
    parser = subparsers.add_parser(
        "generate",
        help="render one generator's image for every record into gen/{generator}/{k}.parquet",
        description="Render every records shard with one registry generator (batched by output size, seeded per "
        "record, encoded per the LAION mix) into gen/{g}/{k}.parquet with stats/generate/{g}/{k}.json. "
        "Resumable; failed batches are retried (halved after out-of-memory), failures are recorded per image "
        "and redone with --retry-failed. Any number of workers may share a generator (leases); under "
        "accelerate launch --multi_gpu --num_processes N each process takes a share of the shards.",
    )
    add_manifest_args(parser)
    parser.add_argument("--generator", "-g", required=True, help="registry entry name, e.g. sd14 or sd14-tiny")
    add_unit_args(parser, retry=True)
    add_speed_args(parser)
    parser.set_defaults(func=_run)
