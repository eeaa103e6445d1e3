"""Multi-objective measures of a preference sweep (METHODS.md section 4), in numpy.

- `hypervolume`: exact hypervolume of loss vectors (minimisation) against a reference point,
  in any dimension (a sweep in 2-D; WFG-style exclusive volumes with limit sets, dominated-point
  pruning and slicing on the last objective above).
- `cost_band_hypervolume`: the hypervolume of the points whose cost lies in a band (a sweep
  compared with another at matched cost).
- `uniformity`: mu = 1 - KL(Lhat || uniform), Lhat_j = r_j L_j / sum_i r_i L_i.
- `rank_controllability` [ours]: Spearman correlation between r_t and task t's performance.
- `delta_m`: mean relative gain over single-task models, in percent.

Every function validates its inputs and stops with one ValueError sentence naming the bad
value and what is expected; preferences are checked by `dymu_jax.controls.check_preferences`
(its `SIMPLEX_TOLERANCE` and message). The preference grids of a sweep (`phn_rays`,
`das_dennis`, ...) are in `dymu_jax.controls`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from dymu_jax import controls


def _as_matrix(points, name: str) -> np.ndarray:
  """A finite (n, d) float64 array (a single (d,) vector becomes (1, d))."""
  array = np.asarray(points, np.float64)
  if array.ndim == 1:
    array = array[None, :]
  if array.ndim != 2 or array.shape[1] < 1:
    raise ValueError(f"{name} must be a (n, d) array of vectors, got shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite, got {array.tolist()}.")
  return array


# ----------------------------------------------------------------------------------------------
# Pareto fronts and hypervolume.


def pareto_mask(points) -> np.ndarray:
  """(n,) bool: True for the points that no other point dominates (minimisation).

  q dominates p when q <= p in every objective and q < p in at least one; exact duplicates do
  not dominate each other, so both stay.
  """
  pts = _as_matrix(points, "points")
  weakly_better = np.all(pts[:, None, :] <= pts[None, :, :], axis=-1)  # [q, p]: q <= p
  strictly_better = np.any(pts[:, None, :] < pts[None, :, :], axis=-1)
  dominated = np.any(weakly_better & strictly_better, axis=0)
  return ~dominated


def pareto_front(points) -> np.ndarray:
  """The non-dominated subset of `points` (minimisation), in their original order."""
  pts = _as_matrix(points, "points")
  return pts[pareto_mask(pts)]


def default_reference(points, margin: float = 0.1) -> np.ndarray:
  """A reference point just worse than every point: nadir + margin * extent, per objective.

  The extent is max - min of the objective over the points; where that is 0 (one point, or
  equal values) it falls back to |max|, and to 1 when that is 0 too, so the reference is always
  strictly worse than every point.
  """
  pts = _as_matrix(points, "points")
  if margin <= 0:
    raise ValueError(f"margin must be > 0, got {margin}.")
  high, low = pts.max(axis=0), pts.min(axis=0)
  extent = high - low
  extent = np.where(extent > 0, extent, np.abs(high))
  extent = np.where(extent > 0, extent, 1.0)
  return high + margin * extent


def _hypervolume_2d(points: np.ndarray, reference: np.ndarray) -> float:
  """Sweep over the first objective; `points` strictly dominate `reference`."""
  order = np.lexsort((points[:, 1], points[:, 0]))
  first, second = points[order, 0], points[order, 1]
  # Best second objective seen before each point; a point adds a slab only below it.
  best_before = np.minimum.accumulate(np.r_[reference[1], second[:-1]])
  return float(np.sum((reference[0] - first) * np.maximum(best_before - second, 0.0)))


def _nondominated(points: np.ndarray) -> np.ndarray:
  """Distinct non-dominated rows (no validation: internal to `_hypervolume`)."""
  points = np.unique(points, axis=0)
  weakly_better = np.all(points[:, None, :] <= points[None, :, :], axis=-1)
  np.fill_diagonal(weakly_better, False)  # distinct rows: q <= p and q != p means q dominates p
  return points[~np.any(weakly_better, axis=0)]


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
  """Exact hypervolume of points that all strictly dominate `reference`.

  Points are sorted by the last objective, worst first. The volume that point k adds to the
  points after it is its box minus the box union of their "limit set" max(p_k, p_j); all limit
  points share p_k's last objective, so that union is a (d-1)-dimensional hypervolume times
  (reference_d - p_k[d]) (the WFG algorithm, While et al. 2012, with slicing).
  """
  num, dim = points.shape
  if num == 0:
    return 0.0
  if dim == 1:
    return float(reference[0] - points[:, 0].min())
  if num == 1:
    return float(np.prod(reference - points[0]))
  if dim == 2:
    return _hypervolume_2d(points, reference)
  points = _nondominated(points)
  points = points[np.argsort(-points[:, -1], kind="stable")]
  head, last = points[:, :-1], points[:, -1]
  volume = 0.0
  for k in range(len(points)):
    box = float(np.prod(reference[:-1] - head[k]))
    limit = np.maximum(head[k + 1:], head[k])
    exclusive = box - _hypervolume(limit, reference[:-1]) if len(limit) else box
    volume += (reference[-1] - last[k]) * exclusive
  return volume


def hypervolume(points, reference) -> float:
  """Exact hypervolume dominated by loss vectors (minimisation), bounded by `reference`.

  Args:
    points: (n, d) loss vectors, e.g. the test losses of a preference sweep.
    reference: (d,) reference point; points that do not strictly dominate it (worse or equal
      in some objective) add nothing and are ignored.

  Returns:
    The Lebesgue measure of the union of the boxes [p, reference]; 0 for no useful point.
  """
  pts = _as_matrix(points, "points")
  ref = np.asarray(reference, np.float64)
  if ref.shape != (pts.shape[1],):
    raise ValueError(f"reference must have shape ({pts.shape[1]},) to match points of dimension "
                     f"{pts.shape[1]}, got shape {ref.shape}.")
  if not np.all(np.isfinite(ref)):
    raise ValueError(f"reference must be finite, got {ref.tolist()}.")
  pts = pts[np.all(pts < ref, axis=1)]
  return float(_hypervolume(pts, ref))


COST_BAND_TOLERANCE = 1e-9


def cost_band_hypervolume(points, costs, reference, high: float,
                          low: float = 0.0) -> tuple[float, int]:
  """Hypervolume of the points whose cost lies in [low, high], and how many there are.

  A sweep whose points cost different amounts (a DYMU sweep's trees) is compared with another
  at matched cost by keeping only its points in the band: e.g. every tree using at most 60 % of
  the anchor's MACs (`high=0.6`). Both ends are inclusive, up to `COST_BAND_TOLERANCE` (costs
  computed as ratios may land a rounding error past a round band edge).

  Args:
    points: (n, d) loss vectors (minimisation).
    costs: (n,) the cost of each point, e.g. the MACs fraction of its network.
    reference: (d,) the hypervolume reference point (`hypervolume`).
    high: the largest cost kept.
    low: the smallest cost kept (default 0).

  Returns:
    (hypervolume of the kept points, number of points kept); (0.0, 0) when none is in the band.
  """
  pts = _as_matrix(points, "points")
  cost = np.asarray(costs, np.float64).reshape(-1)
  if cost.shape != (pts.shape[0],):
    raise ValueError(f"costs must give one number per point ({pts.shape[0]}), got shape "
                     f"{np.shape(costs)}.")
  if not np.all(np.isfinite(cost)):
    raise ValueError(f"costs must be finite, got {cost.tolist()}.")
  if not (math.isfinite(low) and math.isfinite(high) and low <= high):
    raise ValueError(f"the cost band needs finite low <= high, got low={low}, high={high}.")
  keep = (cost >= low - COST_BAND_TOLERANCE) & (cost <= high + COST_BAND_TOLERANCE)
  if not keep.any():
    hypervolume(pts[:0], reference)  # validates the reference all the same
    return 0.0, 0
  return hypervolume(pts[keep], reference), int(keep.sum())


# ----------------------------------------------------------------------------------------------
# Uniformity.


def uniformity_per_point(losses, preferences) -> np.ndarray:
  """(n,) uniformity mu = 1 - KL(Lhat || uniform) of each (loss vector, preference) pair.

  Lhat_j = r_j L_j / sum_i r_i L_i, with 0 log 0 = 0. mu = 1 when the weighted losses are
  equal; it falls to 1 - log(d) when one task takes everything.

  Preferences with zero entries (the corners and edges of the simplex, as in a Das-Dennis grid)
  are fine: a task with r_j = 0 gets Lhat_j = 0 and adds nothing to the KL term, so a corner
  r = e_t gives 1 - log(d) whatever the losses. Only sum_i r_i L_i = 0 (every task with
  r_j > 0 has a zero loss) leaves Lhat undefined; the rule then is Lhat = r, the limit for
  losses shrinking together (L = eps * 1, eps -> 0), so a corner still gives 1 - log(d) and
  nothing divides by zero.
  """
  loss = _as_matrix(losses, "losses")
  prefs = controls.check_preferences(preferences, loss.shape[1])
  if prefs.shape != loss.shape:
    raise ValueError(f"losses of shape {loss.shape} and preferences of shape {prefs.shape} must "
                     "have the same shape.")
  if np.any(loss < 0):
    raise ValueError(f"losses must be >= 0, got {loss.tolist()}.")
  weighted = prefs * loss
  totals = weighted.sum(axis=1, keepdims=True)
  # sum_i r_i L_i = 0: Lhat = r (the docstring's rule); elsewhere r * L / sum.
  zero = totals <= 0
  share = np.where(zero, prefs / prefs.sum(axis=1, keepdims=True),
                   weighted / np.where(zero, 1.0, totals))
  dim = loss.shape[1]
  terms = np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0) * dim), 0.0)
  return 1.0 - terms.sum(axis=1)


def uniformity(losses, preferences) -> float:
  """Mean uniformity over a sweep: `losses` and `preferences` are (n, d) (or one (d,) pair)."""
  return float(np.mean(uniformity_per_point(losses, preferences)))


# ----------------------------------------------------------------------------------------------
# Rank controllability.


def rankdata(values) -> np.ndarray:
  """1-based ranks of a 1-D array, ties sharing their average rank (as scipy's default)."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Start of each run of equal values, and the average 1-based rank of each run.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  run_ranks = (starts + ends + 1) / 2.0
  ranks = np.empty(len(values))
  ranks[order] = np.repeat(run_ranks, ends - starts)
  return ranks


def spearman(x, y) -> float:
  """Spearman rank correlation of two 1-D arrays; NaN when either is constant."""
  rx, ry = rankdata(x), rankdata(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denominator = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denominator) if denominator > 0 else float("nan")


def rank_controllability(preferences, performance,
                         higher_is_better: Sequence[bool]) -> tuple[float, np.ndarray]:
  """Per-task Spearman correlation between r_t and task t's performance over a sweep [ours].

  Args:
    preferences: (n, d) preference vectors of the sweep (n >= 2), each on the simplex.
    performance: (n, d) the task metrics reached at those preferences.
    higher_is_better: d flags; lower-is-better metrics have their sign flipped, so +1 always
      means "more preference, better task".

  Returns:
    (mean over tasks, (d,) per-task correlations). A task whose preference or performance is
    constant over the sweep has an undefined correlation (NaN) and is left out of the mean;
    the mean is NaN when no task is defined. Average over budgets in the caller.
  """
  perf = _as_matrix(performance, "performance")
  prefs = controls.check_preferences(preferences, perf.shape[1])
  if prefs.shape != perf.shape:
    raise ValueError(f"preferences of shape {prefs.shape} and performance of shape {perf.shape} "
                     "must have the same shape.")
  if perf.shape[0] < 2:
    raise ValueError(f"rank controllability needs a sweep of at least 2 preferences, got "
                     f"{perf.shape[0]}.")
  signs = _signs(higher_is_better, perf.shape[1])
  per_task = np.array([spearman(prefs[:, t], signs[t] * perf[:, t])
                       for t in range(perf.shape[1])])
  defined = per_task[~np.isnan(per_task)]
  mean = float(defined.mean()) if len(defined) else float("nan")
  return mean, per_task


def _signs(higher_is_better: Sequence[bool], num_tasks: int) -> np.ndarray:
  flags = list(higher_is_better)
  if len(flags) != num_tasks:
    raise ValueError(f"higher_is_better has {len(flags)} entries but there are {num_tasks} "
                     "tasks.")
  return np.where(np.asarray(flags, bool), 1.0, -1.0)


# ----------------------------------------------------------------------------------------------
# Delta_m.


def delta_m(metrics, single_task_metrics, higher_is_better) -> float:
  """Mean over tasks of s_t (M_t - M_t^single) / M_t^single * 100, s_t = +1 if higher is better.

  Args:
    metrics: the multi-task model's metric per task: a mapping task -> value, or a sequence.
    single_task_metrics: the single-task models' metrics, same keys (or length).
    higher_is_better: mapping task -> bool (or a sequence in the same order).

  Returns:
    Delta_m in percent; positive means better than the single-task models on average. Tasks
    without a relative change are left out of the mean (see `delta_m_terms`); NaN when no task
    has one.
  """
  return delta_m_terms(metrics, single_task_metrics, higher_is_better)[0]


def delta_m_terms(metrics, single_task_metrics, higher_is_better
                  ) -> tuple[float, list[str | int]]:
  """(Delta_m, the tasks left out of it): the rule for references that cannot be divided by.

  A task whose single-task metric is 0 (e.g. an MAE of 0 on a task with a constant label) or
  whose metric or reference is not finite (NaN: no labelled test example) has no relative
  change; it is left out of the mean and named in the second value (task names, or indices for
  sequences), so a report can say which tasks Delta_m covers. With every task left out, Delta_m
  is NaN. Same arguments as `delta_m`.
  """
  if isinstance(metrics, Mapping):
    names = list(metrics)
    if not isinstance(single_task_metrics, Mapping) or set(single_task_metrics) != set(names):
      raise ValueError(f"single_task_metrics must give a value for exactly the tasks {names}.")
    if not isinstance(higher_is_better, Mapping) or set(higher_is_better) != set(names):
      raise ValueError(f"higher_is_better must give a direction for exactly the tasks {names}.")
    values = np.array([metrics[n] for n in names], np.float64)
    single = np.array([single_task_metrics[n] for n in names], np.float64)
    flags = [higher_is_better[n] for n in names]
  else:
    values = np.asarray(metrics, np.float64).reshape(-1)
    single = np.asarray(single_task_metrics, np.float64).reshape(-1)
    flags = list(higher_is_better)
    if single.shape != values.shape:
      raise ValueError(f"single_task_metrics has {single.size} values but metrics has "
                       f"{values.size}.")
    names = list(range(values.size))
  if values.size == 0:
    raise ValueError("delta_m needs at least one task.")
  signs = _signs(flags, values.size)
  usable = np.isfinite(values) & np.isfinite(single) & (single != 0)
  excluded = [n for n, ok in zip(names, usable) if not ok]
  if not np.any(usable):
    return float("nan"), excluded
  terms = signs[usable] * (values[usable] - single[usable]) / single[usable] * 100.0
  return float(np.mean(terms)), excluded
