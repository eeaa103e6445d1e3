r"""Evaluate a trained run: the controllability sweep, its measures, a report and plots.

    python -m experiments.evaluate --workdir=workdirs/utkface_ecmt \
        --reference_workdir=workdirs/utkface_single_task

The run is rebuilt from its newest checkpoint and the flags saved with it. Results go to
`<workdir>/eval/` (or `--output_dir`): `results.json`, `report.md` and PNG plots, and for the
fixed-control methods (below) `per_task.csv`.

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
    unless `--noecmt_preference_cap`, recorded as "preference_cap";
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
  * a budget check: the search over `--budget_check_points` budgets from the smallest SubNet
    to the SuperNet, for every preference, must stay within each budget.

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

import csv
import io
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
from dymu_jax.evaluation import sweep as sweep_lib
from dymu_jax.metrics import pareto
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.models import cost as cost_lib

# The default hypervolume reference of a 2-task Multi-MNIST run, in test cross-entropy per digit
# (issue 22); other runs default to a point just worse than every loss of their sweeps.
MULTI_MNIST_HV_REFERENCE = (2.0, 2.0)
# DYMU: the target of each task's mean metric over a sweep relative to the anchor's (issue 22).
ANCHOR_RATIO_TARGET = 0.95

flags.DEFINE_string("output_dir", None, "Where results go; default <workdir>/eval (evaluate) "
                    "or <workdir>/export/<preference and budget> (export).")
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
flags.DEFINE_integer("calibration_examples", 512,
                     "Training images that re-estimate each SubNet's batch-norm statistics.",
                     lower_bound=1)
flags.DEFINE_integer("score_examples", 256,
                     "Held-out training images that score the encoder configurations.",
                     lower_bound=1)
flags.DEFINE_float("decoder_reserve", 0.5,
                   "ECMT search: fraction of the decoders' MACs span kept free for the "
                   "preference.")
common.require_number("decoder_reserve", 0, 1)
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
flags.DEFINE_bool("preference_cap", True,
                  "ECMT: cap each decoder's extra MACs at r_t / max(r) in the search "
                  "(`ecmt.search(preference_cap=...)`); --nopreference_cap measures rank "
                  "controllability without it.")
flags.DEFINE_alias("ecmt_preference_cap", "preference_cap")

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
  record = runs.read_affinity(run.workdir)
  if record is None:
    return None
  record = dict(record, heatmap=None)
  if FLAGS.plots:
    source = files_lib.run_path(run.workdir) / runs.AFFINITY_PLOT
    target = files_lib.run_path(output_dir) / runs.AFFINITY_PLOT
    if files_lib.is_file(source):
      if source != target:
        files_lib.copy_file(source, target)
    else:
      runs.plot_affinity(record, target)
    record["heatmap"] = runs.AFFINITY_PLOT
  return record


def _deploy_method(run: runs.TrainedRun):
  """The run's method with the deployment options the flags set (`DEPLOY_OPTIONS`)."""
  return run.method.replace_options(**{
      name: FLAGS[name].value for name in run.method.DEPLOY_OPTIONS
      if name in FLAGS and FLAGS[name].present})


def _prepare(run: runs.TrainedRun, method):
  """`method.prepare` on held-out training images (loaded only when it reads them)."""
  held = None
  if method.PREPARE_USES_HELD_OUT:
    held = runs.held_out(run, FLAGS.calibration_examples, FLAGS.score_examples,
                         _eval_batch_size())
  return method.prepare(run.variables, held, cache_dir=run.workdir)


def _group_label(variant: str, fixed: dict, num_variants: int) -> str:
  parts = [variant] if num_variants > 1 or not fixed else []
  parts += [f"{'c' if name == 'resource' else name}={value:g}" for name, value in fixed.items()]
  return ", ".join(parts)


