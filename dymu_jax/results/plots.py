"""The page's figures: the test-loss fronts of the preference sweeps, cost against hypervolume
across methods, and the evaluations' own plots copied next to the page."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.metrics import pareto
from dymu_jax.results import tables


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  files_lib.save_figure(fig, path, dpi=110)
  _pyplot().close(fig)


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
  _save(fig, path)
  return True


# ----------------------------------------------------------------------------------------------
# Cost against hypervolume, across methods.


def _cost_bands(evaluation: Mapping[str, Any], sweep: Mapping[str, Any]) -> list[dict]:
  """The cost-band entries of a sweep (`experiments.evaluate` writes one per sweep of a method
  whose network depends on the resource: "cost_band": {min_macs_fraction, max_macs_fraction,
  hypervolume, num_points}); also read from its resource's row of `cost.by_resource`, one entry
  or a list, leaving out an entry that names another variant. None in reports written before
  cost bands."""
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
    if sweep["resource"] is None:  # one network for every preference
      out.append((tables.method_label(sweep["variant"]), "", cost.get("inference_macs"), hv,
                  False))
      continue
    full = cost.get("full_macs")
    fraction = sweep.get("mean_macs_fraction")
    if fraction is None:
      fraction = next((row["mean_macs_fraction"] for row in cost.get("by_resource", [])
                       if row.get("resource") == sweep["resource"]), None)
    series = f"{tables.method_label(method)} {sweep['variant']}"
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
      out.append((tables.method_label(method), f"b={row['budget']:g}", macs,
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


def _annotate_apart(ax, labels: Sequence[tuple], fontsize: float = 7) -> None:
  """Writes each (x, y, text, color) label next to its point, moving a label down a line while
  it would cover one already written (points of one run often sit at the same cost)."""
  ax.autoscale_view()
  to_points = 72.0 / ax.figure.dpi
  line, char = 1.3 * fontsize, 0.6 * fontsize  # a label's height and a character's width
  placed = []  # (left, bottom, right) of each written label, in points
  for x, y, text, color in sorted(labels, key=lambda label: -label[1]):
    px, py = np.asarray(ax.transData.transform((x, y))) * to_points
    left, right, dy = px + 4, px + 4 + char * len(text), 4.0
    while any(left < r and l < right and abs(py + dy - b) < line for l, b, r in placed):
      dy -= line
    placed.append((left, py + dy, right))
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, dy), fontsize=fontsize,
                color=color)


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
  labels = []
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
          labels.append((x, p["y"], text, color))
  _annotate_apart(ax, labels)
  ax.set_xlabel("MACs per example (millions; mean over the sweep's preferences)")
  ax.set_ylabel("hypervolume of the test losses")
  ax.set_title(f"Cost against hypervolume (reference {[round(x, 3) for x in reference]})",
               fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)
  return True


# ----------------------------------------------------------------------------------------------
# The evaluations' own plots.


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


def images(paths: Sequence[str]) -> list[str]:
  """Markdown image lines of plots (relative paths)."""
  return [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in paths]
