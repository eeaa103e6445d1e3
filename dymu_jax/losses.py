"""Per-kind task losses in pure `jax.numpy`: jit-friendly, and 0 (never NaN) when nothing is valid.

Layouts of predictions and labels are the batch contract of `dymu_jax.tasks`. Every loss is a
mean over the valid samples or pixels of its batch; a batch with nothing valid (all labels
ignored or missing, no depth, no normals) contributes 0 and a zero gradient.

Missing labels (the convention of `dymu_jax.tasks`): a regression label that is NaN and a
classification label equal to `IGNORE_LABEL` (255) are left out of the mean. A missing label
is replaced by a finite value with `jnp.where` before any arithmetic, so a NaN label never
reaches a loss or a gradient (NaN * 0 is NaN, so masking after the fact would not do).

This module dispatches on `task.kind` strings and never imports `dymu_jax.tasks`, which imports
it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_LABEL = 255

# Allowed `Task.loss_type` per kind; the first entry is what "" means.
LOSS_TYPES = {
    "classification": ("ce",),
    "segmentation": ("ce",),
    "regression": ("l1", "l2"),
    "depth": ("l1",),
    "normals": ("l1", "cosine"),
    "edges": ("balanced_bce",),
    "saliency": ("balanced_bce",),
}


def _safe_mean(total, count):
  """total / count, and 0 when count is 0 (no NaN, no NaN gradient)."""
  count = jnp.asarray(count, jnp.float32)
  return total / jnp.maximum(count, 1.0)


def example_present(task, label):
  """(B,) bool: which examples of a batch carry a label of `task` (jit-friendly).

  Regression: not NaN; classification: not `IGNORE_LABEL`; segmentation, depth and normals: at
  least one valid pixel; edges and saliency: always. Use it to weight per-example losses (a
  mean of per-example losses must count only these examples).
  """
  label = jnp.asarray(label)
  flat = label.reshape((label.shape[0], -1))
  if task.kind == "regression":
    return ~jnp.any(jnp.isnan(flat.astype(jnp.float32)), axis=1)
  if task.kind in ("classification", "segmentation"):
    return jnp.any(flat.astype(jnp.int32) != IGNORE_LABEL, axis=1)
  if task.kind == "depth":
    return jnp.any(flat > 0, axis=1)
  if task.kind == "normals":
    return jnp.any(flat != 0, axis=1)
  return jnp.ones((label.shape[0],), bool)


def cross_entropy(logits, labels, ignore_label: int = IGNORE_LABEL):
  """Softmax cross-entropy, mean over the labels that are not `ignore_label`.

  Args:
    logits: float (..., C).
    labels: int (...), in [0, C) or `ignore_label` (for classification 255 means "this
      example has no label for this task", as in CIFAR-100-MTL and the arrays source's masks).
    ignore_label: the label value to skip.

  Returns:
    A float32 scalar; 0 when every label is ignored.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  total = -jnp.sum(jnp.where(valid, picked, 0.0))
  return _safe_mean(total, jnp.sum(valid))


def regression_loss(prediction, label, label_scale: float = 1.0, loss_type: str = "l1",
                    label_offset: float = 0.0):
  """L1 ("l1") or squared ("l2") error between prediction[..., 0] and
  (label - label_offset) / label_scale.

  The mean runs over the labels that are not NaN (NaN = no label); 0, with a zero gradient,
  when every label of the batch is missing.
  """
  if loss_type not in ("l1", "l2"):
    raise ValueError(f"Unknown regression loss_type {loss_type!r}; allowed: '', 'l1', 'l2'.")
  prediction = jnp.asarray(prediction, jnp.float32)[..., 0]
  label = jnp.asarray(label, jnp.float32)
  present = ~jnp.isnan(label)
  # Finite targets first: a NaN label must not enter the difference (its gradient would be
  # NaN * 0 = NaN even where the mask drops it).
  target = (jnp.where(present, label, label_offset) - label_offset) / label_scale
  diff = jnp.where(present, prediction - target, 0.0)
  per_example = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
  return _safe_mean(jnp.sum(per_example), jnp.sum(present))


def depth_l1(prediction, label):
  """Mean absolute error over the pixels with depth (label > 0)."""
  prediction = jnp.asarray(prediction, jnp.float32)
  label = jnp.asarray(label, jnp.float32)
  valid = label > 0
  total = jnp.sum(jnp.where(valid, jnp.abs(prediction - label), 0.0))
  return _safe_mean(total, jnp.sum(valid))


def normalize(vectors, eps: float = 1e-12):
  """Vectors scaled to unit L2 norm along the last axis; zero vectors stay zero.

  Uses max(|v|^2, eps^2) under the square root so the gradient at a zero vector is finite.
  """
  vectors = jnp.asarray(vectors, jnp.float32)
  squared = jnp.sum(jnp.square(vectors), axis=-1, keepdims=True)
  return vectors * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def normals_loss(prediction, label, loss_type: str = "l1"):
  """Loss between the L2-normalised prediction and the unit label over pixels with a normal.

  "l1": mean absolute difference over the components of valid pixels (as the reference
  dense multi-task code: sum of |n_pred - n_gt| over valid elements / number of valid
  elements). "cosine": mean of 1 - cos(n_pred, n_gt) over valid pixels. A pixel is valid when
  its label is not the zero vector.
  """
  pred = normalize(prediction)
  label = jnp.asarray(label, jnp.float32)
  valid = jnp.any(label != 0, axis=-1)
  if loss_type == "l1":
    per_pixel = jnp.sum(jnp.abs(pred - label), axis=-1)
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return _safe_mean(total, jnp.sum(valid) * label.shape[-1])
  if loss_type == "cosine":
    per_pixel = 1.0 - jnp.sum(pred * label, axis=-1)
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return _safe_mean(total, jnp.sum(valid))
  raise ValueError(f"Unknown normals loss_type {loss_type!r}; allowed: '', 'l1', 'cosine'.")


def balanced_bce(logits, label, pos_weight: float | None = None, axis=None):
  """Class-balanced binary cross-entropy on logits, mean over pixels (HED style).

  Labels are binarised at 0.5. Positive pixels are weighted by w and negative pixels by 1 - w,
  where w = `pos_weight` when given, else the fraction of negative pixels (computed over
  `axis`, default the whole batch), as in the balanced loss of the dense multi-task reference
  code. Numerically stable through `log_sigmoid`.

  Args:
    logits: float (...).
    label: float of the same shape, in [0, 1].
    pos_weight: fixed weight of the positives in [0, 1], or None to balance by frequency.
    axis: axes to reduce over; None reduces everything to a scalar. The metrics use the
      per-image reduction (axis = all but the first).

  Returns:
    The loss, reduced over `axis`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  positive = (jnp.asarray(label, jnp.float32) >= 0.5).astype(jnp.float32)
  if pos_weight is None:
    num_pos = jnp.sum(positive, axis=axis, keepdims=True)
    num_total = jnp.sum(jnp.ones_like(positive), axis=axis, keepdims=True)
    w = (num_total - num_pos) / num_total
  else:
    w = jnp.float32(pos_weight)
  loss_pos = -positive * jax.nn.log_sigmoid(logits)
  loss_neg = -(1.0 - positive) * jax.nn.log_sigmoid(-logits)
  return jnp.mean(w * loss_pos + (1.0 - w) * loss_neg, axis=axis)


def _resolve(task) -> str:
  """The concrete loss type of `task` ("" -> the kind's default), or a ValueError."""
  if task.kind not in LOSS_TYPES:
    raise ValueError(f"Task {task.name!r} has unknown kind {task.kind!r}; allowed kinds are "
                     f"{', '.join(LOSS_TYPES)}.")
  allowed = LOSS_TYPES[task.kind]
  loss_type = task.loss_type or allowed[0]
  if loss_type not in allowed:
    raise ValueError(
        f"Task {task.name!r} ({task.kind}) has unknown loss_type {task.loss_type!r}; allowed: "
        f"{', '.join(repr(t) for t in ('',) + allowed)}.")
  return loss_type


def task_loss(task, prediction, label):
  """Scalar loss of one batch for `task` (a `dymu_jax.tasks.Task`), dispatched on its kind.

  Defaults ("" loss_type): cross-entropy for classification and segmentation (ignore 255), L1
  on (label - label_offset) / label_scale for regression (NaN labels skipped), L1 over valid
  pixels for depth, L1 on unit vectors for normals, balanced BCE for edges and saliency.
  """
  kind = task.kind
  loss_type = _resolve(task)
  if kind in ("classification", "segmentation"):
    return cross_entropy(prediction, label)
  if kind == "regression":
    return regression_loss(prediction, label, task.label_scale, loss_type, task.label_offset)
  if kind == "depth":
    return depth_l1(prediction, label)
  if kind == "normals":
    return normals_loss(prediction, label, loss_type)
  # edges and saliency
  return balanced_bce(prediction, label, task.pos_weight)