def evaluate_sweep(run: runs.TrainedRun, output_dir: str) -> dict:
  """The controllability sweep of a run whose method takes controls (module docstring): every
  variant (`Method.evaluation_variants`) at every budget or resource c, over the preferences,
  each setting deployed (`Method.deploy`) and measured by the one loop; distinct networks once.
  """
  method = _deploy_method(run)
  space = method.control_space()
  tasks = tuple(method.tasks)
  names, metric_names, higher = measures.primary(tasks)
  image_shape = tuple(run.test_source.image_shape)
  prepared = _prepare(run, method)
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
               f"{_fmt(sweep['rank_controllability'], 3)}")
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
      "standalone_check": [_standalone_check(sweeper, s) for s in sweeps[:len(budgets)]
                           if "budget" in space.names],
  }
  if full is not None:
    results[f"{full.info['name']}_metrics"] = full_metrics
    results["full_network"] = {"name": full.info["name"], "macs": int(full_cost.macs),
                               "params": int(full_cost.params)}
  if "budget" in space.names:
    _budget_section(results, method, prepared, sweeps, skipped, prefs, full_metrics, tasks)
  elif "resource" in space.names:
    _resource_section(results, method, run, sweeps, full_metrics, hv_reference, output_dir)
  else:
    deployed = sweeper.deploy({})
    cost = deployed.cost()
    results["sweeps"] = sweeps
    results["cost"] = {"inference_macs": int(cost.macs), "params": int(cost.params),
                       "trained_params": cost_lib.num_params(run.variables["params"])}
  return results


def _standalone_check(sweeper, sweep: dict) -> dict:
  """A sweep's first point measured on its standalone (exportable) network."""
  point = sweep["points"][0]
  controls = {"preference": np.asarray(point["preference"]),
              **{k: sweep[k] for k in ("budget", "resource") if sweep.get(k) is not None}}
  record = sweep_lib.standalone_check(sweeper, controls, point["metrics"])
  return {k: sweep[k] for k in ("budget", "resource") if sweep.get(k) is not None} | record


def _budget_section(results, method, prepared, sweeps, skipped, prefs, full_metrics, tasks):
  """What a budget-steered method's evaluation adds: each budget in MACs and whether every
  SubNet met it, the mean normalised metric, and a search over `--budget_check_points` budgets
  from the smallest network to the full one that must stay within each."""
  table = prepared.cost_table
  full, smallest = table.full_macs, table.smallest_macs
  reference = results["reference_metrics"]
  for sweep in sweeps:
    sweep["budget_macs"] = int(np.floor(sweep["budget"] * full * (1.0 + 1e-12)))
    sweep["within_budget"] = bool(all(p["macs"] <= sweep["budget_macs"]
                                      for p in sweep["points"]))
    sweep["distinct_subnets"] = sweep["distinct_structures"]
    sweep["mean_normalised_metric"] = float(np.mean([
        metrics_lib.mean_normalised_metric(tasks, p["metrics"], reference) for p in sweep["points"]]))
    sweep.pop("resource", None)
    sweep.pop("variant", None)
  grid = np.unique(np.linspace(smallest, full, FLAGS.budget_check_points).astype(np.int64))
  violations, checked, chosen_macs = 0, 0, []
  for budget_macs in grid:
    used = [table.macs(method.search(r, int(budget_macs), prepared)) for r in prefs]
    violations += sum(u > budget_macs for u in used)
    checked += len(used)
    chosen_macs.append([int(budget_macs), float(np.mean(used)), int(max(used))])
  ranks = [s["rank_controllability"] for s in sweeps if s["rank_controllability"] is not None]
  results.update({
      "full_macs": full, "smallest_macs": smallest, "budgets": sweeps,
      "skipped_budgets": skipped, "preference_cap": bool(method.preference_cap),
      "decoder_reserve": method.decoder_reserve,
      "encoder_scores_file": os.fspath(files_lib.run_path(results["workdir"])
                                       / "encoder_scores.json"),
      "mean_rank_controllability": float(np.mean(ranks)) if ranks else None,
      "sliced_check": results.pop("standalone_check"),
      "budget_check": {"budgets": int(len(grid)), "searches": checked,
                       "over_budget": int(violations), "macs_by_budget": chosen_macs}})
  del full_metrics


def _resource_section(results, method, run, sweeps, anchor_metrics, hv_reference, output_dir):
  """What a resource-steered method's evaluation adds: quality at matched cost and against the
  anchor per sweep, the mean cost over `--cost_preferences` preferences per c, the affinity."""
  results.pop("standalone_check")
  names, metric_names, higher = measures.primary(method.tasks)
  band = parse_cost_band(FLAGS.cost_band)
  for sweep in sweeps:
    sweep["distinct_trees"] = sweep.pop("distinct_structures")
    # Matched cost: the HV of the trees within the band, and each task's mean against the
    # anchor's (issue 22's target: no ratio below ANCHOR_RATIO_TARGET).
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
      "anchor_ratio_target": ANCHOR_RATIO_TARGET, "cost": cost,
      "affinity": _affinity_for_report(run, output_dir),
      "task_weights": list(method.task_weights) if method.task_weights else None})

