"""One report and one set of plots for every evaluation (`experiments.evaluate` writes them).

`markdown(results, plots)` renders the results dict of a controllability sweep (a method with
controls: one table of its sweeps, then the sections its controls add: the budget check for a
budget, matched cost, the cost per c and the task affinity for a resource, the deployed
network's cost otherwise) or of a fixed network (per-task metrics, Delta_m, cost and the
method's learned structure); `plot(results, output_dir)` draws the plots the results support.

(Over 500 lines: the one renderer of every evaluation, its Markdown and its plots; the sections
each control space adds live here so that no entry point renders results of its own.)
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.train import loop as loop_lib

# DYMU: the target of each task's mean metric over a sweep relative to the anchor's (issue 22).
ANCHOR_RATIO_TARGET = 0.95


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
  sweeps = [s for s in _sweeps(results) if "cost_band" in s]
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
             fmt(sweep["hypervolume"]), fmt(sweep["cost_band"]["hypervolume"]),
             f"{sweep['cost_band']['num_points']} / {len(sweep['points'])}"]
    cells += [f"{fmt(versus[n]['sweep_mean'])} / {fmt(versus[n]['anchor'])} "
              f"({fmt(versus[n]['ratio'], 3)})" for n in names]
    low = sweep.get("min_ratio_to_anchor")
    cells.append("n/a" if low is None else ("yes" if low >= target else "NO") + f" ({low:.3f})")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _sweeps(results: dict) -> list[dict]:
  """The sweeps of a steered method's results (a budget-steered run keeps them as "budgets")."""
  return results.get("sweeps") or results.get("budgets") or []


def _sweep_label(sweep: dict) -> str:
  """A sweep's name: its variant, then its c or budget ("edge, c=1", "phn", "0.5")."""
  parts = [sweep["variant"]] if sweep.get("variant") is not None else []
  if sweep.get("resource") is not None:
    parts.append(f"c={sweep['resource']:g}")
  if sweep.get("budget") is not None:
    parts.append(f"budget {sweep['budget']:g}" if parts else f"{sweep['budget']:g}")
  return ", ".join(parts)


def _distinct(sweep: dict):
  for key in ("distinct_trees", "distinct_subnets", "distinct_structures"):
    if key in sweep:
      return sweep[key]
  return None


def _options_text(results: dict) -> str:
  options = results.get("deploy_options") or {}
  shown = [f"{name.replace('_', ' ')} {'on' if value else 'off'}" if isinstance(value, bool)
           else f"{name.replace('_', ' ')} {value:g}" for name, value in options.items()]
  return f"; deployment options: {', '.join(shown)} (their flags)" if shown else ""


