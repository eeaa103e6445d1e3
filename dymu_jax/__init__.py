"""dymu_jax: controllable multi-task learning in JAX/Flax (DYMU, ECMT, GradSplit)."""

__version__ = "0.1.0"