def _by_resource(results: dict) -> bool:
  """Whether the sweep steered a resource c (its report adds the cost per c and the anchor)."""
  return "resource" in results.get("controls", ())


def _sweep_label(sweep: dict) -> str:
  if sweep["resource"] is None:
    return sweep["variant"]
  return f"{sweep['variant']}, c={sweep['resource']:g}"


def _grid_text(results: dict) -> str:
  """"N preferences (how they were made)" for a report."""
  grid = results.get("preference_grid")
  if not grid:
    return (f"{results['num_preferences']} preferences (uniform on the simplex, seed "
            f"{results['preference_seed']})")
  text = f"{grid['num_preferences']} preferences (`--preference_grid={grid['grid']}`: "
  text += grid["description"]
  if grid["num_preferences"] != grid["requested"]:
    text += f"; at least {grid['requested']} asked"
  return text + ")"


def _hv_text(results: dict) -> str:
  reference = results.get("hypervolume_reference")
  if reference is None:
    return "no hypervolume (no sweep)"
  text = (f"hypervolume of the test losses against the reference point "
          f"{[round(x, 4) for x in reference]}")
  source = results.get("hypervolume_reference_source")
  return text + (f" ({source})" if source else "")


def _outside_reference_markdown(counts) -> list[str]:
  """A note when some sweep points lie past the HV reference (they add no volume)."""
  counts = [(label, inside, total) for label, inside, total in counts
            if inside is not None and inside < total]
  if not counts:
    return []
  return ["", "Points past the hypervolume reference add no volume; points strictly inside it: " +
          "; ".join(f"{label}: {inside}/{total}" for label, inside, total in counts) + "."]


