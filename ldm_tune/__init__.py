"""The `ldm-tune` command: one entry point for every room (train, scan, precompute, export, merge,
inspect, generate)."""
