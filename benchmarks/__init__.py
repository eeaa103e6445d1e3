"""Benchmarks of dymu_jax: run each as `python -m benchmarks.<name>` from the repository root."""
