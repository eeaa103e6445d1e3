"""Evaluate a trained network: its controllability sweep (a method with controls) or its one
deployed network (a fixed one), as the dict that `evaluation.report` renders.

    from dymu_jax.evaluation import run as evaluation_run
    results = evaluation_run.evaluate(method, variables, test_source, Settings(), workdir=...,
                                      output_dir=..., step=..., train_batch_size=64)

The path is chosen by the method's control space (`Method.control_space`), never by its name:
a method with controls is swept (each variant of `Method.evaluation_variants`, at each budget or
resource c, over the preferences), every setting deployed by `Method.deploy` and measured by
the one evaluation loop; a fixed network is deployed and measured once. A budget adds the
budget measures and check (`budget_section`), a resource the matched-cost and anchor
comparisons, the cost per c and the task affinity (`resource_section`). What the measures
mean, per method: docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from dymu_jax import controls
from dymu_jax import files as files_lib
from dymu_jax.data import base as data_base
from dymu_jax.evaluation import measures
from dymu_jax.evaluation import report
from dymu_jax.evaluation import sweep as sweep_lib
from dymu_jax.metrics import pareto
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.train import loop as loop_lib

# The default hypervolume reference of a 2-task Multi-MNIST run, in test cross-entropy per digit
# (issue 22); other runs default to a point just worse than every loss of their sweeps.
MULTI_MNIST_HV_REFERENCE = (2.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a run is evaluated (the flags of `experiments.evaluate`, same names).

  Attributes:
    preference_grid, num_preferences, preference_seed: the preferences of every sweep
      (`controls.preference_grid`).
    budgets: fractions of the full network's MACs (a method with a budget).
    resources: resource preferences c (a method with a resource).
    cost_preferences: preferences over which the mean cost per c is measured.
    hv_reference: the hypervolume reference point (one loss per task), or None for the default
      (`hv_reference_point`).
    cost_band: (lo, hi) fractions of the anchor's MACs of the matched-cost hypervolume.
    budget_check_points: budgets checked for MACs <= budget.
    max_test_examples: evaluate on at most this many test examples; 0 = all.
    eval_batch_size: examples per evaluation batch.
    plots: whether artefacts draw their plots.
  """

  preference_grid: str = "rays"
  num_preferences: int = 25
  preference_seed: int = 0
  budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
  resources: tuple[float, ...] = (0.0, 1.0)
  cost_preferences: int = 1000
  hv_reference: tuple[float, ...] | None = None
  cost_band: tuple[float, float] = (0.0, 0.6)
  budget_check_points: int = 41
  max_test_examples: int = 0
  eval_batch_size: int = 256
  plots: bool = True

  def check(self) -> "Settings":
    """One sentence (naming the flag) for a budget, resource or cost band out of range."""
    for budget in self.budgets:
      if not 0 < budget <= 1:
        raise ValueError(f"--budgets are fractions of the SuperNet's MACs in (0, 1], got "
                         f"{budget}.")
    if not self.resources or any(not 0 <= c <= 1 for c in self.resources):
      raise ValueError(f"--resources are resource preferences c in [0, 1], got "
                       f"{','.join(f'{c:g}' for c in self.resources)}.")
    low, high = self.cost_band
    if not 0 <= low <= high:
      raise ValueError(f"--cost_band needs 0 <= lo <= hi, got {low:g},{high:g}.")
    return self


@dataclasses.dataclass(frozen=True)
class Reference:
  """The single-task reference of Delta_m: {task: {metric: value}} and how reports name it."""

  metrics: Mapping[str, Mapping[str, float]]
  name: str
  workdir: str | None = None


class _Limited(data_base.DataSource):
  """The first `count` examples of a source."""

  def __init__(self, parent, count):
    self.parent, self.count = parent, count
    self.name, self.split, self.tasks = parent.name, parent.split, parent.tasks

  def __len__(self):
    return self.count

  def get(self, indices):
    return self.parent.get(indices)


def test_batches(test_source, settings: Settings) -> list[dict]:
  """The test split (at most `max_test_examples`) as labelled batches, kept in memory."""
  if settings.max_test_examples and settings.max_test_examples < len(test_source):
    test_source = _Limited(test_source, settings.max_test_examples)
  return list(data_base.eval_batches(test_source, settings.eval_batch_size))