def sweep_markdown(results: dict, plots: list[str]) -> str:
  """The report of a steered method's evaluation: one table of its sweeps, then the sections
  its controls add."""
  names, metric = results["tasks"], results["primary_metric"]
  sweeps = _sweeps(results)
  budgeted = "budgets" in results
  lines = [f"# Evaluation of {results['workdir']}", "",
           f"Method `{results['method']}`" + (f" (stage {results['stage']})"
                                               if results.get("stage") else "") +
           f", checkpoint step {results['step']}, tasks {_task_names(names)}. "
           f"{_grid_text(results)} per sweep; {_hv_text(results)}{_options_text(results)}."]
  if len(results.get("variants") or ()) > 1:
    lines[-1] += (" Variants: `weight` = with the weight hypernetwork's batch-norm shifts, "
                  "`edge` = without them (the argmax trees on the frozen anchor).")
  if results.get("reference_metrics") is not None:
    lines[-1] += f" Delta_m against {results['reference']}."
  if budgeted:
    lines += ["", f"SuperNet: {results['full_macs']:,} MACs per example; smallest SubNet: "
              f"{results['smallest_macs']:,} "
              f"({results['smallest_macs'] / results['full_macs']:.3f})."]
  lines.append("")
  has = lambda key: bool(sweeps) and all(s.get(key) is not None for s in sweeps)
  header = ["budget" if budgeted else "sweep"]
  if budgeted:
    header += ["max MACs (fraction)", "within budget"]
  header += [f"{n} {metric[n]} (mean)" for n in names]
  header += ["HV (losses)", "uniformity", "rank contr."] + [f"rank {n}" for n in names]
  header += ["Delta_m %"] if has("delta_m") else []
  header += ["mean norm. metric"] if has("mean_normalised_metric") else []
  header += ["distinct trees" if "distinct_trees" in (sweeps or [{}])[0] else "distinct networks"]
  header += ["MACs fraction (mean)"] if has("mean_macs_fraction") else []
  header += ["params fraction (mean)"] if has("mean_params_fraction") else []
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for sweep in sweeps:
    cells = [_sweep_label(sweep)]
    if budgeted:
      cells += [f"{sweep['max_macs']:,} ({sweep['max_macs'] / results['full_macs']:.3f})",
                "yes" if sweep["within_budget"] else "NO"]
    cells += [fmt(sweep["mean_metric"][n]) for n in names]
    cells += [fmt(sweep["hypervolume"]), fmt(sweep["uniformity"]),
              fmt(sweep["rank_controllability"], 3)]
    cells += [fmt(sweep["rank_per_task"][n], 3) for n in names]
    cells += [f"{sweep['delta_m']:.2f}"] if has("delta_m") else []
    cells += [fmt(sweep["mean_normalised_metric"])] if has("mean_normalised_metric") else []
    cells += [str(_distinct(sweep))]
    cells += [f"{sweep['mean_macs_fraction']:.3f}"] if has("mean_macs_fraction") else []
    cells += [f"{sweep['mean_params_fraction']:.3f}"] if has("mean_params_fraction") else []
    lines.append("| " + " | ".join(cells) + " |")
  ranks = results["mean_rank_controllability"]
  ranks = (", ".join(f"{v}: {fmt(r, 3)}" for v, r in ranks.items()) if isinstance(ranks, dict)
           else fmt(ranks, 3))
  over = ("tasks and budgets" if budgeted else
          "tasks and resource levels" if results.get("resources") else "tasks")
  lines += ["", f"Mean rank controllability over {over}: {ranks}."]
  lines += _outside_reference_markdown(
      [(_sweep_label(s), s.get("points_inside_hv_reference"), len(s["points"])) for s in sweeps])
  if budgeted:
    lines += _budget_markdown(results)
  lines += _matched_cost_markdown(results)
  lines += _cost_sweep_markdown(results)
  if "inference_macs" in (results.get("cost") or {}):
    cost = results["cost"]
    lines += ["", f"Deployed network: {cost['inference_macs']:,} MACs per example and "
              f"{cost['params']:,} parameters whatever the preference; the run trains "
              f"{cost['trained_params']:,} parameters."]
  if plots:
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def _budget_markdown(results: dict) -> list[str]:
  """A budget-steered run: skipped budgets, the budget check and the sliced-network check."""
  lines = []
  if results.get("skipped_budgets"):
    lines.append(f"Skipped budgets below the smallest SubNet: {results['skipped_budgets']}.")
  check = results["budget_check"]
  lines += ["", f"Budget check: {check['searches']} searches over {check['budgets']} budgets "
            f"from the smallest SubNet to the SuperNet, {check['over_budget']} over budget.", ""]
  lines += ["Masked evaluation vs the physically sliced SubNet (largest metric difference):", ""]
  for item in results["sliced_check"]:
    lines.append(f"- budget {item['budget']:g}, encoder {item['encoder']}, decoders "
                 f"{item['decoders']}: {item['max_metric_difference']:.2e}")
  return lines


