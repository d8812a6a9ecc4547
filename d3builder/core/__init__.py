"""Shared plumbing of both command lines: typed YAML configuration and the command-line shell."""
