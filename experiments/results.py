r"""Collect finished runs into one Markdown page of results, each number with its commands.

    python -m experiments.results --workdirs='workdirs/*' --output=docs/results.md

For every workdir (a glob or a comma-separated list) that holds a finished
`python -m experiments.train` run (`summary.json` and a checkpoint): its flags are read from
the checkpoint; the flag file under `experiments/flags/` whose every setting equals the run's
flags names the training command (other flags that differ from their defaults are appended);
its final test metrics and wall time come from `summary.json`; and where
`python -m experiments.evaluate` was run (`<workdir>/eval/results.json`), its measures and the
evaluate command. Runs are grouped by dataset: one table of the fixed methods (baselines,
GradSplit, PCGrad: metrics, Delta_m, inference and training MACs, parameters), one table of the
preference-controlled runs (DYMU, whose `--dymu_stage=all` parent folder counts as one run, PHN
and PHN-BN: hypervolume against one shared reference point, uniformity, rank controllability,
mean cost; with a plot of the loss fronts for two tasks) and one table per ECMT run (one row per
budget). With `--copy_plots`, the
evaluation plots are copied next to the page (`<output stem>/<run>/*.png`) and embedded.

Nothing is re-measured here: the page shows what the runs recorded, so regenerate it after new
runs. Wall times are those of the machine and load each run had.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import shutil
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import common
from experiments import runs
from experiments import train as _train  # noqa: F401  (defines the training flags)
from dymu_jax.metrics import pareto
from dymu_jax.train import checkpoint as checkpoint_lib

flags.DEFINE_list("workdirs", ["workdirs/*"],
                  "Run folders: globs or paths, comma-separated; folders without a finished "
                  "run are skipped with a note.")
flags.DEFINE_string("output", "docs/results.md", "The Markdown file to write.")
flags.DEFINE_string("flags_dir", os.path.join(os.path.dirname(__file__), "flags"),
                    "Folder of the flag files that training commands are matched against.")
flags.DEFINE_bool("copy_plots", True, "Copy each evaluation's PNG plots next to the page.")

FLAGS = flags.FLAGS

# Flags that never belong to a reproducing command (where the run lives, how it prints).
_PER_MACHINE = ("workdir", "data_dir", "progress", "traceback", "flagfile")


# ----------------------------------------------------------------------------------------------
# Reading runs.


def saved_flags(workdir: str) -> dict | None:
  """The flags saved with the newest checkpoint of `workdir`, or None without a checkpoint."""
  if not os.path.isdir(checkpoint_lib.checkpoint_dir(workdir)):
    return None
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      return None
    return dict(checkpointer.metadata(step).get("run", {}).get("flags", {}))


def parse_flag_file(path: str) -> dict[str, str]:
  """{flag name: text value} of a flag file (`--name=value` lines; `--noname` is false)."""
  values = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line.startswith("--"):
        continue
      name, sep, text = line[2:].partition("=")
      if not sep:
        name, text = (name[2:], "false") if name.startswith("no") and name[2:] in FLAGS else (
            name, "true")
      values[name] = text
  return values


def _flag_value(name: str, text: str) -> Any:
  """A flag file's text as the value the parsed flag would have."""
  flag = FLAGS[name]
  return flag.parser.parse(text)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    try:
      return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    except (TypeError, ValueError):
      return False
  return a == b


def matching_flag_file(values: Mapping[str, Any], flags_dir: str) -> str | None:
  """The flag file every setting of which the run has (the most settings wins), or None."""
  best, best_count = None, -1
  for path in sorted(glob.glob(os.path.join(flags_dir, "*.flags"))):
    settings = parse_flag_file(path)
    try:
      # A flag the run predates counts with its default (what the run did without it).
      matches = all(_same(_flag_value(k, v), values.get(k, FLAGS[k].default))
                    for k, v in settings.items() if k not in _PER_MACHINE)
    except Exception:  # pylint: disable=broad-except  (a flag this build no longer has)
      matches = False
    if matches and len(settings) > best_count:
      best, best_count = path, len(settings)
  return best