def hv_reference_point(losses, num_tasks: int, dataset: str | None,
                       given: Sequence[float] | None = None) -> tuple[np.ndarray, str]:
  """The hypervolume reference of every sweep of a run and where it comes from.

  `given` (`--hv_reference`) when set; else `MULTI_MNIST_HV_REFERENCE` (2, 2) for a 2-task
  Multi-MNIST run, so that its runs compare without a flag; else `pareto.default_reference` of
  all the run's sweep losses (just worse than every one of them).
  """
  if given is not None:
    if len(given) != num_tasks:
      raise ValueError(f"--hv_reference needs one loss per task ({num_tasks}), got "
                       f"{len(given)}.")
    return np.asarray(given, np.float64), "--hv_reference"
  if dataset == "multi_mnist" and num_tasks == 2:
    return (np.asarray(MULTI_MNIST_HV_REFERENCE, np.float64),
            "the 2-task Multi-MNIST default (2, 2)")
  return pareto.default_reference(losses), "just worse than every loss of this run's sweeps"


def _check_reference(reference: Reference | None, tasks) -> None:
  if reference is None:
    return
  missing = [t.name for t in tasks if t.name not in reference.metrics]
  if missing:
    raise ValueError(f"The reference run {reference.workdir or reference.name} has no metrics "
                     f"for task(s) {', '.join(missing)}; give a run of the same tasks.")


# ----------------------------------------------------------------------------------------------
# A fixed network.


def evaluate_fixed(method, variables, test_source, settings: Settings, *, workdir: str,
                   output_dir: str, step: int, train_batch_size: int,
                   reference: Reference | None = None) -> dict:
  """A run whose method takes no controls: its deployed network through the one loop, its
  training cost (its learned structure is written by `evaluate`, as for every method)."""
  tasks = tuple(method.tasks)
  missing = [t.name for t in tasks if t.name not in {s.name for s in test_source.tasks}]
  if missing:
    raise ValueError(f"The evaluation data {test_source.name} {test_source.split} has "
                     f"no labels for task(s) {', '.join(missing)}.")
  _check_reference(reference, tasks)
  deployed = method.deploy(variables, image_shape=tuple(test_source.image_shape))
  per_task, counts = sweep_lib.deployed_metrics(deployed, tasks,
                                                test_batches(test_source, settings),
                                                with_labelled=True)
  label = loop_lib.control_label(None)
  for metrics in per_task.values():
    metrics.pop("loss")  # the sweeps' loss-space measures need it; a fixed network's report not
  out = {"method": method.name, "workdir": workdir, "step": step,
         "tasks": [t.name for t in tasks], "kinds": {t.name: t.kind for t in tasks},
         "eval": {label: per_task}, "labelled": {label: counts},
         "summary": {label: loop_lib.summarise_eval(per_task, tasks, counts)}}
  unlabelled = [name for name, count in counts.items() if not count]
  if unlabelled:
    print(f"[{label}] {len(unlabelled)} task(s) with no labelled test examples (metrics NaN): "
          f"{', '.join(unlabelled[:10])}{', ...' if len(unlabelled) > 10 else ''}", flush=True)
  if reference is not None:
    _, metric_names, higher = measures.primary(tasks)
    out["reference"] = reference.name
    out["delta_m"], left_out = pareto.delta_m_terms(
        {n: per_task[n][m] for n, m in metric_names.items()},
        {n: reference.metrics[n][m] for n, m in metric_names.items()}, higher)
    if left_out:  # a zero or missing single-task metric: no relative change to average
      out["delta_m_left_out"] = left_out
      print(f"Delta_m leaves out task(s) {', '.join(map(str, left_out))}: their single-task "
            f"metric is 0 or their metrics are not finite (pareto.delta_m_terms).", flush=True)
  out["cost"] = method.training_cost(variables, test_source.image_shape, train_batch_size)
  return out


# ----------------------------------------------------------------------------------------------
# The controllability sweep.


def _group_label(variant: str, fixed: dict, num_variants: int) -> str:
  parts = [variant] if num_variants > 1 or not fixed else []
  parts += [f"{'c' if name == 'resource' else name}={value:g}" for name, value in fixed.items()]
  return ", ".join(parts)


