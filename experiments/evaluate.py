r"""Evaluate a trained run: the controllability sweep, its measures, a report and plots.

    python -m experiments.evaluate --workdir=workdirs/utkface_ecmt \
        --reference_workdir=workdirs/utkface_single_task

The run is rebuilt from its newest checkpoint and the flags saved with it. Results go to
`<workdir>/eval/` (or `--output_dir`): `results.json`, `report.md` and PNG plots, and for the
fixed-control methods (below) `per_task.csv`.

Every method goes through the same path (`dymu_jax.evaluation`), chosen by its control space
(`Method.control_space`), never by its name: a method with controls is swept (each variant of
`Method.evaluation_variants`, at each budget or resource c, over the preferences), every setting
deployed by `Method.deploy` and measured by the one evaluation loop (`metrics.accumulate`),
settings with the same `Deployed.key` once; a fixed network is deployed and measured once. The
report and plots come from `evaluation.report`. What follows is what each control adds.

Preferences of every sweep (ECMT, DYMU, PHN, PHN-BN), `--preference_grid`
(`controls.preference_grid`):
  * `rays` (the default [ours]): for 2 tasks the `--num_preferences` (25) evaluation rays of PHN's
    Multi-MNIST code (`controls.phn_rays`: angles evenly spaced in [0.1, pi/2 - 0.1], r = (cos,
    sin) / (cos + sin); no corner preference), for more tasks the Das-Dennis grid below;
  * `das_dennis`: `controls.das_dennis` with the fewest divisions giving at least
    `--num_preferences` points (corners and edges of the simplex included);
  * `random`: `--num_preferences` drawn uniformly from the simplex (Dirichlet(1), seeded by
    `--preference_seed`), the only sweep before this flag (`--preference_grid=random
    --num_preferences=20` repeats the former default exactly).
Hypervolume: one reference point for every sweep of a run (`hv_reference_point`):
`--hv_reference`, else (2, 2) for a 2-task Multi-MNIST run, else just worse than every loss of
the run's sweeps; the report gives the point and its source.

ECMT (`--method=ecmt` runs), METHODS.md sections 2 and 4:
  * preferences: `--preference_grid` above; budgets: `--budgets`, fractions of the SuperNet's
    MACs (a budget below the smallest SubNet is reported and skipped);
  * the search caps each decoder's extra MACs at r_t / max(r) (`ecmt.search(preference_cap=)`)
    unless `--nopreference_cap` (formerly `--noecmt_preference_cap`, still accepted), recorded
    as "preference_cap"; the deployment options (`DEPLOY_OPTIONS`) go to "deploy_options";
  * the search picks each SubNet with the encoder scores of `ecmt.score_encoders`, computed
    once on held-out training images and cached in `<workdir>/encoder_scores.json` (the MACs
    table in `<workdir>/cost_table.json`);
  * every SubNet's batch norms are recalibrated on `--calibration_examples` training images
    before it is evaluated on the test split. Distinct SubNets are evaluated once, on the
    masked path (one compiled program for all of them); one SubNet per budget is also run
    physically sliced, and the largest metric difference between the two is reported;
  * measures per budget: per-task metrics, MACs, hypervolume and uniformity of the test losses,
    rank controllability, Delta_m against `--reference_workdir` (single-task models; without
    it, against the SuperNet) and the mean normalised task metric;
  * a budget check: over `--budget_check_points` budgets from the smallest SubNet to the
    SuperNet (`Method.cost_range`), every preference's SubNet (`Method.describe`) must stay
    within each budget.

DYMU (`--method=dymu` runs; give the parent folder of a `--dymu_stage=all` run or a stage's
folder), METHODS.md sections 1 and 4:
  * the weight stage is evaluated twice: with its weight hypernetwork ("weight") and without it
    ("edge": the argmax trees on the frozen anchor, exactly the edge stage's network); an
    edge-stage run only as "edge"; an anchor-stage run like the fixed methods below;
  * per variant and per c in `--resources` (0 and 1): the preferences of `--preference_grid`,
    each run as its argmax tree (only the used nodes compute) on the test split: task metrics
    and test losses, hypervolume, uniformity, rank controllability, Delta_m (against
    `--reference_workdir`, default the anchor's own single-task streams), distinct trees and
    the fraction of the anchor's MACs and parameters in use;
  * at matched cost, per variant and c: the hypervolume of the sweep's trees whose MACs
    fraction lies in `--cost_band` (default at most 0.6; "cost_band": {min_macs_fraction,
    max_macs_fraction, hypervolume, num_points}), and each task's mean primary metric over the
    sweep next to the anchor's (the separate tree) with their ratio ("versus_anchor"; the target
    is every ratio >= 0.95);
  * the mean fraction of the anchor's MACs and parameters over `--cost_preferences` (1000)
    preferences at each c (the trees come from the edge hypernetwork, which the weight stage
    keeps frozen, so both variants use the same trees);
  * plots: MACs fraction against the dominant task's preference per c, the 2-task trade-off
    front of test losses, metric against preference, and the task affinity heat map.

PHN and PHN-BN (`--method=phn`, `phn_bn`): the same preference sweep (no c), with hypervolume,
uniformity, rank controllability and Delta_m, and the cost of the generated network.

Corner preferences (zero entries, e.g. from `das_dennis`) are valid inputs of the DYMU, PHN and
ECMT paths; uniformity takes 0 log 0 = 0 there (`pareto.uniformity_per_point` states its rule).

Other methods (static, single_task, gradsplit, pcgrad) are evaluated at their default
controls: per-task metrics, Delta_m against `--reference_workdir`, and the cost of each method
(`Method.training_cost`): inference MACs and parameters of the network, and training MACs per
example (see `methods.base.TRAINING_MACS_CONVENTION`). A method's learned structure
(`Method.artefacts`) goes to the run and the report: for gradsplit the routing (per split module: its M, the mean
gradient cosines and the conflict frequencies, the fraction of warm-up steps with a negative
cosine; the same pooled over every split parameter for reference) is written to
`<workdir>/gradsplit_routing.json` (with heat maps per module in a PNG next to it and in the
output folder) and shown in the report. Every task's metrics and its number of labelled test
examples (pixels for segmentation, depth and normals; images for edges and saliency) also go
to `per_task.csv` (columns controls, when a method has several, task, kind, labelled, one
column per metric name, note); with more than 8 tasks (`loop.MAX_TASKS_LISTED`) the report and
the printout give a summary instead of one row per task: each primary metric's mean, median
and worst task (`loop.summarise_eval`), the labelled test examples per task and the tasks
without any. A task with no labelled test example (its metrics are NaN) reads "no labelled
test examples" in the report and in the CSV's note, its metric cells left empty.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import numpy as np

from dymu_jax import controls
from dymu_jax import files as files_lib
from experiments import cli_help
from experiments import common
from experiments import runs
from dymu_jax.data import base as data_base
from dymu_jax.train import loop as loop_lib
from dymu_jax.evaluation import measures
from dymu_jax.evaluation import report
from dymu_jax.evaluation import sweep as sweep_lib
from dymu_jax.methods import affinity as affinity_lib
from dymu_jax.metrics import pareto
from dymu_jax.metrics import tasks as metrics_lib

# The default hypervolume reference of a 2-task Multi-MNIST run, in test cross-entropy per digit
# (issue 22); other runs default to a point just worse than every loss of their sweeps.
MULTI_MNIST_HV_REFERENCE = (2.0, 2.0)

flags.DEFINE_string("reference_workdir", None,
                    "A finished single-task run of the same data: the reference of Delta_m and "
                    "of the normalised metrics (default: the run's own SuperNet).")
flags.DEFINE_list("budgets", ["0.25", "0.5", "0.75", "1.0"],
                  "ECMT: budgets as fractions of the SuperNet's MACs.")
flags.DEFINE_enum("preference_grid", "rays", list(controls.PREFERENCE_GRIDS),
                  "The preferences of every sweep (ECMT, DYMU, PHN, PHN-BN). 'rays': for 2 "
                  "tasks PHN's evaluation rays (--num_preferences angles evenly spaced in "
                  "[0.1, pi/2 - 0.1], r = (cos, sin) / (cos + sin)), for more tasks the "
                  "Das-Dennis grid; 'das_dennis': evenly spaced simplex points with the fewest "
                  "divisions giving at least --num_preferences points (corners included); "
                  "'random': --num_preferences drawn uniformly from the simplex (Dirichlet(1), "
                  "seeded by --preference_seed; the sweep before this flag existed).")
flags.DEFINE_integer("num_preferences", 25,
                     "Preferences of the sweep: the number of rays or random draws, or the "
                     "least number of Das-Dennis points (25: PHN's 25 evaluation rays).",
                     lower_bound=1)
flags.DEFINE_integer("preference_seed", 0, "Seed of --preference_grid=random.", lower_bound=0)
flags.DEFINE_integer("budget_check_points", 41,
                     "Budgets from the smallest SubNet to the SuperNet checked for MACs <= "
                     "budget.", lower_bound=1)
flags.DEFINE_integer("max_test_examples", 0, "Evaluate on at most this many test examples; "
                     "0 = all.", lower_bound=0)
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_list("resources", ["0", "1"],
                  "DYMU: resource preferences c of the sweep (0: no sharing pressure, 1: the "
                  "most frugal).")
flags.DEFINE_integer("cost_preferences", 1000,
                     "DYMU: preferences (uniform on the simplex) over which the mean fraction "
                     "of the anchor's MACs and parameters in use is measured, per c.",
                     lower_bound=1)
flags.DEFINE_list("hv_reference", [],
                  "ECMT, DYMU, PHN, PHN-BN: the hypervolume reference point in test-loss "
                  "space, one number per task, for every sweep of the run (give the same one to "
                  "compare runs); empty = (2, 2) for a 2-task Multi-MNIST run, otherwise just "
                  "worse than every loss of this run's sweeps.")
flags.DEFINE_list("cost_band", ["0.6"],
                  "DYMU: the cost band of the matched-cost hypervolume, as fractions of the "
                  "anchor's MACs: 'hi' (trees using at most hi) or 'lo,hi' (both inclusive).")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------
# Data helpers.


def _eval_batch_size() -> int:
  return FLAGS.eval_batch_size or 256


class _Limited(data_base.DataSource):
  """The first `count` examples of a source."""

  def __init__(self, parent, count):
    self.parent, self.count = parent, count
    self.name, self.split, self.tasks = parent.name, parent.split, parent.tasks

  def __len__(self):
    return self.count

  def get(self, indices):
    return self.parent.get(indices)


# ----------------------------------------------------------------------------------------------
# ECMT.


def _sweep_batches(run) -> list[dict]:
  """The test split (at most `--max_test_examples`) as labelled batches, kept in memory."""
  test_source = run.test_source
  if FLAGS.max_test_examples and FLAGS.max_test_examples < len(test_source):
    test_source = _Limited(test_source, FLAGS.max_test_examples)
  return list(data_base.eval_batches(test_source, _eval_batch_size()))


def _sweep_preferences(num_tasks: int) -> tuple[np.ndarray, dict]:
  """The flags' preference sweep (`controls.preference_grid`)."""
  return controls.preference_grid(FLAGS.preference_grid, FLAGS.num_preferences, num_tasks,
                                  FLAGS.preference_seed)


