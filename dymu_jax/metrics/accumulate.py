"""The one evaluation batch loop: task metrics and mean test losses of a network over batches.

Every evaluation of a deployed network goes through `evaluate` (the controllability sweep of
`dymu_jax.evaluation`, ECMT's masked SubNets and its encoder scores): one jit-compiled update per
(network, tasks), so networks that differ only in their variables (PHN's generated weights,
ECMT's width masks, DYMU's shifted batch norms on one tree) share one compiled program.

The test loss of a task is the mean over its labelled examples of each example's loss (a dense
task's example loss is its per-image mean) [ours]: the loss-space measures of a sweep
(hypervolume, uniformity) use it.
"""

from __future__ import annotations

import functools
from typing import Any, Hashable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import losses
from dymu_jax.metrics import tasks as metrics_lib

# The batch key of the padding mask (`data.VALID_KEY`; the data layer sits above metrics).
VALID_KEY = "_valid"


def init(tasks: Sequence[Any]) -> dict:
  """Zero states: every task's metric state and its (summed loss, labelled examples)."""
  zero = np.zeros((), np.float32)
  states = {"metrics": metrics_lib.init_all(tasks), "loss": {t.name: (zero, zero) for t in tasks}}
  # Device arrays of the dtypes the update returns (int64 counts become int32 without x64):
  # the second batch then reuses the first batch's compilation.
  canonical = lambda x: np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
  return jax.device_put(jax.tree.map(canonical, states))


def update(tasks: Sequence[Any], predictions: Mapping[str, jax.Array],
           batch: Mapping[str, jax.Array], states: Mapping[str, Any]) -> dict:
  """The states updated with one batch (pure jax.numpy; `tasks` a hashable tuple under jit).

  Padding (`batch["_valid"]` False) and examples without a task's label count in neither that
  task's metrics nor its loss.
  """
  metric_states = metrics_lib.update_all(states["metrics"], predictions, batch, tasks)
  valid = batch.get(VALID_KEY)
  valid = (jnp.ones(batch["image"].shape[:1], jnp.float32) if valid is None
           else jnp.asarray(valid, jnp.float32))
  loss_states = {}
  for task in tasks:
    per_example = jax.vmap(lambda p, y, task=task: losses.task_loss(task, p[None], y[None]))(
        predictions[task.name], batch[task.name])
    weight = valid * losses.example_present(task, batch[task.name]).astype(jnp.float32)
    total, count = states["loss"][task.name]
    loss_states[task.name] = (total + jnp.sum(per_example * weight), count + jnp.sum(weight))
  return {"metrics": metric_states, "loss": loss_states}


def compute(states: Mapping[str, Any], tasks: Sequence[Any]) -> dict[str, dict[str, float]]:
  """{task: {metric: value, "loss": mean test loss}} on host (NaN: no labelled example)."""
  states = jax.device_get(states)
  results = metrics_lib.compute_all(states["metrics"], tasks)
  for name, (total, count) in states["loss"].items():
    results[name]["loss"] = float(total) / float(count) if count else float("nan")
  return results


def labelled(states: Mapping[str, Any], tasks: Sequence[Any]) -> dict[str, int]:
  """{task: labelled items its metrics pooled} (`metrics.tasks.labelled_all`)."""
  return metrics_lib.labelled_all(jax.device_get(states["metrics"]), tasks)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(network: Hashable, tasks: tuple, variables, states, batch):
  predictions = network.apply(variables, batch["image"], train=False)
  return update(tasks, predictions, batch, states)


def keep_keys(batch: Mapping[str, Any], tasks: Sequence[Any]) -> dict:
  """The batch's image, padding mask and the tasks' labels (other keys would retrace)."""
  keep = {"image", VALID_KEY, *(t.name for t in tasks)}
  return {k: v for k, v in batch.items() if k in keep}


def evaluate(network: Hashable, variables: Any, tasks: Sequence[Any],
             batches: Iterable[Mapping[str, Any]], *, with_labelled: bool = False):
  """Task metrics and mean test losses of `network.apply(variables, images, train=False)`.

  Args:
    network: a hashable value with that `apply` (a Linen module, a DYMU `TreeNetwork`, ECMT's
      masked SuperNet); one compilation per (network, tasks, batch shapes).
    variables: its variables (arrays: changing them does not recompile).
    tasks: the tasks to measure (their labels must be in the batches).
    batches: labelled batches: "image", the task labels and optionally "_valid".
    with_labelled: also return {task: labelled items}.

  Returns:
    {task: {metric: value, "loss": mean test loss}}, and the labelled counts when asked.
  """
  tasks = tuple(tasks)
  states = init(tasks)
  for batch in batches:
    states = _step(network, tasks, variables, states, keep_keys(batch, tasks))
  results = compute(states, tasks)
  return (results, labelled(states, tasks)) if with_labelled else results
