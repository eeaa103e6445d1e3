"""GradSplit's routing: channel groups, the gradient-routing primitive, conflict statistics
(cosines between per-task gradients on each group) and the routing matrices made from them.
See the package docstring (`dymu_jax.methods.gradsplit`) for the method."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax.models import backbones

PyTree = Any


STATE_COLLECTION = "gradsplit"  # the model-state collection of the conflict statistics
MODES = ("activation", "weight")
ROUTINGS = ("learned", "fixed")
CRITERIA = ("module_mean", "module_frequency", "pooled")
# The default threshold of each criterion: a mean cosine >= 0.0 shares; a negative-cosine
# frequency <= 0.5 shares.
DEFAULT_MARGINS = {"module_mean": 0.0, "module_frequency": 0.5, "pooled": 0.0}
ROUTING_FILE = "gradsplit_routing.json"
HEATMAP_FILE = "gradsplit_routing.png"
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------
# Routing matrices and channel groups.


def parse_routing_matrix(text: str, num_tasks: int, name: str = "routing matrix") -> np.ndarray:
  """A routing matrix from text: rows separated by ';', entries by ',' ("1,0;1,1"), or one of
  the words "identity" (strict split) and "ones" (hard sharing).

  Raises:
    ValueError: one sentence, naming `name`, for a wrong shape, entries other than 0/1 or a 0 on
      the diagonal.
  """
  text = (text or "").strip().lower()
  if text == "identity":
    return np.eye(num_tasks, dtype=np.float32)
  if text == "ones":
    return np.ones((num_tasks, num_tasks), np.float32)
  rows = []
  for row in text.split(";"):
    try:
      rows.append([float(v) for v in row.split(",")])
    except ValueError:
      raise ValueError(f"{name} {text!r} must be rows of comma-separated 0/1 entries separated "
                       f"by ';' (1,0;0,1 for example), or 'identity' or 'ones'.") from None
  return validate_routing_matrix(rows, num_tasks, name)


def validate_routing_matrix(matrix, num_tasks: int, name: str = "routing matrix") -> np.ndarray:
  """`matrix` as a (T, T) float32 array of 0/1 with ones on the diagonal (see module doc)."""
  rows = [list(r) for r in matrix]
  example = ";".join(",".join("1" if i == j else "0" for j in range(num_tasks))
                     for i in range(num_tasks))
  lengths = sorted({len(r) for r in rows})
  if len(rows) != num_tasks or lengths != [num_tasks]:
    raise ValueError(f"{name} has {len(rows)} row(s) of {'/'.join(map(str, lengths))} "
                     f"entries; give {num_tasks} rows of {num_tasks} (row t: the tasks whose "
                     f"gradient group t takes), for example {example}.")
  array = np.asarray(rows, np.float64)
  bad = array[(array != 0) & (array != 1)]
  if bad.size:
    raise ValueError(f"{name} entries must be 0 or 1, got {bad[0]:g}.")
  zero = np.flatnonzero(np.diag(array) == 0)
  if zero.size:
    raise ValueError(f"{name} has 0 on its diagonal at row {int(zero[0])}; every group takes "
                     f"its own task's gradient, so the diagonal must be 1.")
  return array.astype(np.float32)


def group_boundaries(num_channels: int, sizes: Sequence[float], where: str = "a layer"
                     ) -> tuple[int, ...]:
  """Channel boundaries (T + 1 of them) of T groups with relative `sizes` over `num_channels`.

  Group t holds channels [b[t], b[t + 1]); boundaries are the rounded cumulative fractions.

  Raises:
    ValueError: a group would be empty (too few channels for the sizes).
  """
  cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(sizes, np.float64))])
  bounds = tuple(int(b) for b in np.round(cumulative / cumulative[-1] * num_channels))
  if any(hi <= lo for lo, hi in zip(bounds[:-1], bounds[1:])):
    raise ValueError(f"{where} has {num_channels} output channels, too few for {len(sizes)} "
                     f"non-empty groups of relative sizes {tuple(sizes)}; split fewer or wider "
                     f"stages, or change the group sizes.")
  return bounds


def group_assignment(num_channels: int, sizes: Sequence[float], where: str = "a layer"
                     ) -> np.ndarray:
  """(C, T) one-hot float32: row c marks the group of channel c."""
  bounds = group_boundaries(num_channels, sizes, where)
  groups = np.searchsorted(np.asarray(bounds[1:]), np.arange(num_channels), side="right")
  return np.eye(len(sizes), dtype=np.float32)[groups]


# ----------------------------------------------------------------------------------------------
# Stages of a backbone.


def stage_modules(encoder: nn.Module) -> tuple[tuple[str, ...], ...]:
  """Names of the encoder's direct submodules, per stage, in call order.

  A stage holds the layers whose widths follow that stage's multiplier (see `backbones`).
  Backbones outside the LeNet, ResNet and MobileNetV2 families provide `stage_modules()`.
  """
  own = getattr(encoder, "stage_modules", None)
  if callable(own):
    return tuple(tuple(s) for s in own())
  if isinstance(encoder, backbones.ResNet):
    return tuple((("stem_conv", "stem_bn") if s == 0 else ()) +
                 tuple(f"stage{s + 1}_block{b}" for b in range(n))
                 for s, n in enumerate(encoder.stage_sizes))
  if isinstance(encoder, backbones.MobileNetV2):
    _, blocks, _ = encoder._architecture()  # pylint: disable=protected-access
    stages = []
    for s in range(encoder.num_stages):
      names = tuple(f"block{k + 1}" for k, b in enumerate(blocks) if b["stage"] == s)
      if s == 0:
        names = ("stem_conv", "stem_bn") + names
      if s == encoder.num_stages - 1:
        names += ("last_conv", "last_bn")
      stages.append(names)
    return tuple(stages)
  if isinstance(encoder, backbones.LeNet):
    bn = encoder.batch_norm
    convs = tuple((f"conv{i + 1}",) + ((f"bn{i + 1}",) if bn else ())
                  for i in range(len(encoder.conv_channels)))
    return convs + (("fc",) + (("bn_fc",) if bn else ()),)
  raise ValueError(f"GradSplit does not know the stages of backbone {type(encoder).__name__}; "
                   f"give the class a stage_modules() method listing its submodule names per "
                   f"stage.")


# ----------------------------------------------------------------------------------------------
# The routing operation.


@jax.custom_vjp
def route_gradient(h: jax.Array, mask: jax.Array) -> jax.Array:
  """`h` forward; backward, the cotangent times `mask` (broadcast over the last axis of h).

  The gradient of `h * mask + stop_gradient(h * (1 - mask))` for a 0/1 mask, with a forward
  that does not read the mask (a batched mask leaves the forward unbatched under `vmap`).
  """
  del mask
  return h


def _route_fwd(h, mask):
  return h, mask


def _route_bwd(mask, cotangent):
  return cotangent * mask.astype(cotangent.dtype), jnp.zeros_like(mask)


route_gradient.defvjp(_route_fwd, _route_bwd)


def _owns_params(module: nn.Module) -> bool:
  params = module.variables.get("params", {}) if module.scope is not None else {}
  return any(hasattr(v, "shape") for v in params.values())


def _key_name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def module_names(split_tree: PyTree) -> tuple[str, ...]:
  """The split modules of a params-shaped tree of the split stages ({stage submodule: ...},
  leaves may carry a leading task axis): the paths ("stage2_block0/conv1") of the modules that
  own its leaves, in the tree's flattening order."""
  names = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(split_tree)[0]:
    names.setdefault("/".join(_key_name(k) for k in path[:-1]), None)
  return tuple(names)


