r"""Collect finished runs into one Markdown page of results, each number with its commands.

    python -m experiments.results --workdirs='workdirs/*' --output=docs/results.md \
        --overwrite_tracked

For every workdir (a glob or a comma-separated list) that holds a finished
`python -m experiments.train` run (`summary.json` and a checkpoint): its flags are read from
the checkpoint; the flag file under `experiments/flags/` whose every setting equals the run's
flags names the training command (other flags that differ from their defaults are appended);
its final test metrics and wall time come from `summary.json`; and where
`python -m experiments.evaluate` was run (`<workdir>/eval/results.json`), its measures and the
evaluate command.

Seeds: runs whose saved training flags are all equal except `--seed` (and where they live:
`--workdir`, `--data_dir`, how they print; the input folders `--dymu_pretrain_dir`,
`--dymu_anchor_dir` and `--dymu_edge_dir` may differ as long as both are set or both empty) form one group, shown as one
row: each number is the mean ± sample standard deviation (ddof = 1) over the group's runs with
its count, `0.912 ± 0.004 (n=3)`; a number without ± is the same in every run; a group of one
run shows the run's own value, and its seed column says n=1. A group's training and evaluation
commands are one `for seed in ...` loop (one command per seed where the runs' folders do not
follow the seed).

Runs are grouped by dataset: one table of the fixed methods (baselines, GradSplit, PCGrad:
metrics, Delta_m, inference and training MACs, parameters; Delta_m of each seed against the
single-task run of the same seed, or against the mean of the single-task group where it has no
run of that seed), one table of the preference-controlled runs (DYMU, whose `--dymu_stage=all`
parent folder counts as one run, PHN and PHN-BN: hypervolume against one shared reference point,
uniformity, rank controllability, mean cost; with a plot of the loss fronts for two tasks), one
table per ECMT group (one row per budget), and one plot of cost against hypervolume across the
methods (`<output stem>/<dataset>_cost_vs_hv.png`: MACs per example against the hypervolume of
the test losses at one reference point; PHN and PHN-BN one point, ECMT one per budget, DYMU one
per variant and resource c, plus its cost-band entries where the evaluation wrote them; error
bars over seeds). A shared reference point is the one every evaluation concerned used where they
agree (Multi-MNIST's fixed point, one `--hv_reference`), else one just worse than all their
losses. The sweeps' and ECMT's Delta_m are their evaluations' own (per seed, then averaged).
Which table a run joins follows its evaluation report (a preference sweep, a budget sweep, or
neither), else its method. With `--copy_plots`, the evaluation plots are copied next to the page
(`<output stem>/<run>/*.png`) and embedded (for a seed group, those of its first run).

Nothing is re-measured here: the page shows what the runs recorded, so regenerate it after new
runs. Wall times are those of the machine and load each run had.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import subprocess
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
import numpy as np

from dymu_jax import files as files_lib
from experiments import cli_help
from experiments import common
from experiments import runs
from experiments import train as _train  # noqa: F401  (defines the training flags)
from dymu_jax.metrics import pareto
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.train import checkpoint as checkpoint_lib

flags.DEFINE_list("workdirs", ["workdirs/*"],
                  "Run folders: globs or paths, comma-separated; folders without a finished "
                  "run are skipped with a note.")
flags.DEFINE_string("output", None,
                    "The Markdown file to write; default results.md in the run folders' common "
                    "parent (e.g. workdirs/results.md).")
flags.DEFINE_bool("overwrite_tracked", False,
                  "Allow --output to replace a file tracked by git (e.g. regenerating "
                  "docs/results.md); refused otherwise, so a command run from the repository "
                  "root cannot overwrite a committed page by accident.")
flags.DEFINE_string("flags_dir", os.path.join(os.path.dirname(__file__), "flags"),
                    "Folder of the flag files that training commands are matched against.")
flags.DEFINE_bool("copy_plots", True,
                  "Copy each evaluation's PNG plots next to the page, and draw the page's own "
                  "plots (loss fronts, cost against hypervolume) there.")

FLAGS = flags.FLAGS

# Flags that never belong to a reproducing command (where the run lives, how it prints).
_PER_MACHINE = ("workdir", "data_dir", "progress", "traceback", "flagfile")

# The method whose runs are the Delta_m reference of the fixed-network table (`--reference`).
flags.DEFINE_string("reference_method", "single_task",
                    "The --method whose runs are the Delta_m reference of the fixed-network "
                    "table.")


# ----------------------------------------------------------------------------------------------
# Reading runs.


def saved_flags(workdir: str) -> dict | None:
  """The flags saved with the newest checkpoint of `workdir`, or None without a checkpoint."""
  if not checkpoint_lib.has_checkpoint_dir(workdir):
    return None
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    if checkpointer.latest_step() is None:
      return None
    return common.normalise_values(checkpointer.metadata().get("run", {}).get("flags", {}))


def parse_flag_file(path: str) -> dict[str, str]:
  """{flag name: text value} of a flag file with its includes (`--name=value` lines; `--noname`
  is false; a former option name counts under its flag)."""
  values = {}
  for line in common.flag_file_args(path):
    if not line.startswith("--"):
      continue
    name, sep, text = line[2:].partition("=")
    if not sep:
      name, text = (name[2:], "false") if name.startswith("no") and name[2:] in FLAGS else (
          name, "true")
    values[name] = text
  return common.normalise_values(values)


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


def train_command(workdir: str, values: Mapping[str, Any], flags_dir: str,
                  always: Sequence[str] = ()) -> str:
  """The command that trains this run again (flag file + flags that differ from it).

  Flags named in `always` are spelled out even at their default (a seed group's `--seed`).
  """
  flag_file = matching_flag_file(values, flags_dir)
  settings = parse_flag_file(flag_file) if flag_file else {}
  parts = ["python -m experiments.train"]
  if flag_file:
    parts.append(f"--flagfile={os.path.relpath(flag_file)}")
  for name in sorted(values):
    if name in _PER_MACHINE or name in settings or name not in FLAGS:
      continue
    default = FLAGS[name].default
    if name in always or not _same(values[name], default):
      value = values[name]
      text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
      text = str(text).lower() if isinstance(value, bool) else text
      parts.append(f"--{name}={text}")
  if values.get("data_dir"):
    parts.append(f"--data_dir={_short_path(values['data_dir'])}")
  parts.append(f"--workdir={_short_path(workdir)}")
  return " ".join(parts)


def _short_path(path: str) -> str:
  if not files_lib.is_local(path):
    return path  # gs://bucket/run: as given
  rel = os.path.relpath(os.path.abspath(path))
  return rel if not rel.startswith("../..") else os.path.abspath(path)


def dymu_parent_flags(folder: str, summary: Mapping[str, Any]) -> dict | None:
  """The flags of a `--dymu_stage=all` run, from its newest stage's checkpoint.

  Each stage saves its own flags (its stage, steps and input folders); the command that trains
  the whole run has `--dymu_stage=all`, the default `--steps`, `--dymu_anchor_dir` only
  when the anchor was another run's, and no `--dymu_pretrain_dir` (its own pretrain stage).
  """
  values = saved_flags(runs.resolve_workdir(folder))
  if values is None:
    return None
  anchor_dir = summary.get("anchor_dir") or ""
  own_anchor = os.fspath(files_lib.run_path(folder) / "anchor")
  return {**values, "dymu_stage": "all", "steps": FLAGS["steps"].default,
          "dymu_anchor_dir": "" if files_lib.run_dir(anchor_dir) == own_anchor else anchor_dir,
          "dymu_edge_dir": FLAGS["dymu_edge_dir"].default,
          "dymu_pretrain_dir": FLAGS["dymu_pretrain_dir"].default}


def _matching(pattern: str) -> list[str]:
  """The folders a --workdirs pattern names: a local glob, or on another filesystem
  (gs://bucket/runs/*) a glob of its last part."""
  if files_lib.is_local(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern)))
  parent, _, last = pattern.rstrip("/").rpartition("/")
  if not any(c in last for c in "*?[") or any(c in parent for c in "*?["):
    return []
  return sorted(os.fspath(p) for p in files_lib.run_path(parent).glob(last))


