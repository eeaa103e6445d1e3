"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020): the
gradient-surgery baseline of GradSplit (METHODS.md section 3), on the hard-sharing network.

`pcgrad()` is an optax-style transformation over per-task gradients: `update` takes a pytree
whose leaves carry a leading task axis T and returns the combined gradient (no task axis):

    g_i' = g_i;  for j in order_i (j != i): if <g_i', g_j> < 0: g_i' -= <g_i', g_j> / |g_j|^2 g_j
    combined = sum_i g_i'

The projections use the original g_j, over the whole flattened tree, and the projected
gradients are summed (the paper's TensorFlow reduction; the weighted task losses of `static`
also sum). Order: "fixed" projects onto j = 0, 1, ..., T-1 in index order (deterministic, the
default); "random" draws a permutation per task i and step from a key (the paper's random
order; seeded, so a run repeats).

`PCGradMethod` applies it to the shared encoder's per-task gradients (one forward pass, T
backward passes: `train.step.per_task_losses_and_grads`); each head only ever receives its own
task's gradient, which is kept as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.methods import options as options_lib
from dymu_jax.methods.static import weighted_task_loss
from dymu_jax.train import step as step_lib

PyTree = Any
ORDERS = ("fixed", "random")
SHARED = "encoder"  # the top-level params entry shared by every task


class PCGradState(NamedTuple):
  """The key of the next random order (unused with the fixed order)."""

  key: jax.Array


def _flatten(task_grads: PyTree) -> tuple[jax.Array, Any]:
  leaves, treedef = jax.tree.flatten(task_grads)
  if not leaves:
    raise ValueError("pcgrad got an empty gradient tree.")
  num_tasks = leaves[0].shape[0]
  if any(leaf.ndim < 1 or leaf.shape[0] != num_tasks for leaf in leaves):
    raise ValueError(f"pcgrad needs every gradient leaf to have the same leading task axis; "
                     f"got shapes {[tuple(leaf.shape) for leaf in leaves]}.")
  flat = jnp.concatenate([leaf.reshape(num_tasks, -1).astype(jnp.float32) for leaf in leaves],
                         axis=1)
  return flat, (treedef, [(leaf.shape[1:], leaf.dtype) for leaf in leaves])


def _unflatten(vector: jax.Array, spec) -> PyTree:
  treedef, shapes = spec
  leaves, start = [], 0
  for shape, dtype in shapes:
    size = int(np.prod(shape))
    leaves.append(vector[start:start + size].reshape(shape).astype(dtype))
    start += size
  return jax.tree.unflatten(treedef, leaves)


def project_conflicting(grads: jax.Array, order: jax.Array | np.ndarray) -> jax.Array:
  """(T, P) per-task gradients -> (T, P) projected ones (before the sum).

  Args:
    grads: one flattened gradient per task.
    order: (T, T) integer array; row i lists the tasks j in the order task i's gradient is
      projected onto them (j = i is skipped).
  """
  num_tasks = grads.shape[0]
  sq_norms = jnp.sum(grads * grads, axis=1)
  projected = []
  for i in range(num_tasks):
    g = grads[i]
    for k in range(num_tasks):
      j = order[i, k]
      other = grads[j]
      dot = jnp.dot(g, other)
      conflict = (j != i) & (dot < 0)
      coef = jnp.where(conflict, dot / jnp.where(conflict, sq_norms[j], 1.0), 0.0)
      g = g - coef * other
    projected.append(g)
  return jnp.stack(projected)