def routing_interceptor(split_names: Mapping[str, int], columns: jax.Array,
                        sizes: Sequence[float], modules: Sequence[str] | None = None,
                        encoder_name: str = "encoder"):
  """A `flax.linen.intercept_methods` interceptor routing one task's gradient.

  Every layer that owns parameters, inside (or being) an encoder submodule named in
  `split_names`, has its output passed through `route_gradient` with the channel mask
  `assign @ column`. `columns` is M[:, s] (T,), the same for every layer, or M_k[:, s] per split
  module (K, T), row k for the module named `modules[k]` (see `module_names`).
  """
  index = {name: k for k, name in enumerate(modules or ())}
  if columns.ndim == 2 and len(index) != columns.shape[0]:
    raise ValueError(f"Got routing columns for {columns.shape[0]} split modules and "
                     f"{len(index)} module names; give one name per row.")

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    path = tuple(module.scope.path) if module.scope is not None else ()
    if (context.method_name != "__call__" or len(path) < 2 or path[0] != encoder_name
        or path[1] not in split_names or not hasattr(out, "shape") or not out.ndim
        or not _owns_params(module)):
      return out
    name = "/".join(path[1:])
    if columns.ndim == 2:
      if name not in index:
        raise ValueError(f"GradSplit has no routing for split layer {name}; its routing "
                         f"modules are {', '.join(index)}.")
      column = columns[index[name]]
    else:
      column = columns
    assign = group_assignment(out.shape[-1], sizes, "encoder/" + name)
    return route_gradient(out, jnp.asarray(assign) @ column.astype(jnp.float32))

  return interceptor


