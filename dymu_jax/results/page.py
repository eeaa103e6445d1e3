"""The results page: `render` writes the Markdown of runs read by `collect.load_runs`."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Mapping, Sequence

import numpy as np

from dymu_jax.results import collect
from dymu_jax.results import plots as plots_lib
from dymu_jax.results import tables

_RULE = ("Runs whose saved training flags are equal except `--seed` (and where they live) form "
         "one row: mean ± sample standard deviation (ddof = 1) over its runs, with their number "
         "n; a value without ± is the same in every run, and a lone run shows its own value "
         "(seeds column: n=1).")

_PREFERENCE_CAPTION = (
    "HV (cost band): DYMU's HV of only the sweep's trees within its evaluation's `--cost_band` "
    "(MACs fraction of the anchor, default at most 0.6), at the same point. min mean/anchor: "
    "the lowest, over tasks, of a task's mean primary metric over the sweep divided by the "
    "anchor's (the target is >= 0.95). Delta_m: mean over the sweep's preferences against each "
    "run's evaluation reference (its evaluation's `--reference_workdir`, named in the commands; "
    "without one, DYMU's anchor streams). DYMU costs: mean over the "
    "evaluation's cost preferences; fractions are of the DYMU anchor's MACs and parameters. "
    "Training time of the edge variant: the stages up to edge (not weight).")

_COST_HV_CAPTION = (
    "against MACs per example (absolute: the methods' fractions are of different networks). "
    "PHN, PHN-BN: the generated network; ECMT: the mean MACs of the budget's SubNets (one point "
    "per budget); DYMU: the mean MACs of the sweep's trees per variant and resource c (one "
    "point per c), and hollow markers for the evaluation's cost bands (the HV of the sweep's "
    "points within the band's MACs fractions, at the band's upper bound). Error bars: sample "
    "std over a group's seeds (n on the point).")


def _plot_owner(group: Mapping[str, Any]) -> tuple[dict | None, str]:
  """The run whose evaluation plots the page shows for a group, and its label."""
  evaluated = [r for r in group["runs"] if r["eval"]]
  if not evaluated:
    return None, ""
  run = evaluated[0]
  if len(group["runs"]) == 1:
    return run, f"`{run['name']}`:"
  return run, f"`{run['name']}` (seed {collect.run_seed(run)} of `{group['name']}`):"


def _relative(path: str, output: str) -> str:
  return os.path.relpath(path, os.path.dirname(output))


def _figure(output: str, name: str) -> str:
  """Where the page's own figure `name` goes: `<output stem>/<name>`."""
  return os.path.join(os.path.splitext(output)[0], name)


def _fixed_section(fixed: Sequence[dict], reference_method: str | None) -> list[str]:
  single = [g for g in fixed if reference_method is not None
            and g["values"].get("method") == reference_method]
  reference = single[0] if len(single) == 1 else None
  lines = ["### Fixed networks", ""] + tables.fixed_table(fixed, reference) + [""]
  if reference is not None and len(reference["runs"]) == 1:
    lines += [f"Delta_m against `{reference['name']}` (primary test metric of each task).", ""]
  elif reference is not None:
    lines += [f"Delta_m of each run against the run of `{reference['name']}` with the same "
              f"seed (seeds {', '.join(map(str, reference['seeds']))}), or against the "
              f"mean of those runs' metrics for a seed it has no run of (primary test "
              f"metric of each task); then mean ± std over the group's runs.", ""]
  return lines


def _preference_section(dataset: str, preference: Sequence[dict], output: str, plots: bool
                        ) -> list[str]:
  lines = ["### Preference-controlled networks (DYMU, PHN, PHN-BN)", ""]
  members = tables.runs_of(preference)
  hv_reference = tables.shared_hv_reference(members)
  if hv_reference is None:
    return lines + ["Not evaluated yet.", ""]
  lines += tables.preference_table(preference, hv_reference) + [""]
  lines += [f"Hypervolume of each sweep's test losses against one reference point for the "
            f"table, {tables.hv_reference_text(members, hv_reference, 'loss above')}. "
            f"{_PREFERENCE_CAPTION}", ""]
  front = _figure(output, f"{dataset}_fronts.png")
  if plots and plots_lib.plot_fronts(members, front):
    lines += [f"![fronts]({_relative(front, output)})", ""]
  for group in preference:
    run, label = _plot_owner(group)
    if plots and run is not None:
      copied = plots_lib.copy_plots(run, output)
      if copied:
        lines += [label, ""] + plots_lib.images(copied) + [""]
  return lines