def pcgrad(order: str = "fixed", seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """The PCGrad transformation (see the module docstring).

  Args:
    order: "fixed" (index order) or "random" (a seeded permutation per task and update).
    seed: seed of the random order's key (`init`).

  Returns:
    `init(params) -> PCGradState` and `update(task_grads, state, params=None, *, key=None)
    -> (combined gradient, new state)`; `key` overrides the state's key for this update
    (a training step passes its own key).
  """
  if order not in ORDERS:
    raise ValueError(f"PCGrad order {order!r} is unknown; use one of {', '.join(ORDERS)}.")

  def init_fn(params):
    del params
    return PCGradState(key=jax.random.PRNGKey(seed))

  def update_fn(task_grads, state, params=None, *, key=None, **extra_args):
    del params, extra_args
    flat, spec = _flatten(task_grads)
    num_tasks = flat.shape[0]
    key = state.key if key is None else key
    next_key, draw = jax.random.split(key)
    if order == "fixed":
      rows = jnp.tile(jnp.arange(num_tasks), (num_tasks, 1))
    else:
      rows = jnp.stack([jax.random.permutation(jax.random.fold_in(draw, i), num_tasks)
                        for i in range(num_tasks)])
    combined = project_conflicting(flat, rows).sum(axis=0)
    return _unflatten(combined, spec), PCGradState(key=next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class PCGradMethod(base.MethodBase):
  """Hard sharing trained with PCGrad on the shared encoder's per-task gradients.

  Attributes:
    tasks: the tasks.
    model: a `MultiTaskNet` (shared variables under "encoder", heads under "head_<task>").
    task_weights: loss weight per task; PCGrad projects the weighted gradients w_t grad L_t.
    order: projection order, "fixed" or "random" (drawn from the step's key).
    name: the method name in logs.
    axis_name: the pmap axis the model's batch norms pool over (see `methods.base`).
  """

  tasks: tuple[tasks_lib.Task, ...]
  model: nn.Module
  task_weights: tuple[float, ...] | None = None
  order: str = "fixed"
  name: str = "pcgrad"
  axis_name: str | None = None

  def __post_init__(self):
    if self.task_weights is not None and len(self.task_weights) != len(self.tasks):
      raise ValueError(f"Got {len(self.task_weights)} task weights for {len(self.tasks)} "
                       f"tasks; give one weight per task.")
    pcgrad(self.order)  # validates the order

  @property
  def backward_passes(self) -> int:
    """Backward passes per training step (one per task; `experiments.evaluate` cost)."""
    return len(self.tasks)

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    return self.model.init(rng, batch["image"], train=False)

  def _apply_train(self, params, model_state, batch):
    return self.model.apply({"params": params, **model_state}, batch["image"], train=True,
                            mutable=list(model_state))

  def loss(self, params, model_state, batch, rng, step):
    """The weighted task loss (its plain gradient is hard sharing's, not PCGrad's)."""
    del rng, step
    outputs, new_state = self._apply_train(params, model_state, batch)
    total, aux = weighted_task_loss(self.tasks, outputs, batch, self.task_weights)
    return total, (aux, new_state)

  def loss_and_grad(self, params, model_state, batch, rng, step):
    """What `jax.value_and_grad(loss, has_aux=True)` returns, with the PCGrad gradient."""
    del step
    weights = jnp.asarray(self.task_weights or (1.0,) * len(self.tasks), jnp.float32)

    def task_losses(p):
      outputs, new_state = self._apply_train(p, model_state, batch)
      losses = jnp.stack([t.loss(outputs[t.name], batch[t.name]) for t in self.tasks])
      return losses * weights, (losses, new_state)

    _, grads, (losses, new_state) = step_lib.per_task_losses_and_grads(
        task_losses, params, has_aux=True)
    if self.axis_name is not None:  # project the global (device-averaged) gradients
      grads = jax.lax.pmean(grads, self.axis_name)
    shared, _ = pcgrad(self.order).update(grads[SHARED], PCGradState(key=rng), key=rng)
    combined = {k: (shared if k == SHARED else jax.tree.map(lambda g: g.sum(axis=0), v))
                for k, v in grads.items()}
    aux = {f"loss/{t.name}": losses[i] for i, t in enumerate(self.tasks)}
    return (jnp.dot(weights, losses), (aux, new_state)), combined

  def predict(self, variables, images, controls=None):
    del controls  # nothing to control
    return self.model.apply(variables, images, train=False)

  def eval_controls(self):
    return [None]

  def gradient_macs_per_step(self, params: PyTree) -> int:
    """Gradient arithmetic besides the backward passes: T squared norms, T(T-1) dot products
    and projections of the shared gradient, and the sum of the T gradients."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    shared = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[SHARED]))
    t = len(self.tasks)
    return t * shared + 2 * t * (t - 1) * shared + t * total


@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """PCGrad's options; flags `--pcgrad_<field>`."""

  PREFIX: ClassVar[str] = "pcgrad"
  TITLE: ClassVar[str] = "PCGrad"

  order: str = options_lib.option(
      "fixed", "Project onto the other tasks in task order ('fixed') or in an order drawn per "
      "step from the run's key ('random', seeded by the run's seed).", choices=ORDERS)


OPTIONS = tuple(f.name for f in Config.fields())


def build(tasks: Sequence[tasks_lib.Task], make_net, *,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> PCGradMethod:
  """A `PCGradMethod` on `make_net(tasks)`; `options` among `OPTIONS`."""
  options = Config.from_options(options).options()
  tasks = tuple(tasks)
  return PCGradMethod(tasks, make_net(tasks), tuple(task_weights) if task_weights else None,
                      axis_name=axis_name, **options)
