r"""Evaluate a trained run: the controllability sweep, its measures, a report and plots.

    python -m experiments.evaluate --workdir=workdirs/utkface_ecmt \
        --reference_workdir=workdirs/utkface_single_task

The run (a parent folder of stages: its newest stage) is rebuilt from its newest checkpoint and
the flags saved with it. Results go to `<workdir>/eval/` (or `--output_dir`): `results.json`,
`report.md` and PNG plots, and for a fixed network `per_task.csv`.

The method's control space (`Method.control_space`) chooses what is measured, never its name
(`dymu_jax.evaluation.run.evaluate`): a method with controls is swept over the preferences
(`--preference_grid`), at each budget (`--budgets`) or resource c (`--resources`), every
setting deployed and measured: per-task metrics, Delta_m against `--reference_workdir`,
hypervolume of the test losses at one reference point per run (`--hv_reference`), uniformity,
rank controllability and cost; a fixed network is measured once, with its cost and its learned
structure (`Method.artefacts`). docs/evaluation.md explains every measure, per method.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags

from dymu_jax import controls
from dymu_jax import files as files_lib
from dymu_jax import runs as runs_lib
from dymu_jax.evaluation import run as evaluation_run
from dymu_jax.runs import settings as run_settings
from experiments import cli_help
from experiments import common
from experiments import runs

flags.DEFINE_string("reference_workdir", None,
                    "A finished single-task run of the same data: the reference of Delta_m and "
                    "of the normalised metrics (default: the run's own full network).")
flags.DEFINE_list("budgets", ["0.25", "0.5", "0.75", "1.0"],
                  "Methods steered by a budget: budgets as fractions of the full network's "
                  "MACs.")
flags.DEFINE_enum("preference_grid", "rays", list(controls.PREFERENCE_GRIDS),
                  "The preferences of every sweep (methods steered by a preference). 'rays': "
                  "for 2 tasks the evaluation rays of the PHN paper's code (--num_preferences angles evenly spaced in "
                  "[0.1, pi/2 - 0.1], r = (cos, sin) / (cos + sin)), for more tasks the "
                  "Das-Dennis grid; 'das_dennis': evenly spaced simplex points with the fewest "
                  "divisions giving at least --num_preferences points (corners included); "
                  "'random': --num_preferences drawn uniformly from the simplex (Dirichlet(1), "
                  "seeded by --preference_seed; the sweep before this flag existed).")
flags.DEFINE_integer("num_preferences", 25,
                     "Preferences of the sweep: the number of rays or random draws, or the "
                     "least number of Das-Dennis points (25: the PHN paper's 25 rays).",
                     lower_bound=1)
flags.DEFINE_integer("preference_seed", 0, "Seed of --preference_grid=random.", lower_bound=0)
flags.DEFINE_integer("budget_check_points", 41,
                     "Methods steered by a budget: budgets from the cheapest to the full network "
                     "checked for MACs <= budget.", lower_bound=1)
flags.DEFINE_integer("max_test_examples", 0, "Evaluate on at most this many test examples; "
                     "0 = all.", lower_bound=0)
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_list("resources", ["0", "1"],
                  "Methods steered by a resource: the levels c of the sweep (0: no sharing "
                  "pressure, 1: the most frugal).")
flags.DEFINE_integer("cost_preferences", 1000,
                     "Methods steered by a resource: preferences (uniform on the simplex) over "
                     "which the mean fraction of the full network's MACs and parameters in use "
                     "is measured, per c.",
                     lower_bound=1)
flags.DEFINE_list("hv_reference", [],
                  "Methods steered by a preference: the hypervolume reference point in "
                  "test-loss space, one number per task, for every sweep of the run (give the same one to "
                  "compare runs); empty = (2, 2) for a 2-task Multi-MNIST run, otherwise just "
                  "worse than every loss of this run's sweeps.")
flags.DEFINE_list("cost_band", ["0.6"],
                  "Methods steered by a resource: the cost band of the matched-cost "
                  "hypervolume, as fractions of the full network's MACs: 'hi' (trees using at most hi) or 'lo,hi' (both inclusive).")
FLAGS = flags.FLAGS


def parse_cost_band(values) -> tuple[float, float]:
  """--cost_band as (lo, hi) fractions of the anchor's MACs: "hi" means (0, hi)."""
  band = run_settings.parse_floats(values, "--cost_band")
  if band is None or len(band) not in (1, 2):
    raise ValueError(f"--cost_band must be 'hi' or 'lo,hi' (fractions of the anchor's MACs), "
                     f"got {','.join(values)!r}.")
  low, high = (0.0, band[0]) if len(band) == 1 else band
  if not 0 <= low <= high:
    raise ValueError(f"--cost_band needs 0 <= lo <= hi, got {','.join(values)}.")
  return float(low), float(high)


def settings() -> evaluation_run.Settings:
  """The evaluation settings of the flags, checked (before the run is loaded)."""
  floats = lambda name: tuple(run_settings.parse_floats(FLAGS[name].value, f"--{name}") or ())
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
  per_task = next(iter(runs_lib.summary_metrics(FLAGS.reference_workdir).values()))
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
  run = runs.load(given)
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
                                           "cost_preferences", "hv_reference", "cost_band",
                                           "budget_check_points")),
    *runs.STEERING_GROUPS,
    ("Errors", ("traceback",)),
    cli_help.RUNTIME_GROUP,
)

if __name__ == "__main__":
  cli_help.run(main, __doc__, EVALUATE_GROUPS)
