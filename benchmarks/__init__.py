"""Benchmarks: each module runs as ``python -m benchmarks.<name>`` from the repository root and
prints one JSON line per figure (shared plumbing in :mod:`benchmarks.common`)."""
