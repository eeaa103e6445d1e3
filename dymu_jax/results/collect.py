"""Finding finished runs, reading what they saved, grouping seeds, and their commands.

A run is a dict: "name" (its folder's name), "workdir", "values" (the training flags saved with
its newest checkpoint, under their current names), "seed", "summary" (`summary.json`) and
"eval" (`eval/results.json`, or None). `defaults` everywhere is {flag: default} of the training
command's flags: a run saved before a flag existed ran with its default.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Sequence

from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax.train import checkpoint as checkpoint_lib

# Flags that never belong to a reproducing command (where the run lives, how it prints).
PER_MACHINE = ("workdir", "data_dir", "progress", "traceback", "flagfile")
# Flags that may differ between the runs of one seed group.
GROUP_FREE = PER_MACHINE + ("seed",)

TRAIN = "python -m experiments.train"
EVALUATE = "python -m experiments.evaluate"


# ----------------------------------------------------------------------------------------------
# Reading runs.


def saved_flags(workdir: str) -> dict | None:
  """The flags saved with the newest checkpoint of `workdir`, or None without a checkpoint."""
  if not checkpoint_lib.has_checkpoint_dir(workdir):
    return None
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    if checkpointer.latest_step() is None:
      return None
    return methods_lib.normalise_flag_values(
        checkpointer.metadata().get("run", {}).get("flags", {}))


def _config(values: Mapping[str, Any]) -> type | None:
  """The option class of the run's method (None for a method this build no longer has)."""
  try:
    return methods_lib.config_of(str(values.get("method")))
  except ValueError:
    return None


def input_dir_flags() -> tuple[str, ...]:
  """The flags that name earlier run folders (`MethodConfig.INPUT_DIRS` of every method)."""
  return tuple(config.flag_name(field) for config in methods_lib.configs()
               for field in config.INPUT_DIRS)


def staged_parent_flags(folder: str, summary: Mapping[str, Any],
                        defaults: Mapping[str, Any]) -> dict | None:
  """The flags of a staged run's parent folder, whose `summary.json` has "stages" ({stage:
  {"workdir", ...}}, in training order) and which has no checkpoint of its own.

  They are the command's own flags where the summary records them ("flags"); else (parents
  written before it did) they are the flags of its newest stage that has a checkpoint, with what the command that
  trains every stage has: the parent's stage selection (`MethodConfig.STAGE_FIELD`, as its
  summary records it), the default `--steps`, and of the input folders
  (`MethodConfig.INPUT_DIRS`) only those the summary names outside the run's own stages.
  """
  if isinstance(summary.get("flags"), Mapping):  # recorded by the stage runner's command
    return dict(summary["flags"])
  stages = summary["stages"]  # older parents: rebuilt from a stage's flags
  values = None
  for name in reversed(list(stages)):
    # In its own subfolder (wherever the run is now), else where training recorded it.
    recorded = str(stages[name].get("workdir") or "")
    values = saved_flags(os.fspath(files_lib.run_path(folder) / name)) or (
        saved_flags(recorded) if recorded else None)
    if values is not None:
      break
  if values is None:
    return None
  values = {**values, "steps": defaults.get("steps")}
  config = _config(values)
  if config is None:
    return values
  if config.STAGE_FIELD:
    flag = config.flag_name(config.STAGE_FIELD)
    values[flag] = summary.get(flag, defaults.get(flag))
  own = {os.fspath(files_lib.run_path(folder) / name) for name in stages}
  own |= {files_lib.run_dir(s["workdir"]) for s in stages.values() if s.get("workdir")}
  for field in config.INPUT_DIRS:
    flag, given = config.flag_name(field), summary.get(field) or ""
    values[flag] = (given if given and files_lib.run_dir(given) not in own
                    else defaults.get(flag, ""))
  return values


