"""Task losses against values computed by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import losses
from dymu_jax import tasks


def test_cross_entropy_ignores_255_by_hand():
  logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]], np.float32)
  labels = np.array([0, 1, 255])
  # Row 0: -log(1/2); row 1: p(1) = 1 / (3 + 1); row 2 is ignored.
  expected = (math.log(2.0) + math.log(4.0)) / 2
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)
  task = tasks.classification("digit", 2)
  np.testing.assert_allclose(task.loss(logits, labels), expected, rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_zero_gradient():
  logits = jnp.ones((2, 3, 3, 4))
  labels = jnp.full((2, 3, 3), 255)
  loss, grad = jax.value_and_grad(losses.cross_entropy)(logits, labels)
  assert float(loss) == 0.0
  assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_segmentation_loss_over_pixels():
  task = tasks.segmentation("seg", 3)
  logits = np.zeros((1, 1, 3, 3), np.float32)
  logits[0, 0, 0] = [math.log(2.0), 0.0, 0.0]  # p(0) = 2 / 4
  labels = np.array([[[0, 2, 255]]])
  expected = (math.log(2.0) + math.log(3.0)) / 2
  np.testing.assert_allclose(task.loss(logits, labels), expected, rtol=1e-6)


def test_balanced_bce_by_hand_on_2x2_map():
  logits = np.array([0.0, math.log(3.0), -math.log(3.0), 0.0], np.float32).reshape(1, 2, 2, 1)
  label = np.array([1.0, 0.0, 0.0, 0.0], np.float32).reshape(1, 2, 2, 1)
  # One positive, three negatives: w = 3/4 on the positive, 1/4 on each negative.
  positive = math.log(2.0)  # -log sigmoid(0)
  negatives = math.log(4.0) + math.log(4.0 / 3.0) + math.log(2.0)  # -log sigmoid(-x)
  expected = (0.75 * positive + 0.25 * negatives) / 4
  task = tasks.edges()
  np.testing.assert_allclose(task.loss(logits, label), expected, rtol=1e-6)
  fixed = tasks.edges(pos_weight=0.5)
  np.testing.assert_allclose(fixed.loss(logits, label), 0.5 * (positive + negatives) / 4,
                             rtol=1e-6)
  saliency = tasks.saliency()
  soft = np.array([0.7, 0.2, 0.4, 0.0], np.float32).reshape(1, 2, 2, 1)  # binarised at 0.5
  np.testing.assert_allclose(saliency.loss(logits, soft), expected, rtol=1e-6)


def test_balanced_bce_is_stable_for_huge_logits():
  logits = jnp.array([1e4, -1e4, 1e4, -1e4]).reshape(1, 2, 2, 1)
  label = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
  loss, grad = jax.value_and_grad(losses.balanced_bce)(logits, label)
  # Two confidently wrong pixels, each 1e4 weighted by 1/2, mean over 4 pixels.
  np.testing.assert_allclose(loss, 2 * 0.5 * 1e4 / 4, rtol=1e-6)
  assert np.all(np.isfinite(grad))


def test_normals_loss_excludes_zero_normals():
  prediction = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 1.0, 2.0]], np.float32)
  label = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  prediction, label = prediction.reshape(1, 1, 3, 3), label.reshape(1, 1, 3, 3)
  # Pixel 0 matches; pixel 1: |0 - 1| + |1 - 0| = 2; pixel 2 has no normal. 6 valid elements.
  np.testing.assert_allclose(tasks.normals().loss(prediction, label), 2.0 / 6.0, rtol=1e-6)
  cosine = tasks.Task("normals", tasks.NORMALS, 3, loss_type="cosine")
  np.testing.assert_allclose(cosine.loss(prediction, label), (0.0 + 1.0) / 2, rtol=1e-6)


def test_normals_loss_gradient_finite_at_zero_prediction_and_zero_when_no_normal():
  prediction = jnp.zeros((1, 2, 2, 3))
  label = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(jnp.array([0.0, 0.0, 1.0]))
  grad = jax.grad(losses.normals_loss)(prediction, label)
  assert np.all(np.isfinite(grad))
  assert float(losses.normals_loss(prediction, jnp.zeros_like(label))) == 0.0


def test_depth_l1_ignores_zero_depth():
  prediction = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)
  label = np.array([0.0, 1.0, 5.0, 0.0], np.float32).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(tasks.depth().loss(prediction, label), (1.0 + 2.0) / 2, rtol=1e-6)
  assert float(tasks.depth().loss(prediction, np.zeros_like(label))) == 0.0


def test_regression_divides_labels_by_label_scale():
  prediction = np.array([[1.0], [2.0]], np.float32)
  label = np.array([10.0, 30.0], np.float32)  # scaled targets 1 and 3
  np.testing.assert_allclose(tasks.regression("age", 10.0).loss(prediction, label), 0.5)
  l2 = tasks.Task("age", tasks.REGRESSION, 1, loss_type="l2", label_scale=10.0)
  np.testing.assert_allclose(l2.loss(prediction, label), 0.5)


def test_regression_nan_labels_are_missing_with_finite_gradient():
  prediction = np.array([[1.0], [2.0], [5.0]], np.float32)
  label = np.array([10.0, np.nan, 30.0], np.float32)  # scaled targets 1 and 3; one missing
  for loss_type, expected in (("l1", (0.0 + 2.0) / 2), ("l2", (0.0 + 4.0) / 2)):
    task = tasks.Task("age", tasks.REGRESSION, 1, loss_type=loss_type, label_scale=10.0)
    np.testing.assert_allclose(task.loss(prediction, label), expected, rtol=1e-6)
    grad = jax.grad(lambda p, task=task: task.loss(p, label))(prediction)
    assert np.all(np.isfinite(grad)) and float(grad[1, 0]) == 0.0
    none = np.full((3,), np.nan, np.float32)
    loss, grad = jax.value_and_grad(lambda p, task=task: task.loss(p, none))(prediction)
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_unknown_loss_type_names_allowed_values():
  task = tasks.Task("age", tasks.REGRESSION, 1, loss_type="huber")
  with pytest.raises(ValueError, match=r"unknown loss_type 'huber'; allowed: '', 'l1', 'l2'"):
    task.loss(np.zeros((1, 1)), np.zeros((1,)))
  normals = tasks.Task("normals", tasks.NORMALS, 3, loss_type="l2")
  with pytest.raises(ValueError, match=r"allowed: '', 'l1', 'cosine'"):
    normals.loss(np.zeros((1, 1, 1, 3)), np.zeros((1, 1, 1, 3)))


def test_losses_jit_with_task_as_static_argument():
  task_set = (tasks.segmentation("seg", 3), tasks.depth(), tasks.edges())
  rng = np.random.default_rng(0)
  predictions = {"seg": rng.normal(size=(2, 4, 4, 3)), "depth": rng.normal(size=(2, 4, 4, 1)),
                 "edges": rng.normal(size=(2, 4, 4, 1))}
  labels = {"seg": rng.integers(0, 3, (2, 4, 4)), "depth": rng.random((2, 4, 4, 1)),
            "edges": (rng.random((2, 4, 4, 1)) > 0.8).astype(np.float32)}

  def total(ts, predictions, labels):
    return sum(t.loss(predictions[t.name], labels[t.name]) for t in ts)

  jitted = jax.jit(total, static_argnums=0)(task_set, predictions, labels)
  np.testing.assert_allclose(jitted, total(task_set, predictions, labels), rtol=1e-5)
