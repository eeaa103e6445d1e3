"""Multi-objective measures: hypervolume against pymoo, the others against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pymoo.indicators.hv import HV
from scipy import stats

from dymu_jax import controls
from dymu_jax.metrics import pareto


def _random_front(rng, num, dim):
  """Points on the unit sphere's positive orthant (mutually non-dominated) plus clutter."""
  sphere = np.abs(rng.normal(size=(num, dim)))
  sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
  clutter = rng.uniform(0.0, 1.5, (num // 3, dim))  # dominated ones and ones past the reference
  return np.vstack([sphere, clutter, sphere[:2]])  # with exact duplicates


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypervolume_matches_pymoo(dim, seed):
  rng = np.random.default_rng(seed)
  points = _random_front(rng, 40, dim)
  reference = np.full(dim, 1.1)
  expected = HV(ref_point=reference)(points)
  assert pareto.hypervolume(points, reference) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_matches_pymoo_in_5d():
  points = _random_front(np.random.default_rng(7), 25, 5)
  reference = pareto.default_reference(points)
  expected = HV(ref_point=reference)(points)
  assert pareto.hypervolume(points, reference) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_2d_by_hand():
  points = [[1, 3], [2, 2], [3, 1], [2.5, 2.5], [5, 0], [4, 0.5]]
  # Staircase: 1 * 1 + 1 * 2 + 1 * 3; (2.5, 2.5) is dominated; (5, 0) lies past the reference
  # and (4, 0.5) only touches it, so both add nothing.
  assert pareto.hypervolume(points, [4, 4]) == pytest.approx(6.0)


def test_hypervolume_3d_by_hand_and_edge_cases():
  assert pareto.hypervolume([[0, 0, 0]], [1, 2, 3]) == pytest.approx(6.0)
  # Boxes of volume 4 and 2 overlapping in a unit cube.
  assert pareto.hypervolume([[0, 0, 1], [1, 1, 0]], [2, 2, 2]) == pytest.approx(5.0)
  assert pareto.hypervolume(np.zeros((0, 3)), [1, 1, 1]) == 0.0
  assert pareto.hypervolume([[2, 0, 0]], [1, 1, 1]) == 0.0


def test_hypervolume_rejects_mismatched_reference():
  with pytest.raises(ValueError, match=r"reference must have shape \(2,\) to match points"):
    pareto.hypervolume([[1, 2]], [3, 3, 3])
  with pytest.raises(ValueError, match="points must be finite"):
    pareto.hypervolume([[1, np.nan]], [3, 3])
  with pytest.raises(ValueError, match=r"points must be a \(n, d\) array"):
    pareto.hypervolume(np.zeros((2, 2, 2)), [3, 3])


def test_pareto_front_and_mask():
  points = np.array([[1, 2], [2, 1], [2, 2], [1, 2], [0.5, 3]])
  np.testing.assert_array_equal(pareto.pareto_mask(points), [True, True, False, True, True])
  np.testing.assert_array_equal(pareto.pareto_front(points), points[[0, 1, 3, 4]])


def test_default_reference():
  np.testing.assert_allclose(pareto.default_reference([[1, 2], [3, 2]]), [3.2, 2.2])
  np.testing.assert_allclose(pareto.default_reference([[0, 0]], margin=0.5), [0.5, 0.5])
  with pytest.raises(ValueError, match="margin must be > 0"):
    pareto.default_reference([[1, 2]], margin=0)


def test_uniformity_by_hand():
  assert pareto.uniformity([1.0, 1.0], [0.5, 0.5]) == pytest.approx(1.0)
  # Lhat = (1/4, 3/4).
  skewed = 1 - (0.25 * math.log(0.5) + 0.75 * math.log(1.5))
  assert pareto.uniformity([1.0, 3.0], [0.5, 0.5]) == pytest.approx(skewed)
  # A corner preference puts all weight on one task: 1 - log 2 (0 log 0 = 0).
  corner = 1 - math.log(2)
  np.testing.assert_allclose(
      pareto.uniformity_per_point([[1, 1], [1, 3], [2, 5]], [[0.5, 0.5], [0.5, 0.5], [1, 0]]),
      [1.0, skewed, corner])
  assert pareto.uniformity([[1, 1], [1, 3]], [[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(
      (1 + skewed) / 2)


def test_uniformity_validates_inputs():
  # controls.check_preferences: one tolerance and one message for every preference check.
  with pytest.raises(ValueError, match=r"^The preference \(0.7, 0.7\) is not on the simplex: "
                                       r"entries must be >= 0 and sum to 1 \(they sum to 1.4\)\.$"):
    pareto.uniformity([1.0, 1.0], [0.7, 0.7])
  with pytest.raises(ValueError, match=r"preference \(1.5, -0.5\) is not on the simplex"):
    pareto.uniformity([[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.5], [1.5, -0.5]])
  with pytest.raises(ValueError, match=r"^The preference has 3 entries \(0.2, 0.3, 0.5\) but "
                                       r"there are 2 tasks\.$"):
    pareto.uniformity([1.0, 1.0], [0.2, 0.3, 0.5])
  # Within controls.SIMPLEX_TOLERANCE (1e-5) of the simplex is fine; just past it is not.
  assert pareto.uniformity([1.0, 1.0], [0.5, 0.500009]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"they sum to 1.000011"):
    pareto.uniformity([1.0, 1.0], [0.5, 0.500011])
  with pytest.raises(ValueError, match=r"losses of shape \(2, 2\) and preferences of shape"):
    pareto.uniformity([[1.0, 1.0], [1.0, 2.0]], [[0.5, 0.5]] * 3)
  with pytest.raises(ValueError, match="losses must be >= 0"):
    pareto.uniformity([-1.0, 1.0], [0.5, 0.5])


def test_uniformity_is_finite_at_corner_preferences():
  """Preferences with zero entries (Das-Dennis corners and edges) divide by nothing zero."""
  corner = 1 - math.log(2)
  # r_j = 0 leaves task j out: a corner gives 1 - log 2 whatever the losses.
  np.testing.assert_allclose(pareto.uniformity_per_point([[2, 5], [0.1, 9]], [[0, 1], [1, 0]]),
                             [corner, corner])
  # sum_i r_i L_i = 0 (the preferred task's loss is 0): Lhat = r, the limit of L -> 0.
  np.testing.assert_allclose(pareto.uniformity_per_point([[0.0, 1.0], [0.0, 0.0]],
                                                         [[1.0, 0.0], [0.5, 0.5]]),
                             [corner, 1.0])
  grid = controls.das_dennis(3, 4)
  losses = np.random.default_rng(0).uniform(0.1, 3.0, grid.shape)
  values = pareto.uniformity_per_point(losses, grid)
  assert np.all(np.isfinite(values)) and np.all(values <= 1 + 1e-12)
  assert np.all(values >= 1 - math.log(3) - 1e-12)


def test_rank_controllability_monotone_and_reversed():
  r1 = np.linspace(0, 1, 6)
  preferences = np.stack([r1, 1 - r1], axis=1)
  accuracy = 0.5 + 0.3 * r1 ** 2      # task 1, higher is better, improves with r1
  error = 1.0 + r1                    # task 2, lower is better, improves with r2 = 1 - r1
  performance = np.stack([accuracy, error], axis=1)
  mean, per_task = pareto.rank_controllability(preferences, performance, [True, False])
  assert mean == pytest.approx(1.0)
  np.testing.assert_allclose(per_task, [1.0, 1.0])
  mean, per_task = pareto.rank_controllability(preferences, performance[::-1], [True, False])
  assert mean == pytest.approx(-1.0)
  np.testing.assert_allclose(per_task, [-1.0, -1.0])


def test_rank_controllability_skips_constant_tasks():
  preferences = [[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]]
  performance = [[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]]
  mean, per_task = pareto.rank_controllability(preferences, performance, [True, True])
  assert mean == pytest.approx(1.0)
  assert np.isnan(per_task[1])
  with pytest.raises(ValueError, match="at least 2 preferences, got 1"):
    pareto.rank_controllability([[0.5, 0.5]], [[1.0, 1.0]], [True, True])
  with pytest.raises(ValueError, match="higher_is_better has 1 entries but there are 2 tasks"):
    pareto.rank_controllability(preferences, performance, [True])


def test_spearman_with_ties_matches_scipy():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, 30).astype(float)
  y = x + rng.integers(0, 3, 30)
  np.testing.assert_allclose(pareto.rankdata(x), stats.rankdata(x))
  assert pareto.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
  assert math.isnan(pareto.spearman([1, 1, 1], [1, 2, 3]))


def test_delta_m_by_hand():
  metrics = {"seg": 0.44, "depth": 0.5}
  single = {"seg": 0.40, "depth": 0.6}
  directions = {"seg": True, "depth": False}
  # seg: +10 %; depth: -(0.5 - 0.6) / 0.6 * 100 = +16.67 %.
  expected = (10.0 + 100 / 6) / 2
  assert pareto.delta_m(metrics, single, directions) == pytest.approx(expected)
  assert pareto.delta_m([0.44, 0.5], [0.4, 0.6], [True, False]) == pytest.approx(expected)
  assert pareto.delta_m(single, single, directions) == 0.0


def test_delta_m_leaves_out_tasks_without_a_relative_change():
  # b's single-task MAE is 0 and c has no labelled test example (NaN): the mean covers a only.
  metrics = {"a": 0.55, "b": 0.1, "c": float("nan")}
  single = {"a": 0.5, "b": 0.0, "c": 2.0}
  value, excluded = pareto.delta_m_terms(metrics, single, {"a": True, "b": False, "c": False})
  assert value == pytest.approx(10.0) and excluded == ["b", "c"]
  assert pareto.delta_m(metrics, single, {"a": True, "b": False, "c": False}) == value
  value, excluded = pareto.delta_m_terms([0.4], [0.0], [True])
  assert math.isnan(value) and excluded == [0]


def test_delta_m_validates_inputs():
  with pytest.raises(ValueError, match=r"single_task_metrics must give a value for exactly"):
    pareto.delta_m({"seg": 0.4}, {"depth": 0.4}, {"seg": True})
  with pytest.raises(ValueError, match="single_task_metrics has 1 values but metrics has 2"):
    pareto.delta_m([0.4, 0.5], [0.4], [True, True])


# ----------------------------------------------------------------------------------------------
# Cost band.


def test_cost_band_hypervolume_by_hand():
  # The staircase of test_hypervolume_2d_by_hand with a cost per point.
  points = [[1, 3], [2, 2], [3, 1], [2.5, 2.5]]
  costs = [0.9, 0.6, 0.4, 0.5]
  reference = [4, 4]
  # At most 0.6: (2, 2), (3, 1) and (2.5, 2.5) (dominated): 2 * 2 + 1 * 1 = 5.
  assert pareto.cost_band_hypervolume(points, costs, reference, 0.6) == (pytest.approx(5.0), 3)
  # 0.45 to 0.6: (2, 2) and (2.5, 2.5): 2 * 2 = 4.
  assert pareto.cost_band_hypervolume(points, costs, reference, 0.6, 0.45) == (
      pytest.approx(4.0), 2)
  # Everything: the full staircase, 6.
  assert pareto.cost_band_hypervolume(points, costs, reference, 1.0) == (pytest.approx(6.0), 4)
  # A cost a rounding error past the edge still counts; an empty band is (0, 0).
  assert pareto.cost_band_hypervolume(points, [0.6 + 1e-12] * 4, reference, 0.6)[1] == 4
  assert pareto.cost_band_hypervolume(points, costs, reference, 0.3) == (0.0, 0)


def test_cost_band_hypervolume_validates_inputs():
  with pytest.raises(ValueError, match=r"costs must give one number per point \(2\)"):
    pareto.cost_band_hypervolume([[1, 1], [2, 2]], [0.5], [3, 3], 0.6)
  with pytest.raises(ValueError, match="finite low <= high"):
    pareto.cost_band_hypervolume([[1, 1]], [0.5], [3, 3], 0.4, 0.6)
  with pytest.raises(ValueError, match="reference must have shape"):
    pareto.cost_band_hypervolume([[1, 1]], [0.5], [3, 3, 3], 0.1)
