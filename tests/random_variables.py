"""Random variables with given shapes, filled by numpy: tests avoid compiling jax.random."""

from __future__ import annotations

import jax
import numpy as np


def fill(shapes, seed: int = 0, other_scale: float = 0.2):
  """A pytree of float32 device arrays with the shapes of `shapes` (e.g. from eval_shape).

  Kernels are He-scaled normals, batch-norm scales and variances lie in [0.5, 1.5], every
  other leaf is normal times `other_scale`.
  """
  rng = np.random.default_rng(seed)

  def fill_leaf(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "kernel":
      value = rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    else:
      value = rng.normal(size=leaf.shape) * other_scale
    return jax.device_put(value.astype(np.float32))

  return jax.tree_util.tree_map_with_path(fill_leaf, shapes)
