"""The project's benchmarks; run them from the repository root, e.g.
``python -m benchmarks.overhead``."""
