"""GradSplit: per-task gradient routing over channel groups of the last encoder stages.

METHODS.md section 3. The network is the hard-sharing `MultiTaskNet` (so inference costs the
same as `static`); only the backward pass differs. In the last `split_stages` stages of the
encoder, the output channels of every layer are split into T groups, one per task (relative
sizes `group_sizes`, equal by default). A routing matrix M (T x T) decides which task's gradient
reaches which group:

    M[t, s] = 1  <=>  group t takes task s's gradient;   M[t, t] = 1 always.

M = identity is the strictest split, M all ones is plain hard sharing; M may be asymmetric.

Split modules: every layer that owns parameters (convolution, batch norm, dense) inside the
split stages, named by its path below the encoder ("stage2_block0/bn2"; `split_modules`, in the
order of the params tree). Each split module k has its own routing matrix M_k (K x T x T in all):
group t of module k's output channels takes task s's gradient iff M_k[t, s] = 1. With routing
"fixed" or criterion "pooled" every M_k is the same M. (A layer that is itself a direct encoder
submodule of a split stage, such as LeNet's `fc` and `bn_fc`, is a split module too.)

Routing modes:

* "activation" (default): for task s's loss the output h of split module k is replaced by
  `h * m_ks + stop_gradient(h * (1 - m_ks))`, m_ks the channel mask of module k's groups with
  M_k[:, s] = 1. `route_gradient` is that operation written as a custom VJP (identity forward,
  cotangent times m_ks backward): same value, same gradient, but its forward does not depend
  on the mask, so the T per-task gradients share one forward pass (XLA merges the identical
  forward computations) and differ only in their backward passes. Every split module is routed,
  not just the stage output, so with M_k[t, s] = 0 task s leaves exactly zero gradient on group
  t's filters of module k (a zero cotangent on a channel also stops at the layers below it in
  the same stage), while the layers below the split still receive every task's gradient.
* "weight": the split modules' weight gradients are masked per task and module (filter = last
  axis of a kernel, bias or batch-norm scale; mask of module k from M_k); activation gradients
  flow unchanged.

Routing source:

* "learned" (default): during the first `warmup_steps` steps every M_k is all ones (hard
  sharing) while conflict statistics accumulate in the non-param collection "gradsplit" of the
  model state, for each split module k and pooled over all of them: the sum of
  cos(g_t, g_s) on group t's filters (g_t: task t's gradient restricted to group t's filters,
  i.e. to the slice of the last axis of the module's parameters) and the number of steps where
  that cosine is negative. From then on M is frozen (the statistics stop at the end of the
  warm-up) and set by `criterion` with threshold `margin`:

  - "module_mean" (default) [ours]: M_k[t, s] = 1 iff module k's running mean cosine on group t
    is >= margin (default 0.0);
  - "module_frequency" [ours]: M_k[t, s] = 1 iff the fraction of warm-up steps with a negative
    cosine on module k's group t is <= margin (default 0.5: split where most steps conflict);
  - "pooled" [ours, the first version]: one M from the cosine pooled over every split parameter,
    M[t, s] = 1 iff its running mean is >= margin (default 0.0), the same for every module.
    Measured on UTKFace and the synthetic scenes, the pooled mean came out slightly positive for
    every pair (the large aligned kernels dominate), so M was all ones, while single steps and
    single modules (the stage's last batch norm) conflicted: hence the per-module default.

  The diagonal is always 1. The switch is a `jnp.where` on the step inside the one compiled
  train step; the statistics have fixed shapes, so no criterion recompiles it.
* "fixed": M is given (`routing_matrix`), the same for every module, and used from the first
  step; no statistics.

Logged every step: "gradsplit/M_<t>_<s>", the fraction of split modules whose group t takes task
s's gradient (M[t, s] itself when every module has the same M), and "gradsplit/cos_<t>_<s>", the
pooled running mean cosine. `GradSplitMethod.save_routing` writes the routing (JSON: per-module M,
mean cosines and conflict frequencies, and the pooled ones for reference) and its heat maps (PNG)
to a folder.

Stages: a stage is the set of the encoder's direct submodules whose widths follow that stage's
multiplier (`stage_modules`; known for the LeNet, ResNet and MobileNetV2 families, or given by a
backbone's own `stage_modules()` method).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import execution
from dymu_jax import files as files_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.methods import options as options_lib
from dymu_jax.methods.static import weighted_task_loss
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


@dataclasses.dataclass(frozen=True)
class GradSplitMethod(base.MethodBase):
  """GradSplit on a hard-sharing network (see the module docstring).

  Attributes:
    tasks: the tasks, in the order of the routing matrix's rows and columns.
    model: a `MultiTaskNet` (encoder variables under "encoder").
    task_weights: loss weight of each task (default 1 each).
    split_stages: how many of the last encoder stages are split (1 .. number of stages).
    group_sizes: relative sizes of the T channel groups (default equal).
    routing: "learned" (conflict estimate on the warm-up) or "fixed" (`routing_matrix`).
    routing_matrix: the fixed M as a tuple of T rows (routing "fixed" only).
    warmup_steps: steps of hard sharing that estimate the conflicts (routing "learned").
    mode: "activation" (route activation gradients) or "weight" (mask weight gradients only).
    criterion: how a learned routing reads the statistics: "module_mean" (default),
      "module_frequency" or "pooled" (see the module docstring).
    margin: the criterion's threshold (routing "learned" only): the least mean cosine that
      shares (means, in [-1, 1]) or the largest negative-cosine frequency that shares
      ("module_frequency", in [0, 1]); None = `DEFAULT_MARGINS[criterion]`.
    name: the method name in logs.
    axis_name: the pmap axis the model's batch norms pool over (see `methods.base`).
  """

  tasks: tuple[tasks_lib.Task, ...]
  model: nn.Module
  task_weights: tuple[float, ...] | None = None
  split_stages: int = 1
  group_sizes: tuple[float, ...] | None = None
  routing: str = "learned"
  routing_matrix: tuple[tuple[float, ...], ...] | None = None
  warmup_steps: int = 100
  mode: str = "activation"
  criterion: str = "module_mean"
  margin: float | None = None
  name: str = "gradsplit"
  axis_name: str | None = None

  def __post_init__(self):
    num_tasks = len(self.tasks)
    if self.task_weights is not None and len(self.task_weights) != num_tasks:
      raise ValueError(f"Got {len(self.task_weights)} task weights for {num_tasks} tasks; give "
                       f"one weight per task.")
    if self.mode not in MODES:
      raise ValueError(f"GradSplit mode {self.mode!r} is unknown; use one of "
                       f"{', '.join(MODES)}.")
    if self.routing not in ROUTINGS:
      raise ValueError(f"GradSplit routing {self.routing!r} is unknown; use one of "
                       f"{', '.join(ROUTINGS)}.")
    if self.criterion not in CRITERIA:
      raise ValueError(f"GradSplit criterion {self.criterion!r} is unknown; use one of "
                       f"{', '.join(CRITERIA)}.")
    num_stages = self.model.num_stages
    if not 1 <= self.split_stages <= num_stages:
      raise ValueError(f"GradSplit split_stages={self.split_stages} must lie in 1..{num_stages} "
                       f"(the encoder's {num_stages} stages).")
    if self.group_sizes is not None:
      if len(self.group_sizes) != num_tasks or min(self.group_sizes) <= 0:
        raise ValueError(f"GradSplit group sizes {tuple(self.group_sizes)} must be {num_tasks} "
                         f"positive numbers, one per task.")
    if self.routing == "fixed":
      if self.routing_matrix is None:
        raise ValueError("GradSplit routing 'fixed' needs a routing matrix, such as 'identity'.")
      validate_routing_matrix(self.routing_matrix, num_tasks)
      if self.margin is not None:
        raise ValueError("A GradSplit margin is only used with routing 'learned'; drop it or set "
                         "routing to 'learned'.")
    else:
      if self.routing_matrix is not None:
        raise ValueError("A GradSplit routing matrix is only used with routing 'fixed'; drop it "
                         "or set routing to 'fixed'.")
      if self.warmup_steps < 1:
        raise ValueError(f"GradSplit warm-up of {self.warmup_steps} steps leaves no step to "
                         f"estimate the conflicts with routing 'learned'; give at least 1 or use "
                         f"routing 'fixed'.")
      check_margin(self.criterion, self.margin)

  # -- structure -------------------------------------------------------------------------------

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def sizes(self) -> tuple[float, ...]:
    return tuple(float(s) for s in (self.group_sizes or (1.0,) * self.num_tasks))

  @property
  def threshold(self) -> float:
    """The criterion's threshold in use (`margin`, or the criterion's default)."""
    return float(DEFAULT_MARGINS[self.criterion] if self.margin is None else self.margin)

  @property
  def backward_passes(self) -> int:
    """Backward passes per training step (one per task; `experiments.evaluate` cost)."""
    return self.num_tasks

  def split_names(self) -> dict[str, int]:
    """{encoder submodule name: stage index} of the split stages."""
    stages = stage_modules(self.model.make_encoder())
    first = len(stages) - self.split_stages
    return {name: s for s in range(first, len(stages)) for name in stages[s]}

  def split_params(self, tree: PyTree) -> dict:
    """The part of a params-shaped tree (leaves may carry a leading task axis) that is split."""
    encoder = tree["encoder"]
    return {name: encoder[name] for name in self.split_names() if name in encoder}

  def split_modules(self, tree: PyTree) -> tuple[str, ...]:
    """The split modules (layers owning split parameters) of a params-shaped tree, in the
    order of the per-module statistics and routing matrices ("stage2_block0/conv1", ...)."""
    return module_names(self.split_params(tree))

  def _replace_split(self, tree: PyTree, split: Mapping[str, PyTree]) -> dict:
    encoder = dict(tree["encoder"])
    encoder.update(split)
    return {**tree, "encoder": encoder}

  def _weights(self) -> jax.Array:
    return jnp.asarray(self.task_weights or (1.0,) * self.num_tasks, jnp.float32)

  def module_matrices(self, matrix, num_modules: int) -> jax.Array:
    """(K, T, T) per-module routing from one M (T, T), used for every module, or from K of
    them."""
    matrix = jnp.asarray(matrix, jnp.float32)
    shape = (self.num_tasks, self.num_tasks)
    if matrix.shape == shape:
      return jnp.broadcast_to(matrix, (num_modules, *shape))
    if matrix.shape != (num_modules, *shape):
      raise ValueError(f"GradSplit routing of shape {matrix.shape} fits neither one {shape} "
                       f"matrix nor one per split module ({num_modules}).")
    return matrix

  # -- routing state ---------------------------------------------------------------------------

  def initial_statistics(self, params: PyTree) -> dict:
    """Zero conflict statistics for the split modules of `params` (a params-shaped tree).

    "cos_sum" / "neg_count" (T, T): the pooled cosines' sum and count of negative ones over the
    warm-up; "module_cos_sum" / "module_neg_count" (K, T, T): the same per split module (order
    of `split_modules`); "count": warm-up steps seen.
    """
    shape = (self.num_tasks, self.num_tasks)
    num_modules = len(self.split_modules(params))
    return {"cos_sum": jnp.zeros(shape, jnp.float32),
            "neg_count": jnp.zeros(shape, jnp.int32),
            "module_cos_sum": jnp.zeros((num_modules, *shape), jnp.float32),
            "module_neg_count": jnp.zeros((num_modules, *shape), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}

  def accumulate(self, statistics: Mapping[str, jax.Array], split_grads: PyTree,
                 in_warmup: jax.Array) -> dict:
    """`statistics` plus one step's group cosines of the per-task `split_grads` (leading task
    axis), where `in_warmup` (a boolean scalar) holds."""
    pooled, modules = module_cosines(split_grads, self.sizes)
    in_warmup = jnp.asarray(in_warmup, bool)
    negative = lambda c: (in_warmup & (c < 0)).astype(jnp.int32)
    return {"cos_sum": statistics["cos_sum"] + jnp.where(in_warmup, pooled, 0.0),
            "neg_count": statistics["neg_count"] + negative(pooled),
            "module_cos_sum": statistics["module_cos_sum"] + jnp.where(in_warmup, modules, 0.0),
            "module_neg_count": statistics["module_neg_count"] + negative(modules),
            "count": statistics["count"] + in_warmup.astype(jnp.int32)}

  def _count(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.maximum(jnp.asarray(statistics["count"]), 1).astype(jnp.float32)

  def mean_cosine(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T) running mean of the pooled cosines."""
    return jnp.asarray(statistics["cos_sum"]) / self._count(statistics)

  def module_mean_cosine(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T) running mean cosine per split module."""
    return jnp.asarray(statistics["module_cos_sum"]) / self._count(statistics)

  def conflict_frequency(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T) fraction of warm-up steps whose pooled cosine was negative."""
    return jnp.asarray(statistics["neg_count"]).astype(jnp.float32) / self._count(statistics)

  def module_conflict_frequency(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T) fraction of warm-up steps with a negative cosine, per split module."""
    return (jnp.asarray(statistics["module_neg_count"]).astype(jnp.float32)
            / self._count(statistics))

  def pooled_matrix(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T): the criterion's rule on the pooled statistics (the routing of "pooled", for the
    others a reference); the fixed M with routing "fixed"."""
    if self.routing == "fixed":
      return jnp.asarray(validate_routing_matrix(self.routing_matrix, self.num_tasks))
    if self.criterion == "module_frequency":
      return routing_from_frequencies(self.conflict_frequency(statistics), self.threshold)
    return routing_from_cosines(self.mean_cosine(statistics), self.threshold)

  def learned_matrices(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T): the per-module M that holds after the warm-up (all ones before any
    statistic)."""
    num_modules = jnp.shape(statistics["module_cos_sum"])[0]
    if self.routing == "fixed" or self.criterion == "pooled":
      return self.module_matrices(self.pooled_matrix(statistics), num_modules)
    if self.criterion == "module_frequency":
      return routing_from_frequencies(self.module_conflict_frequency(statistics),
                                      self.threshold)
    return routing_from_cosines(self.module_mean_cosine(statistics), self.threshold)

  def matrices_at(self, statistics: Mapping[str, jax.Array], step: jax.Array) -> jax.Array:
    """(K, T, T): the per-module M in use at `step` (all ones during a learned routing's
    warm-up, then frozen)."""
    learned = self.learned_matrices(statistics)
    if self.routing == "fixed":
      return learned
    return jnp.where(step < self.warmup_steps, jnp.ones_like(learned), learned)

  # -- Method interface ------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    variables = self.model.init(rng, batch["image"], train=False)
    for name, sub in self.split_params(variables["params"]).items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        where = "encoder/" + name + "/" + "/".join(_key_name(k) for k in path)
        group_boundaries(leaf.shape[-1], self.sizes, where)  # raises on an empty group
    return {**variables, STATE_COLLECTION: self.initial_statistics(variables["params"])}

  def _model_state(self, model_state: Mapping[str, PyTree]) -> dict:
    return {k: v for k, v in model_state.items() if k != STATE_COLLECTION}

  def deployed_variables(self, variables):
    """The hard-shared network's variables, without the routing statistics."""
    return self._model_state(variables)

  def task_losses(self, params, model_state, batch, columns: jax.Array | None = None
                  ) -> tuple[jax.Array, dict]:
    """(the T task losses, updated model collections), in training mode.

    With `columns` (activation mode), the split layers route task s's gradient: M[:, s] (T,)
    for every split module, or M_k[:, s] per split module (K, T; order of `split_modules`).
    """
    variables = {"params": params, **self._model_state(model_state)}

    def apply():
      return self.model.apply(variables, batch["image"], train=True,
                              mutable=list(self._model_state(model_state)))

    if columns is None:
      outputs, new_state = apply()
    else:
      interceptor = routing_interceptor(self.split_names(), jnp.asarray(columns), self.sizes,
                                        self.split_modules(params))
      with nn.intercept_methods(interceptor):
        outputs, new_state = apply()
    losses = jnp.stack([t.loss(outputs[t.name], batch[t.name]) for t in self.tasks])
    return losses, dict(new_state)

  def loss(self, params, model_state, batch, rng, step):
    """The weighted task loss (hard sharing; the routed gradient comes from `loss_and_grad`)."""
    del rng, step
    variables = {"params": params, **self._model_state(model_state)}
    outputs, new_state = self.model.apply(variables, batch["image"], train=True,
                                          mutable=list(self._model_state(model_state)))
    total, aux = weighted_task_loss(self.tasks, outputs, batch, self.task_weights)
    return total, (aux, {**model_state, **new_state})

  def per_task_grads(self, params, model_state, batch, matrix: jax.Array):
    """(per-task gradients with a leading task axis, task losses, updated model collections).

    Gradients are routed (activation mode) or masked (weight mode) by `matrix`: one M (T, T)
    for every split module, or one M_k per split module (K, T, T; order of `split_modules`).
    The T backward passes run as `execution.choices().passes` says. Unrolled (one
    `jax.grad` per task, the CPU default): their forward passes are the same computation,
    which XLA merges into one, and unbatched convolution gradients run about twice as fast on
    CPU as the batched ones a `vmap` over tasks makes. Vmapped (the accelerator default): one
    batched program; the forward stays unbatched where the routing columns do not enter it.
    """
    num_tasks = self.num_tasks
    route = self.mode == "activation"
    modules = self.split_modules(params)
    matrices = self.module_matrices(matrix, len(modules))

    def one_task(columns, onehot):
      def task_loss(p):
        losses, new_state = self.task_losses(p, model_state, batch,
                                             columns if route else None)
        return jnp.dot(losses, onehot), (losses, new_state)

      grads, (losses, new_state) = jax.grad(task_loss, has_aux=True)(params)
      return grads, losses, new_state

    onehots = jnp.eye(num_tasks, dtype=jnp.float32)
    # Every task's pass computes the same losses and model state (only its cotangent and
    # routing columns differ): keep task 0's.
    grads, losses, new_state = execution.map_stacked(
        one_task, jnp.moveaxis(matrices, 2, 0), onehots)
    losses, new_state = jax.tree.map(lambda a: a[0], (losses, new_state))
    if not route:
      index = {name: k for k, name in enumerate(modules)}
      flat, treedef = jax.tree_util.tree_flatten_with_path(self.split_params(grads))
      masked = []
      for path, g in flat:
        k = index["/".join(_key_name(p) for p in path[:-1])]
        mask = self._leaf_masks(g.shape[-1], matrices[k])
        masked.append(g * mask.reshape((num_tasks,) + (1,) * (g.ndim - 2) + (g.shape[-1],)))
      grads = self._replace_split(grads, jax.tree_util.tree_unflatten(treedef, masked))
    return grads, losses, new_state

  def _leaf_masks(self, num_channels: int, matrix: jax.Array) -> jax.Array:
    """(T, C): entry [s, c] = M[group of c, s]."""
    return (jnp.asarray(group_assignment(num_channels, self.sizes)) @ matrix).T

  def loss_and_grad(self, params, model_state, batch, rng, step):
    """What `jax.value_and_grad(loss, has_aux=True)` returns, with the routed gradient."""
    del rng
    statistics = model_state[STATE_COLLECTION]
    matrices = self.matrices_at(statistics, step)
    grads, losses, new_state = self.per_task_grads(params, model_state, batch, matrices)
    weights = self._weights()
    combined = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)

    if self.routing == "learned":
      split = self.split_params(grads)
      if self.axis_name is not None:  # the cosines of the global (device-averaged) gradients
        split = jax.lax.pmean(split, self.axis_name)
      statistics = self.accumulate(statistics, split, step < self.warmup_steps)

    aux = {f"loss/{t.name}": losses[i] for i, t in enumerate(self.tasks)}
    mean_cosine = self.mean_cosine(statistics)
    share = jnp.mean(matrices, axis=0)  # fraction of split modules where group t takes task s
    for t, a in enumerate(self.tasks):
      for s, b in enumerate(self.tasks):
        if t != s:
          aux[f"gradsplit/M_{a.name}_{b.name}"] = share[t, s]
          if self.routing == "learned":
            aux[f"gradsplit/cos_{a.name}_{b.name}"] = mean_cosine[t, s]
    total = jnp.dot(weights, losses)
    new_model_state = {**new_state, STATE_COLLECTION: statistics}
    return (total, (aux, new_model_state)), combined

  def predict(self, variables, images, controls=None):
    del controls  # nothing to control: the network is the hard-sharing one
    return self.model.apply(self._model_state(variables), images, train=False)

  def eval_controls(self):
    return [None]

  def gradient_macs_per_step(self, params: PyTree) -> int:
    """Gradient arithmetic besides the backward passes: the weighted sum of the T gradients
    and (learned routing) the T x T group dot products of the split layers."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    split = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.split_params(params)))
    gram = self.num_tasks ** 2 * split if self.routing == "learned" else 0
    return self.num_tasks * total + gram

  # -- host side: the routing record and its heat map ------------------------------------------

  def criterion_rule(self) -> str:
    """The routing rule in words (for records and reports)."""
    if self.routing == "fixed":
      return "M fixed by configuration, the same for every split module"
    m = f"{self.threshold:g}"
    return {"module_mean": f"M_k[t][s] = 1 iff split module k's mean cos(g_t, g_s) on group t "
                           f"over the warm-up is >= {m}",
            "module_frequency": f"M_k[t][s] = 1 iff the fraction of warm-up steps with a "
                                f"negative cos(g_t, g_s) on split module k's group t is <= {m}",
            "pooled": f"M[t][s] = 1 iff the mean cos(g_t, g_s) on group t of every split "
                      f"module together over the warm-up is >= {m}, the same M for every "
                      f"module"}[self.criterion]

  def routing_record(self, variables: Mapping[str, PyTree], step: int | None = None) -> dict:
    """The routing of trained `variables` as a JSON-able dict (see `save_routing`).

    "modules": per split module, its name, the M in use after the warm-up ("matrix") and its
    warm-up statistics ("mean_cosine", "conflict_frequency": fraction of warm-up steps with a
    negative cosine); "pooled": the same over every split parameter together, whose "matrix" is
    the criterion's rule on the pooled statistics (the routing of criterion "pooled", a
    reference for the others); "share_routed": the fraction of split modules with
    M_k[t][s] = 1. Statistics are None with routing "fixed".
    """
    statistics = jax.tree.map(np.asarray, dict(variables[STATE_COLLECTION]))
    learned = self.routing == "learned"
    count = int(statistics["count"])
    names = self.split_modules(variables["params"])
    matrices = np.asarray(self.learned_matrices(statistics)).astype(int)
    values = lambda x: np.asarray(x, np.float64).round(6).tolist() if learned else None
    module_cos = np.asarray(self.module_mean_cosine(statistics))
    module_freq = np.asarray(self.module_conflict_frequency(statistics))
    record = {
        "convention": "matrix[t][s] = 1: channel group t takes task s's gradient",
        "tasks": [t.name for t in self.tasks], "routing": self.routing, "mode": self.mode,
        "criterion": self.criterion if learned else None,
        "margin": self.threshold if learned else None,
        "rule": self.criterion_rule(),
        "split_stages": self.split_stages,
        "split_modules": list(self.split_names()),
        "group_sizes": list(self.sizes), "warmup_steps": self.warmup_steps if learned else 0,
        "warmup_steps_seen": count,
        "warmup_complete": not learned or count >= self.warmup_steps,
        "modules": [{"name": name, "matrix": matrices[k].tolist(),
                     "mean_cosine": values(module_cos[k]),
                     "conflict_frequency": values(module_freq[k])}
                    for k, name in enumerate(names)],
        "pooled": {"matrix": np.asarray(self.pooled_matrix(statistics)).astype(int).tolist(),
                   "mean_cosine": values(self.mean_cosine(statistics)),
                   "conflict_frequency": values(self.conflict_frequency(statistics))},
        "share_routed": (matrices.mean(axis=0).round(6).tolist() if len(names) else None),
    }
    if step is not None:
      record["step"] = int(step)
    return record

  def artefacts(self, variables, directory: str, *, step: int | None = None,
                plot: bool = True) -> dict[str, dict]:
    """{"routing": the routing record, with "file" (its JSON in `directory`) and "heatmap" (the
    heat map's file name, None without `plot`)}; both files written by `save_routing`."""
    paths = self.save_routing(variables, directory, step=step, plot=plot)
    record = self.routing_record(variables, step)
    record["file"] = paths[0]
    record["heatmap"] = HEATMAP_FILE if plot else None
    return {"routing": record}

  def save_routing(self, variables: Mapping[str, PyTree], directory: str,
                   step: int | None = None, plot: bool = True) -> list[str]:
    """Writes `gradsplit_routing.json` (and the heat maps `gradsplit_routing.png`) to
    `directory`; returns the paths written."""
    files_lib.makedirs(directory)  # a local folder or a URI (files.run_path)
    record = self.routing_record(variables, step)
    paths = [os.path.join(directory, ROUTING_FILE)]
    files_lib.write_json(paths[0], record, indent=1)
    if plot:
      paths.append(os.path.join(directory, HEATMAP_FILE))
      plot_routing(record, paths[-1])
    return paths


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


def plot_routing(record: Mapping[str, Any], path: str) -> None:
  """Heat maps as a PNG: a row for the pooled statistics and one per split module, each with
  the routing matrix and (learned routing) the mean cosines and conflict frequencies.

  The cosines share one colour scale over every row, symmetric around 0 and as wide as the
  largest off-diagonal mean; diagonal entries (a task with itself) are grey.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = record["tasks"]
  num_tasks = len(names)
  pooled = record["pooled"]
  learned = pooled.get("mean_cosine") is not None
  rows = [("pooled" + ("" if record.get("criterion") in (None, "pooled") else " (reference)"),
           pooled)]
  if learned:  # with a fixed routing every module has the pooled row's M
    rows += [(m["name"], m) for m in record.get("modules", [])]
  off = ~np.eye(num_tasks, dtype=bool)
  columns = [("matrix", "M[t, s] (group t takes task s)", "Greens", (-0.6, 1.4))]
  if learned:
    extent = max(float(np.abs(np.asarray(e["mean_cosine"], float)[off]).max(initial=0.0))
                 for _, e in rows) or 1.0
    columns += [("mean_cosine", f"mean cos(g_t, g_s) on group t (±{extent:.2g})", "RdBu",
                 (-extent, extent)),
                ("conflict_frequency", "share of warm-up steps with cos < 0", "Reds", (0, 1))]
  size = 1.3 + 0.5 * num_tasks
  fig, axes = plt.subplots(len(rows), len(columns),
                           figsize=(size * len(columns) + 0.8, size * len(rows) + 0.3),
                           squeeze=False)
  for r, (label, entry) in enumerate(rows):
    for c, (key, title, cmap, (lo, hi)) in enumerate(columns):
      ax = axes[r][c]
      values = np.asarray(entry[key], float)
      shown = values if key == "matrix" else np.where(off, values, np.nan)
      colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
      ax.imshow(shown, cmap=colormap, vmin=lo, vmax=hi)
      for (t, s), v in np.ndenumerate(values):
        if key == "matrix" or t != s:
          dark = abs(v - (lo + hi) / 2) > 0.35 * (hi - lo) and (key != "conflict_frequency"
                                                                or v > 0.6)
          ax.text(s, t, f"{v:.0f}" if key == "matrix" else f"{v:.2g}", ha="center",
                  va="center", fontsize=7, color="white" if dark else "black")
      ax.set_xticks(range(num_tasks), names, rotation=45, ha="right", fontsize=7)
      ax.set_yticks(range(num_tasks), names, fontsize=7)
      if r == len(rows) - 1:
        ax.set_xlabel("task s (gradient)", fontsize=7)
      if c == 0:
        ax.set_ylabel(f"{label}\ngroup t", fontsize=7)
      ax.set_title(title, fontsize=7)
  fig.tight_layout()
  files_lib.save_figure(fig, path, dpi=100)
  plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """GradSplit's options (METHODS.md section 3); flags `--gradsplit_<field>`."""

  PREFIX: ClassVar[str] = "gradsplit"
  TITLE: ClassVar[str] = "GradSplit"

  split_stages: int = options_lib.option(
      1, "How many of the last encoder stages split the output channels of their layers into "
      "one group per task.", low=1, former=("gradsplit_stages",))
  group_sizes: tuple[float, ...] = options_lib.option(
      (), "Relative channel-group size per task, in task order (e.g. 2,1,1); empty = equal "
      "groups.", low=0, open_low=True)
  routing: str = options_lib.option(
      "learned", "'learned' (hard sharing for warmup_steps while gradient conflicts are "
      "measured, then M from them by the criterion) or 'fixed' (routing_matrix from the first "
      "step).", choices=ROUTINGS)
  routing_matrix: str = options_lib.option(
      "", "With routing=fixed: the routing matrix M, rows separated by ';' and entries by ',' "
      "(M[t][s] = 1: channel group t takes task s's gradient; the diagonal must be 1), e.g. "
      "'1,0;1,1', or the words 'identity' (strict split) or 'ones' (hard sharing).",
      former=("gradsplit_matrix",))
  warmup_steps: int = options_lib.option(
      100, "With learned routing: hard-sharing steps that estimate the conflicts; M is frozen "
      "after them.", low=0)
  mode: str = options_lib.option(
      "activation", "'activation' routes the gradients flowing through the split layers' "
      "outputs; 'weight' masks only the split layers' weight gradients.", choices=MODES)
  criterion: str = options_lib.option(
      "module_mean", "With learned routing: how the warm-up's gradient cosines set M. "
      "'module_mean' [ours] gives every split layer (conv, batch norm, dense) its own M: "
      "M[t,s] = 1 where that layer's mean cos(g_t, g_s) on group t is >= the margin; "
      "'module_frequency' [ours]: per layer, M[t,s] = 1 where the fraction of warm-up steps "
      "with a negative cosine is <= the margin; 'pooled': one M for all layers from the cosine "
      "over every split parameter together (the first version, whose large aligned kernels "
      "hid the conflicts: M came out all ones). Runs saved before this option used 'pooled'.",
      choices=CRITERIA, legacy="pooled")
  margin: float | None = options_lib.option(
      None, "With learned routing: the criterion's threshold. For 'module_mean' and 'pooled' "
      "the least mean cosine that shares, in [-1, 1] (default 0.0); for 'module_frequency' "
      "the largest fraction of warm-up steps with a negative cosine that shares, in [0, 1] "
      "(default 0.5). The diagonal of M is always 1.")

  def check_values(self, name):
    matrix = self.routing_matrix  # text, or rows of numbers from the library API
    matrix = matrix.strip() if isinstance(matrix, str) else matrix
    if matrix and self.routing != "fixed":
      raise ValueError(f"{name('routing_matrix')}={matrix} is only used with "
                       f"{name('routing')}=fixed; drop it or set {name('routing')}=fixed.")
    if self.routing == "fixed" and not matrix:
      raise ValueError(f"{name('routing')}=fixed needs {name('routing_matrix')}, such as "
                       f"'identity' or rows like '1,0;1,1'.")
    if self.routing == "learned" and self.warmup_steps < 1:
      raise ValueError(f"{name('warmup_steps')}={self.warmup_steps} leaves no step to estimate "
                       f"the conflicts; give at least 1, or use {name('routing')}=fixed.")
    if self.margin is not None and self.routing != "learned":
      raise ValueError(f"{name('margin')}={self.margin:g} is only used with "
                       f"{name('routing')}=learned; drop it or set {name('routing')}=learned.")
    if self.routing == "learned":
      check_margin(self.criterion, self.margin, name("margin"))

  def options(self) -> dict:
    options = super().options()
    options["group_sizes"] = self.group_sizes or None
    if self.routing != "learned":  # the criterion and margin read the warm-up's conflicts
      del options["criterion"], options["margin"]
    return options


OPTIONS = tuple(f.name for f in Config.fields())


def build(tasks: Sequence[tasks_lib.Task], make_net, *,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> GradSplitMethod:
  """A `GradSplitMethod` on `make_net(tasks)`; `options` are its fields among `OPTIONS`
  (`routing_matrix` may be text for `parse_routing_matrix`)."""
  options = Config.from_options(options).options()
  tasks = tuple(tasks)
  matrix = options.pop("routing_matrix", None)
  if isinstance(matrix, str):
    matrix = (parse_routing_matrix(matrix, len(tasks), f"routing matrix {matrix.strip()!r}")
              if matrix.strip() else None)
  if matrix is not None:
    matrix = tuple(tuple(float(v) for v in row) for row in np.asarray(matrix).tolist())
  if options.get("group_sizes") is not None:
    options["group_sizes"] = tuple(float(s) for s in options["group_sizes"])
  if options.get("margin") is not None:
    options["margin"] = float(options["margin"])
  return GradSplitMethod(tasks, make_net(tasks), tuple(task_weights) if task_weights else None,
                         routing_matrix=matrix, axis_name=axis_name, **options)