def _budget_section(group: Mapping[str, Any], output: str, plots: bool) -> list[str]:
  members = group["runs"]
  title = f"{tables.method_label(group['values'].get('method'))}: `{group['name']}`"
  lines = [f"### {title}" if len(members) == 1 else
           f"### {title} (seeds {', '.join(map(str, group['seeds']))})", ""]
  if not any(r["eval"] for r in members):
    return lines + ["Not evaluated yet; final SuperNet test metrics: "
                    + tables.final_metrics_text(members) + ".", ""]
  lines += tables.budget_table(group) + [""]
  run, label = _plot_owner(group)
  if plots and run is not None:
    copied = plots_lib.copy_plots(run, output)
    if copied:
      lines += ([label, ""] if len(members) > 1 else []) + plots_lib.images(copied) + [""]
  return lines


def cost_hv_section(dataset: str, groups: Sequence[dict], output: str, plots: bool
                    ) -> list[str]:
  """The cost-vs-hypervolume plot of a dataset's controllable groups, with its caption."""
  members = tables.runs_of(groups)
  reference = tables.shared_hv_reference(members)
  if not plots or reference is None:
    return []
  series = plots_lib.cost_hv_series(groups, reference)
  path = _figure(output, f"{dataset}_cost_vs_hv.png")
  if not plots_lib.plot_cost_vs_hv(series, reference, path):
    return []
  table = tables.shared_hv_reference(
      tables.runs_of([g for g in groups if g["kind"] == "preference"]))
  differs = table is not None and not np.allclose(table, reference)
  point = tables.hv_reference_text(members, reference,
                                   "loss of the sweeps and ECMT budgets here")
  if differs:
    point += f" (the preference table's, without ECMT's losses, is {[round(x, 4) for x in table]})"
  return ["### Cost against hypervolume", "",
          f"![cost_vs_hv]({_relative(path, output)})", "",
          f"Hypervolume of each sweep's test losses against one reference point for every "
          f"method here, {point}, {_COST_HV_CAPTION}", ""]


def render(found: Sequence[dict], notes: Sequence[str], output: str, flags_dir: str,
           plots: bool, *, defaults: Mapping[str, Any] | None = None,
           reference_method: str | None = None) -> str:
  """The Markdown page of `found` (`collect.load_runs`), to be written at `output`.

  Args:
    found: the runs.
    notes: one line per skipped folder (listed at the end).
    output: the page's path: its figures and copied plots go to `<output stem>/`.
    flags_dir: the flag files that training commands are matched against.
    plots: copy the evaluations' plots and draw the page's own figures.
    defaults: {flag: default} of the training command's flags (commands spell out the flags
      that differ from them; a run saved before a flag existed had its default).
    reference_method: the method whose group is the Delta_m reference of the fixed-network
      table (e.g. "single_task"); None for each run's evaluation's own Delta_m.
  """
  defaults = defaults or {}
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
    groups = collect.group_runs(dataset_runs, defaults)
    fixed = [g for g in groups if g["kind"] == "fixed"]
    preference = [g for g in groups if g["kind"] == "preference"]
    controllable = [g for g in groups if g["kind"] == "budget"]
    if fixed:
      lines += _fixed_section(fixed, reference_method)
    if preference:
      lines += _preference_section(dataset, preference, output, plots)
    for group in controllable:
      lines += _budget_section(group, output, plots)
    lines += cost_hv_section(dataset, preference + controllable, output, plots)
    lines += ["Commands:", "", "```bash"]
    for group in groups:
      lines += collect.group_commands(group, flags_dir, defaults)
    lines += ["```", ""]
  if notes:
    lines += ["## Skipped folders", ""] + [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)
