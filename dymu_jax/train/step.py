"""The compiled train step, and per-task losses and gradients.

`make_train_step` turns a method's loss into `fn(state, batch) -> (state, metrics)`: one
gradient of the scalar loss with respect to `params`, an optimizer update, and a guard that
skips the update (and records the step and task) when a loss is not finite, all inside the
compiled function, so the loop reads the guard only at its log and checkpoint boundaries.

`per_task_losses_and_grads` gives the T per-task gradients from one forward pass, for the
methods that route or compare task gradients (hypernetworks, branching, GradSplit, PCGrad).
Such a method defines `loss_and_grad(params, model_state, batch, rng, step)`, returning what
`jax.value_and_grad(method.loss, has_aux=True)` would, `((loss, (aux, model_state)), grads)`,
with the gradient it wants applied; the step then uses it instead of differentiating `loss`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from dymu_jax import execution
from dymu_jax.train import state as state_lib

PyTree = Any
TrainStepFn = Callable[[state_lib.TrainState, Mapping[str, jax.Array]],
                       tuple[state_lib.TrainState, dict]]


def task_loss_key(task_name: str) -> str:
  """The aux key under which a method's loss reports one task's loss."""
  return f"loss/{task_name}"


def _tree_where(condition, new, old):
  return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def make_train_step(method, optimizer: optax.GradientTransformation,
                    tasks: Sequence[Any] | None = None, *,
                    axis_name: str | None = None,
                    compute_dtype: str = "float32") -> TrainStepFn:
  """The train step of `method` (see `dymu_jax.methods.base.Method.loss`).

  Args:
    method: provides `loss(params, model_state, batch, rng, step)`, and optionally
      `loss_and_grad` with the same arguments (see the module docstring).
    optimizer: the optax transformation whose state is `state.opt_state`.
    tasks: the tasks whose aux losses "loss/<name>" the guard watches and the metrics report
      (default `method.tasks`); `state.nonfinite_task` indexes this tuple.
    axis_name: set under `jax.pmap` (mode "pmap"): gradients, losses and metrics are averaged
      over this axis, so every device applies the same update. None under `jax.jit` on a mesh,
      where the loss already sees the global batch.
    compute_dtype: "float32" or "bfloat16" (mixed precision): the batch's images are cast to
      it, so the network's activations run in it (`models.layers`), while parameters,
      gradients, optimizer state, batch-norm statistics and losses stay float32.

  Returns:
    `fn(state, batch) -> (new_state, metrics)`; metrics hold "loss", "loss/<task>" for every
    task, "grad_norm" (global norm of the averaged gradient) and every other scalar aux.
  """
  tasks = tuple(method.tasks if tasks is None else tasks)
  dtype = check_compute_dtype(compute_dtype)
  grad_fn = getattr(method, "loss_and_grad", None)
  if grad_fn is None:
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)

  def train_step(state: state_lib.TrainState, batch):
    # One key per step, the same on every device: a method draws e.g. one preference per batch.
    rng = jax.random.fold_in(state.rng, state.step)
    batch = cast_inputs(batch, dtype)
    (loss, (aux, new_model_state)), grads = grad_fn(
        state.params, state.model_state, batch, rng, state.step)
    # A method's own `loss_and_grad` must hand back one gradient per parameter (trace time).
    chex.assert_trees_all_equal_shapes_and_dtypes(
        grads, state.params,
        custom_message=f"{type(method).__name__}: gradients do not match the parameters")
    missing = [t.name for t in tasks if task_loss_key(t.name) not in aux]
    if missing:
      raise ValueError(f"{type(method).__name__}.loss must report the aux scalar "
                       f"'loss/<task>' for every task; missing {', '.join(missing)}.")
    # Scalars only (a method may return per-example arrays in aux for its own use).
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items() if jnp.ndim(v) == 0}
    metrics["loss"] = jnp.asarray(loss, jnp.float32)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    grad_norm = optax.tree.norm(grads)
    metrics["grad_norm"] = grad_norm

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    # Non-finite guard: skip the update, remember the first offending step and task.
    if tasks:
      task_losses = jnp.stack([metrics[task_loss_key(t.name)] for t in tasks])
      task_finite = jnp.isfinite(task_losses)
    else:
      task_finite = jnp.ones((1,), bool)
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(task_finite) & jnp.isfinite(grad_norm)
    first_bad_task = jnp.where(jnp.all(task_finite), state_lib.NO_STEP,
                               jnp.argmin(task_finite)).astype(jnp.int32)
    first_time = (~finite) & (state.nonfinite_step == state_lib.NO_STEP)
    new_state = state.replace(
        params=_tree_where(finite, new_params, state.params),
        model_state=_tree_where(finite, new_model_state, state.model_state),
        opt_state=_tree_where(finite, new_opt_state, state.opt_state),
        step=state.step + 1,
        nonfinite_step=jnp.where(first_time, state.step, state.nonfinite_step),
        nonfinite_task=jnp.where(first_time, first_bad_task, state.nonfinite_task))
    return new_state, metrics

  return train_step


COMPUTE_DTYPES = ("float32", "bfloat16")
INPUT_KEYS = ("image",)  # the batch entries the network reads (labels stay as they are)


def check_compute_dtype(name: str):
  """The jnp dtype of a `compute_dtype` name; ValueError naming what is allowed."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype {name!r} is not one of {', '.join(COMPUTE_DTYPES)}.")
  return jnp.dtype(name)


def cast_inputs(batch: Mapping[str, Any], dtype) -> Mapping[str, Any]:
  """The batch with its floating network inputs cast to `dtype` (a no-op for float32)."""
  if dtype == jnp.float32:
    return batch
  return {k: (v.astype(dtype) if k in INPUT_KEYS and jnp.issubdtype(v.dtype, jnp.floating)
              else v) for k, v in batch.items()}


def per_task_losses_and_grads(loss_per_task_fn: Callable[..., Any], params: PyTree, *args,
                              has_aux: bool = False, **kwargs):
  """Every task's loss and its gradient with respect to `params`, from one forward pass.

  Args:
    loss_per_task_fn: `fn(params, *args, **kwargs) -> losses (T,)` (or `(losses, aux)` with
      `has_aux`).
    params: the pytree to differentiate.
    *args, **kwargs: passed through (batch, rng, ...).
    has_aux: whether the function also returns auxiliary data.

  Returns:
    `(losses (T,), grads)` where every leaf of `grads` has a leading task axis of size T and
    `grads[t] = grad(losses[t])`; `(losses, grads, aux)` with `has_aux`. The T backward passes
    are T calls of one VJP (one forward pass) with one-hot cotangents, unrolled or vmapped as
    `execution.choices().passes` says: unrolled on CPU, where a `vmap` over the
    cotangents makes XLA batch the convolution gradients, which ran the per-task backward
    about 1.8x slower (`benchmarks/method_speed.py`, ResNet-small PCGrad step); vmapped on
    accelerators.
  """
  fn = lambda p: loss_per_task_fn(p, *args, **kwargs)
  if has_aux:
    losses, vjp_fn, aux = jax.vjp(fn, params, has_aux=True)
  else:
    losses, vjp_fn = jax.vjp(fn, params)
  if jnp.ndim(losses) != 1:
    raise ValueError(f"loss_per_task_fn must return a vector of T task losses, got shape "
                     f"{jnp.shape(losses)}.")
  cotangents = jnp.eye(losses.shape[0], dtype=losses.dtype)
  grads = execution.map_stacked(lambda cotangent: vjp_fn(cotangent)[0], cotangents)
  return (losses, grads, aux) if has_aux else (losses, grads)