def _matching(pattern: str) -> list[str]:
  """The folders a --workdirs pattern names: a local glob, or on another filesystem
  (gs://bucket/runs/*) a glob of its last part."""
  if files_lib.is_local(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern)))
  parent, _, last = pattern.rstrip("/").rpartition("/")
  if not any(c in last for c in "*?[") or any(c in parent for c in "*?["):
    return []
  return sorted(os.fspath(p) for p in files_lib.run_path(parent).glob(last))


def load_runs(patterns: Sequence[str], defaults: Mapping[str, Any] | None = None
              ) -> tuple[list[dict], list[str]]:
  """(runs, notes): one dict per finished run (see the module docstring) in the folders that
  `patterns` (globs or paths, local or gs://...) name, and a note per skipped folder."""
  defaults = defaults or {}
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
    if values is None and isinstance(summary.get("stages"), Mapping) and summary["stages"]:
      values = staged_parent_flags(folder, summary, defaults)
    if values is None:
      notes.append(f"{folder}: no checkpoint")
      continue
    evaluation = None
    eval_path = files_lib.run_path(folder) / "eval" / "results.json"
    if files_lib.is_file(eval_path):
      evaluation = json.loads(files_lib.read_bytes(eval_path).decode("utf-8"))
    found.append({"name": os.path.basename(os.path.normpath(folder)), "workdir": folder,
                  "values": values, "seed": values.get("seed", defaults.get("seed")),
                  "summary": summary, "eval": evaluation})
  return found, notes


# ----------------------------------------------------------------------------------------------
# Flag files and commands.


def flag_value(text: str, like: Any) -> Any:
  """A flag file's text as a value of the type of `like` (the value it is compared with: the
  run's, or the flag's default): bool, int, float, a comma-separated list of texts, or text."""
  if isinstance(like, bool):
    lowered = text.lower()
    if lowered not in ("true", "t", "1", "false", "f", "0"):
      raise ValueError(f"{text!r} is not a boolean")
    return lowered in ("true", "t", "1")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, (list, tuple)):
    return [part.strip() for part in text.split(",")] if text.strip() else []
  return text


def parse_flag_file(path: str, defaults: Mapping[str, Any]) -> dict[str, str]:
  """{flag name: text value} of a flag file with its includes (`--name=value` lines; `--noname`
  of a flag in `defaults` is false; a former option name counts under its flag)."""
  values = {}
  for line in files_lib.flag_file_args(path):
    if not line.startswith("--"):
      continue
    name, sep, text = line[2:].partition("=")
    if not sep:
      name, text = (name[2:], "false") if name.startswith("no") and name[2:] in defaults else (
          name, "true")
    values[name] = text
  return methods_lib.normalise_flag_values(values)


def same(a: Any, b: Any) -> bool:
  """Whether two flag values are equal (floats to 1e-12, lists element by element)."""
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    try:
      return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
    except (TypeError, ValueError):
      return False
  return a == b


def matching_flag_file(values: Mapping[str, Any], flags_dir: str,
                       defaults: Mapping[str, Any]) -> str | None:
  """The flag file every setting of which the run has (the most settings wins), or None."""
  best, best_count = None, -1
  for path in sorted(glob.glob(os.path.join(flags_dir, "*.flags"))):
    settings = parse_flag_file(path, defaults)
    matches = True
    for name, text in settings.items():
      if name in PER_MACHINE:
        continue
      if name not in defaults:  # a flag this build no longer has
        matches = False
        break
      # A flag the run predates counts with its default (what the run did without it).
      value = values.get(name, defaults[name])
      try:
        parsed = flag_value(text, value if value is not None else defaults[name])
      except ValueError:
        matches = False
        break
      if not same(parsed, value):
        matches = False
        break
    if matches and len(settings) > best_count:
      best, best_count = path, len(settings)
  return best


def short_path(path: str) -> str:
  """A run folder as a command shows it: relative to the working directory where that is
  shorter than two levels up, else absolute; gs://... as given."""
  if not files_lib.is_local(path):
    return path
  rel = os.path.relpath(os.path.abspath(path))
  return rel if not rel.startswith("../..") else os.path.abspath(path)


