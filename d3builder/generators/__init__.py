"""Image generators: the registry (four kinds), the diffusers runtime, one backend per kind, tiny offline twins,
the render engine and the output encodings."""
