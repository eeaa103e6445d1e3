"""Controls: checking and drawing task preferences and resource preferences, and the
preference grids of a sweep. The one home of these for every method, measure and script.

- `SIMPLEX_TOLERANCE`: how far a preference may be off the simplex, the same for every check.
- `check_preference` (one (T,) preference) and `check_preferences` (an (n, T) sweep): one
  ValueError sentence per problem, naming the value and what is allowed; the simplex message is
  the same for both: "The preference (0.9, 0.9) is not on the simplex: entries must be >= 0 and
  sum to 1 (they sum to 1.8)."
- `check_resource`: DYMU's resource preference c in [0, 1].
- `sample_controls`: one training draw r ~ Dirichlet(alpha 1_N), c ~ Uniform(0, 1) (traceable).
- Preference grids: `phn_rays` (the 2-task rays of PHN's Multi-MNIST evaluation), `das_dennis`
  (evenly spaced points of the simplex), `das_dennis_divisions`, `preference_sweep` (uniform
  random draws) and `preference_grid`, the sweep of `experiments.evaluate`'s
  `--preference_grid` (one of `PREFERENCE_GRIDS`).

Only numpy and jax: nothing of dymu_jax, so that any module may import it.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# How far a preference may be off the simplex: each entry >= -SIMPLEX_TOLERANCE and
# |sum - 1| <= SIMPLEX_TOLERANCE, for a single preference and for every row of a sweep alike.
# Preferences reach the checks as float32 (a JSON file, a flag, a jnp array) or as typed
# decimals: float32 entries sum to 1 within about 1e-7 (each entry is off by at most 6e-8 of
# itself, and the sum is taken in float64, so that bound does not grow with the number of
# tasks), and a user's "0.333,0.333,0.334" sums to 1 exactly. 1e-5 accepts that rounding and
# refuses real mistakes (0.33,0.33,0.33 sums to 0.99). Accepted preferences are clipped at 0.
SIMPLEX_TOLERANCE = 1e-5


# ----------------------------------------------------------------------------------------------
# Checking preferences and resources.


def _entries(values) -> str:
  """(0.5, 0.5): a vector's entries, each as Python writes the float."""
  return "(" + ", ".join(repr(float(x)) for x in values) + ")"


def _task_count(tasks) -> tuple[int, str]:
  """(number of tasks, " (a, b)" naming them or "") from a count or a sequence of names."""
  if isinstance(tasks, (int, np.integer)) and not isinstance(tasks, (bool, np.bool_)):
    return int(tasks), ""
  names = [str(t) for t in tasks]
  return len(names), f" ({', '.join(names)})"


def _plural(count: int, one: str, many: str) -> str:
  return f"{count} {one if count == 1 else many}"


def _length_error(r: np.ndarray, tasks) -> ValueError:
  num, named = _task_count(tasks)
  return ValueError(f"The preference has {_plural(r.shape[0], 'entry', 'entries')} "
                    f"{_entries(r)} but there are {_plural(num, 'task', 'tasks')}{named}.")


def _simplex_error(r: np.ndarray) -> ValueError:
  return ValueError(f"The preference {_entries(r)} is not on the simplex: entries must be >= 0 "
                    f"and sum to 1 (they sum to {float(np.sum(r)):.10g}).")


def _off_simplex(prefs: np.ndarray) -> np.ndarray:
  """(...,) bool over the last axis: non-finite, negative or not summing to 1."""
  return (~np.all(np.isfinite(prefs), axis=-1) | np.any(prefs < -SIMPLEX_TOLERANCE, axis=-1)
          | ~(np.abs(prefs.sum(axis=-1) - 1.0) <= SIMPLEX_TOLERANCE))


def check_preference(preference, tasks: int | Sequence[str]) -> np.ndarray:
  """The preference as a float64 (T,) vector on the simplex, or one ValueError sentence.

  Args:
    preference: T numbers, one per task in task order.
    tasks: the number of tasks, or their names (then a message of the wrong length names them).

  Returns:
    The preference clipped at 0 and divided by its sum (entries within `SIMPLEX_TOLERANCE` of
    the simplex land exactly on it).
  """
  num, named = _task_count(tasks)
  try:
    r = np.asarray(preference, np.float64)
  except (TypeError, ValueError):
    r = None
  if r is None or r.ndim != 1:
    raise ValueError(f"The preference must be {_plural(num, 'number', 'numbers')}, one per "
                     f"task{named}, got {preference!r}.")
  if r.shape[0] != num:
    raise _length_error(r, tasks)
  if _off_simplex(r):
    raise _simplex_error(r)
  r = np.clip(r, 0.0, None)
  return r / r.sum()