# ----------------------------------------------------------------------------------------------
# Conflict statistics.


def _leaf_dots(leaf: jax.Array, sizes: Sequence[float]) -> jax.Array:
  """[a, b, group]: <g_a, g_b> on each group's slice of a leaf with a leading task axis."""
  g = leaf.reshape(leaf.shape[0], -1, leaf.shape[-1]).astype(jnp.float32)
  assign = jnp.asarray(group_assignment(leaf.shape[-1], sizes))
  return jnp.einsum("anc,bnc,cu->abu", g, g, assign)


def _cosines_from_dots(dots: jax.Array) -> jax.Array:
  num_tasks = dots.shape[0]
  t = jnp.arange(num_tasks)
  on_group = dots[t, :, t]  # [t, s]: <g_t, g_s> on group t
  sq_norms = jnp.diagonal(dots, axis1=0, axis2=1).T  # [a, group]: |g_a|^2 on group
  denom = jnp.sqrt(sq_norms[t, t][:, None] * sq_norms[:, t].T)  # [t, s]
  return jnp.where(denom > _EPS, on_group / jnp.where(denom > _EPS, denom, 1.0), 0.0)


def group_cosines(split_grads: PyTree, sizes: Sequence[float]) -> jax.Array:
  """(T, T) cos(g_t, g_s) on group t's filters, from per-task gradients of the split layers.

  Args:
    split_grads: a pytree whose leaves have a leading task axis T; the last axis of every leaf
      is its filter (output channel) axis, split into groups with `sizes`.
    sizes: relative group sizes (T of them).

  Returns:
    C with C[t, s] = <g_t, g_s> / (|g_t| |g_s|) over the slices of group t of every leaf
    (pooled; 0 where a gradient is zero there).
  """
  return module_cosines(split_grads, sizes)[0]


def module_cosines(split_grads: PyTree, sizes: Sequence[float]
                   ) -> tuple[jax.Array, jax.Array]:
  """(pooled (T, T), per module (K, T, T)) group cosines of per-task split gradients.

  The pooled cosine is `group_cosines`' (every leaf together); module k's uses only the leaves
  of the k-th of `module_names(split_grads)`.
  """
  num_tasks = len(sizes)
  pooled = jnp.zeros((num_tasks, num_tasks, num_tasks), jnp.float32)  # [a, b, group]
  per_module = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(split_grads)[0]:
    dots = _leaf_dots(leaf, sizes)
    pooled = pooled + dots
    name = "/".join(_key_name(k) for k in path[:-1])
    per_module[name] = per_module[name] + dots if name in per_module else dots
  modules = [_cosines_from_dots(per_module[n]) for n in module_names(split_grads)]
  return (_cosines_from_dots(pooled),
          jnp.stack(modules) if modules else jnp.zeros((0, num_tasks, num_tasks), jnp.float32))


def routing_from_cosines(mean_cosine, margin: float = 0.0) -> jax.Array:
  """M[..., t, s] = 1 where the mean cosine on group t's filters is >= `margin`; diagonal 1.

  Works on one (T, T) matrix or a stack (K, T, T), one per module."""
  mean_cosine = jnp.asarray(mean_cosine)
  eye = jnp.eye(mean_cosine.shape[-1], dtype=bool)
  return ((mean_cosine >= margin) | eye).astype(jnp.float32)


def routing_from_frequencies(frequency, threshold: float = 0.5) -> jax.Array:
  """M[..., t, s] = 1 where the fraction of steps with a negative cosine on group t's filters
  is <= `threshold`; diagonal 1."""
  frequency = jnp.asarray(frequency)
  eye = jnp.eye(frequency.shape[-1], dtype=bool)
  return ((frequency <= threshold) | eye).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The method.



def check_margin(criterion: str, margin: float | None, name: str = "GradSplit margin") -> None:
  """Raises ValueError (one sentence naming `name`) for a margin outside its criterion's range:
  [-1, 1] for the mean-cosine criteria, [0, 1] for "module_frequency"."""
  if margin is None:
    return
  lo, what = ((0.0, "a fraction of warm-up steps") if criterion == "module_frequency"
              else (-1.0, "a cosine"))
  if not lo <= float(margin) <= 1.0:  # also stops NaN
    raise ValueError(f"{name}={margin:g} must lie in [{lo:g}, 1] with criterion {criterion!r} "
                     f"(it is {what}).")