def evaluate_sweep(method, variables, test_source, settings: Settings, *, workdir: str,
                   output_dir: str, step: int, prepared=None,
                   reference: Reference | None = None, dataset: str | None = None) -> dict:
  """The controllability sweep of a method with controls (module docstring): every variant
  (`Method.evaluation_variants`) at every budget or resource c, over the preferences, each
  setting deployed (`Method.deploy`) and measured by the one loop; distinct networks once.
  `prepared`: the method's `prepare` result (the caller loads its held-out data)."""
  space = method.control_space()
  tasks = tuple(method.tasks)
  _check_reference(reference, tasks)
  names, metric_names, higher = measures.primary(tasks)
  image_shape = tuple(test_source.image_shape)
  sweeper = sweep_lib.Sweeper(method, variables, test_batches(test_source, settings),
                              image_shape=image_shape, prepared=prepared)
  progress = sweep_lib.Progress()
  full = method.full_network(variables, prepared, image_shape=image_shape, standalone=False)
  full_metrics = None
  if full is not None:
    full_metrics = sweep_lib.deployed_metrics(full, tasks, sweeper.batches)
    full_cost = full.cost()
    print(f"{full.info.get('name', 'full network')}: {full_cost.macs:,} MACs per example, "
          f"{full_cost.params:,} parameters", flush=True)
  reference_metrics, reference_name = (
      (reference.metrics, reference.name) if reference is not None else (None, "SuperNet"))
  if reference is None and full_metrics is not None:
    reference_metrics, reference_name = full_metrics, {
        "supernet": "SuperNet", "anchor": "the anchor (single-task streams)"}.get(
            full.info.get("name"), full.info.get("name"))
  prefs, preference_record = controls.preference_grid(
      settings.preference_grid, settings.num_preferences, len(tasks), settings.preference_seed)
  variants = method.evaluation_variants(variables)
  budgets, resources = tuple(settings.budgets), list(settings.resources)
  sweeps, skipped = [], []
  for variant, variant_variables in variants.items():
    for fixed in sweep_lib.groups(space, budgets, resources):
      label = _group_label(variant, fixed, len(variants))
      try:
        points = sweeper.sweep(fixed, prefs, variant_variables, label=variant)
      except ValueError as error:  # a budget below the smallest network: reported, skipped
        if "budget" not in fixed:
          raise
        skipped.append(fixed["budget"])
        print(f"{label}: {error} Skipped.", flush=True)
        continue
      sweep = {"variant": variant, **fixed, "resource": fixed.get("resource"),
               "points": points, **measures.cost_measures(points, sweeper.structure),
               **measures.sweep_measures(tasks, points, reference_metrics)}
      sweeps.append(sweep)
      progress(f"{label}: {sweep['distinct_structures']} distinct networks, mean MACs "
               f"{sweep['mean_macs']:,.0f}, rank controllability "
               f"{report.fmt(sweep['rank_controllability'], 3)}")
  hv_reference, hv_source = None, None
  if sweeps:
    hv_reference, hv_source = hv_reference_point(
        np.concatenate([np.asarray(s["losses"]) for s in sweeps]), len(tasks), dataset,
        settings.hv_reference)
    measures.add_hypervolumes(sweeps, hv_reference)
    hv_reference = hv_reference.tolist()
  ranks = {}
  for variant in variants:
    defined = [s["rank_controllability"] for s in sweeps
               if s["variant"] == variant and s["rank_controllability"] is not None]
    ranks[variant] = float(np.mean(defined)) if defined else None
  results = {
      "method": method.name, "workdir": workdir, "step": step, "tasks": names,
      "primary_metric": metric_names, "higher_is_better": higher, "controls": list(space.names),
      "variants": list(variants), "resources": resources if "resource" in space.names else [],
      "num_preferences": len(prefs), "preference_seed": settings.preference_seed,
      "preference_grid": preference_record, "reference": reference_name,
      "reference_workdir": reference.workdir if reference is not None else None,
      "reference_metrics": reference_metrics, "hypervolume_reference": hv_reference,
      "hypervolume_reference_source": hv_source, "mean_rank_controllability": ranks,
      "distinct_networks": sweeper.distinct_networks,
      "deploy_options": {name: getattr(method, name) for name in method.DEPLOY_OPTIONS},
      # Where `prepare` keeps its caches (ECMT: cost_table.json, encoder_scores.json).
      "prepare_cache_dir": workdir if prepared is not None else None,
      "standalone_check": [_standalone_check(sweeper, s) for s in sweeps[:len(budgets)]
                           if "budget" in space.names],
  }
  if full is not None:
    results[f"{full.info['name']}_metrics"] = full_metrics
    results["full_network"] = {"name": full.info["name"], "macs": int(full_cost.macs),
                               "params": int(full_cost.params)}
  if "budget" in space.names:
    budget_section(results, method, variables, image_shape, settings, prepared, sweeps,
                   skipped, prefs)
  elif "resource" in space.names:
    resource_section(results, method, variables, image_shape, settings, sweeps, full_metrics,
                     hv_reference, workdir, output_dir)
  else:
    cost = sweeper.deploy({}).cost()
    results["sweeps"] = sweeps
    results["cost"] = {"inference_macs": int(cost.macs), "params": int(cost.params),
                       "trained_params": measures.trained_params(variables)}
  return results


