"""Benchmarks that run the shipped code. Run them as modules from the repository root, e.g.
``python -m benchmarks.convergence --quick``."""
