"""One controllability sweep for every method: control settings -> deploy -> one loop -> points.

    sweeper = Sweeper(method, variables, test_batches, image_shape=(28, 28, 1), prepared=...)
    for fixed in groups(method.control_space(), budgets=(0.5, 1.0), resources=(0.0, 1.0)):
      points = sweeper.sweep(variables, fixed, preferences)

Each setting is deployed with `standalone=False` (the form a method evaluates many deployments
in, e.g. ECMT's masked SubNets) and measured by `metrics.accumulate.evaluate`; deployments with
the same `Deployed.key` are measured once. `standalone_check` compares one deployment's
standalone (exportable) network with the form the sweep measured.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dymu_jax.methods import base
from dymu_jax.metrics import accumulate

PyTree = Any


def groups(space: base.ControlSpace, budgets: Sequence[float] = (1.0,),
           resources: Sequence[float] = (0.0,)) -> list[dict[str, float]]:
  """The controls held fixed in each preference sweep: one group per budget (a method with a
  budget), per resource c (a method with a resource), else one group without either."""
  if "budget" in space.names:
    return [{"budget": float(b)} for b in budgets]
  if "resource" in space.names:
    return [{"resource": float(c)} for c in resources]
  return [{}]


def deployed_metrics(deployed: base.Deployed, tasks: Sequence[Any],
                     batches: Sequence[Mapping[str, Any]], **kwargs):
  """{task: {metric: value, "loss": mean test loss}} of a deployed network (the one loop)."""
  return accumulate.evaluate(deployed.network, deployed.variables, tasks, batches, **kwargs)


class Sweeper:
  """Deploys and measures control settings of one trained run, each distinct network once.

  Args:
    method: the trained method (`methods.base.Method`).
    variables: its trained variables (a variant's variables may be passed to `sweep`).
    batches: labelled test batches (kept in memory: every setting runs over them).
    image_shape: (H, W, C) or (D,) of the inputs.
    prepared: `method.prepare(...)`'s result (None when the method prepares nothing).
  """

  def __init__(self, method, variables: PyTree, batches: Sequence[Mapping[str, Any]], *,
               image_shape: Sequence[int], prepared: Any = None):
    self.method, self.variables, self.prepared = method, variables, prepared
    self.tasks = tuple(method.tasks)
    self.batches = [accumulate.keep_keys(b, self.tasks) for b in batches]
    self.image_shape = tuple(int(d) for d in image_shape)
    self._metrics: dict[Any, dict] = {}
    self.structure: tuple[str, ...] = ()  # the structure fields the points carry

  def deploy(self, controls: Mapping[str, Any], variables: PyTree | None = None, *,
             standalone: bool = False) -> base.Deployed:
    return self.method.deploy(self.variables if variables is None else variables, controls,
                              self.prepared, image_shape=self.image_shape, standalone=standalone)

  def point(self, controls: Mapping[str, Any], variables: PyTree | None = None,
            label: str = "") -> dict:
    """One setting's record: its preference, structure, cost and metrics."""
    deployed = self.deploy(controls, variables)
    key = (label, deployed.key)
    if key not in self._metrics:
      self._metrics[key] = deployed_metrics(deployed, self.tasks, self.batches)
    cost = deployed.cost()
    self.structure = tuple(deployed.structure)
    preference = controls.get("preference", deployed.controls.get("preference", ()))
    point = {"preference": [float(x) for x in np.asarray(preference).ravel()],
             **{k: v for k, v in deployed.structure.items()},
             "macs": int(cost.macs), "params": int(cost.params)}
    for name in ("macs_fraction", "params_fraction"):
      if name in deployed.info:
        point[name] = float(deployed.info[name])
    point["metrics"] = self._metrics[key]
    return point

  def sweep(self, fixed: Mapping[str, float], preferences: np.ndarray,
            variables: PyTree | None = None, label: str = "") -> list[dict]:
    """The points of `preferences` (rows) with the controls `fixed` (a budget or a resource),
    in order; `label` separates variants whose deployments share keys."""
    return [self.point({"preference": np.asarray(r), **fixed}, variables, label)
            for r in preferences]

  @property
  def distinct_networks(self) -> int:
    """Networks measured so far (settings with equal keys count once)."""
    return len(self._metrics)


def standalone_check(sweeper: Sweeper, controls: Mapping[str, Any],
                     measured: Mapping[str, Mapping[str, float]]) -> dict:
  """The largest metric difference between a setting's standalone (exportable) network and
  the network the sweep measured (`measured`); 0 for methods with one form."""
  deployed = sweeper.deploy(controls, standalone=True)
  standalone = deployed_metrics(deployed, sweeper.tasks, sweeper.batches)
  diff = max(abs(standalone[n][m] - measured[n][m]) for n in standalone for m in standalone[n]
             if np.isfinite(standalone[n][m]) or np.isfinite(measured[n][m]))
  return {"controls": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in deployed.controls.items()},
          **dict(deployed.structure), "max_metric_difference": float(diff)}


class Progress:
  """Prints one line per finished sweep with its elapsed time."""

  def __init__(self, printer: Callable[[str], None] = lambda text: print(text, flush=True)):
    self.started, self.printer = time.time(), printer

  def __call__(self, text: str) -> None:
    self.printer(f"{text} ({time.time() - self.started:.0f} s)")


def cost_sweep(method, variables: PyTree, groups_: Sequence[Mapping[str, float]], *,
               num: int, seed: int, image_shape: Sequence[int], full_cost,
               prepared: Any = None) -> dict:
  """The cost of the deployed networks over `num` preferences uniform on the simplex
  (Dirichlet(1), `seed`), per group of fixed controls, as fractions of `full_cost` (the full
  network's `models.cost.Cost`), from `Method.describe` (nothing is run).

  Returns {"preferences", "seed", "full_macs", "full_params", "rows": [{<the group's controls>,
  "mean_macs_fraction", "mean_params_fraction", "min_macs_fraction", "max_macs_fraction",
  "distinct_structures", "common_structures" (the 5 most frequent: structure fields, "count",
  fractions), "dominant_preference" (max r of each preference), "macs_fractions"}]}.
  """
  prefs = np.random.default_rng(seed).dirichlet(np.ones(len(method.tasks)), size=num)
  image_shape = tuple(int(d) for d in image_shape)
  rows = []
  for fixed in groups_:
    described = [method.describe(variables, {"preference": r, **fixed}, prepared,
                                 image_shape=image_shape) for r in prefs]
    macs = np.array([c.macs for _, c in described], np.float64) / full_cost.macs
    params = np.array([c.params for _, c in described], np.float64) / full_cost.params
    counts: dict[str, list] = {}
    for (structure, cost), m, p in zip(described, macs, params):
      entry = counts.setdefault(repr(structure), [structure, 0, float(m), float(p)])
      entry[1] += 1
    common = sorted(counts.values(), key=lambda e: -e[1])
    rows.append({
        **fixed, "mean_macs_fraction": float(macs.mean()),
        "mean_params_fraction": float(params.mean()),
        "min_macs_fraction": float(macs.min()), "max_macs_fraction": float(macs.max()),
        "distinct_structures": len(common),
        "common_structures": [{**structure, "count": n, "macs_fraction": m,
                               "params_fraction": p} for structure, n, m, p in common[:5]],
        "dominant_preference": [round(float(x), 4) for x in prefs.max(axis=1)],
        "macs_fractions": [round(float(x), 4) for x in macs],
    })
  return {"preferences": num, "seed": seed, "full_macs": int(full_cost.macs),
          "full_params": int(full_cost.params), "rows": rows}
