"""The page's numbers and tables: mean ± std with n, Delta_m, hypervolume reference points, and
the tables of fixed networks, preference sweeps and budget sweeps.

Every table takes seed groups (`collect.group_runs`) and returns Markdown lines. Which table a
group joins follows its evaluation report (`collect.run_kind`), never its method's name.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dymu_jax.metrics import pareto
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.results import collect

run_seed = collect.run_seed


# ----------------------------------------------------------------------------------------------
# Formatting.


def fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def minutes(seconds: Any) -> str:
  return "n/a" if seconds is None else f"{float(seconds) / 60:.1f} min"


def _spread(value: float) -> str:
  return f"{value:.2g}"


def _three(value: Any) -> str:
  return fmt(value, 3)


def _spread_percent(value: float) -> str:
  return f"{value:.2f}"


def stat(values: Sequence[Any], grouped: bool, fmt: Callable[[Any], str] = fmt,  # pylint: disable=redefined-outer-name
         spread: Callable[[float], str] = _spread) -> str:
  """One number of a group: a lone run's value as `fmt` writes it; of several runs the mean
  and sample standard deviation (ddof = 1) of those that have it, `mean ± std (n=k)`, or
  `mean (n=k)` where every run has the same value. None counts as missing."""
  present = [float(v) for v in values if v is not None and np.isfinite(float(v))]
  if not grouped:
    return fmt(values[0] if values else None)
  if not present:
    return "n/a"
  mean = float(np.mean(present))
  if len(present) == 1 or all(v == present[0] for v in present):
    return f"{fmt(mean)} (n={len(present)})"
  return f"{fmt(mean)} ± {spread(float(np.std(present, ddof=1)))} (n={len(present)})"


def percent(value: Any) -> str:
  """A Delta_m in % with two decimals and its sign (float noise of a reference shows as 0)."""
  return "n/a" if value is None else f"{float(value) + 0.0:+.2f}".replace("-0.00", "+0.00")


def mega(value: Any) -> str:
  """A count in millions (thousands below a million)."""
  if value is None:
    return "n/a"
  value = float(value)
  return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} K"


def method_label(method: Any) -> str:
  """A method's flag value as the page writes it (`phn_bn` -> PHN-BN)."""
  return str(method).upper().replace("_", "-")


def seeds_cell(seeds: Sequence[Any]) -> str:
  """"0, 1, 2 (n=3)"."""
  return f"{', '.join(map(str, seeds))} (n={len(seeds)})"


def runs_of(groups: Sequence[dict]) -> list[dict]:
  return [r for g in groups for r in g["runs"]]


# ----------------------------------------------------------------------------------------------
# Metrics and Delta_m.


def _metric_directions() -> dict[str, bool]:
  """{metric name: higher is better} of every task metric of `dymu_jax.metrics.tasks`."""
  directions, pending = {}, [metrics_lib.TaskMetric]
  while pending:
    cls = pending.pop()
    pending += cls.__subclasses__()
    directions.update(dict(cls.higher_is_better))
  return directions


_DIRECTIONS = _metric_directions()


def primary_name(metrics: Mapping[str, float]) -> str | None:
  # dymu_jax.metrics lists each task's primary metric first, and summary.json keeps the order.
  return next(iter(metrics), None)


def higher_is_better(run: Mapping[str, Any] | None, task: str, metric: str) -> bool:
  """Whether higher is better for a task's primary metric: as the run's evaluation report says
  it (`higher_is_better` per task, with `primary_metric`), else as the metric's own class does
  (`dymu_jax.metrics.tasks`); an unknown metric counts as an error (lower is better)."""
  evaluation = (run or {}).get("eval") or {}
  stated = evaluation.get("higher_is_better")
  primary = evaluation.get("primary_metric") or {}
  if isinstance(stated, Mapping) and task in stated and primary.get(task, metric) == metric:
    return bool(stated[task])
  return _DIRECTIONS.get(metric, False)