def hv_reference_point(losses, num_tasks: int, dataset: str | None) -> tuple[np.ndarray, str]:
  """The hypervolume reference of every sweep of a run and where it comes from.

  `--hv_reference` when given; else `MULTI_MNIST_HV_REFERENCE` (2, 2) for a 2-task Multi-MNIST
  run, so that its runs compare without a flag; else `pareto.default_reference` of all the
  run's sweep losses (just worse than every one of them).
  """
  given = common.parse_floats(FLAGS.hv_reference, "--hv_reference")
  if given is not None:
    if len(given) != num_tasks:
      raise ValueError(f"--hv_reference needs one loss per task ({num_tasks}), got "
                       f"{len(given)}.")
    return np.asarray(given, np.float64), "--hv_reference"
  if dataset == "multi_mnist" and num_tasks == 2:
    return (np.asarray(MULTI_MNIST_HV_REFERENCE, np.float64),
            "the 2-task Multi-MNIST default (2, 2)")
  return pareto.default_reference(losses), "just worse than every loss of this run's sweeps"


def _reference(run, tasks) -> tuple[dict, str]:
  """The reference metrics {task: {metric: value}} and their name."""
  if not FLAGS.reference_workdir:
    return None, "SuperNet"
  evals = runs.summary_metrics(FLAGS.reference_workdir)
  per_task = next(iter(evals.values()))
  missing = [t.name for t in tasks if t.name not in per_task]
  if missing:
    raise ValueError(f"The reference run {FLAGS.reference_workdir} has no metrics for task(s) "
                     f"{', '.join(missing)}; give a run of the same tasks.")
  return per_task, f"single-task ({files_lib.run_path(FLAGS.reference_workdir).name})"


