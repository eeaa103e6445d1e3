"""Methods: each module owns its model composition, its loss, its sampling and its controls.

`build(name, tasks, ...)` returns an object implementing `dymu_jax.methods.base.Method`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

from dymu_jax import models
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import affinity, dymu, ecmt, gradsplit, pcgrad, phn, static

# name -> one line for --help.
METHODS = {
    "static": "hard sharing, one shared encoder and a decoder per task, fixed task weights",
    "single_task": "one independent network per task (the single-task baselines)",
    "ecmt": "slimmable SuperNet trained with sandwich-sampled SubNets and CI-KD; controlled by "
            "(preference, budget) through a MACs search",
    "gradsplit": "hard sharing whose last encoder stages split their channels into one group per "
                 "task; a routing matrix per split layer (learned from that layer's gradient "
                 "conflicts on a warm-up, or fixed) decides which tasks' gradients reach each "
                 "group",
    "pcgrad": "hard sharing trained with PCGrad: conflicting per-task gradients of the shared "
              "encoder are projected onto each other's normal planes",
    "dymu": "single-task anchor streams fine-tuned from one pretrained trunk, then an edge "
            "hypernetwork that turns (preference, resource) into a tree of shared blocks and a "
            "weight hypernetwork that shifts its batch norms (stages pretrain, anchor, edge, "
            "weight: --dymu_stage)",
    "phn": "Pareto HyperNetwork: a hypernetwork (chunked or not) generates every weight of the "
           "shared network from the preference",
    "phn_bn": "PHN-BN: a hypernetwork generates only the batch-norm scales and biases of the "
              "shared network from the preference; the other weights are learned directly",
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
    task_weights: loss weight per task (every method; DYMU's edge and weight stages take
      `dymu.task_weights_from_losses` of the anchor).
    method_options: the method's own options (ecmt: num_subnets, lambda_kd, kd, lambda_mutual,
      mutual_temperature, width_choices; see `ecmt.ECMTMethod`; gradsplit: split_stages,
      group_sizes, routing, routing_matrix, warmup_steps, mode, criterion, margin; see
      `gradsplit.GradSplitMethod`; pcgrad: order; dymu: `dymu.OPTIONS`, including the stage
      and its inputs trunk_variables, anchor_variables, edge_params and affinity; phn, phn_bn:
      `phn.OPTIONS`).

  DYMU builds a `branched.BranchedNet`, not a `MultiTaskNet`: of `model_options` it takes only
  `dymu.MODEL_OPTIONS` (others are left out).
  """
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}; available methods are {', '.join(METHODS)}.")
  tasks = tuple(tasks)
  model_options = dict(model_options or {})
  make_net = functools.partial(models.build_multitask, bn_axis_name=axis_name, **model_options)
  weights = tuple(float(w) for w in task_weights) if task_weights else None
  if weights is not None and not (all(math.isfinite(w) and w >= 0 for w in weights)
                                  and any(weights)):
    raise ValueError(f"Task weights must be finite numbers >= 0, not all 0, got "
                     f"{', '.join(f'{w:g}' for w in weights)}.")
  if name == "static":
    return static.StaticMethod(tasks, make_net(tasks), weights, axis_name=axis_name)
  if name == "single_task":
    nets = models.SingleTaskNets(tuple(make_net((task,)) for task in tasks))
    return static.StaticMethod(tasks, nets, weights, name="single_task", axis_name=axis_name)
  if name == "ecmt":
    return ecmt.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                      **dict(method_options or {}))
  if name == "gradsplit":
    return gradsplit.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                           **dict(method_options or {}))
  if name == "pcgrad":
    return pcgrad.build(tasks, make_net, task_weights=weights, axis_name=axis_name,
                        **dict(method_options or {}))
  if name == "dymu":
    options = {k: v for k, v in model_options.items() if k in dymu.MODEL_OPTIONS}
    return dymu.build(tasks, model_options=options, task_weights=weights, axis_name=axis_name,
                      **dict(method_options or {}))
  if name in ("phn", "phn_bn"):
    return phn.build(tasks, make_net, mode="all" if name == "phn" else "bn",
                     task_weights=weights, axis_name=axis_name, **dict(method_options or {}))
  raise AssertionError(name)
