"""Controls: preference and resource checks (one tolerance, one message), the training draw of
(r, c), and the preference grids of a sweep, against values worked out by hand."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import controls


def _sentence(text: str) -> str:
  """A pattern matching exactly `text`, the whole message."""
  return "^" + re.escape(text) + "$"


# ----------------------------------------------------------------------------------------------
# check_preference and check_preferences.


def test_one_tolerance_of_1e_5():
  assert controls.SIMPLEX_TOLERANCE == 1e-5


def test_a_preference_within_the_tolerance_is_accepted_and_renormalised():
  # Sums to 1.000009: inside 1e-5, divided by its sum.
  r = controls.check_preference((0.5, 0.500009), 2)
  assert r.dtype == np.float64 and r.shape == (2,)
  np.testing.assert_allclose(r, [0.5 / 1.000009, 0.500009 / 1.000009], rtol=1e-15)
  assert r.sum() == pytest.approx(1.0, abs=1e-15)
  # An entry down to -1e-5 is clipped at 0.
  np.testing.assert_array_equal(controls.check_preference((1.000005, -0.000005), 2), [1.0, 0.0])
  # Typed decimals that sum to 1, and float32 entries (which sum to 1 within ~1e-7).
  np.testing.assert_allclose(controls.check_preference([0.333, 0.333, 0.334], ["a", "b", "c"]),
                             [0.333, 0.333, 0.334], rtol=1e-15)
  float32 = np.full(40, 1 / 40, np.float32)
  np.testing.assert_allclose(controls.check_preference(float32, 40), 1 / 40, rtol=1e-15)


@pytest.mark.parametrize("preference, message", [
    ((0.5, 0.500011), "The preference (0.5, 0.500011) is not on the simplex: entries must be >= 0 "
                      "and sum to 1 (they sum to 1.000011)."),
    ((0.9, 0.9), "The preference (0.9, 0.9) is not on the simplex: entries must be >= 0 and sum "
                 "to 1 (they sum to 1.8)."),
    ((1.00002, -0.00002), "The preference (1.00002, -2e-05) is not on the simplex: entries must "
                          "be >= 0 and sum to 1 (they sum to 1)."),
    ((float("nan"), 0.5), "The preference (nan, 0.5) is not on the simplex: entries must be >= 0 "
                          "and sum to 1 (they sum to nan)."),
])
def test_a_preference_off_the_simplex_is_refused_in_one_sentence(preference, message):
  with pytest.raises(ValueError, match=_sentence(message)):
    controls.check_preference(preference, 2)
  with pytest.raises(ValueError, match=_sentence(message)):  # the same with task names
    controls.check_preference(preference, ["left", "right"])


def test_typed_decimals_that_miss_1_are_refused():
  with pytest.raises(ValueError, match=re.escape("(they sum to 0.99).")):
    controls.check_preference("0.33,0.33,0.33".split(","), 3)


def test_wrong_length_or_not_numbers():
  with pytest.raises(ValueError, match=_sentence(
      "The preference has 3 entries (0.2, 0.3, 0.5) but there are 2 tasks.")):
    controls.check_preference((0.2, 0.3, 0.5), 2)
  with pytest.raises(ValueError, match=_sentence(
      "The preference has 2 entries (0.5, 0.5) but there are 4 tasks (a, b, c, d).")):
    controls.check_preference((0.5, 0.5), ["a", "b", "c", "d"])
  with pytest.raises(ValueError, match=_sentence(
      "The preference has 1 entry (1.0) but there are 2 tasks.")):
    controls.check_preference([1.0], 2)
  with pytest.raises(ValueError, match=_sentence(
      "The preference must be 2 numbers, one per task (left, right), got 'x'.")):
    controls.check_preference("x", ["left", "right"])
  with pytest.raises(ValueError, match=_sentence(
      "The preference must be 2 numbers, one per task, got [[0.5, 0.5]].")):
    controls.check_preference([[0.5, 0.5]], 2)


def test_check_preferences_a_sweep():
  sweep = [[0.5, 0.5], [1.000005, -0.000005], [0.2, 0.8]]
  got = controls.check_preferences(sweep, 2)
  # Clipped at 0, not renormalised (a sweep's ties stay ties).
  np.testing.assert_array_equal(got, [[0.5, 0.5], [1.000005, 0.0], [0.2, 0.8]])
  np.testing.assert_array_equal(controls.check_preferences([0.25, 0.75]), [[0.25, 0.75]])
  # The same tolerance as one preference: 1 + 9e-6 passes, 1 + 1.1e-5 does not.
  controls.check_preferences([[0.5, 0.500009]])
  with pytest.raises(ValueError, match="they sum to 1.000011"):
    controls.check_preferences([[0.5, 0.5], [0.5, 0.500011]])
  # The message of the first row at fault is check_preference's.
  with pytest.raises(ValueError) as batch:
    controls.check_preferences([[0.5, 0.5], [0.7, 0.7], [1.5, -0.5]], 2)
  with pytest.raises(ValueError) as single:
    controls.check_preference([0.7, 0.7], 2)
  assert str(batch.value) == str(single.value)
  with pytest.raises(ValueError, match=_sentence(
      "The preference has 3 entries (0.2, 0.3, 0.5) but there are 2 tasks (x, y).")):
    controls.check_preferences([[0.2, 0.3, 0.5]], ["x", "y"])
  with pytest.raises(ValueError, match=r"must be an \(n, T\) array of numbers, one preference "
                                       r"per row, got shape \(2, 2, 2\)"):
    controls.check_preferences(np.full((2, 2, 2), 0.5))


# ----------------------------------------------------------------------------------------------
# check_resource and sample_controls.


def test_check_resource():
  assert controls.check_resource(0) == 0.0 and controls.check_resource(1) == 1.0
  assert controls.check_resource(np.float32(0.25)) == 0.25
  for bad, shown in [(1.5, "1.5"), (-0.1, "-0.1"), (float("nan"), "nan"), (True, "True"),
                     ("low", "'low'"), (None, "None")]:
    with pytest.raises(ValueError, match=_sentence(
        f"The resource preference c must be a number in [0, 1], got {shown}.")):
      controls.check_resource(bad)


def test_sample_controls_draws_r_on_the_simplex_and_c_in_0_1():
  r, c = jax.jit(controls.sample_controls, static_argnums=1)(jax.random.key(3), 3)
  assert r.shape == (3,) and r.dtype == jnp.float32 and c.shape == () and c.dtype == jnp.float32
  assert float(jnp.sum(r)) == pytest.approx(1.0, abs=1e-6) and float(jnp.min(r)) >= 0
  assert 0.0 <= float(c) <= 1.0
  # The draws: the key split in two, r ~ Dirichlet(0.2 1_3) from the first, c from the second.
  key_r, key_c = jax.random.split(jax.random.key(3))
  expected = jax.random.dirichlet(key_r, jnp.full((3,), 0.2, jnp.float32))
  np.testing.assert_allclose(r, expected / jnp.sum(expected), rtol=1e-6)
  assert float(c) == float(jax.random.uniform(key_c, (), jnp.float32))
  # Many keys, and a tiny alpha whose draws underflow: always finite and on the simplex.
  for alpha in (0.2, 1e-3):
    rs, cs = jax.vmap(lambda k, a=alpha: controls.sample_controls(k, 4, a))(
        jax.random.split(jax.random.key(0), 64))
    assert np.all(np.isfinite(rs)) and np.all(np.asarray(rs) >= 0)
    np.testing.assert_allclose(np.sum(rs, axis=1), 1.0, atol=1e-6)
    assert np.all((np.asarray(cs) >= 0) & (np.asarray(cs) <= 1))
  # Dirichlet(0.2) is sparse: most draws put most of r on one task.
  rs, _ = jax.vmap(lambda k: controls.sample_controls(k, 4))(
      jax.random.split(jax.random.key(1), 256))
  assert np.mean(np.max(np.asarray(rs), axis=1) > 0.5) > 0.5


# ----------------------------------------------------------------------------------------------
# Preference grids.


def test_phn_rays_are_evenly_spaced_angles_normalised():
  # 3 rays: angles 0.1, pi/4, pi/2 - 0.1; each (cos, sin) / (cos + sin).
  def ray(angle):
    return np.array([math.cos(angle), math.sin(angle)]) / (math.cos(angle) + math.sin(angle))
  np.testing.assert_allclose(controls.phn_rays(3), [ray(0.1), [0.5, 0.5], ray(math.pi / 2 - 0.1)],
                             rtol=1e-12)
  np.testing.assert_allclose(controls.phn_rays(2, min_angle=0.0), [[1.0, 0.0], [0.0, 1.0]],
                             atol=1e-12)
  with pytest.raises(ValueError, match="at least 1 ray"):
    controls.phn_rays(0)
  with pytest.raises(ValueError, match=r"min_angle must lie in \[0, pi / 4\)"):
    controls.phn_rays(3, min_angle=1.0)


def test_phn_rays_are_the_authors_25_rays():
  rays = controls.phn_rays(25)
  assert rays.shape == (25, 2)
  np.testing.assert_allclose(rays.sum(axis=1), 1.0)
  # Endpoints: (cos 0.1, sin 0.1) / (cos 0.1 + sin 0.1) and its mirror; the middle is uniform.
  first = np.array([math.cos(0.1), math.sin(0.1)]) / (math.cos(0.1) + math.sin(0.1))
  np.testing.assert_allclose(rays[0], first)
  np.testing.assert_allclose(rays[-1], first[::-1])
  np.testing.assert_allclose(rays[12], [0.5, 0.5])
  assert rays.min() > 0.09  # no corner preference
  # Evenly spaced in angle: theta = arctan(r_2 / r_1) steps by (pi/2 - 0.2) / 24.
  angles = np.arctan2(rays[:, 1], rays[:, 0])
  np.testing.assert_allclose(angles[[0, -1]], [0.1, math.pi / 2 - 0.1])
  np.testing.assert_allclose(np.diff(angles), (math.pi / 2 - 0.2) / 24)
  # r_1 falls monotonically from the first task's end to the second's.
  assert np.all(np.diff(rays[:, 0]) < 0)


def test_das_dennis_by_hand():
  np.testing.assert_allclose(controls.das_dennis(2, 4), [[0, 1], [0.25, 0.75], [0.5, 0.5],
                                                         [0.75, 0.25], [1, 0]])
  np.testing.assert_allclose(controls.das_dennis(3, 2), [[0, 0, 1], [0, 0.5, 0.5], [0, 1, 0],
                                                         [0.5, 0, 0.5], [0.5, 0.5, 0],
                                                         [1, 0, 0]])
  np.testing.assert_allclose(controls.das_dennis(4, 1), [[0, 0, 0, 1], [0, 0, 1, 0],
                                                         [0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_allclose(controls.das_dennis(1, 3), [[1.0]])
  with pytest.raises(ValueError, match="at least 1 division"):
    controls.das_dennis(3, 0)
  with pytest.raises(ValueError, match="at least 1 task"):
    controls.das_dennis(0, 3)


@pytest.mark.parametrize("num_tasks, divisions", [(2, 1), (2, 24), (3, 6), (4, 4), (5, 3)])
def test_das_dennis_count_and_every_point_on_the_simplex(num_tasks, divisions):
  grid = controls.das_dennis(num_tasks, divisions)
  assert grid.shape == (math.comb(divisions + num_tasks - 1, num_tasks - 1), num_tasks)
  assert len(np.unique(grid, axis=0)) == len(grid)  # distinct points
  assert np.all(grid >= 0)
  np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_array_equal(controls.check_preferences(grid, num_tasks), grid)
  # Every entry is a multiple of 1 / divisions.
  np.testing.assert_allclose(grid * divisions, np.round(grid * divisions), atol=1e-9)


@pytest.mark.parametrize("num_tasks, divisions", [(2, 1), (2, 24), (3, 6), (4, 4), (5, 3)])
def test_das_dennis_matches_pymoo(num_tasks, divisions):
  from pymoo.util.ref_dirs import get_reference_directions  # pylint: disable=g-import-not-at-top
  expected = get_reference_directions("das-dennis", num_tasks, n_partitions=divisions)
  np.testing.assert_allclose(controls.das_dennis(num_tasks, divisions), expected,
                             atol=1e-12)  # the same points in the same order


def test_das_dennis_divisions_is_the_smallest_grid_with_enough_points():
  assert controls.das_dennis_divisions(2, 25) == 24  # 25 points
  assert controls.das_dennis_divisions(3, 25) == 6  # C(7, 2) = 21 < 25 <= C(8, 2) = 28
  assert controls.das_dennis_divisions(4, 4) == 1  # the 4 corners
  assert controls.das_dennis_divisions(4, 5) == 2  # 10 points
  for tasks, at_least in [(3, 10), (3, 11), (5, 40)]:
    h = controls.das_dennis_divisions(tasks, at_least)
    assert len(controls.das_dennis(tasks, h)) >= at_least > len(controls.das_dennis(tasks, h - 1))
  with pytest.raises(ValueError, match="at least 2 tasks"):
    controls.das_dennis_divisions(1, 3)
  with pytest.raises(ValueError, match="at_least must be >= 1"):
    controls.das_dennis_divisions(3, 0)


def test_preference_grid_for_each_name():
  assert controls.PREFERENCE_GRIDS == ("rays", "das_dennis", "random")
  # random: Dirichlet(1) draws, point for point the former evaluate sweep.
  prefs, record = controls.preference_grid("random", 20, 3, 7)
  np.testing.assert_array_equal(prefs, np.random.default_rng(7).dirichlet(np.ones(3), size=20))
  np.testing.assert_array_equal(controls.preference_sweep(20, 3, 7), prefs)
  assert record == {"grid": "random", "requested": 20, "divisions": None, "seed": 7,
                    "description": "drawn uniformly from the simplex (Dirichlet(1), seed 7)",
                    "num_preferences": 20}
  # rays, 2 tasks: PHN's 25 evaluation rays.
  prefs, record = controls.preference_grid("rays", 25, 2, 0)
  np.testing.assert_array_equal(prefs, controls.phn_rays(25))
  assert record == {"grid": "rays", "requested": 25, "divisions": None, "seed": None,
                    "description": "PHN's evaluation rays: angles evenly spaced in [0.1, "
                                   "pi/2 - 0.1], r = (cos, sin) / (cos + sin)",
                    "num_preferences": 25}
  # rays with more tasks and das_dennis: the smallest Das-Dennis grid with enough points.
  for grid in ("rays", "das_dennis"):
    prefs, record = controls.preference_grid(grid, 25, 3, 0)
    np.testing.assert_array_equal(prefs, controls.das_dennis(3, 6))
    assert record == {"grid": grid, "requested": 25, "divisions": 6, "seed": None,
                      "description": "the Das-Dennis grid of the simplex, 6 divisions (corners "
                                     "included)", "num_preferences": 28}
  prefs, record = controls.preference_grid("das_dennis", 4, 4, 0)
  np.testing.assert_array_equal(prefs, np.eye(4)[::-1])  # the 4 corners
  assert record["description"].endswith("1 division (corners included)")
  prefs, _ = controls.preference_grid("das_dennis", 5, 2, 0)
  np.testing.assert_allclose(prefs[:, 0], np.linspace(0, 1, 5))  # corners included
  with pytest.raises(ValueError, match="at least 2 for rank correlations, got 1"):
    controls.preference_grid("rays", 1, 2, 0)
  with pytest.raises(ValueError, match="at least 2 for rank correlations, got 1"):
    controls.preference_sweep(1, 2, 0)
  with pytest.raises(ValueError, match=r"--preference_grid=das_dennis needs at least 2 tasks"):
    controls.preference_grid("das_dennis", 5, 1, 0)
  with pytest.raises(ValueError, match=_sentence(
      "--preference_grid must be one of rays, das_dennis, random, got 'grid'.")):
    controls.preference_grid("grid", 5, 2, 0)