def load_runs(patterns: Sequence[str]) -> tuple[list[dict], list[str]]:
  """(runs, notes): one dict per finished run, and a note per skipped folder."""
  folders = []
  for pattern in patterns:
    matched = _matching(pattern) or [pattern]
    folders += [f for f in matched if f not in folders]
  found, notes = [], []
  for folder in folders:
    summary_path = files_lib.run_path(folder) / "summary.json"
    if not files_lib.is_dir(files_lib.run_path(folder)):
      notes.append(f"{folder}: not a folder")
      continue
    if not files_lib.is_file(summary_path):
      notes.append(f"{folder}: no summary.json (training not finished)")
      continue
    try:
      summary = files_lib.read_json(summary_path)
    except files_lib.DamagedFile as error:
      notes.append(f"{folder}: {error}; rerun its training command to rewrite it")
      continue
    values = saved_flags(folder)
    if values is None and isinstance(summary.get("stages"), dict):
      # A run in stages: the command's flags (older DYMU parents: rebuilt from a stage's).
      values = summary.get("flags") or dymu_parent_flags(folder, summary)
    if values is None:
      notes.append(f"{folder}: no checkpoint")
      continue
    evaluation = None
    eval_path = files_lib.run_path(folder) / "eval" / "results.json"
    if files_lib.is_file(eval_path):
      evaluation = json.loads(files_lib.read_bytes(eval_path).decode("utf-8"))
    found.append({"name": os.path.basename(os.path.normpath(folder)), "workdir": folder,
                  "values": values, "summary": summary, "eval": evaluation})
  return found, notes


# ----------------------------------------------------------------------------------------------
# Seed groups.

# Flags that may differ between the runs of one group.
_GROUP_FREE = _PER_MACHINE + ("seed",)
# Input folders of a DYMU stage: each seed's own, so they may differ, but a run that trains its
# own anchor (empty) does not group with one that reuses another run's.
_INPUT_DIRS = ("dymu_pretrain_dir", "dymu_anchor_dir", "dymu_edge_dir")


def _default(name: str) -> Any:
  return FLAGS[name].default if name in FLAGS else None


def run_seed(run: Mapping[str, Any]) -> Any:
  return run["values"].get("seed", _default("seed"))


def same_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether two runs' saved flags are equal but for their seed and where they live."""
  for name in (set(a) | set(b)) - set(_GROUP_FREE):
    x, y = a.get(name, _default(name)), b.get(name, _default(name))
    if name in _INPUT_DIRS:
      if bool(x) != bool(y):
        return False
    elif not _same(x, y):
      return False
  return True