def train_command(workdir: str, values: Mapping[str, Any], flags_dir: str) -> str:
  """The command that trains this run again (flag file + flags that differ from it)."""
  flag_file = matching_flag_file(values, flags_dir)
  settings = parse_flag_file(flag_file) if flag_file else {}
  parts = ["python -m experiments.train"]
  if flag_file:
    parts.append(f"--flagfile={os.path.relpath(flag_file)}")
  for name in sorted(values):
    if name in _PER_MACHINE or name in settings or name not in FLAGS:
      continue
    default = FLAGS[name].default
    if not _same(values[name], default):
      value = values[name]
      text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
      text = str(text).lower() if isinstance(value, bool) else text
      parts.append(f"--{name}={text}")
  if values.get("data_dir"):
    parts.append(f"--data_dir={_short_path(values['data_dir'])}")
  parts.append(f"--workdir={_short_path(workdir)}")
  return " ".join(parts)


def _short_path(path: str) -> str:
  rel = os.path.relpath(os.path.abspath(path))
  return rel if not rel.startswith("../..") else os.path.abspath(path)


def dymu_parent_flags(folder: str, summary: Mapping[str, Any]) -> dict | None:
  """The flags of a `--dymu_stage=all` run, from its newest stage's checkpoint.

  Each stage saves its own flags (its stage, steps and input folders); the command that trains
  the whole run has `--dymu_stage=all`, the default `--steps`, and `--dymu_anchor_dir` only
  when the anchor was another run's.
  """
  values = saved_flags(runs.resolve_workdir(folder))
  if values is None:
    return None
  anchor_dir = summary.get("anchor_dir") or ""
  own_anchor = os.path.abspath(os.path.join(folder, "anchor"))
  return {**values, "dymu_stage": "all", "steps": FLAGS["steps"].default,
          "dymu_anchor_dir": "" if os.path.abspath(anchor_dir) == own_anchor else anchor_dir,
          "dymu_edge_dir": FLAGS["dymu_edge_dir"].default}


def load_runs(patterns: Sequence[str]) -> tuple[list[dict], list[str]]:
  """(runs, notes): one dict per finished run, and a note per skipped folder."""
  folders = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]
    folders += [f for f in matched if f not in folders]
  found, notes = [], []
  for folder in folders:
    summary_path = os.path.join(folder, "summary.json")
    if not os.path.isdir(folder):
      notes.append(f"{folder}: not a folder")
      continue
    if not os.path.isfile(summary_path):
      notes.append(f"{folder}: no summary.json (training not finished)")
      continue
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    values = saved_flags(folder)
    if values is None and summary.get("dymu_stage") == "all":
      values = dymu_parent_flags(folder, summary)
    if values is None:
      notes.append(f"{folder}: no checkpoint")
      continue
    evaluation = None
    eval_path = os.path.join(folder, "eval", "results.json")
    if os.path.isfile(eval_path):
      with open(eval_path, encoding="utf-8") as f:
        evaluation = json.load(f)
    found.append({"name": os.path.basename(os.path.normpath(folder)), "workdir": folder,
                  "values": values, "summary": summary, "eval": evaluation})
  return found, notes


# ----------------------------------------------------------------------------------------------
# Formatting.


def _fmt(value: Any, digits: int = 4) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}g}"
  return str(value)


def _minutes(seconds: Any) -> str:
  return "n/a" if seconds is None else f"{float(seconds) / 60:.1f} min"


# Metrics where higher is better; every other primary metric is an error (lower is better).
_HIGHER_IS_BETTER = ("accuracy", "miou", "odsf", "maxf")


def _primary_name(metrics: Mapping[str, float]) -> str | None:
  # dymu_jax.metrics lists each task's primary metric first, and summary.json keeps the order.
  return next(iter(metrics), None)


def _primary(task_name: str, metrics: Mapping[str, float]) -> str:
  name = _primary_name(metrics)
  return f"{task_name} {name} {_fmt(metrics.get(name))}" if name else task_name


def delta_m(metrics: Mapping[str, Mapping[str, float]],
            reference: Mapping[str, Mapping[str, float]]) -> float | None:
  """Delta_m % of primary metrics against a reference run of the same tasks (None if not)."""
  if set(metrics) != set(reference) or not metrics:
    return None
  values, refs, higher = {}, {}, {}
  for task, task_metrics in metrics.items():
    name = _primary_name(task_metrics)
    if name is None or name not in reference[task]:
      return None
    values[task], refs[task] = task_metrics[name], reference[task][name]
    higher[task] = name in _HIGHER_IS_BETTER
  return pareto.delta_m(values, refs, higher)


def _supernet_metrics(run: dict) -> Mapping[str, Mapping[str, float]]:
  evals = run["summary"].get("eval", {})
  if not evals:
    return {}
  for label, per_task in evals.items():  # the full network's entry first
    if "0.25" not in label:
      return per_task
  return next(iter(evals.values()))


