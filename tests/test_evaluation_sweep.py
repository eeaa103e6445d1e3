"""The one evaluation loop (`metrics.accumulate`) and the one controllability sweep
(`dymu_jax.evaluation`): golden metrics and losses, the sweep over every steered method with
each distinct network measured once and compiled once, and the sweep's form equal to the
standalone (exportable) network.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import controls
from dymu_jax import tasks as tasks_lib
from dymu_jax.evaluation import measures
from dymu_jax.evaluation import sweep as sweep_lib
from dymu_jax.metrics import accumulate

import test_deploy
import test_methods_dymu as dymu_tests


@dataclasses.dataclass(frozen=True)
class FixedLogits:
  """A 'network' whose outputs are its variables, sliced to the batch (rows in batch order)."""

  def apply(self, variables, images, train=False):
    del train
    start = variables["offset"]
    return {name: jax.lax.dynamic_slice_in_dim(logits, start, images.shape[0])
            for name, logits in variables["logits"].items()}


def test_accumulate_golden_metrics_and_losses():
  """Accuracy and mean cross-entropy by hand; padding and unlabelled examples count in neither."""
  task = tasks_lib.classification("digit", 3)
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4],
                            [0.5, 0.25, 0.25]], np.float32))
  labels = np.array([0, 2, 2, 1], np.int32)
  labels_missing = labels.copy()
  labels_missing[1] = tasks_lib.IGNORE_LABEL
  variables = {"logits": {"digit": jnp.asarray(logits)}, "offset": 0}
  batch = {"image": np.zeros((4, 2, 2, 1), np.float32), "digit": labels,
           "_valid": np.array([True, True, True, False])}
  results = accumulate.evaluate(FixedLogits(), variables, (task,), [batch])
  # Examples 0-2 count (3 is padding): correct are 0 and 2.
  assert results["digit"]["accuracy"] == pytest.approx(2 / 3)
  expected = -np.mean([np.log(0.7), np.log(0.1), np.log(0.4)])
  assert results["digit"]["loss"] == pytest.approx(expected, rel=1e-5)
  batch["digit"] = labels_missing
  results, counts = accumulate.evaluate(FixedLogits(), variables, (task,), [batch],
                                        with_labelled=True)
  assert counts == {"digit": 2}
  assert results["digit"]["accuracy"] == pytest.approx(1.0)
  assert results["digit"]["loss"] == pytest.approx(-np.mean([np.log(0.7), np.log(0.4)]),
                                                    rel=1e-5)


def test_sweep_measures_golden():
  task_a, task_b = tasks_lib.classification("a", 2), tasks_lib.regression("b")
  points = [{"preference": [0.8, 0.2], "macs": 10, "macs_fraction": 1.0,
             "metrics": {"a": {"accuracy": 0.9, "loss": 0.2}, "b": {"mae": 3.0, "loss": 0.6}}},
            {"preference": [0.2, 0.8], "macs": 6, "macs_fraction": 0.6,
             "metrics": {"a": {"accuracy": 0.7, "loss": 0.5}, "b": {"mae": 2.0, "loss": 0.3}}}]
  reference = {"a": {"accuracy": 1.0}, "b": {"mae": 2.0}}
  out = measures.sweep_measures((task_a, task_b), points, reference)
  assert out["losses"] == [[0.2, 0.6], [0.5, 0.3]]
  assert out["mean_metric"] == pytest.approx({"a": 0.8, "b": 2.5})
  # Each task is better where it is preferred more: perfect rank controllability.
  assert out["rank_controllability"] == pytest.approx(1.0)
  # Delta_m: mean over points of the mean relative change (accuracy up, MAE down is better).
  first = np.mean([(0.9 - 1) / 1, -(3.0 - 2.0) / 2.0]) * 100
  second = np.mean([(0.7 - 1) / 1, 0.0]) * 100
  assert out["delta_m"] == pytest.approx(np.mean([first, second]))
  cost = measures.cost_measures(points, ())
  assert cost == {"distinct_structures": 1, "mean_macs": 8.0, "max_macs": 10,
                  "mean_macs_fraction": 0.8}
  sweep = {"losses": out["losses"], "points": points}
  measures.add_hypervolumes([sweep], [1.0, 1.0])
  assert sweep["hypervolume"] == pytest.approx(0.8 * 0.4 + 0.5 * (0.7 - 0.4))
  assert sweep["points_inside_hv_reference"] == 2


def _step_compilations() -> int:
  return accumulate._step._cache_size()  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["phn", "phn_bn", "ecmt", "dymu"])
def test_sweep_over_every_steered_method(name, tmp_path):
  """Every point of the sweep equals its standalone (exportable) network's metrics; settings
  with the same key are measured once; networks differing only in variables (PHN's generated
  weights, ECMT's masked SubNets) share one compilation of the loop."""
  if name == "dymu":
    method, variables = dymu_tests.trained("edge")
    prepared, shape = None, dymu_tests.SHAPE
  else:
    method, variables = test_deploy.setup(name)
    prepared = method.prepare(variables, test_deploy.held_out(), cache_dir=tmp_path)
    shape = test_deploy.SHAPE
  batches = [test_deploy.digits_batch(seed, 8) for seed in (11, 12)]
  sweeper = sweep_lib.Sweeper(method, variables, batches, image_shape=shape, prepared=prepared)
  prefs, _ = controls.preference_grid("rays", 5, 2, 0)
  (fixed,) = sweep_lib.groups(method.control_space(), budgets=(0.7,), resources=(1.0,))
  assert fixed == {"ecmt": {"budget": 0.7}, "dymu": {"resource": 1.0}}.get(name, {})
  before = _step_compilations()
  points = sweeper.sweep(fixed, prefs)
  compiled = _step_compilations() - before
  keys = {sweeper.deploy({"preference": r, **fixed}).key for r in prefs}
  assert sweeper.distinct_networks == len(keys)
  if name in ("phn", "phn_bn", "ecmt"):
    assert compiled <= 1, compiled  # one program for every preference (or none: cached)
  else:
    assert compiled <= len(keys)  # DYMU: one program per distinct tree
  assert [p["preference"] for p in points] == prefs.tolist()
  for point, r in zip(points, prefs):
    check = sweep_lib.standalone_check(sweeper, {"preference": r, **fixed}, point["metrics"])
    assert check["max_metric_difference"] < 1e-4, check
    assert point["macs"] > 0 and point["params"] > 0
    for task in test_deploy.DIGITS:
      assert np.isfinite(point["metrics"][task.name]["loss"])
  measured = measures.sweep_measures(method.tasks, points, None)
  assert len(measured["losses"]) == len(prefs)
