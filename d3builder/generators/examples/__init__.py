"""Example generators for the registry's non-diffusers kinds (used by the tests and the README)."""