def _matched_cost_markdown(results: dict) -> list[str]:
  """DYMU: the cost-band hypervolume and each task's sweep mean against the anchor's, per
  sweep (variant and c)."""
  sweeps = [s for s in results["sweeps"] if "cost_band" in s]
  if not sweeps:
    return []
  names, metric = results["tasks"], results["primary_metric"]
  band = results["cost_band"]
  shown = (f"MACs fraction <= {band['max_macs_fraction']:g}" if not band["min_macs_fraction"]
           else f"{band['min_macs_fraction']:g} <= MACs fraction <= "
                f"{band['max_macs_fraction']:g}")
  target = results.get("anchor_ratio_target", ANCHOR_RATIO_TARGET)
  lines = ["", "## Matched cost", "",
           f"Cost band ({shown}, `--cost_band`): the hypervolume of the sweep's trees in the "
           f"band, against the same reference point. Each task's mean primary metric over the "
           f"sweep against the anchor's (the separate tree): ratio = mean / anchor "
           f"(anchor / mean for lower-is-better metrics); target: every ratio >= {target:g}.",
           ""]
  header = (["sweep", "MACs fraction (mean)", "HV (all)", "HV (cost band)", "points in band"] +
            [f"{n} {metric[n]}: mean / anchor (ratio)" for n in names] +
            [f"min ratio >= {target:g}"])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for sweep in sweeps:
    versus = sweep["versus_anchor"]
    cells = [_sweep_label(sweep), f"{sweep['mean_macs_fraction']:.3f}",
             _fmt(sweep["hypervolume"]), _fmt(sweep["cost_band"]["hypervolume"]),
             f"{sweep['cost_band']['num_points']} / {len(sweep['points'])}"]
    cells += [f"{_fmt(versus[n]['sweep_mean'])} / {_fmt(versus[n]['anchor'])} "
              f"({_fmt(versus[n]['ratio'], 3)})" for n in names]
    low = sweep.get("min_ratio_to_anchor")
    cells.append("n/a" if low is None else ("yes" if low >= target else "NO") + f" ({low:.3f})")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def sweep_markdown(results: dict, plots: list[str]) -> str:
  """The report of a DYMU or PHN evaluation."""
  names, metric = results["tasks"], results["primary_metric"]
  lines = [f"# Evaluation of {results['workdir']}", "",
           f"Method `{results['method']}`" + (f" (stage {results['stage']})"
                                               if results.get("stage") else "") +
           f", checkpoint step {results['step']}, tasks {_task_names(names)}. "
           f"{_grid_text(results)} per sweep; {_hv_text(results)}."]
  if _by_resource(results):
    lines[-1] += (" Variants: `weight` = with the weight hypernetwork's batch-norm shifts, "
                  "`edge` = without them (the argmax trees on the frozen anchor).")
  if results.get("reference_metrics") is not None:
    lines[-1] += f" Delta_m against {results['reference']}."
  lines.append("")
  header = ["sweep"] + [f"{n} {metric[n]} (mean)" for n in names] + [
      "HV (losses)", "uniformity", "rank contr."] + [f"rank {n}" for n in names]
  has_delta = "delta_m" in results["sweeps"][0]
  if has_delta:
    header.append("Delta_m %")
  if _by_resource(results):
    header += ["distinct trees", "MACs fraction (mean)", "params fraction (mean)"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for sweep in results["sweeps"]:
    cells = [_sweep_label(sweep)] + [_fmt(sweep["mean_metric"][n]) for n in names]
    cells += [_fmt(sweep["hypervolume"]), _fmt(sweep["uniformity"]),
              _fmt(sweep["rank_controllability"], 3)]
    cells += [_fmt(sweep["rank_per_task"][n], 3) for n in names]
    if has_delta:
      cells.append(f"{sweep['delta_m']:.2f}")
    if _by_resource(results):
      cells += [str(sweep["distinct_trees"]), f"{sweep['mean_macs_fraction']:.3f}",
                f"{sweep['mean_params_fraction']:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
  ranks = ", ".join(f"{v}: {_fmt(r, 3)}" for v, r in results["mean_rank_controllability"].items())
  over = "tasks and resource levels" if results["resources"] else "tasks"
  lines += ["", f"Mean rank controllability over {over}: {ranks}."]
  lines += _outside_reference_markdown(
      [(_sweep_label(s), s.get("points_inside_hv_reference"), len(s["points"]))
       for s in results["sweeps"]])
  lines += _matched_cost_markdown(results)
  cost = results["cost"]
  if _by_resource(results):
    anchor = results["anchor_metrics"]
    lines += ["", "Anchor (single-task streams, the full separate tree): " + "; ".join(
        f"{n} {metric[n]}={_fmt(anchor[n][metric[n]])}, loss={_fmt(anchor[n]['loss'])}"
        for n in names) + ".", "", "## Cost", "",
        f"Fraction of the anchor's MACs ({cost['full_macs']:,} per example) and parameters "
        f"({cost['full_params']:,}) that the predicted trees use, over {cost['preferences']} "
        f"preferences uniform on the simplex (seed {cost['seed']}). {cost['note']}", "",
        "| c | MACs fraction (mean) | min | max | params fraction (mean) | distinct trees | "
        "most common tree (parents per layer) |", "|---|---|---|---|---|---|---|"]
    for row in cost["by_resource"]:
      top = row["common_trees"][0]
      shown = " / ".join(",".join(str(p) for p in layer) for layer in top["tree"])
      lines.append(f"| {row['resource']:g} | {row['mean_macs_fraction']:.3f} | "
                   f"{row['min_macs_fraction']:.3f} | {row['max_macs_fraction']:.3f} | "
                   f"{row['mean_params_fraction']:.3f} | {row['distinct_trees']} | "
                   f"{shown} ({top['count']}x) |")
    record = results.get("affinity")
    if results.get("task_weights"):
      source = (record or {}).get("task_weight_source", "training")
      where = {"held-out": "held-out examples, scaled to mean 1", "uniform": "(uniform: 1 each)"
               }.get(source, "training images")
      lines += ["", f"Task weights w = 1 / the anchor's single-task loss on {where}: "
                + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, results["task_weights"]))
                + "."]
    if record:
      lines += ["", "## Task affinity", "",
                f"RSA on the frozen anchor, K = {record['num_images']} training images, "
                f"{record['normalisation']} normalisation.", "",
                "| A | " + " | ".join(record["tasks"]) + " |",
                "|---|" + "---|" * len(record["tasks"])]
      for name, row in zip(record["tasks"], record["affinity"]):
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
      if record.get("heatmap"):
        lines += ["", f"![task affinity]({record['heatmap']})"]
  else:
    lines += ["", f"Deployed network: {cost['inference_macs']:,} MACs per example and "
              f"{cost['params']:,} parameters whatever the preference; the run trains "
              f"{cost['trained_params']:,} parameters."]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def plot_sweeps(results: dict, output_dir: str) -> list[str]:
  """PNG plots of a DYMU or PHN evaluation; returns their file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names, metric = results["tasks"], results["primary_metric"]
  sweeps = results["sweeps"]
  files = []
  if _by_resource(results):
    fig, ax = plt.subplots(figsize=(4.8, 4))
    for row in results["cost"]["by_resource"]:
      x = np.asarray(row["dominant_preference"])
      y = np.asarray(row["macs_fractions"])
      points = ax.scatter(x, y, s=5, alpha=0.25, label=f"c={row['resource']:g}")
      bins = np.linspace(1.0 / len(names), 1.0, 11)
      index = np.clip(np.digitize(x, bins) - 1, 0, len(bins) - 2)
      centres = [(bins[i] + bins[i + 1]) / 2 for i in range(len(bins) - 1) if np.any(index == i)]
      means = [y[index == i].mean() for i in range(len(bins) - 1) if np.any(index == i)]
      ax.plot(centres, means, "-", color=points.get_facecolor()[0][:3], lw=2)
    ax.set_xlabel("preference of the dominant task (max r)")
    ax.set_ylabel("MACs of the tree (fraction of the anchor)")
    ax.set_title(f"cost over {results['cost']['preferences']} preferences (line: bin mean)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append("cost_vs_preference.png")
    files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
    plt.close(fig)
  if len(names) == 2:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for sweep in sweeps:
      loss = np.asarray(sweep["losses"])
      order = np.argsort(loss[:, 0])
      ax.plot(loss[order, 0], loss[order, 1], "o-", ms=3, label=_sweep_label(sweep))
    ax.set_xlabel(f"{names[0]} test loss")
    ax.set_ylabel(f"{names[1]} test loss")
    ax.set_title("trade-off fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append("tradeoff_front.png")
    files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
    plt.close(fig)
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
  for i, name in enumerate(names):
    ax = axes[0, i]
    for sweep in sweeps:
      r = np.array([p["preference"][i] for p in sweep["points"]])
      v = np.array([p["metrics"][name][metric[name]] for p in sweep["points"]])
      order = np.argsort(r)
      ax.plot(r[order], v[order], "o-", ms=3, label=_sweep_label(sweep))
    ax.set_xlabel(f"preference for {name}")
    ax.set_ylabel(metric[name])
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  fig.tight_layout()
  files.append("controllability.png")
  files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
  plt.close(fig)
  return files


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(value, digits=4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def _cost_markdown(cost: dict | None) -> list[str]:
  if not cost:
    return []
  return ["", "| inference MACs / example | parameters | backward passes / step | "
          "training MACs / example |", "|---|---|---|---|",
          f"| {cost['inference_macs']:,} | {cost['params']:,} | {cost['backward_passes']} | "
          f"{cost['training_macs_per_example']:,} |", "",
          f"Convention: {cost['convention']} (batch size {cost['batch_size']}, gradient "
          f"arithmetic {cost['gradient_macs_per_step']:,} MACs per step)."]


def _routing_markdown(routing: dict | None) -> list[str]:
  if not routing:
    return []
  names = routing["tasks"]
  lines = ["", "## GradSplit routing", "",
           f"{routing['routing'].capitalize()} routing, {routing['mode']} mode, last "
           f"{routing['split_stages']} stage(s) split ({', '.join(routing['split_modules'])}), "
           f"group sizes {routing['group_sizes']}. M[t][s] = 1: channel group t takes task s's "
           f"gradient."]
  learned = routing["routing"] == "learned"
  if learned:
    lines[-1] += (f" Criterion `{routing.get('criterion')}`: {routing.get('rule')}; "
                  f"statistics over {routing['warmup_steps_seen']} of "
                  f"{routing['warmup_steps']} warm-up steps"
                  f"{'' if routing['warmup_complete'] else ' (warm-up not finished)'}. "
                  f"'neg': fraction of warm-up steps with a negative cosine.")
  pooled = routing["pooled"]

  def cell(entry, t, s):
    text = str(entry["matrix"][t][s])
    if entry.get("mean_cosine") is not None:
      text += (f" (cos {entry['mean_cosine'][t][s]:+.3f}, "
               f"neg {entry['conflict_frequency'][t][s]:.0%})")
    return text

  title = "Pooled over every split parameter" + (
      "" if routing.get("criterion") in (None, "pooled") else
      " (reference: the criterion's rule on the pooled statistics, not used for routing)")
  lines += ["", f"{title}:", "", "| group \\ task | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
  for t, name in enumerate(names):
    lines.append(f"| {name} | " + " | ".join(cell(pooled, t, s) for s in range(len(names)))
                 + " |")
  modules = routing.get("modules") or []
  if learned and modules:
    pairs = [(t, s) for t in range(len(names)) for s in range(len(names)) if t != s]
    lines += ["", "Per split module (column t<-s: group t takes task s's gradient):", "",
              "| module | " + " | ".join(f"{names[t]}<-{names[s]}" for t, s in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for entry in modules:
      lines.append(f"| {entry['name']} | " + " | ".join(cell(entry, t, s) for t, s in pairs)
                   + " |")
    zeros = [sum(not e["matrix"][t][s] for t, s in pairs) for e in modules]
    lines += ["", f"{sum(z > 0 for z in zeros)} of {len(modules)} split modules route some "
              f"task's gradient away from a group ({sum(zeros)} of {len(modules) * len(pairs)} "
              f"off-diagonal entries are 0; none: hard sharing)."]
  if routing.get("heatmap"):
    lines += ["", f"![routing]({routing['heatmap']})"]
  return lines


NO_LABELS = "no labelled test examples"
PER_TASK_FILE = "per_task.csv"


def _task_names(names) -> str:
  """The tasks of a report's first line: every name, or the first and last few of many."""
  names = list(names)
  if len(names) <= loop_lib.MAX_TASKS_LISTED:
    return ", ".join(names)
  return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])} ({len(names)} tasks)"


