"""Accumulating task metrics against values computed by hand."""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest

from dymu_jax import losses
from dymu_jax import tasks
from dymu_jax.metrics import tasks as metrics


def _logit(p):
  p = np.asarray(p, np.float64)
  return np.log(p / (1 - p)).astype(np.float32)


def _one_hot_logits(classes, num_classes):
  return np.eye(num_classes, dtype=np.float32)[np.asarray(classes)] * 5.0


def _run(task, *batches):
  """compute() after updating a fresh state with (prediction, label[, valid]) batches."""
  metric = task.metric()
  state = metric.init()
  for batch in batches:
    state = metric.update(state, *batch)
  return metric.compute(state)


ALL_TASKS = (tasks.classification("digit", 3), tasks.regression("age", 10.0),
             tasks.segmentation("seg", 4), tasks.depth(), tasks.normals(), tasks.edges(),
             tasks.saliency())


def _random_batch(rng, batch_size=3, size=5):
  predictions = {
      "digit": rng.normal(size=(batch_size, 3)), "age": rng.normal(size=(batch_size, 1)),
      "seg": rng.normal(size=(batch_size, size, size, 4)),
      "depth": rng.normal(size=(batch_size, size, size, 1)),
      "normals": rng.normal(size=(batch_size, size, size, 3)),
      "edges": rng.normal(size=(batch_size, size, size, 1)),
      "saliency": rng.normal(size=(batch_size, size, size, 1)),
  }
  normals = rng.normal(size=(batch_size, size, size, 3))
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[:, 0] = 0.0
  seg = rng.integers(0, 4, (batch_size, size, size))
  seg[:, :, 0] = 255
  labels = {
      "digit": np.where(rng.random(batch_size) < 0.3, 255, rng.integers(0, 3, batch_size)),
      "age": rng.uniform(1, 90, batch_size), "seg": seg,
      "depth": np.where(rng.random((batch_size, size, size, 1)) < 0.3, 0.0,
                        rng.uniform(0.5, 5, (batch_size, size, size, 1))),
      "normals": normals,
      "edges": (rng.random((batch_size, size, size, 1)) < 0.2).astype(np.float32),
      "saliency": rng.random((batch_size, size, size, 1)).astype(np.float32),
  }
  predictions = {k: v.astype(np.float32) for k, v in predictions.items()}
  return predictions, labels


def test_directions_and_primary_match_computed_metrics():
  rng = np.random.default_rng(0)
  predictions, labels = _random_batch(rng)
  for task in ALL_TASKS:
    values = _run(task, (predictions[task.name], labels[task.name]))
    assert list(values) == [name for name, _ in task.metric().higher_is_better]
    assert task.primary_metric == next(iter(values))
    assert all(np.isfinite(v) for v in values.values()), (task, values)
  assert tasks.segmentation("seg", 4).metric_directions == {"miou": True,
                                                            "pixel_accuracy": True}
  assert tasks.depth().metric_directions["rmse"] is False


def test_metric_for_is_cached_per_task():
  assert metrics.metric_for(tasks.depth()) is metrics.metric_for(tasks.depth())
  assert metrics.metric_for(tasks.depth()) is not metrics.metric_for(tasks.depth("d2"))


def test_accuracy_ignores_255():
  logits = _one_hot_logits([0, 1, 2, 0], 3)
  labels = np.array([0, 2, 2, 255])
  assert _run(tasks.classification("digit", 3), (logits, labels)) == {"accuracy": 2 / 3}


def test_regression_mae_rmse_in_label_units():
  prediction = np.array([[1.0], [2.5]], np.float32)  # 10 and 25 years with label_scale 10
  label = np.array([12.0, 20.0], np.float32)
  values = _run(tasks.regression("age", 10.0), (prediction, label))
  np.testing.assert_allclose(values["mae"], 3.5, rtol=1e-6)
  np.testing.assert_allclose(values["rmse"], math.sqrt((4 + 25) / 2), rtol=1e-6)


def test_regression_nan_labels_are_missing_and_pool_over_batches():
  task = tasks.regression("age", 10.0)
  first = (np.array([[1.0], [2.5]], np.float32), np.array([12.0, np.nan], np.float32))
  second = (np.array([[3.0], [0.0], [4.0]], np.float32),
            np.array([np.nan, 5.0, 41.0], np.float32))
  errors = np.array([-2.0, -5.0, -1.0])  # 3 labelled examples over 2 batches
  values = _run(task, first, second)
  np.testing.assert_allclose(values["mae"], np.abs(errors).mean(), rtol=1e-6)
  np.testing.assert_allclose(values["rmse"], math.sqrt(np.square(errors).mean()), rtol=1e-6)
  metric = task.metric()
  state = metric.update(metric.update(metric.init(), *first), *second)
  assert metric.labelled(state) == 3