def brace_name(names: Sequence[str]) -> str:
  """One name for several: their common prefix and suffix around `{a,b,c}` (bash style)."""
  names = list(dict.fromkeys(names))
  if len(names) == 1:
    return names[0]
  prefix = os.path.commonprefix(names)
  rests = [n[len(prefix):] for n in names]
  suffix = os.path.commonprefix([r[::-1] for r in rests])[::-1]
  middles = [r[:len(r) - len(suffix)] for r in rests]
  return f"{prefix}{{{','.join(middles)}}}{suffix}"


def group_runs(found: Sequence[dict]) -> list[dict]:
  """Runs with the same flags but their seed, as groups in the order of their first run.

  Each group: "runs" (by seed), "seeds", "name" (the runs' names in one, `x_s{0,1,2}`),
  "values" (the first run's flags), "kind" (`run_kind`).
  """
  groups: list[list[dict]] = []
  for run in found:
    for members in groups:
      if same_config(members[0]["values"], run["values"]):
        members.append(run)
        break
    else:
      groups.append([run])
  out = []
  for members in groups:
    members = sorted(members, key=lambda r: (_seed_key(run_seed(r)), r["name"]))
    evaluated = [r for r in members if r["eval"]]
    out.append({"runs": members, "seeds": [run_seed(r) for r in members],
                "name": brace_name([r["name"] for r in members]),
                "values": members[0]["values"],
                "kind": run_kind(evaluated[0] if evaluated else members[0])})
  return out


def _seed_key(seed: Any) -> tuple:
  return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def run_kind(run: Mapping[str, Any]) -> str:
  """"preference", "budget" or "fixed": from the evaluation report, else from the method."""
  evaluation = run.get("eval") or {}
  if "sweeps" in evaluation:
    return "preference"
  if "budgets" in evaluation:
    return "budget"
  if "eval" in evaluation:
    return "fixed"
  # Not evaluated yet: the controls its method takes, as training recorded them.
  controls = (run.get("summary") or {}).get("controls") or ()
  return "budget" if "budget" in controls else "preference" if controls else "fixed"


def method_label(method: Any) -> str:
  """PHN, PHN-BN, DYMU, ECMT, ... from a method's flag value."""
  return str(method).upper().replace("_", "-")


def seeds_cell(seeds: Sequence[Any]) -> str:
  """"0, 1, 2 (n=3)"."""
  return f"{', '.join(map(str, seeds))} (n={len(seeds)})"


def seed_loop(commands: Sequence[str], seeds: Sequence[Any]) -> str | None:
  """One `for seed in ...; do ...; done` line for commands that differ only by their seed.

  Where two commands differ, each must read the same text around its own seed (`--seed=1`,
  `workdirs/x_s1`); None when they do not.
  """
  seeds = [str(s) for s in seeds]
  if len(commands) < 2 or len(set(seeds)) != len(seeds):
    return None
  split = [c.split(" ") for c in commands]
  if len({len(tokens) for tokens in split}) != 1:
    return None
  template = []
  for tokens in zip(*split):
    if len(set(tokens)) == 1:
      template.append(tokens[0])
      continue
    first, found = tokens[0], None
    start = first.find(seeds[0])
    while start >= 0 and found is None:
      prefix, suffix = first[:start], first[start + len(seeds[0]):]
      if all(t == f"{prefix}{s}{suffix}" for t, s in zip(tokens, seeds)):
        found = prefix + "${seed}" + suffix
      start = first.find(seeds[0], start + 1)
    if found is None:
      return None
    template.append(found)
  return f"for seed in {' '.join(seeds)}; do {' '.join(template)}; done"


def group_commands(group: Mapping[str, Any], flags_dir: str) -> list[str]:
  """The commands that train and evaluate a group again: a loop over its seeds if they fit."""
  members = group["runs"]
  if len(members) == 1:
    run = members[0]
    lines = [train_command(run["workdir"], run["values"], flags_dir)]
    command = eval_command(run)
    return lines + ([command] if command else [])
  lines = [f"# {group['name']}: seeds {', '.join(map(str, group['seeds']))}"]
  trains = [train_command(r["workdir"], r["values"], flags_dir, always=("seed",))
            for r in members]
  lines += [seed_loop(trains, group["seeds"]) or "\n".join(trains)]
  evaluated = [r for r in members if r["eval"]]
  evals = [eval_command(r) for r in evaluated]
  if evals:
    lines += [seed_loop(evals, [run_seed(r) for r in evaluated]) or "\n".join(evals)]
  return lines


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


def _spread(value: float) -> str:
  return f"{value:.2g}"


