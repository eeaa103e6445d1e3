"""`GradSplitMethod`, its options (`Config`) and `build`; see the package docstring.

Over 500 lines because the method is one concept: its loss routes per-task gradients, and its
training state moves from the warm-up (measuring conflicts) to the frozen routing, with the
artefacts that record it; the routing primitives live in `routing.py`, the plots in `plot.py`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import execution
from dymu_jax import files as files_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.methods import options as options_lib
from dymu_jax.methods.static import weighted_task_loss

PyTree = Any

from dymu_jax.methods.gradsplit.plot import plot_routing
from dymu_jax.methods.gradsplit.routing import (
    CRITERIA, DEFAULT_MARGINS, HEATMAP_FILE, MODES, ROUTING_FILE, ROUTINGS, STATE_COLLECTION,
    _key_name, check_margin, group_assignment, group_boundaries, module_cosines, module_names,
    parse_routing_matrix, routing_from_cosines, routing_from_frequencies, routing_interceptor,
    stage_modules, validate_routing_matrix)


@dataclasses.dataclass(frozen=True)
class GradSplitMethod(base.MethodBase):
  """GradSplit on a hard-sharing network (see the module docstring).

  Attributes:
    tasks: the tasks, in the order of the routing matrix's rows and columns.
    model: a `MultiTaskNet` (encoder variables under "encoder").
    task_weights: loss weight of each task (default 1 each).
    split_stages: how many of the last encoder stages are split (1 .. number of stages).
    group_sizes: relative sizes of the T channel groups (default equal).
    routing: "learned" (conflict estimate on the warm-up) or "fixed" (`routing_matrix`).
    routing_matrix: the fixed M as a tuple of T rows (routing "fixed" only).
    warmup_steps: steps of hard sharing that estimate the conflicts (routing "learned").
    mode: "activation" (route activation gradients) or "weight" (mask weight gradients only).
    criterion: how a learned routing reads the statistics: "module_mean" (default),
      "module_frequency" or "pooled" (see the module docstring).
    margin: the criterion's threshold (routing "learned" only): the least mean cosine that
      shares (means, in [-1, 1]) or the largest negative-cosine frequency that shares
      ("module_frequency", in [0, 1]); None = `DEFAULT_MARGINS[criterion]`.
    name: the method name in logs.
    axis_name: the pmap axis the model's batch norms pool over (see `methods.base`).
  """

  tasks: tuple[tasks_lib.Task, ...]
  model: nn.Module
  task_weights: tuple[float, ...] | None = None
  split_stages: int = 1
  group_sizes: tuple[float, ...] | None = None
  routing: str = "learned"
  routing_matrix: tuple[tuple[float, ...], ...] | None = None
  warmup_steps: int = 100
  mode: str = "activation"
  criterion: str = "module_mean"
  margin: float | None = None
  name: str = "gradsplit"
  axis_name: str | None = None

  def __post_init__(self):
    num_tasks = len(self.tasks)
    if self.task_weights is not None and len(self.task_weights) != num_tasks:
      raise ValueError(f"Got {len(self.task_weights)} task weights for {num_tasks} tasks; give "
                       f"one weight per task.")
    if self.mode not in MODES:
      raise ValueError(f"GradSplit mode {self.mode!r} is unknown; use one of "
                       f"{', '.join(MODES)}.")
    if self.routing not in ROUTINGS:
      raise ValueError(f"GradSplit routing {self.routing!r} is unknown; use one of "
                       f"{', '.join(ROUTINGS)}.")
    if self.criterion not in CRITERIA:
      raise ValueError(f"GradSplit criterion {self.criterion!r} is unknown; use one of "
                       f"{', '.join(CRITERIA)}.")
    num_stages = self.model.num_stages
    if not 1 <= self.split_stages <= num_stages:
      raise ValueError(f"GradSplit split_stages={self.split_stages} must lie in 1..{num_stages} "
                       f"(the encoder's {num_stages} stages).")
    if self.group_sizes is not None:
      if len(self.group_sizes) != num_tasks or min(self.group_sizes) <= 0:
        raise ValueError(f"GradSplit group sizes {tuple(self.group_sizes)} must be {num_tasks} "
                         f"positive numbers, one per task.")
    if self.routing == "fixed":
      if self.routing_matrix is None:
        raise ValueError("GradSplit routing 'fixed' needs a routing matrix, such as 'identity'.")
      validate_routing_matrix(self.routing_matrix, num_tasks)
      if self.margin is not None:
        raise ValueError("A GradSplit margin is only used with routing 'learned'; drop it or set "
                         "routing to 'learned'.")
    else:
      if self.routing_matrix is not None:
        raise ValueError("A GradSplit routing matrix is only used with routing 'fixed'; drop it "
                         "or set routing to 'fixed'.")
      if self.warmup_steps < 1:
        raise ValueError(f"GradSplit warm-up of {self.warmup_steps} steps leaves no step to "
                         f"estimate the conflicts with routing 'learned'; give at least 1 or use "
                         f"routing 'fixed'.")
      check_margin(self.criterion, self.margin)

  # -- structure -------------------------------------------------------------------------------

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def sizes(self) -> tuple[float, ...]:
    return tuple(float(s) for s in (self.group_sizes or (1.0,) * self.num_tasks))

  @property
  def threshold(self) -> float:
    """The criterion's threshold in use (`margin`, or the criterion's default)."""
    return float(DEFAULT_MARGINS[self.criterion] if self.margin is None else self.margin)

  @property
  def backward_passes(self) -> int:
    """Backward passes per training step (one per task; `experiments.evaluate` cost)."""
    return self.num_tasks

  def split_names(self) -> dict[str, int]:
    """{encoder submodule name: stage index} of the split stages."""
    stages = stage_modules(self.model.make_encoder())
    first = len(stages) - self.split_stages
    return {name: s for s in range(first, len(stages)) for name in stages[s]}

  def split_params(self, tree: PyTree) -> dict:
    """The part of a params-shaped tree (leaves may carry a leading task axis) that is split."""
    encoder = tree["encoder"]
    return {name: encoder[name] for name in self.split_names() if name in encoder}

  def split_modules(self, tree: PyTree) -> tuple[str, ...]:
    """The split modules (layers owning split parameters) of a params-shaped tree, in the
    order of the per-module statistics and routing matrices ("stage2_block0/conv1", ...)."""
    return module_names(self.split_params(tree))

  def _replace_split(self, tree: PyTree, split: Mapping[str, PyTree]) -> dict:
    encoder = dict(tree["encoder"])
    encoder.update(split)
    return {**tree, "encoder": encoder}

  def _weights(self) -> jax.Array:
    return jnp.asarray(self.task_weights or (1.0,) * self.num_tasks, jnp.float32)

  def module_matrices(self, matrix, num_modules: int) -> jax.Array:
    """(K, T, T) per-module routing from one M (T, T), used for every module, or from K of
    them."""
    matrix = jnp.asarray(matrix, jnp.float32)
    shape = (self.num_tasks, self.num_tasks)
    if matrix.shape == shape:
      return jnp.broadcast_to(matrix, (num_modules, *shape))
    if matrix.shape != (num_modules, *shape):
      raise ValueError(f"GradSplit routing of shape {matrix.shape} fits neither one {shape} "
                       f"matrix nor one per split module ({num_modules}).")
    return matrix

  # -- routing state ---------------------------------------------------------------------------

  def initial_statistics(self, params: PyTree) -> dict:
    """Zero conflict statistics for the split modules of `params` (a params-shaped tree).

    "cos_sum" / "neg_count" (T, T): the pooled cosines' sum and count of negative ones over the
    warm-up; "module_cos_sum" / "module_neg_count" (K, T, T): the same per split module (order
    of `split_modules`); "count": warm-up steps seen.
    """
    shape = (self.num_tasks, self.num_tasks)
    num_modules = len(self.split_modules(params))
    return {"cos_sum": jnp.zeros(shape, jnp.float32),
            "neg_count": jnp.zeros(shape, jnp.int32),
            "module_cos_sum": jnp.zeros((num_modules, *shape), jnp.float32),
            "module_neg_count": jnp.zeros((num_modules, *shape), jnp.int32),
            "count": jnp.zeros((), jnp.int32)}

  def accumulate(self, statistics: Mapping[str, jax.Array], split_grads: PyTree,
                 in_warmup: jax.Array) -> dict:
    """`statistics` plus one step's group cosines of the per-task `split_grads` (leading task
    axis), where `in_warmup` (a boolean scalar) holds."""
    pooled, modules = module_cosines(split_grads, self.sizes)
    in_warmup = jnp.asarray(in_warmup, bool)
    negative = lambda c: (in_warmup & (c < 0)).astype(jnp.int32)
    return {"cos_sum": statistics["cos_sum"] + jnp.where(in_warmup, pooled, 0.0),
            "neg_count": statistics["neg_count"] + negative(pooled),
            "module_cos_sum": statistics["module_cos_sum"] + jnp.where(in_warmup, modules, 0.0),
            "module_neg_count": statistics["module_neg_count"] + negative(modules),
            "count": statistics["count"] + in_warmup.astype(jnp.int32)}

  def _count(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.maximum(jnp.asarray(statistics["count"]), 1).astype(jnp.float32)

  def mean_cosine(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T) running mean of the pooled cosines."""
    return jnp.asarray(statistics["cos_sum"]) / self._count(statistics)

  def module_mean_cosine(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T) running mean cosine per split module."""
    return jnp.asarray(statistics["module_cos_sum"]) / self._count(statistics)

  def conflict_frequency(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T) fraction of warm-up steps whose pooled cosine was negative."""
    return jnp.asarray(statistics["neg_count"]).astype(jnp.float32) / self._count(statistics)

  def module_conflict_frequency(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T) fraction of warm-up steps with a negative cosine, per split module."""
    return (jnp.asarray(statistics["module_neg_count"]).astype(jnp.float32)
            / self._count(statistics))

  def pooled_matrix(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(T, T): the criterion's rule on the pooled statistics (the routing of "pooled", for the
    others a reference); the fixed M with routing "fixed"."""
    if self.routing == "fixed":
      return jnp.asarray(validate_routing_matrix(self.routing_matrix, self.num_tasks))
    if self.criterion == "module_frequency":
      return routing_from_frequencies(self.conflict_frequency(statistics), self.threshold)
    return routing_from_cosines(self.mean_cosine(statistics), self.threshold)

  def learned_matrices(self, statistics: Mapping[str, jax.Array]) -> jax.Array:
    """(K, T, T): the per-module M that holds after the warm-up (all ones before any
    statistic)."""
    num_modules = jnp.shape(statistics["module_cos_sum"])[0]
    if self.routing == "fixed" or self.criterion == "pooled":
      return self.module_matrices(self.pooled_matrix(statistics), num_modules)
    if self.criterion == "module_frequency":
      return routing_from_frequencies(self.module_conflict_frequency(statistics),
                                      self.threshold)
    return routing_from_cosines(self.module_mean_cosine(statistics), self.threshold)

  def matrices_at(self, statistics: Mapping[str, jax.Array], step: jax.Array) -> jax.Array:
    """(K, T, T): the per-module M in use at `step` (all ones during a learned routing's
    warm-up, then frozen)."""
    learned = self.learned_matrices(statistics)
    if self.routing == "fixed":
      return learned
    return jnp.where(step < self.warmup_steps, jnp.ones_like(learned), learned)

  # -- Method interface ------------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    variables = self.model.init(rng, batch["image"], train=False)
    for name, sub in self.split_params(variables["params"]).items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        where = "encoder/" + name + "/" + "/".join(_key_name(k) for k in path)
        group_boundaries(leaf.shape[-1], self.sizes, where)  # raises on an empty group
    return {**variables, STATE_COLLECTION: self.initial_statistics(variables["params"])}

  def _model_state(self, model_state: Mapping[str, PyTree]) -> dict:
    return {k: v for k, v in model_state.items() if k != STATE_COLLECTION}

  def deployed_variables(self, variables):
    """The hard-shared network's variables, without the routing statistics."""
    return self._model_state(variables)

  def task_losses(self, params, model_state, batch, columns: jax.Array | None = None
                  ) -> tuple[jax.Array, dict]:
    """(the T task losses, updated model collections), in training mode.

    With `columns` (activation mode), the split layers route task s's gradient: M[:, s] (T,)
    for every split module, or M_k[:, s] per split module (K, T; order of `split_modules`).
    """
    variables = {"params": params, **self._model_state(model_state)}

    def apply():
      return self.model.apply(variables, batch["image"], train=True,
                              mutable=list(self._model_state(model_state)))

    if columns is None:
      outputs, new_state = apply()
    else:
      interceptor = routing_interceptor(self.split_names(), jnp.asarray(columns), self.sizes,
                                        self.split_modules(params))
      with nn.intercept_methods(interceptor):
        outputs, new_state = apply()
    losses = jnp.stack([t.loss(outputs[t.name], batch[t.name]) for t in self.tasks])
    return losses, dict(new_state)

  def loss(self, params, model_state, batch, rng, step):
    """The weighted task loss (hard sharing; the routed gradient comes from `loss_and_grad`)."""
    del rng, step
    variables = {"params": params, **self._model_state(model_state)}
    outputs, new_state = self.model.apply(variables, batch["image"], train=True,
                                          mutable=list(self._model_state(model_state)))
    total, aux = weighted_task_loss(self.tasks, outputs, batch, self.task_weights)
    return total, (aux, {**model_state, **new_state})

  def per_task_grads(self, params, model_state, batch, matrix: jax.Array):
    """(per-task gradients with a leading task axis, task losses, updated model collections).

    Gradients are routed (activation mode) or masked (weight mode) by `matrix`: one M (T, T)
    for every split module, or one M_k per split module (K, T, T; order of `split_modules`).
    The T backward passes run as `execution.choices().passes` says. Unrolled (one
    `jax.grad` per task, the CPU default): their forward passes are the same computation,
    which XLA merges into one, and unbatched convolution gradients run about twice as fast on
    CPU as the batched ones a `vmap` over tasks makes. Vmapped (the accelerator default): one
    batched program; the forward stays unbatched where the routing columns do not enter it.
    """
    num_tasks = self.num_tasks
    route = self.mode == "activation"
    modules = self.split_modules(params)
    matrices = self.module_matrices(matrix, len(modules))

    def one_task(columns, onehot):
      def task_loss(p):
        losses, new_state = self.task_losses(p, model_state, batch,
                                             columns if route else None)
        return jnp.dot(losses, onehot), (losses, new_state)

      grads, (losses, new_state) = jax.grad(task_loss, has_aux=True)(params)
      return grads, losses, new_state

    onehots = jnp.eye(num_tasks, dtype=jnp.float32)
    # Every task's pass computes the same losses and model state (only its cotangent and
    # routing columns differ): keep task 0's.
    grads, losses, new_state = execution.map_stacked(
        one_task, jnp.moveaxis(matrices, 2, 0), onehots)
    losses, new_state = jax.tree.map(lambda a: a[0], (losses, new_state))
    if not route:
      index = {name: k for k, name in enumerate(modules)}
      flat, treedef = jax.tree_util.tree_flatten_with_path(self.split_params(grads))
      masked = []
      for path, g in flat:
        k = index["/".join(_key_name(p) for p in path[:-1])]
        mask = self._leaf_masks(g.shape[-1], matrices[k])
        masked.append(g * mask.reshape((num_tasks,) + (1,) * (g.ndim - 2) + (g.shape[-1],)))
      grads = self._replace_split(grads, jax.tree_util.tree_unflatten(treedef, masked))
    return grads, losses, new_state

  def _leaf_masks(self, num_channels: int, matrix: jax.Array) -> jax.Array:
    """(T, C): entry [s, c] = M[group of c, s]."""
    return (jnp.asarray(group_assignment(num_channels, self.sizes)) @ matrix).T

  def loss_and_grad(self, params, model_state, batch, rng, step):
    """What `jax.value_and_grad(loss, has_aux=True)` returns, with the routed gradient."""
    del rng
    statistics = model_state[STATE_COLLECTION]
    matrices = self.matrices_at(statistics, step)
    grads, losses, new_state = self.per_task_grads(params, model_state, batch, matrices)
    weights = self._weights()
    combined = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)

    if self.routing == "learned":
      split = self.split_params(grads)
      if self.axis_name is not None:  # the cosines of the global (device-averaged) gradients
        split = jax.lax.pmean(split, self.axis_name)
      statistics = self.accumulate(statistics, split, step < self.warmup_steps)

    aux = {f"loss/{t.name}": losses[i] for i, t in enumerate(self.tasks)}
    mean_cosine = self.mean_cosine(statistics)
    share = jnp.mean(matrices, axis=0)  # fraction of split modules where group t takes task s
    for t, a in enumerate(self.tasks):
      for s, b in enumerate(self.tasks):
        if t != s:
          aux[f"gradsplit/M_{a.name}_{b.name}"] = share[t, s]
          if self.routing == "learned":
            aux[f"gradsplit/cos_{a.name}_{b.name}"] = mean_cosine[t, s]
    total = jnp.dot(weights, losses)
    new_model_state = {**new_state, STATE_COLLECTION: statistics}
    return (total, (aux, new_model_state)), combined

  def predict(self, variables, images, controls=None):
    del controls  # nothing to control: the network is the hard-sharing one
    return self.model.apply(self._model_state(variables), images, train=False)

  def eval_controls(self):
    return [None]

  def gradient_macs_per_step(self, params: PyTree) -> int:
    """Gradient arithmetic besides the backward passes: the weighted sum of the T gradients
    and (learned routing) the T x T group dot products of the split layers."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    split = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.split_params(params)))
    gram = self.num_tasks ** 2 * split if self.routing == "learned" else 0
    return self.num_tasks * total + gram

  # -- host side: the routing record and its heat map ------------------------------------------

  def criterion_rule(self) -> str:
    """The routing rule in words (for records and reports)."""
    if self.routing == "fixed":
      return "M fixed by configuration, the same for every split module"
    m = f"{self.threshold:g}"
    return {"module_mean": f"M_k[t][s] = 1 iff split module k's mean cos(g_t, g_s) on group t "
                           f"over the warm-up is >= {m}",
            "module_frequency": f"M_k[t][s] = 1 iff the fraction of warm-up steps with a "
                                f"negative cos(g_t, g_s) on split module k's group t is <= {m}",
            "pooled": f"M[t][s] = 1 iff the mean cos(g_t, g_s) on group t of every split "
                      f"module together over the warm-up is >= {m}, the same M for every "
                      f"module"}[self.criterion]

  def routing_record(self, variables: Mapping[str, PyTree], step: int | None = None) -> dict:
    """The routing of trained `variables` as a JSON-able dict (see `save_routing`).

    "modules": per split module, its name, the M in use after the warm-up ("matrix") and its
    warm-up statistics ("mean_cosine", "conflict_frequency": fraction of warm-up steps with a
    negative cosine); "pooled": the same over every split parameter together, whose "matrix" is
    the criterion's rule on the pooled statistics (the routing of criterion "pooled", a
    reference for the others); "share_routed": the fraction of split modules with
    M_k[t][s] = 1. Statistics are None with routing "fixed".
    """
    statistics = jax.tree.map(np.asarray, dict(variables[STATE_COLLECTION]))
    learned = self.routing == "learned"
    count = int(statistics["count"])
    names = self.split_modules(variables["params"])
    matrices = np.asarray(self.learned_matrices(statistics)).astype(int)
    values = lambda x: np.asarray(x, np.float64).round(6).tolist() if learned else None
    module_cos = np.asarray(self.module_mean_cosine(statistics))
    module_freq = np.asarray(self.module_conflict_frequency(statistics))
    record = {
        "convention": "matrix[t][s] = 1: channel group t takes task s's gradient",
        "tasks": [t.name for t in self.tasks], "routing": self.routing, "mode": self.mode,
        "criterion": self.criterion if learned else None,
        "margin": self.threshold if learned else None,
        "rule": self.criterion_rule(),
        "split_stages": self.split_stages,
        "split_modules": list(self.split_names()),
        "group_sizes": list(self.sizes), "warmup_steps": self.warmup_steps if learned else 0,
        "warmup_steps_seen": count,
        "warmup_complete": not learned or count >= self.warmup_steps,
        "modules": [{"name": name, "matrix": matrices[k].tolist(),
                     "mean_cosine": values(module_cos[k]),
                     "conflict_frequency": values(module_freq[k])}
                    for k, name in enumerate(names)],
        "pooled": {"matrix": np.asarray(self.pooled_matrix(statistics)).astype(int).tolist(),
                   "mean_cosine": values(self.mean_cosine(statistics)),
                   "conflict_frequency": values(self.conflict_frequency(statistics))},
        "share_routed": (matrices.mean(axis=0).round(6).tolist() if len(names) else None),
    }
    if step is not None:
      record["step"] = int(step)
    return record

  def artefacts(self, variables, directory: str, *, step: int | None = None,
                plot: bool = True) -> dict[str, dict]:
    """{"routing": the routing record, with "file" (its JSON in `directory`) and "heatmap" (the
    heat map's file name, None without `plot`)}; both files written by `save_routing`."""
    paths = self.save_routing(variables, directory, step=step, plot=plot)
    record = self.routing_record(variables, step)
    record["file"] = paths[0]
    record["heatmap"] = HEATMAP_FILE if plot else None
    return {"routing": record}

  def save_routing(self, variables: Mapping[str, PyTree], directory: str,
                   step: int | None = None, plot: bool = True) -> list[str]:
    """Writes `gradsplit_routing.json` (and the heat maps `gradsplit_routing.png`) to
    `directory`; returns the paths written."""
    files_lib.makedirs(directory)  # a local folder or a URI (files.run_path)
    record = self.routing_record(variables, step)
    paths = [os.path.join(directory, ROUTING_FILE)]
    files_lib.write_json(paths[0], record, indent=1)
    if plot:
      paths.append(os.path.join(directory, HEATMAP_FILE))
      plot_routing(record, paths[-1])
    return paths




@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """GradSplit's options (METHODS.md section 3); flags `--gradsplit_<field>`."""

  PREFIX: ClassVar[str] = "gradsplit"
  TITLE: ClassVar[str] = "GradSplit"

  split_stages: int = options_lib.option(
      1, "How many of the last encoder stages split the output channels of their layers into "
      "one group per task.", low=1, former=("gradsplit_stages",))
  group_sizes: tuple[float, ...] = options_lib.option(
      (), "Relative channel-group size per task, in task order (e.g. 2,1,1); empty = equal "
      "groups.", low=0, open_low=True)
  routing: str = options_lib.option(
      "learned", "'learned' (hard sharing for warmup_steps while gradient conflicts are "
      "measured, then M from them by the criterion) or 'fixed' (routing_matrix from the first "
      "step).", choices=ROUTINGS)
  routing_matrix: str = options_lib.option(
      "", "With routing=fixed: the routing matrix M, rows separated by ';' and entries by ',' "
      "(M[t][s] = 1: channel group t takes task s's gradient; the diagonal must be 1), e.g. "
      "'1,0;1,1', or the words 'identity' (strict split) or 'ones' (hard sharing).",
      former=("gradsplit_matrix",))
  warmup_steps: int = options_lib.option(
      100, "With learned routing: hard-sharing steps that estimate the conflicts; M is frozen "
      "after them.", low=0)
  mode: str = options_lib.option(
      "activation", "'activation' routes the gradients flowing through the split layers' "
      "outputs; 'weight' masks only the split layers' weight gradients.", choices=MODES)
  criterion: str = options_lib.option(
      "module_mean", "With learned routing: how the warm-up's gradient cosines set M. "
      "'module_mean' [ours] gives every split layer (conv, batch norm, dense) its own M: "
      "M[t,s] = 1 where that layer's mean cos(g_t, g_s) on group t is >= the margin; "
      "'module_frequency' [ours]: per layer, M[t,s] = 1 where the fraction of warm-up steps "
      "with a negative cosine is <= the margin; 'pooled': one M for all layers from the cosine "
      "over every split parameter together (the first version, whose large aligned kernels "
      "hid the conflicts: M came out all ones). Runs saved before this option used 'pooled'.",
      choices=CRITERIA, legacy="pooled")
  margin: float | None = options_lib.option(
      None, "With learned routing: the criterion's threshold. For 'module_mean' and 'pooled' "
      "the least mean cosine that shares, in [-1, 1] (default 0.0); for 'module_frequency' "
      "the largest fraction of warm-up steps with a negative cosine that shares, in [0, 1] "
      "(default 0.5). The diagonal of M is always 1.")

  def check_values(self, name):
    matrix = self.routing_matrix  # text, or rows of numbers from the library API
    matrix = matrix.strip() if isinstance(matrix, str) else matrix
    if matrix and self.routing != "fixed":
      raise ValueError(f"{name('routing_matrix')}={matrix} is only used with "
                       f"{name('routing')}=fixed; drop it or set {name('routing')}=fixed.")
    if self.routing == "fixed" and not matrix:
      raise ValueError(f"{name('routing')}=fixed needs {name('routing_matrix')}, such as "
                       f"'identity' or rows like '1,0;1,1'.")
    if self.routing == "learned" and self.warmup_steps < 1:
      raise ValueError(f"{name('warmup_steps')}={self.warmup_steps} leaves no step to estimate "
                       f"the conflicts; give at least 1, or use {name('routing')}=fixed.")
    if self.margin is not None and self.routing != "learned":
      raise ValueError(f"{name('margin')}={self.margin:g} is only used with "
                       f"{name('routing')}=learned; drop it or set {name('routing')}=learned.")
    if self.routing == "learned":
      check_margin(self.criterion, self.margin, name("margin"))

  def options(self) -> dict:
    options = super().options()
    options["group_sizes"] = self.group_sizes or None
    if self.routing != "learned":  # the criterion and margin read the warm-up's conflicts
      del options["criterion"], options["margin"]
    return options


OPTIONS = tuple(f.name for f in Config.fields())


def build(tasks: Sequence[tasks_lib.Task], make_net, *,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> GradSplitMethod:
  """A `GradSplitMethod` on `make_net(tasks)`; `options` are its fields among `OPTIONS`
  (`routing_matrix` may be text for `parse_routing_matrix`)."""
  options = Config.from_options(options).options()
  tasks = tuple(tasks)
  matrix = options.pop("routing_matrix", None)
  if isinstance(matrix, str):
    matrix = (parse_routing_matrix(matrix, len(tasks), f"routing matrix {matrix.strip()!r}")
              if matrix.strip() else None)
  if matrix is not None:
    matrix = tuple(tuple(float(v) for v in row) for row in np.asarray(matrix).tolist())
  if options.get("group_sizes") is not None:
    options["group_sizes"] = tuple(float(s) for s in options["group_sizes"])
  if options.get("margin") is not None:
    options["margin"] = float(options["margin"])
  return GradSplitMethod(tasks, make_net(tasks), tuple(task_weights) if task_weights else None,
                         routing_matrix=matrix, axis_name=axis_name, **options)