def test_labelled_counts_what_each_metric_pools():
  rng = np.random.default_rng(0)
  for task in ALL_TASKS:
    metric = task.metric()
    assert metric.labelled(metric.init()) == 0, task
  metric = tasks.segmentation("seg", 4).metric()
  label = np.array([0, 255, 1, 3]).reshape(1, 2, 2)
  state = metric.update(metric.init(), rng.normal(size=(1, 2, 2, 4)), label)
  assert metric.labelled(state) == 3  # pixels
  metric = tasks.edges().metric()
  state = metric.update(metric.init(), np.zeros((2, 2, 2, 1)), np.zeros((2, 2, 2, 1)),
                        np.array([True, False]))
  assert metric.labelled(state) == 1  # images


def test_miou_by_hand_with_class_absent_from_the_set():
  # Four classes; class 3 is neither labelled nor predicted, so it does not count.
  label = np.array([0, 0, 1, 1, 1, 255, 0]).reshape(1, 1, 7)
  predicted = np.array([0, 1, 1, 1, 2, 0, 0])
  logits = _one_hot_logits(predicted, 4).reshape(1, 1, 7, 4)
  values = _run(tasks.segmentation("seg", 4), (logits, label))
  # IoU_0 = 2 / 3, IoU_1 = 2 / 4, IoU_2 = 0 / 1 (a false positive).
  np.testing.assert_allclose(values["miou"], (2 / 3 + 1 / 2 + 0) / 3, rtol=1e-12)
  np.testing.assert_allclose(values["pixel_accuracy"], 4 / 6, rtol=1e-12)


def test_no_valid_data_gives_nan_without_warnings():
  empty = {
      "digit": (_one_hot_logits([0, 1], 3), np.array([255, 255])),
      "age": (np.ones((2, 1), np.float32), np.full((2,), np.nan, np.float32)),
      "seg": (np.zeros((1, 2, 2, 4), np.float32), np.full((1, 2, 2), 255)),
      "depth": (np.ones((1, 2, 2, 1), np.float32), np.zeros((1, 2, 2, 1), np.float32)),
      "normals": (np.ones((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2, 3), np.float32)),
      "edges": (np.zeros((1, 2, 2, 1), np.float32), np.zeros((1, 2, 2, 1), np.float32)),
  }
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for task in ALL_TASKS:
      if task.name in empty:
        values = _run(task, empty[task.name])
        assert np.isnan(values[task.primary_metric]), (task, values)
      never_updated = task.metric().compute(task.metric().init())
      assert all(np.isnan(v) for v in never_updated.values()), (task, never_updated)
  assert _run(tasks.segmentation("seg", 4), empty["seg"]) == pytest.approx(
      {"miou": math.nan, "pixel_accuracy": math.nan}, nan_ok=True)


def test_two_batches_equal_one_big_batch_and_merge():
  rng = np.random.default_rng(1)
  first, second = _random_batch(rng, 3), _random_batch(rng, 2)
  for task in ALL_TASKS:
    metric = task.metric()
    name = task.name
    together = _run(task, (np.concatenate([first[0][name], second[0][name]]),
                           np.concatenate([first[1][name], second[1][name]])))
    sequential = _run(task, (first[0][name], first[1][name]), (second[0][name], second[1][name]))
    merged = metric.compute(metric.merge(
        metric.update(metric.init(), first[0][name], first[1][name]),
        metric.update(metric.init(), second[0][name], second[1][name])))
    for key, value in together.items():
      np.testing.assert_allclose(sequential[key], value, rtol=1e-5, err_msg=f"{name} {key}")
      np.testing.assert_allclose(merged[key], value, rtol=1e-5, err_msg=f"{name} {key}")


def test_valid_mask_excludes_padding():
  rng = np.random.default_rng(2)
  real, padding = _random_batch(rng, 2), _random_batch(rng, 2)
  valid = np.array([True, True, False, False])
  for task in ALL_TASKS:
    name = task.name
    expected = _run(task, (real[0][name], real[1][name]))
    padded = _run(task, (np.concatenate([real[0][name], padding[0][name]]),
                         np.concatenate([real[1][name], padding[1][name]]), valid))
    for key, value in expected.items():
      np.testing.assert_allclose(padded[key], value, rtol=1e-5, err_msg=f"{name} {key}")


def test_depth_rmse_pools_pixels_over_the_set():
  # Batch 1: one valid pixel with error 3; batch 2: three valid pixels with error 1.
  first = (np.array([4.0, 9.0]).reshape(1, 1, 2, 1), np.array([1.0, 0.0]).reshape(1, 1, 2, 1))
  second = (np.full((1, 1, 3, 1), 3.0), np.full((1, 1, 3, 1), 2.0))
  values = _run(tasks.depth(), first, second)
  np.testing.assert_allclose(values["rmse"], math.sqrt((9 + 3) / 4), rtol=1e-6)
  np.testing.assert_allclose(values["mae"], 6 / 4, rtol=1e-6)