def _standalone_check(sweeper, sweep: dict) -> dict:
  """A sweep's first point measured on its standalone (exportable) network."""
  point = sweep["points"][0]
  fixed = {k: sweep[k] for k in ("budget", "resource") if sweep.get(k) is not None}
  record = sweep_lib.standalone_check(
      sweeper, {"preference": np.asarray(point["preference"]), **fixed}, point["metrics"])
  return fixed | record


def budget_section(results, method, variables, image_shape, settings: Settings, prepared,
                   sweeps, skipped, prefs) -> None:
  """What a budget-steered method's evaluation adds: each budget in MACs and whether every
  network met it, the mean normalised metric, and a check over `budget_check_points` budgets
  from the cheapest network to the full one (`Method.cost_range`) that every preference's
  network (`Method.describe`) stays within each."""
  smallest, full = (int(c.macs) for c in method.cost_range(variables, prepared,
                                                           image_shape=image_shape))
  reference = results["reference_metrics"]
  for sweep in sweeps:
    sweep["budget_macs"] = controls.budget_macs(sweep["budget"], full)
    sweep["within_budget"] = bool(all(p["macs"] <= sweep["budget_macs"]
                                      for p in sweep["points"]))
    sweep["distinct_subnets"] = sweep["distinct_structures"]
    sweep["mean_normalised_metric"] = float(np.mean([
        metrics_lib.mean_normalised_metric(method.tasks, p["metrics"], reference)
        for p in sweep["points"]]))
    sweep.pop("resource", None)
    sweep.pop("variant", None)
  grid = np.unique(np.linspace(smallest, full, settings.budget_check_points).astype(np.int64))
  violations, checked, chosen_macs = 0, 0, []
  for budget_macs in grid:
    used = [method.describe(variables, {"preference": r, "budget": int(budget_macs)},
                            prepared, image_shape=image_shape)[1].macs for r in prefs]
    violations += sum(u > budget_macs for u in used)
    checked += len(used)
    chosen_macs.append([int(budget_macs), float(np.mean(used)), int(max(used))])
  ranks = [s["rank_controllability"] for s in sweeps if s["rank_controllability"] is not None]
  results.update({
      "full_macs": full, "smallest_macs": smallest, "budgets": sweeps,
      "skipped_budgets": skipped, **results["deploy_options"],
      "mean_rank_controllability": float(np.mean(ranks)) if ranks else None,
      "sliced_check": results.pop("standalone_check"),
      "budget_check": {"budgets": int(len(grid)), "searches": checked,
                       "over_budget": int(violations), "macs_by_budget": chosen_macs}})


