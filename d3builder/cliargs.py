"""Arguments shared by the d3builder subcommands."""

from __future__ import annotations

import argparse

from .manifest import Manifest, load_manifest


def add_manifest_args(parser: argparse.ArgumentParser) -> None:
    """`--manifest M` and `--output-root DIR`."""
    parser.add_argument("--manifest", "-m", required=True, help="dataset recipe (YAML), e.g. manifests/tiny.yaml")
    parser.add_argument("--output-root", help="write under this folder instead of the manifest's output_root")


def manifest_from_args(args: argparse.Namespace) -> Manifest:
    """Load the manifest named on the command line (ConfigError names file and key)."""
    return load_manifest(args.manifest, output_root=args.output_root)