def test_normals_angles_with_zero_normals_excluded():
  prediction = np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 1]], np.float32)
  label = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], np.float32)
  values = _run(tasks.normals(), (prediction.reshape(1, 2, 2, 3), label.reshape(1, 2, 2, 3)))
  # Angles 0, 90 and 45 degrees; the fourth pixel has no normal.
  np.testing.assert_allclose(values["mean_angle"], 45.0, rtol=1e-5)
  assert values["median_angle"] == pytest.approx(45.0, abs=0.05 + 1e-6)
  np.testing.assert_allclose(values["rmse_angle"], math.sqrt((45**2 + 90**2) / 3), rtol=1e-5)
  np.testing.assert_allclose(values["within_11_25"], 100 / 3, rtol=1e-9)
  np.testing.assert_allclose(values["within_30"], 100 / 3, rtol=1e-9)


def test_normals_median_from_histogram():
  # Angles 10, 20, 30.05, 50 (four pixels): lower median 20 degrees -> bin [20.0, 20.1).
  angles = np.radians([10.02, 20.04, 30.05, 50.0])
  prediction = np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], -1).astype(np.float32)
  label = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (4, 1))
  values = _run(tasks.normals(), (prediction.reshape(1, 1, 4, 3), label.reshape(1, 1, 4, 3)))
  assert values["median_angle"] == pytest.approx(20.05, abs=1e-9)


def test_edges_ods_f_by_hand():
  probabilities = np.array([0.95, 0.45, 0.65, 0.15]).reshape(1, 2, 2, 1)
  label = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
  logits = _logit(probabilities)
  values = _run(tasks.edges(), (logits, label))
  # t < 0.15: F = 4/6; 0.15 <= t < 0.45: TP 2, FP 1 -> F = 4/5; then 2/4 and 2/3.
  np.testing.assert_allclose(values["odsf"], 0.8, rtol=1e-12)
  np.testing.assert_allclose(values["loss"], losses.balanced_bce(logits, label), rtol=1e-6)


def test_edges_loss_is_mean_of_per_image_losses():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 3, 1)).astype(np.float32)
  label = (rng.random((2, 3, 3, 1)) < 0.4).astype(np.float32)
  values = _run(tasks.edges(), (logits, label))
  per_image = [losses.balanced_bce(logits[i], label[i]) for i in range(2)]
  np.testing.assert_allclose(values["loss"], np.mean(per_image), rtol=1e-6)


def test_saliency_max_f_by_hand():
  # Image A: labels [1, 0], probabilities [0.805, 0.305]; image B: labels [1, 1], [0.605, 0.205].
  probabilities = np.array([[0.805, 0.305], [0.605, 0.205]]).reshape(2, 1, 2, 1)
  label = np.array([[1, 0], [1, 1]], np.float32).reshape(2, 1, 2, 1)
  values = _run(tasks.saliency(), (_logit(probabilities), label))
  # Best at 0.31 <= t < 0.60: A has P = R = 1, B has P = 1, R = 1/2; mean P = 1, R = 3/4;
  # F = 1.3 * 0.75 / (0.3 + 0.75) = 13/14.
  np.testing.assert_allclose(values["maxf"], 13 / 14, rtol=1e-6)


def test_saliency_label_binarised_at_half():
  probabilities = np.array([0.9, 0.1]).reshape(1, 1, 2, 1)
  soft = np.array([0.6, 0.4], np.float32).reshape(1, 1, 2, 1)
  assert _run(tasks.saliency(), (_logit(probabilities), soft))["maxf"] == pytest.approx(1.0)


def test_update_runs_inside_jit():
  rng = np.random.default_rng(4)
  predictions, labels = _random_batch(rng, 4)
  batch = dict(labels, _valid=np.array([True, True, True, False]))
  states = metrics.init_all(ALL_TASKS)
  update = jax.jit(metrics.update_all, static_argnums=3)
  jitted = metrics.compute_all(update(states, predictions, batch, ALL_TASKS), ALL_TASKS)
  eager = metrics.compute_all(metrics.update_all(states, predictions, batch, ALL_TASKS),
                              ALL_TASKS)
  assert set(jitted) == {t.name for t in ALL_TASKS}
  for name, values in eager.items():
    for key, value in values.items():
      np.testing.assert_allclose(jitted[name][key], value, rtol=1e-5, err_msg=f"{name} {key}")
  single = jax.jit(tasks.depth().metric().update)
  state = single(tasks.depth().metric().init(), predictions["depth"], labels["depth"])
  assert state["count"].dtype == np.int32
  merged = metrics.merge_all(states, states, ALL_TASKS)
  assert np.all(np.isnan(list(metrics.compute_all(merged, ALL_TASKS)["seg"].values())))


def test_init_state_is_fixed_shape_numpy():
  state = tasks.segmentation("seg", 5).metric().init()
  assert state["confusion"].shape == (5, 5) and state["confusion"].dtype == np.int64
  edge_state = tasks.edges().metric().init()
  assert edge_state["positive_hist"].shape == (metrics.NUM_THRESHOLDS + 1,)
  assert tasks.saliency().metric().init()["precision"].dtype == np.float64