def check_preferences(preferences, tasks: int | Sequence[str] | None = None) -> np.ndarray:
  """A sweep's preferences as a float64 (n, T) array, each row on the simplex, or one
  ValueError sentence (`check_preference`'s, for the first row at fault).

  Args:
    preferences: (n, T) preferences, one per row (a single (T,) vector becomes (1, T)).
    tasks: optional number of tasks or their names, which the rows' length must match.

  Returns:
    The preferences clipped at 0. Rows are not renormalised: their ordering (ties included, as
    in a Das-Dennis grid) stays exactly as given.
  """
  try:
    prefs = np.asarray(preferences, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"The preferences must be an (n, T) array of numbers, one preference per "
                     f"row, got {preferences!r}.") from None
  if prefs.ndim == 1:
    prefs = prefs[None, :]
  if prefs.ndim != 2 or prefs.shape[1] < 1:
    raise ValueError(f"The preferences must be an (n, T) array of numbers, one preference per "
                     f"row, got shape {prefs.shape}.")
  if tasks is not None and prefs.shape[1] != _task_count(tasks)[0]:
    if len(prefs):
      raise _length_error(prefs[0], tasks)
    raise ValueError(f"The preferences have shape {prefs.shape} but there are "
                     f"{_plural(_task_count(tasks)[0], 'task', 'tasks')}{_task_count(tasks)[1]}.")
  bad = _off_simplex(prefs)
  if bad.any():
    raise _simplex_error(prefs[np.argmax(bad)])
  return np.clip(prefs, 0.0, None)


def check_resource(resource) -> float:
  """The resource preference c as a float in [0, 1], or one clear error."""
  if isinstance(resource, (bool, np.bool_)):
    raise ValueError(f"The resource preference c must be a number in [0, 1], got {resource!r}.")
  try:
    c = float(resource)
  except (TypeError, ValueError):
    raise ValueError(f"The resource preference c must be a number in [0, 1], got "
                     f"{resource!r}.") from None
  if not (math.isfinite(c) and 0.0 <= c <= 1.0):
    raise ValueError(f"The resource preference c must be a number in [0, 1], got {c:g}.")
  return c


def sample_controls(rng: jax.Array, num_tasks: int, dirichlet_alpha: float = 0.2
                    ) -> tuple[jax.Array, jax.Array]:
  """One (r ~ Dirichlet(alpha 1_N), c ~ Uniform(0, 1)) draw (traceable), float32.

  DYMU draws both per training batch; PHN uses r only.
  """
  key_r, key_c = jax.random.split(rng)
  r = jax.random.dirichlet(key_r, jnp.full((num_tasks,), dirichlet_alpha, jnp.float32))
  # Dirichlet draws with a small alpha can underflow; renormalise and keep them finite.
  r = jnp.nan_to_num(r, nan=0.0)
  total = jnp.sum(r)
  r = jnp.where(total > 0, r / jnp.maximum(total, 1e-30), jnp.full_like(r, 1.0 / num_tasks))
  c = jax.random.uniform(key_c, (), jnp.float32)
  return r, c


# ----------------------------------------------------------------------------------------------
# Preference grids.


PHN_RAY_MIN_ANGLE = 0.1
# experiments.evaluate's --preference_grid choices (`preference_grid`); "rays" is the default
# [ours].
PREFERENCE_GRIDS = ("rays", "das_dennis", "random")


def phn_rays(num: int, min_angle: float = PHN_RAY_MIN_ANGLE) -> np.ndarray:
  """(num, 2) the evaluation rays of Pareto HyperNetworks (PHN) for two tasks.

  PHN's Multi-MNIST evaluation (Navon et al., ICLR 2021; `experiments/utils.py::circle_points`
  and `experiments/multimnist/trainer.py` of AvivNavon/pareto-hypernetworks, 25 rays by default)
  takes `num` angles evenly spaced by `np.linspace(min_angle, pi / 2 - min_angle, num)`, the
  rays (cos theta, sin theta), and divides each by its sum: preferences on the simplex, the
  first favouring task 1 (r_1 = cos 0.1 / (cos 0.1 + sin 0.1) ~ 0.909), the last task 2, the
  middle one (0.5, 0.5) for odd `num`. The angle margin of 0.1 rad keeps every entry above
  0.09: no corner preference. Evenly spaced in angle, not in r_1.
  """
  if num < 1:
    raise ValueError(f"phn_rays needs at least 1 ray, got {num}.")
  if not 0.0 <= min_angle < math.pi / 4:
    raise ValueError(f"min_angle must lie in [0, pi / 4), got {min_angle}.")
  angles = np.linspace(min_angle, math.pi / 2 - min_angle, num)
  rays = np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return rays / rays.sum(axis=1, keepdims=True)