def eval_command(run: dict) -> str | None:
  evaluation = run["eval"]
  if evaluation is None:
    return None
  parts = ["python -m experiments.evaluate", f"--workdir={_short_path(run['workdir'])}"]
  reference = evaluation.get("reference_workdir")
  label = str(evaluation.get("reference") or "")
  if not reference and label.startswith("single-task ("):  # results written before the path
    reference = os.path.join(os.path.dirname(os.path.normpath(run["workdir"])),
                             label[len("single-task ("):-1])
  if reference:
    parts.append(f"--reference_workdir={_short_path(reference)}")
  return " ".join(parts)


def _percent(value: Any) -> str:
  """A Delta_m in % with two decimals and its sign (float noise of a reference shows as 0)."""
  return "n/a" if value is None else f"{float(value) + 0.0:+.2f}".replace("-0.00", "+0.00")


def _mega(value: Any) -> str:
  """A count in millions (thousands below a million)."""
  if value is None:
    return "n/a"
  value = float(value)
  return f"{value / 1e6:.2f} M" if value >= 1e6 else f"{value / 1e3:.1f} K"


def fixed_table(group: Sequence[dict], reference: dict | None) -> list[str]:
  """One row per run; Delta_m from its evaluation, else from its summary against `reference`.

  Costs (per example) come from the evaluation (`cost`: analytic inference MACs, parameters and
  training MACs by `experiments.evaluate.TRAINING_MACS_CONVENTION`).
  """
  lines = ["| run | method | steps | test metrics | Delta_m % | inference MACs | params | "
           "training MACs | wall time |", "|---|---|---|---|---|---|---|---|---|"]
  for run in group:
    metrics = _supernet_metrics(run)
    shown = ", ".join(_primary(t, m) for t, m in metrics.items())
    delta = run["eval"].get("delta_m") if run["eval"] else None
    if delta is None and reference is not None:
      delta = delta_m(metrics, _supernet_metrics(reference))
    cost = (run["eval"] or {}).get("cost") or {}
    lines.append(f"| `{run['name']}` | {run['values'].get('method')} | "
                 f"{run['summary'].get('steps')} | {shown} | {_percent(delta)} | "
                 f"{_mega(cost.get('inference_macs'))} | {_mega(cost.get('params'))} | "
                 f"{_mega(cost.get('training_macs_per_example'))} | "
                 f"{_minutes(run['summary'].get('seconds'))} |")
  return lines


# Methods evaluated by a preference sweep (experiments.evaluate's DYMU and PHN sweeps).
PREFERENCE_METHODS = ("dymu", "phn", "phn_bn")


def shared_hv_reference(group: Sequence[dict]) -> list[float] | None:
  """One hypervolume reference for every preference sweep of a dataset (test losses)."""
  losses = [np.asarray(sweep["losses"]) for run in group if run["eval"]
            for sweep in run["eval"].get("sweeps", [])]
  if not losses:
    return None
  return pareto.default_reference(np.concatenate(losses)).tolist()


def _anchor_cost(group: Sequence[dict]) -> dict | None:
  for run in group:
    cost = (run["eval"] or {}).get("cost") or {}
    if "full_macs" in cost:
      return cost
  return None


def _training_seconds(run: dict, variant: str) -> Any:
  """Wall time of the stages a DYMU variant needs (without the weight stage for "edge")."""
  stages = run["summary"].get("stages")
  if variant == "edge" and stages:
    return sum(stages[s]["seconds"] for s in ("anchor", "edge") if s in stages)
  return run["summary"].get("seconds")


