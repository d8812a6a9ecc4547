"""Dataset recipes: the manifest, its command-line arguments and the plan of a full build."""