def _labelled(results: dict, label: str, task: str):
  """The labelled test examples of a task (None in results written before they were kept)."""
  return ((results.get("labelled") or {}).get(label) or {}).get(task)


def per_task_table(results: dict) -> list[list]:
  """The rows of `per_task.csv` of a fixed-control evaluation, header first.

  Columns: "controls" (only when the method was evaluated at several controls), "task", "kind",
  "labelled" (labelled test examples; pixels for segmentation, depth and normals, images for
  edges and saliency), one column per metric name (in order of first appearance; empty where a
  task has no such metric) and "note" ("no labelled test examples" where the count is 0, whose
  metric cells are left empty instead of NaN).
  """
  evals = results["eval"]
  several = len(evals) > 1
  kinds = results.get("kinds") or {}
  metric_names = list(dict.fromkeys(m for per_task in evals.values()
                                    for values in per_task.values() for m in values))
  header = (["controls"] if several else []) + ["task", "kind", "labelled", *metric_names,
                                                "note"]
  rows = [header]
  for label, per_task in evals.items():
    for task, values in per_task.items():
      count = _labelled(results, label, task)
      none = count == 0
      cells = [label] if several else []
      cells += [task, kinds.get(task, ""), "" if count is None else int(count)]
      cells += ["" if none or m not in values else repr(float(values[m])) for m in metric_names]
      cells.append(NO_LABELS if none else "")
      rows.append(cells)
  return rows