def _cost_sweep_markdown(results: dict) -> list[str]:
  """A resource-steered run: the cost per c over many preferences, task weights, affinity."""
  cost = results.get("cost") or {}
  if "by_resource" not in cost:
    return []
  names = results["tasks"]
  anchor, metric = results["anchor_metrics"], results["primary_metric"]
  lines = ["", "Anchor (single-task streams, the full separate tree): " + "; ".join(
      f"{n} {metric[n]}={fmt(anchor[n][metric[n]])}, loss={fmt(anchor[n]['loss'])}"
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
    # A record written from the method alone (`affinity.write_artefact`) lacks K and the
    # normalisation: the line says only what is known.
    about = [f"K = {record['num_images']} training images"
             if record.get("num_images") is not None else "",
             f"{record['normalisation']} normalisation" if record.get("normalisation") else ""]
    lines += ["", "## Task affinity", "",
              "RSA on the frozen anchor" + "".join(f", {a}" for a in about if a) + ".", "",
              "| A | " + " | ".join(record["tasks"]) + " |",
              "|---|" + "---|" * len(record["tasks"])]
    for name, row in zip(record["tasks"], record["affinity"]):
      lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    if record.get("heatmap"):
      lines += ["", f"![task affinity]({record['heatmap']})"]
  return lines


def _save(fig, output_dir: str, name: str, files: list[str]) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  files.append(name)
  files_lib.save_figure(fig, files_lib.run_path(output_dir) / name, dpi=110)
  plt.close(fig)


def plot(results: dict, output_dir: str) -> list[str]:
  """PNG plots of a steered method's evaluation (none for a fixed network); returns their file
  names: the cost over many preferences per c, the 2-task trade-off fronts, metric against
  preference per task, and cost against budget."""
  sweeps = _sweeps(results)
  if not sweeps:
    return []
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names, metric = results["tasks"], results["primary_metric"]
  files = []
  cost = results.get("cost") or {}
  if "by_resource" in cost:
    fig, ax = plt.subplots(figsize=(4.8, 4))
    for row in cost["by_resource"]:
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
    ax.set_title(f"cost over {cost['preferences']} preferences (line: bin mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, output_dir, "cost_vs_preference.png", files)
  label = lambda s: (f"budget {_sweep_label(s)}" if s.get("variant") is None
                     and s.get("budget") is not None else _sweep_label(s))
  if len(names) == 2:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    for sweep in sweeps:
      loss = np.asarray(sweep["losses"])
      order = np.argsort(loss[:, 0])
      ax.plot(loss[order, 0], loss[order, 1], "o-", ms=3, label=label(sweep))
    ax.set_xlabel(f"{names[0]} test loss")
    ax.set_ylabel(f"{names[1]} test loss")
    ax.set_title("trade-off fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, output_dir, "tradeoff_front.png", files)
  fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
  for i, name in enumerate(names):
    ax = axes[0, i]
    for sweep in sweeps:
      r = np.array([p["preference"][i] for p in sweep["points"]])
      v = np.array([p["metrics"][name][metric[name]] for p in sweep["points"]])
      order = np.argsort(r)
      ax.plot(r[order], v[order], "o-", ms=3, label=label(sweep))
    ax.set_xlabel(f"preference for {name}")
    ax.set_ylabel(metric[name])
    ax.set_title(name)
    ax.grid(alpha=0.3)
  axes[0, -1].legend(fontsize=7)
  _save(fig, output_dir, "controllability.png", files)
  grid = np.asarray((results.get("budget_check") or {}).get("macs_by_budget", []), np.float64)
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
    _save(fig, output_dir, "cost_vs_budget.png", files)
  return files


# ----------------------------------------------------------------------------------------------
# Report.


def fmt(value, digits=4) -> str:
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
                 ", ".join(f"{k}={fmt(v)}" for k, v in values.items()))
        lines.append(f"| {label} | {task} | {fmt(count)} | {shown} |")
    return lines + ["", f"Every task's metrics and labelled test examples: `{PER_TASK_FILE}`."]
  for label in results["eval"]:
    summary = summaries[label]
    lines += [f"{summary['tasks']} tasks at controls `{label}`; every task's metrics and "
              f"labelled test examples in `{PER_TASK_FILE}`.", "",
              "| primary metric | tasks | mean | median | worst (task) |", "|---|---|---|---|---|"]
    for group in summary["primary_metrics"]:
      better = "higher" if group["higher_is_better"] else "lower"
      lines.append(f"| {group['metric']} ({better} is better) | {group['tasks']} | "
                   f"{fmt(group['mean'])} | {fmt(group['median'])} | "
                   f"{fmt(group['worst'])} ({group['worst_task']}) |")
    counts = summary.get("labelled")
    notes = []
    if counts:
      notes.append(f"Labelled test examples per task: {counts['total']:,} in all, min "
                   f"{counts['min']:,}, median {fmt(counts['median'])}, max {counts['max']:,}.")
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
  """The report of an evaluation: a steered method's sweeps, or a fixed network's metrics."""
  if _sweeps(results) or "budgets" in results or "sweeps" in results:
    return sweep_markdown(results, plots)
  lines = [f"# Evaluation of {results['workdir']}", "",
           f"Method `{results['method']}`, checkpoint step {results['step']}, tasks "
           f"{_task_names(results['tasks'])}.", ""]
  lines += _fixed_metrics_markdown(results)
  if "delta_m" in results:
    lines += ["", f"Delta_m against {results['reference']}: {results['delta_m']:.2f}%"]
    if results.get("delta_m_left_out"):
      lines.append(f"(left out: {', '.join(map(str, results['delta_m_left_out']))}, whose "
                   f"single-task metric is 0 or whose metrics are not finite)")
  lines += _cost_markdown(results.get("cost"))
  lines += _routing_markdown(results.get("routing"))
  return "\n".join(lines) + "\n"
