"""Methods: each module owns its model composition, its loss, its sampling and its controls.

`build(name, tasks, ...)` returns an object implementing `dymu_jax.methods.base.Method`.
"""

from __future__ import annotations

import functools
from typing import Sequence

from dymu_jax import models
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import ecmt, gradsplit, pcgrad, static

# name -> one line for --help.
METHODS = {
    "static": "hard sharing, one shared encoder and a decoder per task, fixed task weights",
    "single_task": "one independent network per task (the single-task baselines)",
    "ecmt": "slimmable SuperNet trained with sandwich-sampled SubNets and CI-KD; controlled by "
            "(preference, budget) through a MACs search",
    "gradsplit": "hard sharing whose last encoder stages split their channels into one group per "
                 "task; a routing matrix (learned from gradient conflicts on a warm-up, or "
                 "fixed) decides which tasks' gradients reach each group",
    "pcgrad": "hard sharing trained with PCGrad: conflicting per-task gradients of the shared "
              "encoder are projected onto each other's normal planes",
}


def build(name: str, tasks: Sequence[tasks_lib.Task], *, model_options: dict | None = None,
          axis_name: str | None = None, task_weights: Sequence[float] | None = None,
          method_options: dict | None = None):
  """The method `name` for `tasks` with the model built from `model_options`.

  Args:
    name: a key of `METHODS`.
    tasks: the tasks to learn.
    model_options: keyword arguments of `dymu_jax.models.build_multitask` (backbone, ...).
    axis_name: the pmap axis name when training with `--parallel=pmap` (batch statistics are
      pooled over it), else None.
    task_weights: loss weight per task (static, ecmt, gradsplit, pcgrad).
    method_options: the method's own options (ecmt: num_subnets, lambda_kd, kd, lambda_mutual,
      mutual_temperature, width_choices; see `ecmt.ECMTMethod`; gradsplit: split_stages,
      group_sizes, routing, routing_matrix, warmup_steps, mode; see
      `gradsplit.GradSplitMethod`; pcgrad: order).
  """
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; available methods are {', '.join(METHODS)}.")
  tasks = tuple(tasks)
  model_options = dict(model_options or {})
  make_net = functools.partial(models.build_multitask, bn_axis_name=axis_name, **model_options)
  weights = tuple(task_weights) if task_weights else None
  if name == "static":
    return static.StaticMethod(tasks, make_net(tasks), weights, axis_name=axis_name)
  if name == "single_task":
    return static.StaticMethod(tasks, static.SingleTaskNets(tasks, make_net), weights,
                               name="single_task", axis_name=axis_name)
  if name == "ecmt":
    return ecmt.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                      **dict(method_options or {}))
  if name == "gradsplit":
    return gradsplit.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                           **dict(method_options or {}))
  if name == "pcgrad":
    return pcgrad.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                        **dict(method_options or {}))
  raise AssertionError(name)