def preference_table(group: Sequence[dict], hv_reference: Sequence[float]) -> list[str]:
  """One row per sweep (run, variant, c) of DYMU, PHN and PHN-BN runs of one dataset.

  Hypervolumes are recomputed against `hv_reference`, shared by every row so they compare.
  Costs: DYMU's mean over the evaluation's `--cost_preferences` preferences (trees differ per
  preference); PHN's network is one shared network. Fractions are of the DYMU anchor (N
  single-task streams) where the dataset has a DYMU run.
  """
  anchor = _anchor_cost(group)
  head = ["run", "variant", "c", "HV", "uniformity", "rank contr.", "Delta_m %",
          "mean MACs (fraction)", "mean params (fraction)", "distinct trees", "training time"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  reference = np.asarray(hv_reference, np.float64)
  for run in group:
    evaluation = run["eval"]
    if evaluation is None or "sweeps" not in evaluation:
      lines.append(f"| `{run['name']}` | not evaluated |" + " |" * (len(head) - 2))
      continue
    cost = evaluation.get("cost") or {}
    by_resource = {row["resource"]: row for row in cost.get("by_resource", [])}
    for sweep in evaluation["sweeps"]:
      if sweep["resource"] is not None and sweep["resource"] in by_resource:
        row = by_resource[sweep["resource"]]
        macs = row["mean_macs_fraction"] * cost["full_macs"]
        params = row["mean_params_fraction"] * cost["full_params"]
        trees = row["distinct_trees"]
      else:
        macs, params = cost.get("inference_macs"), cost.get("params")
        trees = sweep.get("distinct_trees", "-")
      fraction = lambda v, k: (f" ({float(v) / anchor[k]:.3f})" if anchor and v is not None
                               else "")
      cells = [f"`{run['name']}`", sweep["variant"],
               "-" if sweep["resource"] is None else f"{sweep['resource']:g}",
               _fmt(pareto.hypervolume(np.asarray(sweep["losses"]), reference)),
               _fmt(sweep.get("uniformity")), _fmt(sweep.get("rank_controllability"), 3),
               _percent(sweep.get("delta_m")),
               _mega(macs) + fraction(macs, "full_macs"),
               _mega(params) + fraction(params, "full_params"), str(trees),
               _minutes(_training_seconds(run, sweep["variant"]))]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


def plot_fronts(group: Sequence[dict], path: str) -> bool:
  """The test-loss fronts of every two-task preference sweep in one figure; False if none."""
  sweeps = [(run, sweep) for run in group if run["eval"]
            for sweep in run["eval"].get("sweeps", []) if len(run["eval"]["tasks"]) == 2]
  if not sweeps:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = sweeps[0][0]["eval"]["tasks"]
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for run, sweep in sweeps:
    losses = np.asarray(sweep["losses"])
    order = np.argsort([p["preference"][0] for p in sweep["points"]])
    label = f"{run['name']} {sweep['variant']}" + (
        "" if sweep["resource"] is None else f" c={sweep['resource']:g}")
    ax.plot(losses[order, 0], losses[order, 1], marker="o", markersize=3, linewidth=1,
            label=label)
  ax.set_xlabel(f"{tasks[0]} test loss")
  ax.set_ylabel(f"{tasks[1]} test loss")
  ax.set_title("Test losses over the preference sweep (ordered by r_1)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def ecmt_table(run: dict) -> list[str]:
  evaluation = run["eval"]
  tasks = evaluation["tasks"]
  primary = evaluation.get("primary_metric", {})
  head = ["budget", "max MACs (fraction)", "within budget"]
  head += [f"{t} {primary.get(t, '')}" for t in tasks]
  head += ["rank contr.", "Delta_m %", "mean norm. metric", "HV (losses)", "uniformity"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  full = float(evaluation["full_macs"])
  for row in evaluation["budgets"]:
    mean = row.get("mean_metric", {})
    cells = [_fmt(row["budget"]), f"{row['max_macs']:,} ({row['max_macs'] / full:.3f})",
             "yes" if row.get("within_budget") else "NO"]
    cells += [_fmt(mean.get(t)) for t in tasks]
    cells += [_fmt(row.get("rank_controllability"), 3), _fmt(row.get("delta_m"), 3),
              _fmt(row.get("mean_normalised_metric")), _fmt(row.get("hypervolume")),
              _fmt(row.get("uniformity"))]
    lines.append("| " + " | ".join(cells) + " |")
  check = evaluation.get("budget_check", {})
  lines += ["", f"Mean rank controllability over tasks and budgets: "
            f"{_fmt(evaluation.get('mean_rank_controllability'), 3)}. Budget check: "
            f"{check.get('searches', 'n/a')} searches over {check.get('budgets', 'n/a')} "
            f"budgets, {check.get('over_budget', 'n/a')} over budget. Reference of Delta_m: "
            f"{evaluation.get('reference', 'n/a')}. Training: {run['summary'].get('steps')} "
            f"steps, {_minutes(run['summary'].get('seconds'))}; evaluation "
            f"{_minutes(evaluation.get('seconds'))}."]
  return lines


def copy_plots(run: dict, output: str) -> list[str]:
  """Copies the run's evaluation plots next to `output`; their paths relative to it."""
  evaluation = run["eval"]
  source = os.path.join(run["workdir"], "eval")
  stem = os.path.splitext(output)[0]
  target = os.path.join(stem, run["name"])
  copied = []
  for name in evaluation.get("plots", []):
    path = os.path.join(source, name)
    if os.path.isfile(path):
      os.makedirs(target, exist_ok=True)
      shutil.copyfile(path, os.path.join(target, name))
      copied.append(os.path.relpath(os.path.join(target, name), os.path.dirname(output)))
  return copied


def render(found: Sequence[dict], notes: Sequence[str], output: str, flags_dir: str,
           plots: bool) -> str:
  """The Markdown page."""
  lines = ["# Results", "",
           f"Generated by `python -m experiments.results` on {datetime.date.today()} "
           f"({platform.machine()}, {os.cpu_count()} CPU cores) from the runs' own records: "
           f"`summary.json` (final test metrics, wall time) and `eval/results.json` (from "
           f"`python -m experiments.evaluate`). Regenerate it after new runs. Wall times are "
           f"those of the machine and load each run had.", ""]
  by_dataset: dict[str, list[dict]] = {}
  for run in found:
    by_dataset.setdefault(str(run["values"].get("dataset")), []).append(run)
  for dataset, group in sorted(by_dataset.items()):
    lines += [f"## {dataset}", ""]
    fixed = [r for r in group
             if r["values"].get("method") not in ("ecmt",) + PREFERENCE_METHODS]
    preference = [r for r in group if r["values"].get("method") in PREFERENCE_METHODS]
    controllable = [r for r in group if r["values"].get("method") == "ecmt"]
    if fixed:
      single = [r for r in fixed if r["values"].get("method") == "single_task"]
      reference = single[0] if len(single) == 1 else None
      lines += ["### Fixed networks", ""] + fixed_table(fixed, reference) + [""]
      if reference is not None:
        lines += [f"Delta_m against `{reference['name']}` (primary test metric of each task).",
                  ""]
    if preference:
      lines += ["### Preference-controlled networks (DYMU, PHN, PHN-BN)", ""]
      hv_reference = shared_hv_reference(preference)
      if hv_reference is None:
        lines += ["Not evaluated yet.", ""]
      else:
        lines += preference_table(preference, hv_reference) + [""]
        lines += [f"Hypervolume of each sweep's test losses against one reference point for "
                  f"the table, {[round(x, 4) for x in hv_reference]} (just worse than every "
                  f"loss above). Delta_m: mean over the sweep's preferences against each "
                  f"run's evaluation reference (DYMU: its anchor streams). DYMU costs: mean "
                  f"over the evaluation's cost preferences; fractions are of the DYMU anchor's "
                  f"MACs and parameters. Training time of the edge variant: anchor and edge "
                  f"stages only.", ""]
        front = os.path.join(os.path.splitext(output)[0], f"{dataset}_fronts.png")
        if plots and plot_fronts(preference, front):
          lines += [f"![fronts]({os.path.relpath(front, os.path.dirname(output))})", ""]
        for run in preference:
          if plots and run["eval"]:
            copied = copy_plots(run, output)
            if copied:
              lines += [f"`{run['name']}`:", ""] + [
                  f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in copied] + [""]
    for run in controllable:
      lines += [f"### ECMT: `{run['name']}`", ""]
      if run["eval"] is None:
        lines += ["Not evaluated yet; final SuperNet test metrics: " + ", ".join(
            _primary(t, m) for t, m in _supernet_metrics(run).items()) + ".", ""]
      else:
        lines += ecmt_table(run) + [""]
        if plots:
          lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})"
                    for p in copy_plots(run, output)] + [""]
    lines += ["Commands:", "", "```bash"]
    for run in group:
      lines.append(train_command(run["workdir"], run["values"], flags_dir))
      command = eval_command(run)
      if command:
        lines.append(command)
    lines += ["```", ""]
  if notes:
    lines += ["## Skipped folders", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


def main(argv):
  del argv
  common.quiet_logging()
  with common.user_errors():
    found, notes = load_runs(FLAGS.workdirs)
    if not found:
      raise FileNotFoundError(f"No finished run in {', '.join(FLAGS.workdirs)}; train one "
                              f"with python -m experiments.train first.")
    output = os.path.abspath(FLAGS.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    text = render(found, notes, output, FLAGS.flags_dir, FLAGS.copy_plots)
    with open(output, "w", encoding="utf-8") as f:
      f.write(text)
    print(f"{len(found)} runs -> {output}" + (f" ({len(notes)} folders skipped)" if notes
                                              else ""))


if __name__ == "__main__":
  app.run(main)