def delta_m(metrics: Mapping[str, Mapping[str, float]],
            reference: Mapping[str, Mapping[str, float]],
            run: Mapping[str, Any] | None = None) -> float | None:
  """Delta_m % of primary metrics against a reference run of the same tasks (None if not).

  The direction of each metric is `higher_is_better(run, ...)`.
  """
  if set(metrics) != set(reference) or not metrics:
    return None
  values, refs, higher = {}, {}, {}
  for task, task_metrics in metrics.items():
    name = primary_name(task_metrics)
    if name is None or name not in reference[task]:
      return None
    values[task], refs[task] = task_metrics[name], reference[task][name]
    higher[task] = higher_is_better(run, task, name)
  return pareto.delta_m(values, refs, higher)


def final_metrics(run: Mapping[str, Any]) -> Mapping[str, Mapping[str, float]]:
  """{task: {metric: value}} of the full network's final test evaluation (`summary.json`)."""
  evals = run["summary"].get("eval", {})
  if not evals:
    return {}
  for label, per_task in evals.items():  # the full network's entry first
    if "0.25" not in label:
      return per_task
  return next(iter(evals.values()))


def _mean_metrics(members: Sequence[dict]) -> dict[str, dict[str, float]]:
  """{task: {metric: mean over the runs that have it}}, in the first run's order."""
  out: dict[str, dict[str, float]] = {}
  for run in members:
    for task, task_metrics in final_metrics(run).items():
      for name in task_metrics:
        out.setdefault(task, {}).setdefault(name, None)
  for task, task_metrics in out.items():
    for name in task_metrics:
      values = [final_metrics(r).get(task, {}).get(name) for r in members]
      values = [float(v) for v in values if v is not None]
      task_metrics[name] = float(np.mean(values)) if values else None
  return out


def final_metrics_text(members: Sequence[dict]) -> str:
  """`task metric value, ...` of the runs' final primary test metrics (stat over the runs)."""
  per_run = [final_metrics(r) for r in members]
  shown = []
  for task, task_metrics in per_run[0].items():
    name = primary_name(task_metrics)
    if name is None:
      shown.append(task)
      continue
    shown.append(f"{task} {name} " + stat([m.get(task, {}).get(name) for m in per_run],
                                         len(members) > 1))
  return ", ".join(shown)


def run_delta_m(run: dict, reference: Mapping[str, Any] | None) -> float | None:
  """Delta_m % of a fixed run against the reference group `reference` (see `fixed_table`)."""
  evaluation = run["eval"] or {}
  if reference is None:
    if evaluation.get("delta_m") is not None:
      return evaluation["delta_m"]
    return None
  same_seed = [r for r in reference["runs"] if collect.same(run_seed(r), run_seed(run))]
  if same_seed:
    target = same_seed[0]
    measured = collect.reference_dir(run)
    same_run = measured and (
        os.path.realpath(measured) == os.path.realpath(target["workdir"])
        or os.path.basename(os.path.normpath(measured)) == target["name"])  # folders moved
    if evaluation.get("delta_m") is not None and same_run:
      return evaluation["delta_m"]
    return delta_m(final_metrics(run), final_metrics(target), run)
  return delta_m(final_metrics(run), _mean_metrics(reference["runs"]), run)


