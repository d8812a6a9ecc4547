"""Image generators: the registry, the runtime that loads and runs them, tiny offline twins, encodings."""
