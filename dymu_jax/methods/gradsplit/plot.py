"""Heat maps of GradSplit's routing record (`GradSplitMethod.artefacts`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dymu_jax import files as files_lib




def plot_routing(record: Mapping[str, Any], path: str) -> None:
  """Heat maps as a PNG: a row for the pooled statistics and one per split module, each with
  the routing matrix and (learned routing) the mean cosines and conflict frequencies.

  The cosines share one colour scale over every row, symmetric around 0 and as wide as the
  largest off-diagonal mean; diagonal entries (a task with itself) are grey.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = record["tasks"]
  num_tasks = len(names)
  pooled = record["pooled"]
  learned = pooled.get("mean_cosine") is not None
  rows = [("pooled" + ("" if record.get("criterion") in (None, "pooled") else " (reference)"),
           pooled)]
  if learned:  # with a fixed routing every module has the pooled row's M
    rows += [(m["name"], m) for m in record.get("modules", [])]
  off = ~np.eye(num_tasks, dtype=bool)
  columns = [("matrix", "M[t, s] (group t takes task s)", "Greens", (-0.6, 1.4))]
  if learned:
    extent = max(float(np.abs(np.asarray(e["mean_cosine"], float)[off]).max(initial=0.0))
                 for _, e in rows) or 1.0
    columns += [("mean_cosine", f"mean cos(g_t, g_s) on group t (±{extent:.2g})", "RdBu",
                 (-extent, extent)),
                ("conflict_frequency", "share of warm-up steps with cos < 0", "Reds", (0, 1))]
  size = 1.3 + 0.5 * num_tasks
  fig, axes = plt.subplots(len(rows), len(columns),
                           figsize=(size * len(columns) + 0.8, size * len(rows) + 0.3),
                           squeeze=False)
  for r, (label, entry) in enumerate(rows):
    for c, (key, title, cmap, (lo, hi)) in enumerate(columns):
      ax = axes[r][c]
      values = np.asarray(entry[key], float)
      shown = values if key == "matrix" else np.where(off, values, np.nan)
      colormap = plt.get_cmap(cmap).with_extremes(bad="0.85")
      ax.imshow(shown, cmap=colormap, vmin=lo, vmax=hi)
      for (t, s), v in np.ndenumerate(values):
        if key == "matrix" or t != s:
          dark = abs(v - (lo + hi) / 2) > 0.35 * (hi - lo) and (key != "conflict_frequency"
                                                                or v > 0.6)
          ax.text(s, t, f"{v:.0f}" if key == "matrix" else f"{v:.2g}", ha="center",
                  va="center", fontsize=7, color="white" if dark else "black")
      ax.set_xticks(range(num_tasks), names, rotation=45, ha="right", fontsize=7)
      ax.set_yticks(range(num_tasks), names, fontsize=7)
      if r == len(rows) - 1:
        ax.set_xlabel("task s (gradient)", fontsize=7)
      if c == 0:
        ax.set_ylabel(f"{label}\ngroup t", fontsize=7)
      ax.set_title(title, fontsize=7)
  fig.tight_layout()
  files_lib.save_figure(fig, path, dpi=100)
  plt.close(fig)

