"""Random variables with given shapes, filled by numpy: tests avoid compiling jax.random; and
fake torchvision checkpoints (`torchvision_state`)."""

from __future__ import annotations

import jax
import numpy as np

from dymu_jax.models import pretrained


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


def torchvision_state(name: str, variables, seed: int = 0) -> dict[str, np.ndarray]:
  """A fake torchvision state dict for `variables` of backbone `name` ("resnet18", "resnet34"
  or "mobilenet_v2", `pretrained.torchvision_layout`'s names and shapes): random values,
  positive running variances, and the parts a loader skips (the classifier, the
  `num_batches_tracked` counters)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, (_, shape) in pretrained.torchvision_layout(name, variables).items():
    value = rng.normal(size=shape).astype(np.float32)
    if key.endswith("running_var"):
      value = np.abs(value) + 0.5
    state[key] = value
    if key.endswith("running_var"):
      state[key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
  head = ("fc", 512) if name.startswith("resnet") else ("classifier.1", 1280)
  state[f"{head[0]}.weight"] = rng.normal(size=(1000, head[1])).astype(np.float32)
  state[f"{head[0]}.bias"] = np.zeros(1000, np.float32)
  return state