# ----------------------------------------------------------------------------------------------
# Fixed-control methods.


def evaluate_fixed(run: runs.TrainedRun) -> dict:
  """A run whose method takes no controls: its deployed network through the one loop."""
  tasks = tuple(run.method.tasks)
  missing = [t.name for t in tasks if t.name not in {s.name for s in run.test_source.tasks}]
  if missing:
    raise ValueError(f"The evaluation data {run.test_source.name} {run.test_source.split} has "
                     f"no labels for task(s) {', '.join(missing)}.")
  deployed = run.method.deploy(run.variables, image_shape=tuple(run.test_source.image_shape))
  per_task, counts = sweep_lib.deployed_metrics(deployed, tasks, _sweep_batches(run),
                                                with_labelled=True)
  label = loop_lib.control_label(None)
  for metrics in per_task.values():
    metrics.pop("loss")  # the sweeps' loss-space measures need it; a fixed network's report not
  results, labelled = {label: per_task}, {label: counts}
  out = {"method": run.method.name, "workdir": run.workdir, "step": run.step,
         "tasks": [t.name for t in tasks], "kinds": {t.name: t.kind for t in tasks},
         "eval": results, "labelled": labelled,
         "summary": {label: loop_lib.summarise_eval(per_task, tasks, counts)}}
  for label, counts in labelled.items():
    unlabelled = [name for name, count in counts.items() if not count]
    if unlabelled:
      print(f"[{label}] {len(unlabelled)} task(s) with no labelled test examples (metrics NaN): "
            f"{', '.join(unlabelled[:10])}{', ...' if len(unlabelled) > 10 else ''}", flush=True)
  reference, name = _reference(run, run.method.tasks)
  if reference is not None:
    _, metric_names, higher = measures.primary(tasks)
    out["reference"] = name
    out["delta_m"], left_out = pareto.delta_m_terms(
        {n: per_task[n][m] for n, m in metric_names.items()},
        {n: reference[n][m] for n, m in metric_names.items()}, higher)
    if left_out:  # a zero or missing single-task metric: no relative change to average
      out["delta_m_left_out"] = left_out
      print(f"Delta_m leaves out task(s) {', '.join(map(str, left_out))}: their single-task "
            f"metric is 0 or their metrics are not finite (pareto.delta_m_terms).", flush=True)
  out["cost"] = run.method.training_cost(run.variables, run.test_source.image_shape,
                                         run.config.batch_size)
  # Learned structure (gradsplit: routing JSON and heat map) into the run's folder and next to
  # the report; the record keeps the run folder's file.
  output_dir = common.ensure_workdir(
      FLAGS.output_dir or os.fspath(files_lib.run_path(run.workdir) / "eval"), "--output_dir")
  records = run.method.artefacts(run.variables, run.workdir, step=run.step, plot=FLAGS.plots)
  if records and output_dir != run.workdir:
    run.method.artefacts(run.variables, output_dir, step=run.step, plot=FLAGS.plots)
  out.update(records)
  out["artefacts"] = sorted(records)
  return out


