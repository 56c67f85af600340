"""Benchmarks for every stage (see bench/README.md). Run from the project root: python -m bench.<name>."""
