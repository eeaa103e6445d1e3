r"""Evaluate a trained run: the controllability sweep, its measures, a report and plots.

    python -m experiments.evaluate --workdir=workdirs/utkface_ecmt \
        --reference_workdir=workdirs/utkface_single_task

The run is rebuilt from its newest checkpoint and the flags saved with it. Results go to
`<workdir>/eval/` (or `--output_dir`): `results.json`, `report.md` and PNG plots, and for the
fixed-control methods (below) `per_task.csv`.

Every method goes through the same path (`dymu_jax.evaluation.run.evaluate`, usable from Python
with `evaluation.run.Settings`), chosen by its control space
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

import time

from absl import app
from absl import flags

from dymu_jax import controls
from dymu_jax import files as files_lib
from experiments import cli_help
from experiments import common
from experiments import runs
from dymu_jax.evaluation import run as evaluation_run

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


def settings() -> evaluation_run.Settings:
  """The evaluation settings of the flags, checked (before the run is loaded)."""
  floats = lambda name: tuple(common.parse_floats(FLAGS[name].value, f"--{name}") or ())
  return evaluation_run.Settings(
      preference_grid=FLAGS.preference_grid, num_preferences=FLAGS.num_preferences,
      preference_seed=FLAGS.preference_seed, budgets=floats("budgets"),
      resources=floats("resources"), cost_preferences=FLAGS.cost_preferences,
      hv_reference=floats("hv_reference") or None, cost_band=parse_cost_band(FLAGS.cost_band),
      budget_check_points=FLAGS.budget_check_points,
      max_test_examples=FLAGS.max_test_examples, eval_batch_size=FLAGS.eval_batch_size or 256,
      plots=FLAGS.plots).check()


def reference() -> evaluation_run.Reference | None:
  """The single-task run of --reference_workdir: its final metrics, or None."""
  if not FLAGS.reference_workdir:
    return None
  per_task = next(iter(runs.summary_metrics(FLAGS.reference_workdir).values()))
  return evaluation_run.Reference(
      per_task, f"single-task ({files_lib.run_path(FLAGS.reference_workdir).name})",
      files_lib.run_dir(FLAGS.reference_workdir))


def run_evaluation() -> dict:
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder of a trained run.")
  started = time.time()
  # The parent folder of a run in stages evaluates its newest stage; results go to
  # <the given folder>/eval.
  given = files_lib.run_dir(FLAGS.workdir)
  chosen = settings()
  if FLAGS.output_dir:  # an output folder that cannot be written stops before the run loads
    common.ensure_workdir(FLAGS.output_dir, "--output_dir")
  run = runs.load_run(runs.resolve_workdir(given), data_dir=FLAGS.data_dir)
  output_dir = common.ensure_workdir(
      FLAGS.output_dir or evaluation_run.default_output_dir(given), "--output_dir")
  print(f"evaluating {run.method.name} from {run.workdir} (step {run.step})", flush=True)
  method, prepared = run.method, None
  if method.control_space().names:  # a steered method: with the deployment flags, prepared
    method, prepared = runs.steer(run)
  results = evaluation_run.evaluate(
      method, run.variables, run.test_source, chosen, workdir=run.workdir,
      output_dir=output_dir, step=run.step, train_batch_size=run.config.batch_size,
      prepared=prepared, reference=reference(), dataset=run.values.get("dataset"))
  results["seconds"] = round(time.time() - started, 1)
  text, written = evaluation_run.write(results, output_dir, plots=FLAGS.plots)
  print(text)
  print(f"wrote {output_dir}/{', '.join(written)} and {len(results['plots'])} plot(s) in "
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