def train_command(workdir: str, values: Mapping[str, Any], flags_dir: str,
                  defaults: Mapping[str, Any], always: Sequence[str] = ()) -> str:
  """The command that trains this run again (flag file + flags that differ from it).

  Flags named in `always` are spelled out even at their default (a seed group's `--seed`);
  flags not in `defaults` (no longer defined) are left out.
  """
  flag_file = matching_flag_file(values, flags_dir, defaults)
  settings = parse_flag_file(flag_file, defaults) if flag_file else {}
  parts = [TRAIN]
  if flag_file:
    parts.append(f"--flagfile={os.path.relpath(flag_file)}")
  for name in sorted(values):
    if name in PER_MACHINE or name in settings or name not in defaults:
      continue
    if name in always or not same(values[name], defaults[name]):
      value = values[name]
      text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
      text = str(text).lower() if isinstance(value, bool) else text
      parts.append(f"--{name}={text}")
  if values.get("data_dir"):
    parts.append(f"--data_dir={short_path(values['data_dir'])}")
  parts.append(f"--workdir={short_path(workdir)}")
  return " ".join(parts)


def reference_dir(run: Mapping[str, Any]) -> str | None:
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


def eval_command(run: Mapping[str, Any]) -> str | None:
  """The command that evaluates this run again (None if it was not evaluated)."""
  if run["eval"] is None:
    return None
  parts = [EVALUATE, f"--workdir={short_path(run['workdir'])}"]
  reference = reference_dir(run)
  if reference:
    parts.append(f"--reference_workdir={short_path(reference)}")
  return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# Seed groups.


def run_seed(run: Mapping[str, Any]) -> Any:
  return run["seed"] if "seed" in run else run["values"].get("seed")


def same_config(a: Mapping[str, Any], b: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None) -> bool:
  """Whether two runs' saved flags are equal but for their seed and where they live.

  Input folders (`input_dir_flags`) are each seed's own, so they may differ, but a run that
  trains its own input (empty) does not group with one that reuses another run's.
  """
  defaults = defaults or {}
  input_dirs = input_dir_flags()
  for name in (set(a) | set(b)) - set(GROUP_FREE):
    x, y = a.get(name, defaults.get(name)), b.get(name, defaults.get(name))
    if name in input_dirs:
      if bool(x) != bool(y):
        return False
    elif not same(x, y):
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


def _seed_key(seed: Any) -> tuple:
  return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def run_kind(run: Mapping[str, Any]) -> str:
  """"preference", "budget" or "fixed": from the evaluation report (a preference sweep, a
  budget sweep, or neither), else from the controls training recorded."""
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


def group_runs(found: Sequence[dict], defaults: Mapping[str, Any] | None = None) -> list[dict]:
  """Runs with the same flags but their seed, as groups in the order of their first run.

  Each group: "runs" (by seed), "seeds", "name" (the runs' names in one, `x_s{0,1,2}`),
  "values" (the first run's flags), "kind" (`run_kind`).
  """
  groups: list[list[dict]] = []
  for run in found:
    for members in groups:
      if same_config(members[0]["values"], run["values"], defaults):
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


def group_commands(group: Mapping[str, Any], flags_dir: str,
                   defaults: Mapping[str, Any]) -> list[str]:
  """The commands that train and evaluate a group again: a loop over its seeds if they fit."""
  members = group["runs"]
  if len(members) == 1:
    run = members[0]
    lines = [train_command(run["workdir"], run["values"], flags_dir, defaults)]
    command = eval_command(run)
    return lines + ([command] if command else [])
  lines = [f"# {group['name']}: seeds {', '.join(map(str, group['seeds']))}"]
  trains = [train_command(r["workdir"], r["values"], flags_dir, defaults, always=("seed",))
            for r in members]
  lines += [seed_loop(trains, group["seeds"]) or "\n".join(trains)]
  evaluated = [r for r in members if r["eval"]]
  evals = [eval_command(r) for r in evaluated]
  if evals:
    lines += [seed_loop(evals, [run_seed(r) for r in evaluated]) or "\n".join(evals)]
  return lines
