"""Arguments shared by the d3builder subcommands."""

from __future__ import annotations

import argparse

from d3builder.generators.registry import DTYPES
from d3builder.generators.render import SpeedOptions
from d3builder.recipe.manifest import Manifest, load_manifest


def add_manifest_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--manifest M` and `--output-root DIR`."""
    parser.add_argument("--manifest", "-m", required=required, help="dataset recipe (YAML), e.g. manifests/tiny.yaml")
    parser.add_argument("--output-root", help="write under this folder instead of the manifest's output_root")


def manifest_from_args(args: argparse.Namespace) -> Manifest:
    """Load the manifest named on the command line (ConfigError names file and key)."""
    return load_manifest(args.manifest, output_root=args.output_root)


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """Batch size and the speed switches (documented defaults)."""
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
    return SpeedOptions(dtype=args.dtype, sdpa=args.sdpa, compile=args.compile, channels_last=args.channels_last,
                        vae_slicing=args.vae_slicing, vae_tiling=args.vae_tiling)