def das_dennis(num_tasks: int, divisions: int) -> np.ndarray:
  """(C(divisions + num_tasks - 1, num_tasks - 1), num_tasks) Das-Dennis points of the simplex.

  Every vector (k_1, ..., k_T) / divisions of non-negative integers summing to `divisions`:
  evenly spaced points, corners and edges included (preferences with zero entries). Rows are in
  the order of pymoo's `get_reference_directions("das-dennis", T, n_partitions=divisions)`:
  lexicographic, first entry slowest, ascending (for 2 tasks: (0, 1), (1/H, 1 - 1/H), ...,
  (1, 0)).
  """
  if num_tasks < 1:
    raise ValueError(f"das_dennis needs at least 1 task, got {num_tasks}.")
  if divisions < 0 or (num_tasks > 1 and divisions < 1):
    raise ValueError(f"das_dennis needs at least 1 division, got {divisions}.")
  if num_tasks == 1:
    return np.ones((1, 1))
  rows = []

  def fill(prefix: list[int], left: int):
    if len(prefix) == num_tasks - 1:
      rows.append(prefix + [left])
      return
    for k in range(left + 1):
      fill(prefix + [k], left - k)

  fill([], divisions)
  return np.asarray(rows, np.float64) / divisions


def das_dennis_divisions(num_tasks: int, at_least: int) -> int:
  """The fewest divisions H whose Das-Dennis grid has at least `at_least` points
  (C(H + T - 1, T - 1) >= at_least)."""
  if num_tasks < 2:
    raise ValueError(f"a Das-Dennis grid of several points needs at least 2 tasks, got "
                     f"{num_tasks}.")
  if at_least < 1:
    raise ValueError(f"at_least must be >= 1, got {at_least}.")
  divisions = 1
  while math.comb(divisions + num_tasks - 1, num_tasks - 1) < at_least:
    divisions += 1
  return divisions


def preference_sweep(num: int, num_tasks: int, seed: int) -> np.ndarray:
  """(num, T) preferences drawn uniformly from the simplex (Dirichlet with all ones)."""
  if num < 2:
    raise ValueError(f"--num_preferences must be at least 2 for rank correlations, got {num}.")
  return np.random.default_rng(seed).dirichlet(np.ones(num_tasks), size=num)


def preference_grid(grid: str, num: int, num_tasks: int, seed: int) -> tuple[np.ndarray, dict]:
  """The preferences of a sweep, (n, T), and a record of how they were made (for the report).

  grid: "rays" (2 tasks: `phn_rays(num)`, PHN's evaluation rays; more tasks: as
  "das_dennis"), "das_dennis" (`das_dennis` with the fewest divisions giving at least `num`
  points, so n >= num) or "random" (`preference_sweep(num, num_tasks, seed)`, unchanged). The
  errors name `experiments.evaluate`'s flags (--preference_grid, --num_preferences), which give
  these arguments.
  """
  if num < 2:
    raise ValueError(f"--num_preferences must be at least 2 for rank correlations, got {num}.")
  record = {"grid": grid, "requested": int(num), "divisions": None, "seed": None}
  if grid == "random":
    prefs = preference_sweep(num, num_tasks, seed)
    record["seed"] = int(seed)
    record["description"] = f"drawn uniformly from the simplex (Dirichlet(1), seed {seed})"
  elif grid == "rays" and num_tasks == 2:
    prefs = phn_rays(num)
    record["description"] = (
        f"PHN's evaluation rays: angles evenly spaced in [{PHN_RAY_MIN_ANGLE:g}, "
        f"pi/2 - {PHN_RAY_MIN_ANGLE:g}], r = (cos, sin) / (cos + sin)")
  elif grid in ("rays", "das_dennis"):
    if num_tasks < 2:
      raise ValueError(f"--preference_grid={grid} needs at least 2 tasks, got {num_tasks}; use "
                       "--preference_grid=random.")
    divisions = das_dennis_divisions(num_tasks, num)
    prefs = das_dennis(num_tasks, divisions)
    record["divisions"] = divisions
    record["description"] = (f"the Das-Dennis grid of the simplex, {divisions} "
                             f"division{'s' if divisions != 1 else ''} (corners included)")
  else:
    raise ValueError(f"--preference_grid must be one of {', '.join(PREFERENCE_GRIDS)}, got "
                     f"{grid!r}.")
  record["num_preferences"] = int(len(prefs))
  return prefs, record


def budget_macs(budget, full_macs: int) -> int:
  """A budget as MACs per example: an int is MACs, a float in (0, 1] a fraction of the full
  network's MACs (`full_macs`: ECMT's SuperNet)."""
  full = full_macs
  if isinstance(budget, (bool, np.bool_)):
    raise ValueError(f"The budget must be MACs (an int) or a fraction of the SuperNet's MACs "
                     f"(a float in (0, 1]), got {budget!r}.")
  if isinstance(budget, (int, np.integer)):
    if budget <= 0:
      raise ValueError(f"A budget in MACs must be positive, got {budget}.")
    return int(budget)
  if isinstance(budget, (float, np.floating)):
    if not 0.0 < budget <= 1.0:
      raise ValueError(f"A fractional budget must lie in (0, 1] (give MACs as an int), got "
                       f"{budget}.")
    # The relative slack absorbs float error (a fraction computed as macs / full), < 1 MAC.
    return int(math.floor(float(budget) * full * (1.0 + 1e-12)))
  raise ValueError(f"The budget must be MACs (an int) or a fraction of the SuperNet's MACs "
                   f"(a float in (0, 1]), got {budget!r}.")
