"""Benchmarks: scripts that measure side by side in one run and append to BENCHMARKS.md."""
