"""The measures of a controllability sweep (METHODS.md section 4), from its points' metrics.

A point is {"preference": [...], "metrics": {task: {metric: value, "loss": test loss}}, ...};
a sweep is the points of one group of controls in preference order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dymu_jax.metrics import pareto
from dymu_jax.models import cost as cost_lib
from dymu_jax.metrics import tasks as metrics_lib


def trained_params(variables: Mapping[str, Any]) -> int:
  """How many parameters a run trains (those under variables["params"]; frozen collections
  and batch statistics are not counted)."""
  return int(cost_lib.num_params(variables["params"]))


def primary(tasks: Sequence[Any]) -> tuple[list[str], dict[str, str], dict[str, bool]]:
  """(task names, {task: primary metric name}, {task: primary metric is higher-better})."""
  names = [t.name for t in tasks]
  pairs = {t.name: metrics_lib.primary(t) for t in tasks}
  return (names, {n: metric for n, (metric, _) in pairs.items()},
          {n: higher for n, (_, higher) in pairs.items()})


def _none_if_nan(value) -> float | None:
  return None if np.isnan(value) else float(value)


def sweep_measures(tasks: Sequence[Any], points: Sequence[Mapping[str, Any]],
                   reference: Mapping[str, Mapping[str, float]] | None) -> dict:
  """Loss-space and controllability measures of one preference sweep.

  Returns {"losses": (P, T) test losses, "mean_metric": {task: mean primary metric},
  "uniformity", "rank_controllability" (None when undefined), "rank_per_task"}, and "delta_m"
  (mean over points, against `reference` {task: {metric: value}}) when a reference is given.
  """
  names, metric_names, higher = primary(tasks)
  prefs = np.array([p["preference"] for p in points], np.float64)
  values = np.array([[p["metrics"][n][metric_names[n]] for n in names] for p in points])
  loss = np.array([[p["metrics"][n]["loss"] for n in names] for p in points])
  rank_mean, rank_per_task = pareto.rank_controllability(prefs, values,
                                                         [higher[n] for n in names])
  out = {"losses": loss.tolist(),
         "mean_metric": {n: float(values[:, i].mean()) for i, n in enumerate(names)},
         "uniformity": pareto.uniformity(loss, prefs),
         "rank_controllability": _none_if_nan(rank_mean),
         "rank_per_task": {n: _none_if_nan(v) for n, v in zip(names, rank_per_task)}}
  if reference is not None:
    out["delta_m"] = float(np.mean([
        pareto.delta_m({n: p["metrics"][n][metric_names[n]] for n in names},
                       {n: reference[n][metric_names[n]] for n in names}, higher)
        for p in points]))
  return out


def cost_measures(points: Sequence[Mapping[str, Any]], structure: Sequence[str] = ()) -> dict:
  """The sweep's distinct structures (the points' `structure` fields, e.g. DYMU's "tree"),
  its mean and largest MACs, and mean fractions of the full network where points have them."""
  macs = [p["macs"] for p in points]
  out = {"distinct_structures": len({repr([p.get(k) for k in structure]) for p in points}),
         "mean_macs": float(np.mean(macs)), "max_macs": int(max(macs))}
  for name in ("macs_fraction", "params_fraction"):
    values = [p[name] for p in points if p.get(name) is not None]
    if values and len(values) == len(points):
      out[f"mean_{name}"] = float(np.mean(values))
  return out


def points_inside(losses, reference) -> int:
  """How many loss vectors strictly dominate the reference (the ones that add volume)."""
  losses = np.asarray(losses, np.float64).reshape(-1, len(reference))
  return int(np.sum(np.all(losses < np.asarray(reference), axis=1)))


def add_hypervolumes(sweeps: Sequence[dict], reference) -> None:
  """Each sweep's "hypervolume" of its "losses" against one `reference` point, and how many of
  its points lie inside that point's box ("points_inside_hv_reference")."""
  for sweep in sweeps:
    sweep["hypervolume"] = pareto.hypervolume(np.asarray(sweep["losses"]), reference)
    sweep["points_inside_hv_reference"] = points_inside(sweep["losses"], reference)


def cost_band(sweep: Mapping[str, Any], reference, band: tuple[float, float]) -> dict:
  """The hypervolume of a sweep's points whose MACs fraction lies in `band` (both inclusive):
  quality at matched cost."""
  low, high = band
  volume, count = pareto.cost_band_hypervolume(
      np.asarray(sweep["losses"]), [p["macs_fraction"] for p in sweep["points"]], reference,
      high, low)
  return {"min_macs_fraction": low, "max_macs_fraction": high, "hypervolume": volume,
          "num_points": count}


def versus(mean_metric: Mapping[str, float], reference_metrics: Mapping[str, Mapping[str, float]],
           metric_names: Mapping[str, str], higher: Mapping[str, bool]) -> dict:
  """Each task's mean primary metric over a sweep next to a reference network's (DYMU: its
  anchor, the separate tree).

  ratio = mean / reference for higher-is-better metrics and reference / mean otherwise, so that
  ratio >= 0.95 reads "within 5 % of the reference" either way; None when it would divide by
  zero. The record names the reference "anchor" (the one reference this is used with).
  """
  out = {}
  for name, mean in mean_metric.items():
    anchor = float(reference_metrics[name][metric_names[name]])
    numerator, denominator = (mean, anchor) if higher[name] else (anchor, mean)
    ratio = float(numerator / denominator) if denominator else None
    out[name] = {"metric": metric_names[name], "sweep_mean": float(mean), "anchor": anchor,
                 "ratio": ratio}
  return out