# ----------------------------------------------------------------------------------------------
# DYMU and PHN: preference sweeps (METHODS.md sections 1 and 4).


def parse_cost_band(values) -> tuple[float, float]:
  """--cost_band as (lo, hi) fractions of the anchor's MACs: "hi" means (0, hi)."""
  band = common.parse_floats(values, "--cost_band")
  if band is None or len(band) not in (1, 2):
    raise ValueError(f"--cost_band must be 'hi' or 'lo,hi' (fractions of the anchor's MACs), "
                     f"got {','.join(values)!r}.")
  low, high = (0.0, band[0]) if len(band) == 1 else band
  if not 0 <= low <= high:
    raise ValueError(f"--cost_band needs 0 <= lo <= hi, got {','.join(values)}.")
  return float(low), float(high)


def _budgets() -> tuple[float, ...]:
  budgets = common.parse_floats(FLAGS.budgets, "--budgets") or ()
  for budget in budgets:
    if not 0 < budget <= 1:
      raise ValueError(f"--budgets are fractions of the SuperNet's MACs in (0, 1], got {budget}.")
  return budgets


def check_list_flags() -> None:
  """The list flags' numbers, before the run is loaded (their counts per task come later)."""
  _budgets()
  _resources()
  parse_cost_band(FLAGS.cost_band)
  common.parse_floats(FLAGS.hv_reference, "--hv_reference")


