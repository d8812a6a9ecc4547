"""Arguments shared by the d3builder subcommands: one spelling and one meaning per flag.

Generator modules (diffusers, torch) are imported only by the commands that render, so that the others
(select, assemble, status, ...) start fast."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from d3builder.core.commandline import shard_list
from d3builder.recipe.manifest import Manifest, load_manifest
from d3builder.storage.runner import ExitCode, RunSummary

if TYPE_CHECKING:
    from d3builder.generators.render import SpeedOptions


def add_manifest_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--manifest M` and `--output-root DIR_OR_URL`."""
    parser.add_argument("--manifest", "-m", required=required, help="dataset recipe (YAML), e.g. manifests/tiny.yaml")
    parser.add_argument("--output-root", help="write under this folder or storage URL (s3://, gs://, file://, "
                        "memory://) instead of the manifest's output_root")


def manifest_from_args(args: argparse.Namespace) -> Manifest:
    """Load the manifest named on the command line (ConfigError names file and key)."""
    return load_manifest(args.manifest, output_root=args.output_root)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """`--no-progress`."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (logs, CI)")


def add_unit_args(parser: argparse.ArgumentParser, retry: bool = False) -> None:
    """The unit runner's flags: `--shards`, `--no-wait`, `--no-progress` (and `--retry-failed`)."""
    parser.add_argument("--shards", type=shard_list, metavar="LIST",
                        help="only these shard numbers, e.g. 0,3,7 or 0-9 (default: every records shard)")
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="do not wait for units other live owners hold: leave them and exit 3")
    if retry:
        parser.add_argument("--retry-failed", action="store_true",
                            help="also redo the failed records of done units and merge them in")
    add_progress_arg(parser)


def report(*summaries: RunSummary) -> int:
    """Print each summary; returns the exit code of them all."""
    for summary in summaries:
        print(summary.describe(), flush=True)
    return int(ExitCode.worst(s.exit_code for s in summaries))


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """Batch size and the speed switches (documented defaults)."""
    from d3builder.generators.registry import DTYPES

    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default: the manifest's generate.batch_size)")
    parser.add_argument("--dtype", choices=DTYPES, help="override every stage's dtype (default: the registry entry's)")
    parser.add_argument("--no-sdpa", dest="sdpa", action="store_false",
                        help="classic attention instead of torch scaled_dot_product_attention (default: SDPA on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (default: off)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last UNet and VAE (default: off)")
    parser.add_argument("--vae-slicing", action="store_true", help="decode the batch one image at a time (default: off)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles, for large images (default: off)")


def speed_from_args(args: argparse.Namespace) -> SpeedOptions:
    """SpeedOptions from the parsed flags."""
    from d3builder.generators.render import SpeedOptions

    return SpeedOptions(dtype=args.dtype, sdpa=args.sdpa, compile=args.compile, channels_last=args.channels_last,
                        vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling)