def fixed_table(groups: Sequence[dict], reference: Mapping[str, Any] | None) -> list[str]:
  """One row per seed group of fixed networks.

  Delta_m of each run against `reference` (the reference method's group): its run of the same
  seed (the evaluation's value where it was measured against that run, else from the
  summaries), or the mean of the group's metrics where it has no run of that seed; without a
  reference, the run's evaluation's own Delta_m. Costs (per example) come from the evaluation
  (`cost`: analytic inference MACs, parameters and training MACs by
  `experiments.evaluate.TRAINING_MACS_CONVENTION`).
  """
  lines = ["| run | method | steps | test metrics | Delta_m % | inference MACs | params | "
           "training MACs | wall time | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
  for group in groups:
    members, grouped = group["runs"], len(group["runs"]) > 1
    costs = [(r["eval"] or {}).get("cost") or {} for r in members]
    cells = [f"`{group['name']}`", str(group["values"].get("method")),
             str(members[0]["summary"].get("steps")), final_metrics_text(members),
             stat([run_delta_m(r, reference) for r in members], grouped, percent,
                  _spread_percent),
             stat([c.get("inference_macs") for c in costs], grouped, mega, mega),
             stat([c.get("params") for c in costs], grouped, mega, mega),
             stat([c.get("training_macs_per_example") for c in costs], grouped, mega, mega),
             stat([r["summary"].get("seconds") for r in members], grouped, minutes, minutes),
             seeds_cell(group["seeds"])]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


# ----------------------------------------------------------------------------------------------
# Hypervolume reference points.


def common_hv_reference(members: Sequence[dict]) -> tuple[list[float], str] | None:
  """(point, source) when every evaluated sweep or budget sweep of these runs was measured
  against the same hypervolume reference point (`hypervolume_reference` of their reports, e.g.
  Multi-MNIST's fixed (2, 2) or one `--hv_reference`), else None."""
  reports = [run["eval"] for run in members if run["eval"]
             and (run["eval"].get("sweeps") or run["eval"].get("budgets"))]
  points = [r.get("hypervolume_reference") for r in reports]
  if not points or any(p is None for p in points):
    return None
  first = np.asarray(points[0], np.float64)
  if any(np.shape(p) != first.shape or not np.allclose(p, first, rtol=0, atol=1e-12)
         for p in points):
    return None
  sources = list(dict.fromkeys(str(r.get("hypervolume_reference_source") or "")
                               for r in reports))
  return first.tolist(), "; ".join(s for s in sources if s)


def shared_hv_reference(members: Sequence[dict]) -> list[float] | None:
  """One hypervolume reference for the test losses of every preference sweep (and budget) of
  these runs: the one their evaluations all used (`common_hv_reference`), else just worse than
  every one of their losses (`pareto.default_reference`)."""
  common_reference = common_hv_reference(members)
  if common_reference is not None:
    return common_reference[0]
  losses = [np.asarray(item["losses"]) for run in members if run["eval"]
            for key in ("sweeps", "budgets") for item in run["eval"].get(key, [])
            if item.get("losses")]
  if not losses:
    return None
  return pareto.default_reference(np.concatenate(losses)).tolist()


def hv_reference_text(members: Sequence[dict], reference: Sequence[float], losses: str) -> str:
  """How the page's reference point was chosen, for a caption."""
  point = [round(x, 4) for x in reference]
  common_reference = common_hv_reference(members)
  if common_reference is not None:
    source = f": {common_reference[1]}" if common_reference[1] else ""
    return f"{point} (the point every evaluation here used{source})"
  return f"{point} (just worse than every {losses})"


# ----------------------------------------------------------------------------------------------
# Preference sweeps.


def _anchor_cost(members: Sequence[dict]) -> dict | None:
  """The cost of the first evaluation that states its full network's ("full_macs")."""
  for run in members:
    cost = (run["eval"] or {}).get("cost") or {}
    if "full_macs" in cost:
      return cost
  return None


def training_seconds(run: Mapping[str, Any], variant: str) -> Any:
  """Wall time of what a sweep's variant needs: where the variant names a stage of a staged run
  other than its last, the stages up to that one; else the whole run's."""
  stages = run["summary"].get("stages") or {}
  names = list(stages)
  if variant in names[:-1]:
    return sum(stages[s]["seconds"] for s in names[:names.index(variant) + 1])
  return run["summary"].get("seconds")


def _sweep_key(sweep: Mapping[str, Any]) -> tuple:
  return (sweep["variant"], sweep["resource"])


def _sweep_cost(evaluation: Mapping[str, Any], sweep: Mapping[str, Any]) -> tuple:
  """(MACs, params, distinct trees) of a sweep as the preference table shows them."""
  cost = evaluation.get("cost") or {}
  by_resource = {row["resource"]: row for row in cost.get("by_resource", [])}
  if sweep["resource"] is not None and sweep["resource"] in by_resource:
    row = by_resource[sweep["resource"]]
    return (row["mean_macs_fraction"] * cost["full_macs"],
            row["mean_params_fraction"] * cost["full_params"], row["distinct_trees"])
  return cost.get("inference_macs"), cost.get("params"), sweep.get("distinct_trees", "-")


def _sweep_band_hv(sweep: Mapping[str, Any], reference: np.ndarray) -> float | None:
  """The HV of a sweep's points in its evaluation's cost band, at `reference`; None for sweeps
  without a band (one network, whose cost is in the MACs column)."""
  band = sweep.get("cost_band")
  if not band:
    return None
  costs = [p.get("macs_fraction") for p in sweep["points"]]
  if any(c is None for c in costs):
    return None
  value, _ = pareto.cost_band_hypervolume(np.asarray(sweep["losses"]), np.asarray(costs),
                                          reference, band["max_macs_fraction"],
                                          band.get("min_macs_fraction", 0.0))
  return value


def preference_table(groups: Sequence[dict], hv_reference: Sequence[float]) -> list[str]:
  """One row per seed group and sweep (variant, resource c) of the preference-swept runs.

  Hypervolumes are recomputed against `hv_reference`, shared by every row so they compare.
  Costs: per resource, the mean over the evaluation's cost preferences (`cost.by_resource`:
  the network differs per preference), else the one network's. Fractions are of the first
  evaluation that states its full network's cost (`cost.full_macs`, `cost.full_params`).
  """
  anchor = _anchor_cost(runs_of(groups))
  head = ["run", "variant", "c", "HV", "HV (cost band)", "uniformity", "rank contr.",
          "min mean/anchor", "Delta_m %", "mean MACs (fraction)", "mean params (fraction)",
          "distinct trees", "training time", "seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  reference = np.asarray(hv_reference, np.float64)
  fraction = lambda k: (lambda v: mega(v) + (f" ({float(v) / anchor[k]:.3f})"
                                             if anchor and v is not None else ""))
  for group in groups:
    evaluated = [r for r in group["runs"] if r["eval"] and "sweeps" in r["eval"]]
    if not evaluated:
      lines.append(f"| `{group['name']}` | not evaluated |" + " |" * (len(head) - 2))
      continue
    grouped = len(group["runs"]) > 1
    keys = list(dict.fromkeys(_sweep_key(s) for r in evaluated for s in r["eval"]["sweeps"]))
    for key in keys:
      rows = []  # (run, sweep) of the runs that have this sweep
      for run in evaluated:
        rows += [(run, s) for s in run["eval"]["sweeps"] if _sweep_key(s) == key][:1]
      costs = [_sweep_cost(run["eval"], sweep) for run, sweep in rows]
      trees = [c[2] for c in costs]
      variant, resource = key
      cells = [f"`{group['name']}`", variant, "-" if resource is None else f"{resource:g}",
               stat([pareto.hypervolume(np.asarray(s["losses"]), reference) for _, s in rows],
                    grouped),
               stat([_sweep_band_hv(s, reference) for _, s in rows], grouped),
               stat([s.get("uniformity") for _, s in rows], grouped),
               stat([s.get("rank_controllability") for _, s in rows], grouped, _three),
               stat([s.get("min_ratio_to_anchor") for _, s in rows], grouped, _three),
               stat([s.get("delta_m") for _, s in rows], grouped, percent, _spread_percent),
               stat([c[0] for c in costs], grouped, fraction("full_macs"), mega),
               stat([c[1] for c in costs], grouped, fraction("full_params"), mega),
               (str(trees[0]) if not grouped or not all(isinstance(t, (int, float))
                                                         for t in trees)
                else stat(trees, grouped)),
               stat([training_seconds(run, variant) for run, _ in rows], grouped, minutes,
                    minutes),
               seeds_cell([run_seed(run) for run, _ in rows])]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


# ----------------------------------------------------------------------------------------------
# Budget sweeps.


def budget_table(group: Mapping[str, Any]) -> list[str]:
  """One row per budget of a seed group whose evaluations are budget sweeps ("budgets" in the
  report); hypervolumes against one reference point for the group's budgets (for one run: the
  evaluation's own)."""
  if "runs" not in group:  # one run, as before seed groups
    group = {"runs": [group], "seeds": [run_seed(group)]}
  members = [r for r in group["runs"] if r["eval"]]
  grouped = len(group["runs"]) > 1
  evaluation = members[0]["eval"]
  tasks = evaluation["tasks"]
  primary = evaluation.get("primary_metric", {})
  head = ["budget", "max MACs (fraction)", "within budget"]
  head += [f"{t} {primary.get(t, '')}" for t in tasks]
  head += ["rank contr.", "Delta_m %", "mean norm. metric", "HV (losses)", "uniformity"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  full = float(evaluation["full_macs"])
  rows_of = [{row["budget"]: row for row in r["eval"]["budgets"]} for r in members]
  all_rows = [row for rows in rows_of for row in rows.values()]
  hv_reference = (shared_hv_reference(members)
                  if all(row.get("losses") for row in all_rows) else None)
  budgets = list(dict.fromkeys(b for rows in rows_of for b in rows))
  for budget in budgets:
    rows = [r[budget] for r in rows_of if budget in r]
    within = [bool(row.get("within_budget")) for row in rows]
    cells = [fmt(budget),
             stat([row["max_macs"] for row in rows], grouped,
                  lambda v: f"{int(round(v)):,} ({v / full:.3f})", lambda s: f"{s:,.0f}"),
             "yes" if all(within) else ("NO" if not grouped
                                        else f"NO ({within.count(False)} of {len(within)})")]
    cells += [stat([row.get("mean_metric", {}).get(t) for row in rows], grouped)
              for t in tasks]
    hvs = [row.get("hypervolume") if hv_reference is None else
           pareto.hypervolume(np.asarray(row["losses"]), hv_reference) for row in rows]
    cells += [stat([row.get("rank_controllability") for row in rows], grouped, _three),
              stat([row.get("delta_m") for row in rows], grouped, _three),
              stat([row.get("mean_normalised_metric") for row in rows], grouped),
              stat(hvs, grouped), stat([row.get("uniformity") for row in rows], grouped)]
    lines.append("| " + " | ".join(cells) + " |")
  checks = [r["eval"].get("budget_check", {}) for r in members]
  total = lambda k: (sum(c[k] for c in checks) if all(k in c for c in checks) else "n/a")
  budget_counts = sorted({str(c.get("budgets", "n/a")) for c in checks})
  references = list(dict.fromkeys(str(r["eval"].get("reference", "n/a")) for r in members))
  first = group["runs"][0]
  rank = stat([r["eval"].get("mean_rank_controllability") for r in members], grouped, _three)
  train_time = stat([r["summary"].get("seconds") for r in group["runs"]], grouped, minutes,
                    minutes)
  eval_time = stat([r["eval"].get("seconds") for r in members], grouped, minutes, minutes)
  lines += ["", f"Mean rank controllability over tasks and budgets: {rank}. Budget check: "
            f"{total('searches')} searches over {' / '.join(budget_counts)} "
            f"budgets{' (all runs)' if grouped else ''}, {total('over_budget')} over budget. "
            f"Reference of Delta_m: {'; '.join(references)}. Training: "
            f"{first['summary'].get('steps')} steps, {train_time}; evaluation {eval_time}"
            f". Seeds: {seeds_cell(group['seeds'])}"
            + (f"; evaluated: {', '.join(str(run_seed(r)) for r in members)}"
               if len(members) < len(group["runs"]) else "") + "."
            + (f" HV (losses) against one reference point for the group's runs, "
               f"{hv_reference_text(members, hv_reference, 'loss of their budgets')}."
               if grouped and hv_reference is not None else "")]
  return lines