def _resources() -> list[float]:
  resources = common.parse_floats(FLAGS.resources, "--resources") or ()
  if not resources or any(not 0 <= c <= 1 for c in resources):
    raise ValueError(f"--resources are resource preferences c in [0, 1], got "
                     f"{','.join(FLAGS.resources)}.")
  return list(resources)


def _affinity_for_report(run, output_dir: str) -> dict | None:
  """The run's affinity record, with its heat map copied (or drawn) into `output_dir`."""
  record = affinity_lib.read_record(run.workdir)
  if record is None:
    return None
  record = dict(record, heatmap=None)
  if FLAGS.plots:
    source = files_lib.run_path(run.workdir) / affinity_lib.RECORD_PLOT
    target = files_lib.run_path(output_dir) / affinity_lib.RECORD_PLOT
    if files_lib.is_file(source):
      if source != target:
        files_lib.copy_file(source, target)
    else:
      affinity_lib.plot_record(record, target)
    record["heatmap"] = affinity_lib.RECORD_PLOT
  return record


def _group_label(variant: str, fixed: dict, num_variants: int) -> str:
  parts = [variant] if num_variants > 1 or not fixed else []
  parts += [f"{'c' if name == 'resource' else name}={value:g}" for name, value in fixed.items()]
  return ", ".join(parts)


def evaluate_sweep(run: runs.TrainedRun, output_dir: str) -> dict:
  """The controllability sweep of a run whose method takes controls (module docstring): every
  variant (`Method.evaluation_variants`) at every budget or resource c, over the preferences,
  each setting deployed (`Method.deploy`) and measured by the one loop; distinct networks once.
  """
  method, prepared = runs.steer(run)
  space = method.control_space()
  tasks = tuple(method.tasks)
  names, metric_names, higher = measures.primary(tasks)
  image_shape = tuple(run.test_source.image_shape)
  sweeper = sweep_lib.Sweeper(method, run.variables, _sweep_batches(run),
                              image_shape=image_shape, prepared=prepared)
  progress = sweep_lib.Progress()
  full = method.full_network(run.variables, prepared, image_shape=image_shape, standalone=False)
  full_metrics = None
  if full is not None:
    full_metrics = sweep_lib.deployed_metrics(full, tasks, sweeper.batches)
    full_cost = full.cost()
    print(f"{full.info.get('name', 'full network')}: {full_cost.macs:,} MACs per example, "
          f"{full_cost.params:,} parameters", flush=True)
  reference, reference_name = _reference(run, tasks)
  if reference is None and full_metrics is not None:
    reference, reference_name = full_metrics, {
        "supernet": "SuperNet", "anchor": "the anchor (single-task streams)"}.get(
            full.info.get("name"), full.info.get("name"))
  prefs, preference_record = _sweep_preferences(len(tasks))
  variants = method.evaluation_variants(run.variables)
  budgets, resources = _budgets(), _resources()
  sweeps, skipped = [], []
  for variant, variables in variants.items():
    for fixed in sweep_lib.groups(space, budgets, resources):
      label = _group_label(variant, fixed, len(variants))
      try:
        points = sweeper.sweep(fixed, prefs, variables, label=variant)
      except ValueError as error:  # a budget below the smallest network: reported, skipped
        if "budget" not in fixed:
          raise
        skipped.append(fixed["budget"])
        print(f"{label}: {error} Skipped.", flush=True)
        continue
      sweep = {"variant": variant, **fixed, "resource": fixed.get("resource"),
               "points": points, **measures.cost_measures(points, sweeper.structure),
               **measures.sweep_measures(tasks, points, reference)}
      sweeps.append(sweep)
      progress(f"{label}: {sweep['distinct_structures']} distinct networks, mean MACs "
               f"{sweep['mean_macs']:,.0f}, rank controllability "
               f"{report.fmt(sweep['rank_controllability'], 3)}")
  hv_reference, hv_source = None, None
  if sweeps:
    hv_reference, hv_source = hv_reference_point(
        np.concatenate([np.asarray(s["losses"]) for s in sweeps]), len(tasks),
        run.values.get("dataset"))
    measures.add_hypervolumes(sweeps, hv_reference)
    hv_reference = hv_reference.tolist()
  ranks = {}
  for variant in variants:
    defined = [s["rank_controllability"] for s in sweeps
               if s["variant"] == variant and s["rank_controllability"] is not None]
    ranks[variant] = float(np.mean(defined)) if defined else None
  results = {
      "method": method.name, "workdir": run.workdir, "step": run.step, "tasks": names,
      "primary_metric": metric_names, "higher_is_better": higher, "controls": list(space.names),
      "variants": list(variants), "resources": resources if "resource" in space.names else [],
      "num_preferences": len(prefs), "preference_seed": FLAGS.preference_seed,
      "preference_grid": preference_record, "reference": reference_name,
      "reference_workdir": (files_lib.run_dir(FLAGS.reference_workdir)
                            if FLAGS.reference_workdir else None),
      "reference_metrics": reference, "hypervolume_reference": hv_reference,
      "hypervolume_reference_source": hv_source, "mean_rank_controllability": ranks,
      "distinct_networks": sweeper.distinct_networks,
      "deploy_options": {name: getattr(method, name) for name in method.DEPLOY_OPTIONS},
      # Where `prepare` keeps its caches (ECMT: cost_table.json, encoder_scores.json).
      "prepare_cache_dir": run.workdir if prepared is not None else None,
      "standalone_check": [_standalone_check(sweeper, s) for s in sweeps[:len(budgets)]
                           if "budget" in space.names],
  }
  if full is not None:
    results[f"{full.info['name']}_metrics"] = full_metrics
    results["full_network"] = {"name": full.info["name"], "macs": int(full_cost.macs),
                               "params": int(full_cost.params)}
  if "budget" in space.names:
    _budget_section(results, method, run, prepared, sweeps, skipped, prefs)
  elif "resource" in space.names:
    _resource_section(results, method, run, sweeps, full_metrics, hv_reference, output_dir)
  else:
    deployed = sweeper.deploy({})
    cost = deployed.cost()
    results["sweeps"] = sweeps
    results["cost"] = {"inference_macs": int(cost.macs), "params": int(cost.params),
                       "trained_params": measures.trained_params(run.variables)}
  return results