def resource_section(results, method, variables, image_shape, settings: Settings, sweeps,
                     anchor_metrics, hv_reference, workdir: str, output_dir: str) -> None:
  """What a resource-steered method's evaluation adds: quality at matched cost and against the
  anchor per sweep, the mean cost over `cost_preferences` preferences per c, the affinity."""
  results.pop("standalone_check")
  _, metric_names, higher = measures.primary(method.tasks)
  for sweep in sweeps:
    sweep["distinct_trees"] = sweep.pop("distinct_structures")
    # Matched cost: the HV of the trees within the band, and each task's mean against the
    # anchor's (issue 22's target: no ratio below report.ANCHOR_RATIO_TARGET).
    sweep["cost_band"] = measures.cost_band(sweep, hv_reference, settings.cost_band)
    sweep["versus_anchor"] = measures.versus(sweep["mean_metric"], anchor_metrics,
                                             metric_names, higher)
    ratios = [v["ratio"] for v in sweep["versus_anchor"].values() if v["ratio"] is not None]
    sweep["min_ratio_to_anchor"] = min(ratios) if ratios else None
  full = method.full_network(variables, image_shape=image_shape)
  cost = sweep_lib.cost_sweep(method, variables, [{"resource": c} for c in results["resources"]],
                              num=settings.cost_preferences, seed=settings.preference_seed + 1,
                              image_shape=image_shape, full_cost=full.cost())
  cost["by_resource"] = cost.pop("rows")
  for row in cost["by_resource"]:
    row["distinct_trees"] = row.pop("distinct_structures")
    row["common_trees"] = row.pop("common_structures")
  cost["note"] = ("Trees come from the edge hypernetwork, which the weight stage keeps frozen: "
                  "the costs with and without the weight hypernetwork are the same.")
  results.update({
      "stage": method.stage, "sweeps": sweeps,
      "cost_band": {"min_macs_fraction": settings.cost_band[0],
                    "max_macs_fraction": settings.cost_band[1]},
      "anchor_ratio_target": report.ANCHOR_RATIO_TARGET, "cost": cost,
      "task_weights": list(method.task_weights) if method.task_weights else None})


# ----------------------------------------------------------------------------------------------
# Both, and the files.


def evaluate(method, variables, test_source, settings: Settings, *, workdir: str,
             output_dir: str, step: int, train_batch_size: int, prepared=None,
             reference: Reference | None = None, dataset: str | None = None) -> dict:
  """The sweep of a method with controls, else its fixed network (module docstring); then the
  learned structure the run leaves (`Method.artefacts`: GradSplit's routing, DYMU's task
  affinity), written into the run's folder and next to the report, each record under its name
  (its "file" the run folder's)."""
  if method.control_space().names:
    results = evaluate_sweep(method, variables, test_source, settings, workdir=workdir,
                             output_dir=output_dir, step=step, prepared=prepared,
                             reference=reference, dataset=dataset)
  else:
    results = evaluate_fixed(method, variables, test_source, settings, workdir=workdir,
                             output_dir=output_dir, step=step,
                             train_batch_size=train_batch_size, reference=reference)
  records = method.artefacts(variables, workdir, step=step, plot=settings.plots)
  if records and output_dir != workdir:
    method.artefacts(variables, output_dir, step=step, plot=settings.plots)
  results.update(records)
  results["artefacts"] = sorted(records)
  return results


def write(results: dict, output_dir: str, plots: bool = True) -> tuple[str, list[str]]:
  """Writes results.json, report.md (and per_task.csv for a fixed network) and the plots into
  `output_dir`; returns (the report's Markdown, the files written besides the plots)."""
  drawn = report.plot(results, output_dir) if plots else []
  # The heat maps a method's artefacts drew (GradSplit's routing) next to the report.
  drawn += [results[name]["heatmap"] for name in results.get("artefacts", ())
            if results[name].get("heatmap")]
  results["plots"] = drawn
  folder = files_lib.run_path(output_dir)
  written = ["results.json", "report.md"]
  if "eval" in results:  # a fixed network: every task's row in per_task.csv
    results["per_task_file"] = report.PER_TASK_FILE
    report.write_per_task_csv(results, folder)
    written.append(report.PER_TASK_FILE)
  files_lib.write_json(folder / "results.json", results, indent=1)
  text = report.markdown(results, drawn)
  files_lib.atomic_write(folder / "report.md", text)
  return text, written


def default_output_dir(workdir: str) -> str:
  """<workdir>/eval."""
  return os.fspath(files_lib.run_path(workdir) / "eval")
