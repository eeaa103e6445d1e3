"""Hard parameter sharing: one shared encoder and one decoder per task, fixed task weights.

The static multi-task baseline of every paper in this line; its full-width network is also the
ECMT SuperNet before slimming.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.models.multitask import SingleTaskNets


def weighted_task_loss(tasks: Sequence[tasks_lib.Task], outputs: Mapping[str, jax.Array],
                       batch: Mapping[str, jax.Array], weights: Sequence[float] | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(sum_t w_t L_t, {"loss/<task>": L_t}) for the predictions `outputs` of one batch."""
  weights = weights or (1.0,) * len(tasks)
  per_task = {task.name: task.loss(outputs[task.name], batch[task.name]) for task in tasks}
  total = sum(w * per_task[t.name] for w, t in zip(weights, tasks))
  return total, {f"loss/{name}": value for name, value in per_task.items()}


@dataclasses.dataclass(frozen=True)
class StaticMethod(base.MethodBase):
  """A fixed multi-task network trained on a fixed weighted sum of task losses.

  Attributes:
    tasks: the tasks, in the order of `task_weights`.
    model: a Linen module `model(images, train=...) -> {task name: prediction}` (for example
      `dymu_jax.models.multitask.MultiTaskNet`).
    task_weights: loss weight of each task (default 1 each).
    name: the method name in logs ("static", or "single_task" for independent networks).
    axis_name: the pmap axis the model's batch norms pool over (see `methods.base`).
  """

  tasks: tuple[tasks_lib.Task, ...]
  model: nn.Module
  task_weights: tuple[float, ...] | None = None
  name: str = "static"
  axis_name: str | None = None

  def __post_init__(self):
    if self.task_weights is not None and len(self.task_weights) != len(self.tasks):
      raise ValueError(f"Got {len(self.task_weights)} task weights for {len(self.tasks)} tasks "
                       f"({', '.join(t.name for t in self.tasks)}); give one weight per task.")

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> Any:
    return self.model.init(rng, batch["image"], train=False)

  def loss(self, params, model_state, batch, rng, step):
    del rng, step  # deterministic network
    outputs, new_state = self.model.apply(
        {"params": params, **model_state}, batch["image"], train=True,
        mutable=list(model_state))
    total, aux = weighted_task_loss(self.tasks, outputs, batch, self.task_weights)
    return total, (aux, new_state)

  def predict(self, variables, images, controls=None):
    del controls  # nothing to control
    return self.model.apply(variables, images, train=False)

  def eval_controls(self):
    return [None]


def build(tasks: Sequence[tasks_lib.Task], make_net, *,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          single_task: bool = False) -> StaticMethod:
  """Hard sharing on `make_net(tasks)`, or with `single_task` one network per task
  (`make_net((task,))` each, the single-task baselines)."""
  tasks = tuple(tasks)
  weights = tuple(task_weights) if task_weights else None
  if single_task:
    nets = SingleTaskNets(tuple(make_net((task,)) for task in tasks))
    return StaticMethod(tasks, nets, weights, name="single_task", axis_name=axis_name)
  return StaticMethod(tasks, make_net(tasks), weights, axis_name=axis_name)