def _standalone_check(sweeper, sweep: dict) -> dict:
  """A sweep's first point measured on its standalone (exportable) network."""
  point = sweep["points"][0]
  controls = {"preference": np.asarray(point["preference"]),
              **{k: sweep[k] for k in ("budget", "resource") if sweep.get(k) is not None}}
  record = sweep_lib.standalone_check(sweeper, controls, point["metrics"])
  return {k: sweep[k] for k in ("budget", "resource") if sweep.get(k) is not None} | record


def _budget_section(results, method, run, prepared, sweeps, skipped, prefs):
  """What a budget-steered method's evaluation adds: each budget in MACs and whether every
  network met it, the mean normalised metric, and a check over `--budget_check_points` budgets
  from the cheapest network to the full one (`Method.cost_range`) that every preference's
  network (`Method.describe`) stays within each."""
  image_shape = tuple(run.test_source.image_shape)
  smallest, full = (int(c.macs) for c in method.cost_range(run.variables, prepared,
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
  grid = np.unique(np.linspace(smallest, full, FLAGS.budget_check_points).astype(np.int64))
  violations, checked, chosen_macs = 0, 0, []
  for budget_macs in grid:
    used = [method.describe(run.variables, {"preference": r, "budget": int(budget_macs)},
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


def _resource_section(results, method, run, sweeps, anchor_metrics, hv_reference, output_dir):
  """What a resource-steered method's evaluation adds: quality at matched cost and against the
  anchor per sweep, the mean cost over `--cost_preferences` preferences per c, the affinity."""
  results.pop("standalone_check")
  names, metric_names, higher = measures.primary(method.tasks)
  band = parse_cost_band(FLAGS.cost_band)
  for sweep in sweeps:
    sweep["distinct_trees"] = sweep.pop("distinct_structures")
    # Matched cost: the HV of the trees within the band, and each task's mean against the
    # anchor's (issue 22's target: no ratio below report.ANCHOR_RATIO_TARGET).
    sweep["cost_band"] = measures.cost_band(sweep, hv_reference, band)
    sweep["versus_anchor"] = measures.versus(sweep["mean_metric"], anchor_metrics,
                                             metric_names, higher)
    ratios = [v["ratio"] for v in sweep["versus_anchor"].values() if v["ratio"] is not None]
    sweep["min_ratio_to_anchor"] = min(ratios) if ratios else None
  full = method.full_network(run.variables, image_shape=tuple(run.test_source.image_shape))
  cost = sweep_lib.cost_sweep(method, run.variables,
                              [{"resource": c} for c in results["resources"]],
                              num=FLAGS.cost_preferences, seed=FLAGS.preference_seed + 1,
                              image_shape=tuple(run.test_source.image_shape),
                              full_cost=full.cost())
  cost["by_resource"] = cost.pop("rows")
  for row in cost["by_resource"]:
    row["distinct_trees"] = row.pop("distinct_structures")
    row["common_trees"] = row.pop("common_structures")
  cost["note"] = ("Trees come from the edge hypernetwork, which the weight stage keeps frozen: "
                  "the costs with and without the weight hypernetwork are the same.")
  results.update({
      "stage": method.stage, "sweeps": sweeps,
      "cost_band": {"min_macs_fraction": band[0], "max_macs_fraction": band[1]},
      "anchor_ratio_target": report.ANCHOR_RATIO_TARGET, "cost": cost,
      "affinity": _affinity_for_report(run, output_dir),
      "task_weights": list(method.task_weights) if method.task_weights else None})

def run_evaluation() -> dict:
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder of a trained run.")
  started = time.time()
  # The parent folder of a --dymu_stage=all run evaluates its newest stage; results go to
  # <the given folder>/eval.
  given = files_lib.run_dir(FLAGS.workdir)
  check_list_flags()
  if FLAGS.output_dir:  # an output folder that cannot be written stops before the run loads
    common.ensure_workdir(FLAGS.output_dir, "--output_dir")
  run = runs.load_run(runs.resolve_workdir(given), data_dir=FLAGS.data_dir)
  default = os.fspath(files_lib.run_path(given) / "eval")
  output_dir = common.ensure_workdir(FLAGS.output_dir or default, "--output_dir")
  print(f"evaluating {run.method.name} from {run.workdir} (step {run.step})", flush=True)
  if run.method.control_space().names:  # a steered method: its controllability sweep
    results = evaluate_sweep(run, output_dir)
  else:
    results = evaluate_fixed(run)
  results["seconds"] = round(time.time() - started, 1)
  plots = report.plot(results, output_dir) if FLAGS.plots else []
  # The heat maps a method's artefacts drew (GradSplit's routing) next to the report.
  plots += [results[name]["heatmap"] for name in results.get("artefacts", ())
            if results[name].get("heatmap")]
  results["plots"] = plots
  folder = files_lib.run_path(output_dir)
  written = ["results.json", "report.md"]
  if "eval" in results:  # the fixed-control methods: every task's row in per_task.csv
    results["per_task_file"] = report.PER_TASK_FILE
    report.write_per_task_csv(results, folder)
    written.append(report.PER_TASK_FILE)
  files_lib.write_json(folder / "results.json", results, indent=1)
  text = report.markdown(results, plots)
  files_lib.atomic_write(folder / "report.md", text)
  print(text)
  print(f"wrote {output_dir}/{', '.join(written)} and {len(plots)} plot(s) in "
        f"{results['seconds']:.0f} s")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors("--output_dir"):
    run_evaluation()


EVALUATE_GROUPS = (
    ("Run", ("workdir", "data_dir", "output_dir", "reference_workdir", "eval_batch_size",
             "max_test_examples", "plots")),
    ("Preferences, budgets and measures", ("preference_grid", "num_preferences",
                                           "preference_seed", "budgets", "resources",
                                           "cost_preferences", "hv_reference", "cost_band")),
    ("ECMT search", ("calibration_examples", "score_examples", "decoder_reserve",
                     "budget_check_points", "preference_cap")),
    ("Errors", ("traceback",)),
    cli_help.RUNTIME_GROUP,
)

if __name__ == "__main__":
  cli_help.run(main, __doc__, EVALUATE_GROUPS)
