"""The embedded LAION-format photo set and the loopback HTTP server that serves it."""
