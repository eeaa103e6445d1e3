"""ECMT's distillation terms: CI-KD on encoder features and mutual learning on predictions
(see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from dymu_jax import losses
from dymu_jax import tasks as tasks_lib

PyTree = Any


KD_MODES = ("ci_kd", "mutual", "none")


# ----------------------------------------------------------------------------------------------
# Distillation terms.


def ci_kd_loss(teacher_features: Sequence[jax.Array], student_features: Sequence[jax.Array],
               active_channels: Sequence[jax.Array] | None = None) -> jax.Array:
  """Configuration-invariant distillation: mean over stages of the per-element squared error.

  Args:
    teacher_features: the SuperNet's stage outputs (full width); gradients never reach them.
    student_features: a SubNet's stage outputs: sliced (C_s channels, static path) or full
      width with zeros beyond the active channels (masked path).
    active_channels: for the masked path, the active channel count of each stage (int32
      scalars); None on the static path (the student's channel count is the active count).

  Returns:
    `mean_s sum((sg(F_max_s)[..., :C_s] - F_s)^2) / (elements of the C_s-channel slice)`.
  """
  if len(teacher_features) != len(student_features):
    raise ValueError(f"CI-KD needs one teacher feature map per student stage, got "
                     f"{len(teacher_features)} and {len(student_features)}.")
  per_stage = []
  for s, (teacher, student) in enumerate(zip(teacher_features, student_features)):
    width = student.shape[-1]
    teacher = jax.lax.stop_gradient(teacher)[..., :width]
    positions = math.prod(student.shape[:-1])
    if active_channels is None:
      per_stage.append(jnp.mean(jnp.square(teacher - student)))
    else:
      mask = (jnp.arange(width) < active_channels[s]).astype(student.dtype)
      squared = jnp.sum(jnp.square((teacher - student) * mask))
      per_stage.append(squared / (positions * active_channels[s].astype(student.dtype)))
  return jnp.mean(jnp.stack(per_stage))


def prediction_distance(task: tasks_lib.Task, student: jax.Array, teacher: jax.Array,
                        temperature: float = 1.0) -> jax.Array:
  """How far `student`'s prediction is from `teacher`'s (a stop-gradient target), per kind.

  Classification and segmentation: `T^2 KL(softmax(teacher/T) || softmax(student/T))`, mean
  over examples (and pixels); edges and saliency: the same with Bernoulli distributions of
  sigmoids; normals: mean squared error of the unit vectors; regression and depth: mean
  squared error. Zero when the predictions are equal.
  """
  teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  student = student.astype(jnp.float32)
  if task.kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION):
    log_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return temperature**2 * jnp.mean(kl)
  if task.kind in (tasks_lib.EDGES, tasks_lib.SALIENCY):
    t, s = teacher / temperature, student / temperature
    p = jax.nn.sigmoid(t)
    kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
          + (1.0 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
    return temperature**2 * jnp.mean(kl)
  if task.kind == tasks_lib.NORMALS:
    diff = losses.normalize(student) - losses.normalize(teacher)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))
  return jnp.mean(jnp.square(student - teacher))


def mutual_loss(tasks: Sequence[tasks_lib.Task], predictions_a: Mapping[str, jax.Array],
                predictions_b: Mapping[str, jax.Array], temperature: float = 1.0,
                weights: Sequence[float] | None = None) -> jax.Array:
  """Two-way distillation between two networks' predictions: both receive gradients.

  `sum_t w_t [d_t(a, sg(b)) + d_t(b, sg(a))]` with `d_t = prediction_distance`.
  """
  weights = weights or (1.0,) * len(tasks)
  total = jnp.zeros((), jnp.float32)
  for w, task in zip(weights, tasks):
    a, b = predictions_a[task.name], predictions_b[task.name]
    total += w * (prediction_distance(task, a, b, temperature)
                  + prediction_distance(task, b, a, temperature))
  return total