def write_per_task_csv(results: dict, folder) -> str:
  """Writes `per_task.csv` (`per_task_table`) into `folder`; returns its path."""
  text = io.StringIO()
  csv.writer(text, lineterminator="\n").writerows(per_task_table(results))
  path = files_lib.run_path(folder) / PER_TASK_FILE
  files_lib.atomic_write(path, text.getvalue())
  return os.fspath(path)


def _fixed_metrics_markdown(results: dict) -> list[str]:
  """The task metrics of a fixed-control evaluation: one row per task, or, with more than
  `loop.MAX_TASKS_LISTED` tasks, a summary per control setting (every task in per_task.csv)."""
  lines = []
  summaries = results.get("summary")
  if len(results["tasks"]) <= loop_lib.MAX_TASKS_LISTED or not summaries:
    lines += ["| controls | task | labelled test examples | metrics |", "|---|---|---|---|"]
    for label, per_task in results["eval"].items():
      for task, values in per_task.items():
        count = _labelled(results, label, task)
        shown = (NO_LABELS if count == 0 else
                 ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        lines.append(f"| {label} | {task} | {_fmt(count)} | {shown} |")
    return lines + ["", f"Every task's metrics and labelled test examples: `{PER_TASK_FILE}`."]
  for label in results["eval"]:
    summary = summaries[label]
    lines += [f"{summary['tasks']} tasks at controls `{label}`; every task's metrics and "
              f"labelled test examples in `{PER_TASK_FILE}`.", "",
              "| primary metric | tasks | mean | median | worst (task) |", "|---|---|---|---|---|"]
    for group in summary["primary_metrics"]:
      better = "higher" if group["higher_is_better"] else "lower"
      lines.append(f"| {group['metric']} ({better} is better) | {group['tasks']} | "
                   f"{_fmt(group['mean'])} | {_fmt(group['median'])} | "
                   f"{_fmt(group['worst'])} ({group['worst_task']}) |")
    counts = summary.get("labelled")
    notes = []
    if counts:
      notes.append(f"Labelled test examples per task: {counts['total']:,} in all, min "
                   f"{counts['min']:,}, median {_fmt(counts['median'])}, max {counts['max']:,}.")
    unlabelled = summary["unlabelled"]
    if unlabelled:
      shown = ", ".join(unlabelled[:20]) + (", ..." if len(unlabelled) > 20 else "")
      notes.append(f"{len(unlabelled)} task(s) with {NO_LABELS} (left out of the summary): "
                   f"{shown}.")
    if summary.get("not_finite"):
      notes.append(f"{len(summary['not_finite'])} task(s) whose primary metric is not finite "
                   f"(left out of the summary): {', '.join(summary['not_finite'][:20])}.")
    lines += ([""] + notes if notes else []) + [""]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def markdown(results: dict, plots: list[str]) -> str:
  if "sweeps" in results:  # DYMU, PHN, PHN-BN
    return sweep_markdown(results, plots)
  lines = [f"# Evaluation of {results['workdir']}", "",
           f"Method `{results['method']}`, checkpoint step {results['step']}, tasks "
           f"{_task_names(results['tasks'])}.", ""]
  if "budgets" not in results:
    lines += _fixed_metrics_markdown(results)
    if "delta_m" in results:
      lines += ["", f"Delta_m against {results['reference']}: {results['delta_m']:.2f}%"]
      if results.get("delta_m_left_out"):
        lines.append(f"(left out: {', '.join(map(str, results['delta_m_left_out']))}, whose "
                     f"single-task metric is 0 or whose metrics are not finite)")
    lines += _cost_markdown(results.get("cost"))
    lines += _routing_markdown(results.get("routing"))
    return "\n".join(lines) + "\n"
  names, metric = results["tasks"], results["primary_metric"]
  lines += [f"SuperNet: {results['full_macs']:,} MACs per example; smallest SubNet: "
            f"{results['smallest_macs']:,} ({results['smallest_macs'] / results['full_macs']:.3f})."
            f" {_grid_text(results)} per budget; search with the preference cap "
            f"{'on' if results.get('preference_cap', True) else 'off'} "
            f"(`--ecmt_preference_cap`); {_hv_text(results)}; Delta_m and normalised metrics "
            f"against {results['reference']}.", ""]
  header = (["budget", "max MACs (fraction)", "within budget", "SubNets"] +
            [f"{n} {metric[n]} (mean)" for n in names] +
            ["HV (losses)", "uniformity", "rank contr. (mean)"] +
            [f"rank {n}" for n in names] + ["Delta_m %", "mean norm. metric"])
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in results["budgets"]:
    cells = [f"{row['budget']:g}", f"{row['max_macs']:,} ({row['max_macs'] / results['full_macs']:.3f})",
             "yes" if row["within_budget"] else "NO", str(row["distinct_subnets"])]
    cells += [_fmt(row["mean_metric"][n]) for n in names]
    cells += [_fmt(row["hypervolume"]), _fmt(row["uniformity"]),
              _fmt(row["rank_controllability"], 3)]
    cells += [_fmt(row["rank_per_task"][n], 3) for n in names]
    cells += [f"{row['delta_m']:.2f}", _fmt(row["mean_normalised_metric"])]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Mean rank controllability over tasks and budgets: "
            f"{_fmt(results['mean_rank_controllability'], 3)}."]
  lines += _outside_reference_markdown(
      [(f"budget {row['budget']:g}", row.get("points_inside_hv_reference"), len(row["points"]))
       for row in results["budgets"]])
  if results["skipped_budgets"]:
    lines.append(f"Skipped budgets below the smallest SubNet: {results['skipped_budgets']}.")
  check = results["budget_check"]
  lines += ["", f"Budget check: {check['searches']} searches over {check['budgets']} budgets "
            f"from the smallest SubNet to the SuperNet, {check['over_budget']} over budget.", ""]
  lines += ["Masked evaluation vs the physically sliced SubNet (largest metric difference):", ""]
  for item in results["sliced_check"]:
    lines.append(f"- budget {item['budget']:g}, encoder {item['encoder']}, decoders "
                 f"{item['decoders']}: {item['max_metric_difference']:.2e}")
  if plots:
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def plot(results: dict, output_dir: str) -> list[str]:
  """PNG plots of an ECMT evaluation; returns their file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names, metric = results["tasks"], results["primary_metric"]
  rows = results["budgets"]
  files = []
  if rows:
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for i, name in enumerate(names):
      ax = axes[0, i]
      for row in rows:
        r = np.array([p["preference"][i] for p in row["points"]])
        v = np.array([p["metrics"][name][metric[name]] for p in row["points"]])
        order = np.argsort(r)
        ax.plot(r[order], v[order], "o-", ms=3, label=f"budget {row['budget']:g}")
      ax.set_xlabel(f"preference for {name}")
      ax.set_ylabel(metric[name])
      ax.set_title(name)
      ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    files.append("controllability.png")
    files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
    plt.close(fig)
  if rows and len(names) == 2:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for row in rows:
      loss = np.asarray(row["losses"])
      order = np.argsort(loss[:, 0])
      ax.plot(loss[order, 0], loss[order, 1], "o-", ms=3, label=f"budget {row['budget']:g}")
    ax.set_xlabel(f"{names[0]} test loss")
    ax.set_ylabel(f"{names[1]} test loss")
    ax.set_title("trade-off fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append("tradeoff_front.png")
    files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
    plt.close(fig)
  grid = np.asarray(results["budget_check"]["macs_by_budget"], np.float64)
  if len(grid):
    full = results["full_macs"]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot(grid[:, 0] / full, grid[:, 0] / full, "k--", lw=1, label="budget")
    ax.plot(grid[:, 0] / full, grid[:, 1] / full, "o-", ms=3, label="mean MACs of SubNets")
    ax.plot(grid[:, 0] / full, grid[:, 2] / full, "x", ms=4, label="max MACs of SubNets")
    ax.set_xlabel("budget (fraction of SuperNet MACs)")
    ax.set_ylabel("SubNet MACs (fraction)")
    ax.set_title("cost against budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append("cost_vs_budget.png")
    files_lib.save_figure(fig, files_lib.run_path(output_dir) / files[-1], dpi=110)
    plt.close(fig)
  return files


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
  plots = plot(results, output_dir) if FLAGS.plots and "budgets" in results else []
  if FLAGS.plots and "sweeps" in results:
    plots = plot_sweeps(results, output_dir)
  if (results.get("routing") or {}).get("heatmap"):  # gradsplit: written by its artefacts
    plots = [results["routing"]["heatmap"]]
  results["plots"] = plots
  folder = files_lib.run_path(output_dir)
  written = ["results.json", "report.md"]
  if "eval" in results:  # the fixed-control methods: every task's row in per_task.csv
    results["per_task_file"] = PER_TASK_FILE
    write_per_task_csv(results, folder)
    written.append(PER_TASK_FILE)
  files_lib.write_json(folder / "results.json", results, indent=1)
  report = markdown(results, plots)
  files_lib.atomic_write(folder / "report.md", report)
  print(report)
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
                     "budget_check_points", "ecmt_preference_cap")),
    ("Errors", ("traceback",)),
    cli_help.RUNTIME_GROUP,
)

if __name__ == "__main__":
  cli_help.run(main, __doc__, EVALUATE_GROUPS)
