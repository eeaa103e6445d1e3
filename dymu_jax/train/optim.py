"""Optimizers and learning-rate schedules chosen by name (thin layer over optax).

    optimizer = make_optimizer("adam", 1e-3, schedule="step", total_steps=30_000,
                               decay_steps=14_000, decay_factor=0.3)   # DYMU's setting

The chain is: global-norm clipping (when `grad_clip > 0`), coupled L2 weight decay for
sgd/momentum/adam (when `weight_decay > 0`; adamw decouples it), then the optimizer scaled by
the schedule. Weight decay applies to every parameter [ours: the methods do not say otherwise].
"""

from __future__ import annotations

import optax

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "warmup_cosine")
WARMUP_FRACTION = 0.05  # warmup_cosine's default warmup: 5% of the run [ours]


def make_schedule(name: str, learning_rate: float, total_steps: int = 0, *,
                  decay_steps: int = 0, decay_factor: float = 0.1,
                  warmup_steps: int | None = None) -> optax.Schedule:
  """The learning rate as a function of the step.

  Args:
    name: "constant"; "cosine" (decays to 0 over `total_steps`); "step" (multiplied by
      `decay_factor` every `decay_steps`); "warmup_cosine" (linear warmup from 0 over
      `warmup_steps`, default 5% of `total_steps`, then cosine decay to 0 at `total_steps`).
    learning_rate: the peak (initial) learning rate, > 0.
    total_steps: length of the run; needed by the cosine schedules.
    decay_steps, decay_factor: the "step" schedule.
    warmup_steps: the "warmup_cosine" schedule.
  """
  if name not in SCHEDULES:
    raise ValueError(f"Unknown schedule {name!r}; allowed schedules are {', '.join(SCHEDULES)}.")
  if not learning_rate > 0:
    raise ValueError(f"The learning rate must be > 0, got {learning_rate}.")
  if name == "constant":
    return optax.constant_schedule(learning_rate)
  if name == "step":
    if decay_steps < 1:
      raise ValueError(f"The step schedule needs decay_steps >= 1, got {decay_steps}.")
    return optax.exponential_decay(learning_rate, transition_steps=decay_steps,
                                   decay_rate=decay_factor, staircase=True)
  if total_steps < 1:
    raise ValueError(f"The {name} schedule needs total_steps >= 1, got {total_steps}.")
  if name == "cosine":
    return optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
  if warmup_steps is None:
    warmup_steps = max(1, int(WARMUP_FRACTION * total_steps))
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}), got "
                     f"{warmup_steps}.")
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps=warmup_steps,
                                            decay_steps=total_steps)


def make_optimizer(name: str, learning_rate: float, *, schedule: str = "constant",
                   total_steps: int = 0, weight_decay: float = 0.0, grad_clip: float = 0.0,
                   momentum: float = 0.9, decay_steps: int = 0, decay_factor: float = 0.1,
                   warmup_steps: int | None = None) -> optax.GradientTransformation:
  """An optax optimizer by name: "sgd", "momentum" (heavy ball), "adam" or "adamw".

  Args:
    name: one of `OPTIMIZERS`.
    learning_rate, schedule, total_steps, decay_steps, decay_factor, warmup_steps: see
      `make_schedule`.
    weight_decay: >= 0; decoupled for adamw, an L2 term added to the gradient otherwise.
    grad_clip: clip gradients to this global norm first; 0 disables clipping.
    momentum: the momentum of "momentum".
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; allowed optimizers are "
                     f"{', '.join(OPTIMIZERS)}.")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
  if grad_clip < 0:
    raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}.")
  lr = make_schedule(schedule, learning_rate, total_steps, decay_steps=decay_steps,
                     decay_factor=decay_factor, warmup_steps=warmup_steps)
  chain = []
  if grad_clip > 0:
    chain.append(optax.clip_by_global_norm(grad_clip))
  if weight_decay > 0 and name != "adamw":
    chain.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    chain.append(optax.sgd(lr))
  elif name == "momentum":
    chain.append(optax.sgd(lr, momentum=momentum))
  elif name == "adam":
    chain.append(optax.adam(lr))
  else:
    chain.append(optax.adamw(lr, weight_decay=weight_decay))
  return optax.chain(*chain) if len(chain) > 1 else chain[0]