def stat(values: Sequence[Any], grouped: bool, fmt: Callable[[Any], str] = _fmt,
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


def _metric_directions() -> dict[str, bool]:
  """{metric name: higher is better} of every task metric of `dymu_jax.metrics.tasks`."""
  directions, pending = {}, [metrics_lib.TaskMetric]
  while pending:
    cls = pending.pop()
    pending += cls.__subclasses__()
    directions.update(dict(cls.higher_is_better))
  return directions


_DIRECTIONS = _metric_directions()


def _primary_name(metrics: Mapping[str, float]) -> str | None:
  # dymu_jax.metrics lists each task's primary metric first, and summary.json keeps the order.
  return next(iter(metrics), None)


def _primary(task_name: str, metrics: Mapping[str, float]) -> str:
  name = _primary_name(metrics)
  return f"{task_name} {name} {_fmt(metrics.get(name))}" if name else task_name


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
    name = _primary_name(task_metrics)
    if name is None or name not in reference[task]:
      return None
    values[task], refs[task] = task_metrics[name], reference[task][name]
    higher[task] = higher_is_better(run, task, name)
  return pareto.delta_m(values, refs, higher)


def _supernet_metrics(run: dict) -> Mapping[str, Mapping[str, float]]:
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
    for task, task_metrics in _supernet_metrics(run).items():
      for name in task_metrics:
        out.setdefault(task, {}).setdefault(name, None)
  for task, task_metrics in out.items():
    for name in task_metrics:
      values = [_supernet_metrics(r).get(task, {}).get(name) for r in members]
      values = [float(v) for v in values if v is not None]
      task_metrics[name] = float(np.mean(values)) if values else None
  return out


def _reference_dir(run: dict) -> str | None:
  """The `--reference_workdir` the run's evaluation had (older reports: from its label)."""
  evaluation = run["eval"] or {}
  reference = evaluation.get("reference_workdir")
  label = str(evaluation.get("reference") or "")
  if not reference and label.startswith("single-task ("):  # results written before the path
    workdir = run["workdir"]
    parent = (os.path.dirname(os.path.normpath(workdir)) if files_lib.is_local(workdir)
              else os.fspath(files_lib.run_path(workdir).parent))
    reference = os.path.join(parent, label[len("single-task ("):-1])
  return reference or None


def eval_command(run: dict) -> str | None:
  if run["eval"] is None:
    return None
  parts = ["python -m experiments.evaluate", f"--workdir={_short_path(run['workdir'])}"]
  reference = _reference_dir(run)
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


# ----------------------------------------------------------------------------------------------
# Tables.


def run_delta_m(run: dict, reference: Mapping[str, Any] | None) -> float | None:
  """Delta_m % of a fixed run against the single-task group `reference` (see `fixed_table`)."""
  evaluation = run["eval"] or {}
  if reference is None:
    if evaluation.get("delta_m") is not None:
      return evaluation["delta_m"]
    return None
  same_seed = [r for r in reference["runs"] if _same(run_seed(r), run_seed(run))]
  if same_seed:
    target = same_seed[0]
    measured = _reference_dir(run)
    same_run = measured and (
        os.path.realpath(measured) == os.path.realpath(target["workdir"])
        or os.path.basename(os.path.normpath(measured)) == target["name"])  # folders moved
    if evaluation.get("delta_m") is not None and same_run:
      return evaluation["delta_m"]
    return delta_m(_supernet_metrics(run), _supernet_metrics(target), run)
  return delta_m(_supernet_metrics(run), _mean_metrics(reference["runs"]), run)


def fixed_table(groups: Sequence[dict], reference: Mapping[str, Any] | None) -> list[str]:
  """One row per seed group of fixed networks.

  Delta_m of each run against `reference` (the single-task group): its run of the same seed
  (the evaluation's value where it was measured against that run, else from the summaries), or
  the mean of the group's metrics where it has no run of that seed; without a reference, the
  run's evaluation's own Delta_m. Costs (per example) come from the evaluation (`cost`:
  analytic inference MACs, parameters and training MACs by
  `experiments.evaluate.TRAINING_MACS_CONVENTION`).
  """
  lines = ["| run | method | steps | test metrics | Delta_m % | inference MACs | params | "
           "training MACs | wall time | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
  for group in groups:
    members, grouped = group["runs"], len(group["runs"]) > 1
    per_run = [_supernet_metrics(r) for r in members]
    shown = []
    for task, task_metrics in per_run[0].items():
      name = _primary_name(task_metrics)
      if name is None:
        shown.append(task)
        continue
      shown.append(f"{task} {name} " + stat([m.get(task, {}).get(name) for m in per_run],
                                           grouped))
    costs = [(r["eval"] or {}).get("cost") or {} for r in members]
    cells = [f"`{group['name']}`", str(group["values"].get("method")),
             str(members[0]["summary"].get("steps")), ", ".join(shown),
             stat([run_delta_m(r, reference) for r in members], grouped, _percent,
                  lambda s: f"{s:.2f}"),
             stat([c.get("inference_macs") for c in costs], grouped, _mega, _mega),
             stat([c.get("params") for c in costs], grouped, _mega, _mega),
             stat([c.get("training_macs_per_example") for c in costs], grouped, _mega, _mega),
             stat([r["summary"].get("seconds") for r in members], grouped, _minutes, _minutes),
             seeds_cell(group["seeds"])]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


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
  """One hypervolume reference for the test losses of every preference sweep (and ECMT
  budget) of these runs: the one their evaluations all used (`common_hv_reference`), else just
  worse than every one of their losses (`pareto.default_reference`)."""
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


def _runs_of(groups: Sequence[dict]) -> list[dict]:
  return [r for g in groups for r in g["runs"]]


def _anchor_cost(members: Sequence[dict]) -> dict | None:
  for run in members:
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
  """The HV of a DYMU sweep's points in its evaluation's cost band, at `reference`; None for
  sweeps without a band (PHN, PHN-BN: one network, whose cost is in the MACs column)."""
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
  """One row per seed group and sweep (variant, c) of DYMU, PHN and PHN-BN runs of a dataset.

  Hypervolumes are recomputed against `hv_reference`, shared by every row so they compare.
  Costs: DYMU's mean over the evaluation's `--cost_preferences` preferences (trees differ per
  preference); PHN's network is one shared network. Fractions are of the DYMU anchor (N
  single-task streams) where the dataset has a DYMU run.
  """
  anchor = _anchor_cost(_runs_of(groups))
  head = ["run", "variant", "c", "HV", "HV (cost band)", "uniformity", "rank contr.",
          "min mean/anchor", "Delta_m %", "mean MACs (fraction)", "mean params (fraction)",
          "distinct trees", "training time", "seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  reference = np.asarray(hv_reference, np.float64)
  fraction = lambda k: (lambda v: _mega(v) + (f" ({float(v) / anchor[k]:.3f})"
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
               stat([s.get("rank_controllability") for _, s in rows], grouped,
                    lambda v: _fmt(v, 3)),
               stat([s.get("min_ratio_to_anchor") for _, s in rows], grouped,
                    lambda v: _fmt(v, 3)),
               stat([s.get("delta_m") for _, s in rows], grouped, _percent,
                    lambda s: f"{s:.2f}"),
               stat([c[0] for c in costs], grouped, fraction("full_macs"), _mega),
               stat([c[1] for c in costs], grouped, fraction("full_params"), _mega),
               (str(trees[0]) if not grouped or not all(isinstance(t, (int, float))
                                                         for t in trees)
                else stat(trees, grouped)),
               stat([_training_seconds(run, variant) for run, _ in rows], grouped, _minutes,
                    _minutes),
               seeds_cell([run_seed(run) for run, _ in rows])]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


def plot_fronts(members: Sequence[dict], path: str) -> bool:
  """The test-loss fronts of every two-task preference sweep in one figure; False if none."""
  sweeps = [(run, sweep) for run in members if run["eval"]
            for sweep in run["eval"].get("sweeps", []) if len(run["eval"]["tasks"]) == 2]
  if not sweeps:
    return False
  plt = _pyplot()
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
  files_lib.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return True


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ----------------------------------------------------------------------------------------------
# Cost against hypervolume, across methods.


def _cost_bands(evaluation: Mapping[str, Any], sweep: Mapping[str, Any]) -> list[dict]:
  """The cost-band entries of a DYMU sweep (`experiments.evaluate` writes one per sweep:
  "cost_band": {min_macs_fraction, max_macs_fraction, hypervolume, num_points}); also read from
  its resource's row of `cost.by_resource`, one entry or a list, leaving out an entry that names
  another variant. None in reports written before cost bands."""
  found = [sweep.get("cost_band")]
  for row in (evaluation.get("cost") or {}).get("by_resource", []):
    if row.get("resource") == sweep["resource"]:
      found.append(row.get("cost_band"))
  entries = []
  for item in found:
    for entry in (item if isinstance(item, list) else [item]):
      if (isinstance(entry, Mapping) and entry.get("max_macs_fraction") is not None
          and entry.get("variant", sweep["variant"]) == sweep["variant"]):
        entries.append(dict(entry))
  return entries


def _band_hypervolume(evaluation: Mapping[str, Any], sweep: Mapping[str, Any], band: dict,
                      reference: np.ndarray) -> float | None:
  """HV at `reference` of the sweep's points whose MACs fraction lies in a cost band
  (`pareto.cost_band_hypervolume`, as the evaluation picks them); where they cannot be picked
  again (no per-point fractions, or another count than the band's), the band's own value if the
  evaluation's reference point is this one, else None."""
  points, losses = sweep.get("points") or [], sweep.get("losses") or []
  fractions = [p.get("macs_fraction") for p in points]
  if points and len(points) == len(losses) and None not in fractions:
    volume, count = pareto.cost_band_hypervolume(
        np.asarray(losses, np.float64), fractions, reference,
        float(band["max_macs_fraction"]), float(band.get("min_macs_fraction") or 0.0))
    if band.get("num_points") in (None, count):
      return volume
  own = evaluation.get("hypervolume_reference")
  if (band.get("hypervolume") is not None and own is not None and len(own) == len(reference)
      and np.allclose(own, reference)):
    return float(band["hypervolume"])
  return None


def _band_label(band: Mapping[str, Any]) -> str:
  low, high = float(band.get("min_macs_fraction") or 0.0), float(band["max_macs_fraction"])
  return f"band {low:.2f}-{high:.2f}" if low > 0 else f"band <= {high:.2f}"


def _run_cost_points(run: dict, reference: np.ndarray) -> list[tuple]:
  """(series, point label, MACs per example, HV at `reference`, is a cost band) of one run."""
  evaluation = run["eval"] or {}
  method = str(evaluation.get("method") or run["values"].get("method"))
  cost = evaluation.get("cost") or {}
  out = []
  for sweep in evaluation.get("sweeps", []):
    hv = pareto.hypervolume(np.asarray(sweep["losses"]), reference)
    if sweep["resource"] is None:  # PHN, PHN-BN: one network
      out.append((method_label(sweep["variant"]), "", cost.get("inference_macs"), hv, False))
      continue
    full = cost.get("full_macs")
    fraction = sweep.get("mean_macs_fraction")
    if fraction is None:
      fraction = next((row["mean_macs_fraction"] for row in cost.get("by_resource", [])
                       if row.get("resource") == sweep["resource"]), None)
    series = f"{method_label(method)} {sweep['variant']}"
    c = f"c={sweep['resource']:g}"
    out.append((series, c, None if full is None or fraction is None else fraction * full, hv,
                False))
    for band in _cost_bands(evaluation, sweep):
      band_hv = _band_hypervolume(evaluation, sweep, band, reference)
      if band_hv is not None and full is not None:
        out.append((series, f"{c} {_band_label(band)}",
                    float(band["max_macs_fraction"]) * full, band_hv, True))
  for row in evaluation.get("budgets", []):
    if row.get("losses"):
      macs = row.get("mean_macs", row.get("max_macs"))
      out.append((method_label(method), f"b={row['budget']:g}", macs,
                  pareto.hypervolume(np.asarray(row["losses"]), reference), False))
  return [p for p in out if p[2] is not None]


def cost_hv_series(groups: Sequence[dict], reference: Sequence[float]) -> list[dict]:
  """The points of the cost-vs-hypervolume plot, one series per group and variant.

  Each series: "label", "method" (its marker), "points": {"label", "x" (mean MACs per example),
  "x_std", "y" (mean HV), "y_std" (sample std over seeds, 0 for one), "n", "band"}.
  """
  reference = np.asarray(reference, np.float64)
  series: dict[str, dict] = {}
  for group in groups:
    for run in group["runs"]:
      if not run["eval"]:
        continue
      for name, label, x, y, band in _run_cost_points(run, reference):
        key = f"{name}: {group['name']}"
        entry = series.setdefault(key, {"label": key, "method": name.split(" ")[0],
                                        "points": {}})
        entry["points"].setdefault((label, band), []).append((float(x), float(y)))
  out = []
  for entry in series.values():
    points = []
    for (label, band), values in entry["points"].items():
      xs, ys = np.asarray([v[0] for v in values]), np.asarray([v[1] for v in values])
      std = lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0
      points.append({"label": label, "x": float(xs.mean()), "x_std": std(xs),
                     "y": float(ys.mean()), "y_std": std(ys), "n": len(values), "band": band})
    out.append({**entry, "points": points})
  return out


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def plot_cost_vs_hv(series: Sequence[dict], reference: Sequence[float], path: str) -> bool:
  """The cost-vs-hypervolume figure of `cost_hv_series`; False when there is no point."""
  if not any(s["points"] for s in series):
    return False
  plt = _pyplot()
  markers = {}
  for entry in series:
    markers.setdefault(entry["method"], _MARKERS[len(markers) % len(_MARKERS)])
  fig, ax = plt.subplots(figsize=(7, 4.8))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, entry in enumerate(series):
    color = colors[i % len(colors)]
    for band in (False, True):
      points = sorted((p for p in entry["points"] if p["band"] == band), key=lambda p: p["x"])
      if not points:
        continue
      xs = np.asarray([p["x"] for p in points]) / 1e6
      ax.errorbar(xs, [p["y"] for p in points],
                  xerr=np.asarray([p["x_std"] for p in points]) / 1e6,
                  yerr=[p["y_std"] for p in points], marker=markers[entry["method"]],
                  markersize=6, linestyle="none" if band else "-", linewidth=1, capsize=3,
                  color=color, markerfacecolor="none" if band else color,
                  label=entry["label"] + (" (cost band)" if band else ""))
      for p, x in zip(points, xs):
        text = p["label"] + (f" n={p['n']}" if p["n"] > 1 else "")
        if text:
          ax.annotate(text, (x, p["y"]), textcoords="offset points", xytext=(4, 4),
                      fontsize=7, color=color)
  ax.set_xlabel("MACs per example (millions; mean over the sweep's preferences)")
  ax.set_ylabel("hypervolume of the test losses")
  ax.set_title(f"Cost against hypervolume (reference {[round(x, 3) for x in reference]})",
               fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files_lib.save_figure(fig, path, dpi=110)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------------------------
# ECMT.


def ecmt_table(group: Mapping[str, Any]) -> list[str]:
  """One row per budget of an ECMT seed group (its evaluated runs); hypervolumes against one
  reference point for the group's budgets (for one run: the evaluation's own)."""
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
    cells = [_fmt(budget),
             stat([row["max_macs"] for row in rows], grouped,
                  lambda v: f"{int(round(v)):,} ({v / full:.3f})", lambda s: f"{s:,.0f}"),
             "yes" if all(within) else ("NO" if not grouped
                                        else f"NO ({within.count(False)} of {len(within)})")]
    cells += [stat([row.get("mean_metric", {}).get(t) for row in rows], grouped)
              for t in tasks]
    hvs = [row.get("hypervolume") if hv_reference is None else
           pareto.hypervolume(np.asarray(row["losses"]), hv_reference) for row in rows]
    three = lambda v: _fmt(v, 3)
    cells += [stat([row.get("rank_controllability") for row in rows], grouped, three),
              stat([row.get("delta_m") for row in rows], grouped, three),
              stat([row.get("mean_normalised_metric") for row in rows], grouped),
              stat(hvs, grouped), stat([row.get("uniformity") for row in rows], grouped)]
    lines.append("| " + " | ".join(cells) + " |")
  checks = [r["eval"].get("budget_check", {}) for r in members]
  total = lambda k: (sum(c[k] for c in checks) if all(k in c for c in checks) else "n/a")
  budget_counts = sorted({str(c.get("budgets", "n/a")) for c in checks})
  references = list(dict.fromkeys(str(r["eval"].get("reference", "n/a")) for r in members))
  first = group["runs"][0]
  rank = stat([r["eval"].get("mean_rank_controllability") for r in members], grouped, three)
  train_time = stat([r["summary"].get("seconds") for r in group["runs"]], grouped, _minutes,
                    _minutes)
  eval_time = stat([r["eval"].get("seconds") for r in members], grouped, _minutes, _minutes)
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


def copy_plots(run: dict, output: str) -> list[str]:
  """Copies the run's evaluation plots next to `output`; their paths relative to it."""
  evaluation = run["eval"]
  source = files_lib.run_path(run["workdir"]) / "eval"  # the run may be on gs://...
  stem = os.path.splitext(output)[0]
  target = os.path.join(stem, run["name"])
  copied = []
  for name in evaluation.get("plots", []):
    path = source / name
    if files_lib.is_file(path):
      os.makedirs(target, exist_ok=True)
      files_lib.copy_file(path, os.path.join(target, name))
      copied.append(os.path.relpath(os.path.join(target, name), os.path.dirname(output)))
  return copied


def _images(paths: Sequence[str]) -> list[str]:
  return [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in paths]


def _plot_owner(group: Mapping[str, Any]) -> tuple[dict | None, str]:
  """The run whose evaluation plots the page shows for a group, and its label."""
  evaluated = [r for r in group["runs"] if r["eval"]]
  if not evaluated:
    return None, ""
  run = evaluated[0]
  if len(group["runs"]) == 1:
    return run, f"`{run['name']}`:"
  return run, f"`{run['name']}` (seed {run_seed(run)} of `{group['name']}`):"


# ----------------------------------------------------------------------------------------------
# The page.


_RULE = ("Runs whose saved training flags are equal except `--seed` (and where they live) form "
         "one row: mean ± sample standard deviation (ddof = 1) over its runs, with their number "
         "n; a value without ± is the same in every run, and a lone run shows its own value "
         "(seeds column: n=1).")


def render(found: Sequence[dict], notes: Sequence[str], output: str, flags_dir: str,
           plots: bool) -> str:
  """The Markdown page."""
  lines = ["# Results", "",
           f"Generated by `python -m experiments.results` on {datetime.date.today()} "
           f"({platform.machine()}, {os.cpu_count()} CPU cores) from the runs' own records: "
           f"`summary.json` (final test metrics, wall time) and `eval/results.json` (from "
           f"`python -m experiments.evaluate`). Regenerate it after new runs. Wall times are "
           f"those of the machine and load each run had. {_RULE}", ""]
  by_dataset: dict[str, list[dict]] = {}
  for run in found:
    by_dataset.setdefault(str(run["values"].get("dataset")), []).append(run)
  for dataset, dataset_runs in sorted(by_dataset.items()):
    lines += [f"## {dataset}", ""]
    groups = group_runs(dataset_runs)
    fixed = [g for g in groups if g["kind"] == "fixed"]
    preference = [g for g in groups if g["kind"] == "preference"]
    controllable = [g for g in groups if g["kind"] == "budget"]
    if fixed:
      single = [g for g in fixed if g["values"].get("method") == FLAGS.reference_method]
      reference = single[0] if len(single) == 1 else None
      lines += ["### Fixed networks", ""] + fixed_table(fixed, reference) + [""]
      if reference is not None and len(reference["runs"]) == 1:
        lines += [f"Delta_m against `{reference['name']}` (primary test metric of each task).",
                  ""]
      elif reference is not None:
        lines += [f"Delta_m of each run against the run of `{reference['name']}` with the same "
                  f"seed (seeds {', '.join(map(str, reference['seeds']))}), or against the "
                  f"mean of those runs' metrics for a seed it has no run of (primary test "
                  f"metric of each task); then mean ± std over the group's runs.", ""]
    if preference:
      lines += ["### Preference-controlled networks (DYMU, PHN, PHN-BN)", ""]
      hv_reference = shared_hv_reference(_runs_of(preference))
      if hv_reference is None:
        lines += ["Not evaluated yet.", ""]
      else:
        lines += preference_table(preference, hv_reference) + [""]
        lines += [f"Hypervolume of each sweep's test losses against one reference point for "
                  f"the table, "
                  f"{hv_reference_text(_runs_of(preference), hv_reference, 'loss above')}. "
                  f"HV (cost band): DYMU's HV of only the sweep's trees within its "
                  f"evaluation's `--cost_band` (MACs fraction of the anchor, default at most "
                  f"0.6), at the same point. min mean/anchor: the lowest, over tasks, of a "
                  f"task's mean primary metric over the sweep divided by the anchor's (the "
                  f"target is >= 0.95). "
                  f"Delta_m: mean over the sweep's preferences against each "
                  f"run's evaluation reference (DYMU: its anchor streams). DYMU costs: mean "
                  f"over the evaluation's cost preferences; fractions are of the DYMU anchor's "
                  f"MACs and parameters. Training time of the edge variant: anchor and edge "
                  f"stages only.", ""]
        front = os.path.join(os.path.splitext(output)[0], f"{dataset}_fronts.png")
        if plots and plot_fronts(_runs_of(preference), front):
          lines += [f"![fronts]({os.path.relpath(front, os.path.dirname(output))})", ""]
        for group in preference:
          run, label = _plot_owner(group)
          if plots and run is not None:
            copied = copy_plots(run, output)
            if copied:
              lines += [label, ""] + _images(copied) + [""]
    for group in controllable:
      members = group["runs"]
      heading = (f"### ECMT: `{group['name']}`" if len(members) == 1 else
                 f"### ECMT: `{group['name']}` (seeds {', '.join(map(str, group['seeds']))})")
      lines += [heading, ""]
      if not any(r["eval"] for r in members):
        per_run = [_supernet_metrics(r) for r in members]
        lines += ["Not evaluated yet; final SuperNet test metrics: " + ", ".join(
            f"{t} {_primary_name(m)} " + stat(
                [p.get(t, {}).get(_primary_name(m)) for p in per_run], len(members) > 1)
            if _primary_name(m) else t for t, m in per_run[0].items()) + ".", ""]
      else:
        lines += ecmt_table(group) + [""]
        run, label = _plot_owner(group)
        if plots and run is not None:
          copied = copy_plots(run, output)
          if copied:
            lines += ([label, ""] if len(members) > 1 else []) + _images(copied) + [""]
    lines += cost_hv_section(dataset, preference + controllable, output, plots)
    lines += ["Commands:", "", "```bash"]
    for group in groups:
      lines += group_commands(group, flags_dir)
    lines += ["```", ""]
  if notes:
    lines += ["## Skipped folders", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


def cost_hv_section(dataset: str, groups: Sequence[dict], output: str, plots: bool
                    ) -> list[str]:
  """The cost-vs-hypervolume plot of a dataset's controllable groups, with its caption."""
  members = _runs_of(groups)
  reference = shared_hv_reference(members)
  if not plots or reference is None:
    return []
  series = cost_hv_series(groups, reference)
  path = os.path.join(os.path.splitext(output)[0], f"{dataset}_cost_vs_hv.png")
  if not plot_cost_vs_hv(series, reference, path):
    return []
  table = shared_hv_reference(_runs_of([g for g in groups if g["kind"] == "preference"]))
  differs = table is not None and not np.allclose(table, reference)
  point = hv_reference_text(members, reference, "loss of the sweeps and ECMT budgets here")
  if differs:
    point += f" (the preference table's, without ECMT's losses, is {[round(x, 4) for x in table]})"
  return ["### Cost against hypervolume", "",
          f"![cost_vs_hv]({os.path.relpath(path, os.path.dirname(output))})", "",
          f"Hypervolume of each sweep's test losses against one reference point for every "
          f"method here, {point}, against MACs per example (absolute: the methods' fractions "
          f"are of different networks). PHN, PHN-BN: the generated network; ECMT: the mean "
          f"MACs of the budget's SubNets (one point per budget); DYMU: the mean MACs of the "
          f"sweep's trees per variant and resource c (one point per c), and hollow markers for "
          f"the evaluation's cost bands (the HV of the sweep's points within the band's MACs "
          f"fractions, at the band's upper bound). Error bars: sample std over a group's seeds "
          f"(n on the point).", ""]


def output_path(output: str | None, run_dirs) -> str:
  """--output, or results.md in the common parent of the run folders."""
  if output:
    return os.path.abspath(output)
  # Runs on another filesystem (gs://...) have no local parent: the page goes to the cwd.
  parents = [os.path.dirname(os.path.abspath(d)) for d in run_dirs
             if files_lib.is_local(d)] or [os.getcwd()]
  return os.path.join(os.path.commonpath(parents), "results.md")


def is_tracked(path: str) -> bool:
  """Whether `path` is a file that git tracks (False outside a repository or without git)."""
  if not os.path.isfile(path):
    return False
  try:
    result = subprocess.run(["git", "ls-files", "--error-unmatch", os.path.basename(path)],
                            cwd=os.path.dirname(path), capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return result.returncode == 0


def check_output(output: str) -> None:
  """The page's folder exists (created if missing) and can be written, and `output` is not a
  folder; else one sentence naming --output."""
  if os.path.isdir(output):
    raise ValueError(f"--output={output} is a folder; give the Markdown file to write, such "
                     f"as {os.path.join(output, 'results.md')}.")
  common.ensure_workdir(os.path.dirname(output), "--output")


def main(argv):
  del argv
  common.quiet_logging()
  with common.user_errors("--output"):
    if FLAGS.output:  # a page that cannot be written stops before the runs are read
      check_output(output_path(FLAGS.output, []))
    found, notes = load_runs(FLAGS.workdirs)
    if not found:
      skipped = f" (skipped: {'; '.join(notes)})" if notes else ""
      raise FileNotFoundError(f"No finished run in {', '.join(FLAGS.workdirs)}{skipped}; "
                              f"train one with python -m experiments.train first.")
    output = output_path(FLAGS.output, [run["workdir"] for run in found])
    if not FLAGS.overwrite_tracked and is_tracked(output):
      raise ValueError(f"{output} is tracked by git; pass --overwrite_tracked to regenerate "
                       f"it, or choose another --output.")
    check_output(output)
    text = render(found, notes, output, FLAGS.flags_dir, FLAGS.copy_plots)
    files_lib.atomic_write(output, text)
    print(f"{len(found)} runs -> {output}" + (f" ({len(notes)} folders skipped)" if notes
                                              else ""))


if __name__ == "__main__":
  cli_help.run(main, __doc__, (("Collect", ("workdirs", "output", "overwrite_tracked",
                                            "flags_dir", "copy_plots")),))
