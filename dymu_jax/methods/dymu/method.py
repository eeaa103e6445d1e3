"""The DYMU method: its stages, training losses, controls and deployment (see the package
docstring).

(Over 500 lines: one method class whose stages share the network, the controls and deployment;
the hypernetworks, regulariser, anchor tools and options live beside it in this package.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import controls as controls_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import affinity as affinity_lib
from dymu_jax.methods import base
from dymu_jax.models import cost as cost_lib
from dymu_jax.models import branched
from dymu_jax.models.branched import BranchedNet, Tree, TreeCost

from dymu_jax.methods.dymu.hypernets import EdgeHypernet, WeightHypernet, shift_unraveler
from dymu_jax.methods.dymu.regulariser import (DEPTH_FACTORS, USE_GRADIENTS, branching_regularizer,
                                               gumbel_softmax, hard_parents,
                                               parent_use_probability, temperature)

PyTree = Any


STAGES = ("pretrain", "anchor", "edge", "weight")
# How the anchor's streams start: copies of one trunk trained with hard sharing (stage
# "pretrain"; the paper's recipe), one random draw for every stream, or a draw per stream.
ANCHOR_INITS = ("trunk", "shared", "independent")


# ----------------------------------------------------------------------------------------------
# Controls (checked and drawn by `dymu_jax.controls`).


def _preference(preference, num_tasks: int) -> np.ndarray:
  """`controls.check_preference` as float32 (N,), the dtype the hypernetworks read."""
  return controls_lib.check_preference(preference, num_tasks).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The method.


def _as_affinity(affinity, num_tasks: int) -> tuple[tuple[float, ...], ...] | None:
  if affinity is None:
    return None
  a = np.asarray(affinity, dtype=np.float64)
  if a.shape != (num_tasks, num_tasks) or not np.all(np.isfinite(a)):
    raise ValueError(f"The task affinity must be a finite ({num_tasks}, {num_tasks}) matrix, "
                     f"got shape {a.shape}.")
  return tuple(tuple(float(x) for x in row) for row in a)


def _is_traced(tree: PyTree) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class DymuMethod(base.MethodBase):
  """DYMU on a `BranchedNet` (module docstring); one instance per training stage.

  Attributes:
    tasks: the tasks, in stream order.
    net: the branched network (the anchor's architecture).
    stage: "pretrain", "anchor", "edge" or "weight".
    affinity: A (N x N, rows of floats), needed to train the "edge" stage
      (`affinity.task_affinity`).
    task_weights: w_i (default 1 each); [ours] 1 / the anchor's single-task loss
      (`anchor_task_losses`).
    lambda_active: lambda_A (1 in the paper, 0.05 in a related filing).
    lambda_inactive: lambda_I.
    tau_factor: tau = tau_factor / N (0: every task is active).
    dirichlet_alpha: preferences are drawn from Dirichlet(alpha 1_N).
    initial_temperature, temperature_decay, temperature_every: the Gumbel-softmax schedule.
    embedding_features: embedding dimension of both hypernetworks.
    edge_hidden, weight_hidden: hidden widths of the two hypernetworks' MLPs.
    self_logit: initial own-stream logit bias of the edge hypernetwork [ours option].
    anchor_init: how the anchor's streams start (`ANCHOR_INITS`): "trunk" (default, the
      paper's recipe), every stream a copy of one network trained with hard sharing on all
      tasks (stage "pretrain"), then fine-tuned on its own task, so the streams stay close and
      a low-level cross-task edge is cheap; "shared" [ours], one random draw for every stream;
      "independent", a draw per stream.
    depth_factor: the regulariser's depth factor (`depth_weights`): "paper" or "shifted".
    use_gradient: "stop" (P_use is a usage weight) or "flow" (`branching_regularizer`).
    eval_resources: the c values `eval_controls` pairs with the uniform preference.
    name: the method name in logs.
    axis_name: the pmap axis the anchor's batch norms pool over (anchor stage).
  """

  tasks: tuple[tasks_lib.Task, ...]
  net: BranchedNet
  stage: str = "edge"
  affinity: tuple[tuple[float, ...], ...] | None = None
  task_weights: tuple[float, ...] | None = None
  lambda_active: float = 1.0
  lambda_inactive: float = 0.1
  tau_factor: float = 0.6
  dirichlet_alpha: float = 0.2
  initial_temperature: float = 5.0
  temperature_decay: float = 0.97
  temperature_every: int = 300
  embedding_features: int = 32
  edge_hidden: tuple[int, ...] = (100, 100)
  weight_hidden: tuple[int, ...] = (100, 100, 100)
  self_logit: float = 0.0
  anchor_init: str = "trunk"
  depth_factor: str = "paper"
  use_gradient: str = "stop"
  eval_resources: tuple[float, ...] = (0.0, 1.0)
  name: str = "dymu"
  axis_name: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    n = len(self.tasks)
    if tuple(self.net.tasks) != self.tasks:
      raise ValueError("The branched network's tasks must be the method's tasks, in order.")
    if self.stage not in STAGES:
      raise ValueError(f"Unknown DYMU stage {self.stage!r}; allowed: {', '.join(STAGES)}.")
    if self.anchor_init not in ANCHOR_INITS:
      raise ValueError(f"Unknown DYMU anchor_init {self.anchor_init!r}; allowed: "
                       f"{', '.join(ANCHOR_INITS)}.")
    if self.depth_factor not in DEPTH_FACTORS:
      raise ValueError(f"Unknown DYMU depth_factor {self.depth_factor!r}; allowed: "
                       f"{', '.join(DEPTH_FACTORS)}.")
    if self.use_gradient not in USE_GRADIENTS:
      raise ValueError(f"Unknown DYMU use_gradient {self.use_gradient!r}; allowed: "
                       f"{', '.join(USE_GRADIENTS)}.")
    object.__setattr__(self, "affinity", _as_affinity(self.affinity, n))
    if self.task_weights is not None:
      weights = tuple(float(w) for w in self.task_weights)
      if len(weights) != n or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"Got task weights {weights} for {n} tasks "
                         f"({', '.join(t.name for t in self.tasks)}); give one finite weight "
                         f">= 0 per task.")
      object.__setattr__(self, "task_weights", weights)
    for field in ("lambda_active", "lambda_inactive"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}.")
    # tau_factor <= 1 keeps the most preferred task active (max r >= 1/N); 0 makes every task
    # active (the ablation without an inactive set).
    if not 0 <= self.tau_factor <= 1:
      raise ValueError(f"tau_factor must lie in [0, 1] so that the most preferred task is "
                       f"active, got {self.tau_factor!r}.")
    if not self.dirichlet_alpha > 0:
      raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}.")
    if not (self.initial_temperature > 0 and 0 < self.temperature_decay <= 1
            and self.temperature_every >= 1):
      raise ValueError(
          f"The temperature schedule needs initial_temperature > 0, 0 < temperature_decay <= 1 "
          f"and temperature_every >= 1, got {self.initial_temperature!r}, "
          f"{self.temperature_decay!r}, {self.temperature_every!r}.")
    object.__setattr__(self, "edge_hidden", tuple(int(h) for h in self.edge_hidden))
    object.__setattr__(self, "weight_hidden", tuple(int(h) for h in self.weight_hidden))
    object.__setattr__(self, "eval_resources",
                       tuple(controls_lib.check_resource(c) for c in self.eval_resources))

  # -- parts -----------------------------------------------------------------------------------

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  def edge_hypernet(self) -> EdgeHypernet:
    return EdgeHypernet(self.num_tasks, self.net.num_layers, self.embedding_features,
                        self.edge_hidden, self.self_logit)

  def weight_hypernet(self, num_outputs: int) -> WeightHypernet:
    return WeightHypernet(self.num_tasks, num_outputs, self.embedding_features,
                          self.weight_hidden)

  def _weights(self) -> tuple[float, ...]:
    return self.task_weights or (1.0,) * self.num_tasks

  def parts(self, variables: Mapping[str, PyTree]):
    """(anchor variables, edge hypernet params or None, weight hypernet params or None)."""
    if self.stage in ("pretrain", "anchor") or "anchor" not in variables:
      return dict(variables), None, None
    params = variables.get("params", {})
    edge = params.get("edge_hypernet")
    if edge is None and "edge_hypernet" in variables:
      edge = variables["edge_hypernet"]["params"]
    return variables["anchor"], edge, params.get("weight_hypernet")

  def parent_logits(self, edge_params: PyTree, preference, resource) -> jax.Array:
    return self.edge_hypernet().apply({"params": edge_params}, preference, resource)

  def adapted_anchor(self, anchor: PyTree, weight_params: PyTree | None, preference,
                     resource) -> PyTree:
    """The anchor's variables with g(r, c)'s batch-norm shifts (the anchor when None)."""
    if weight_params is None:
      return anchor
    size, unravel = shift_unraveler(anchor)
    flat = self.weight_hypernet(size).apply({"params": weight_params}, preference, resource)
    return branched.apply_batch_norm_shifts(anchor, unravel(flat))

  # -- the Method interface --------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    """The stage's variables. What comes from an earlier stage (the trunk's copies, the frozen
    anchor, the frozen edge hypernetwork; `required_variables`) is drawn as a stand-in of the
    right shapes, which `train.train(..., initial_variables=...)` replaces or a restored
    checkpoint overwrites; calling the method directly, put the real ones over it:
    `{**method.init(rng, batch), **dymu.stage_variables(anchor=..., ...)}`."""
    images = batch["image"]
    if self.stage == "pretrain":
      return self.net.init(rng, images, "shared")
    if self.stage == "anchor":
      return self.net.init(rng, images, "shared" if self.anchor_init == "trunk"
                           else self.anchor_init)
    anchor = self.net.init(jax.random.fold_in(rng, 1), images, "shared")
    r = jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)
    c = jnp.zeros((), jnp.float32)
    if self.stage == "edge":
      edge = self.edge_hypernet().init(rng, r, c)["params"]
      return {"params": {"edge_hypernet": edge}, "anchor": anchor}
    edge = self.edge_hypernet().init(jax.random.fold_in(rng, 2), r, c)["params"]
    size, _ = shift_unraveler(anchor)
    weight = self.weight_hypernet(size).init(rng, r, c)["params"]
    return {"params": {"weight_hypernet": weight}, "anchor": anchor,
            "edge_hypernet": {"params": edge}}

  def load_pretrained(self, variables: PyTree, path: str) -> PyTree:
    """Every stream from one torchvision checkpoint (`branched.load_pretrained_streams`; a
    resnet18 or mobilenet_v2 stack) in the stage a run starts with: pretrain, or anchor with
    anchor_init shared or independent. The later stages start from their earlier stage."""
    if self.stage == "pretrain" or (self.stage == "anchor" and self.anchor_init != "trunk"):
      return branched.load_pretrained_streams(self.net, variables, path)
    raise ValueError(f"DYMU's {self.stage} stage"
                     f"{' (anchor_init=trunk)' if self.stage == 'anchor' else ''} starts from "
                     f"its earlier stage's weights; pretrained weights load into the first "
                     f"stage (pretrain, or anchor with anchor_init shared or independent).")

  def required_variables(self) -> tuple[str, ...]:
    """The collections the stage starts from, out of its earlier stages' variables
    (`dymu.stage_variables`): the trunk's copies (an anchor from a trunk: its start, in
    "params"), the frozen anchor ("anchor") and edge hypernetwork ("edge_hypernet")."""
    if self.stage == "anchor":
      return ("params",) if self.anchor_init == "trunk" else ()
    return {"pretrain": (), "edge": ("anchor",),
            "weight": ("anchor", "edge_hypernet")}[self.stage]

  def _task_losses(self, predictions, batch) -> dict[str, jax.Array]:
    return {t.name: t.loss(predictions[t.name], batch[t.name]) for t in self.tasks}

  def loss(self, params, model_state, batch, rng, step):
    """The stage's training loss (module docstring); aux "loss/<task>" are unweighted."""
    if self.stage in ("pretrain", "anchor"):
      # pretrain: one hard-shared trunk (stream 0) and every decoder; the other streams'
      # blocks get no gradient and stay at their (identical) start.
      tree = self.net.shared_tree(0) if self.stage == "pretrain" else self.net.separate_tree()
      predictions, new_state = self.net.apply_tree(
          {"params": params, **model_state}, batch["image"], tree, train=True)
      losses = self._task_losses(predictions, batch)
      total = sum(w * losses[t.name] for w, t in zip(self._weights(), self.tasks))
      aux = {f"loss/{name}": value for name, value in losses.items()}
      return total, (aux, {**model_state, **new_state})

    control_key, gumbel_key = jax.random.split(rng)
    r, c = controls_lib.sample_controls(control_key, self.num_tasks, self.dirichlet_alpha)
    variables = {"params": params, **model_state}
    anchor, edge, weight = self.parts(variables)
    aux = {}
    if self.stage == "edge":
      if self.affinity is None:
        raise ValueError("The edge stage needs the task affinity; compute it on the trained "
                         "anchor with dymu_jax.methods.affinity.task_affinity.")
      logits = self.parent_logits(edge, r, c)
      tau = temperature(step, self.initial_temperature, self.temperature_decay,
                        self.temperature_every)
      nu = gumbel_softmax(gumbel_key, logits, tau)
      omega, terms = branching_regularizer(
          nu, r, c, jnp.asarray(self.affinity, jnp.float32), self.lambda_active,
          self.lambda_inactive, self.tau_factor, self.depth_factor, self.use_gradient)
      aux.update(terms, omega=omega, temperature=tau)
    else:
      logits = jax.lax.stop_gradient(self.parent_logits(edge, r, c))
      nu = hard_parents(logits)
      omega = jnp.zeros((), jnp.float32)
      anchor = self.adapted_anchor(anchor, weight, r, c)
    predictions = self.net.apply_soft(anchor, batch["image"], nu, train=False)
    losses = self._task_losses(predictions, batch)
    weighted = sum(r[i] * w * losses[t.name]
                   for i, (w, t) in enumerate(zip(self._weights(), self.tasks)))
    # Share of the nodes the argmax tree of this (r, c) uses (1: separate, 1/N: shared trunk).
    used = parent_use_probability(hard_parents(jax.lax.stop_gradient(logits)))[:-1]
    aux.update({f"loss/{name}": value for name, value in losses.items()})
    aux.update(task_loss=weighted, resource=c, used_nodes=jnp.mean(used))
    return weighted + omega, (aux, model_state)

  def predict(self, variables, images, controls=None):
    """Evaluation-mode predictions for the controls.

    `{"preference": r, "resource": c}`: the argmax tree of h(r, c) with g(r, c)'s batch-norm
    shifts (when trained). Under tracing (inside jit, where the tree cannot be read) it runs
    as one-hot soft mixing, which gives the same predictions with every node computed; with
    concrete variables only the tree's nodes compute. `{"tree": Tree or parent tuples}` runs
    that tree on the anchor; None (or the anchor stage) runs the anchor's separate tree (the
    pretrain stage: its shared trunk).
    """
    anchor, edge, weight = self.parts(variables)
    if not controls:
      tree = self.net.shared_tree(0) if self.stage == "pretrain" else self.net.separate_tree()
      return apply_tree(self.net, anchor, images, tree)
    controls = dict(controls)
    if set(controls) == {"tree"}:
      tree = controls["tree"]
      tree = tree if isinstance(tree, Tree) else Tree(tree)
      return apply_tree(self.net, anchor, images, tree.validate(self.net.num_layers,
                                                                self.num_tasks))
    if set(controls) != {"preference", "resource"}:
      raise ValueError(f"DYMU controls must be {{'preference': r, 'resource': c}} or "
                       f"{{'tree': Tree}}, got keys {sorted(controls)}.")
    if edge is None:
      raise ValueError("Predicting for a preference needs a trained edge hypernetwork; the "
                       "anchor stage's variables have none.")
    r = _preference(controls["preference"], self.num_tasks)
    c = controls_lib.check_resource(controls["resource"])
    if _is_traced((edge, weight, anchor)):
      adapted = self.adapted_anchor(anchor, weight, r, c)
      nu = hard_parents(self.parent_logits(edge, r, c))
      return self.net.apply_soft(adapted, images, nu, train=False)
    tree, adapted = self.controller(variables).predict(r, c)
    return apply_tree(self.net, adapted, images, tree)

  def eval_controls(self):
    """The anchor or trunk (stages "pretrain", "anchor"); else the uniform preference at each
    of `eval_resources`."""
    if self.stage in ("pretrain", "anchor"):
      return [None]
    uniform = tuple([1.0 / self.num_tasks] * self.num_tasks)
    return [{"preference": uniform, "resource": c} for c in self.eval_resources]

  def controller(self, variables: Mapping[str, PyTree]) -> DymuController:
    """The inference controller of trained variables (stage "edge" or "weight")."""
    return DymuController(self, variables)

  def training_cost(self, variables, image_shape, batch_size):
    raise NotImplementedError("DYMU's training cost (four stages on N streams and two "
                              "hypernetworks) is not counted yet; its evaluation reports each "
                              "tree's inference cost.")

  def artefacts(self, variables, directory, *, step=None, plot=True) -> dict[str, dict]:
    """{"affinity": the task affinity A and task weights w the stage trained with, with "file"
    (`affinity.RECORD_FILE` in `directory`) and "heatmap" (None without `plot`)} for the edge
    and weight stages; {} before (no affinity). The stage's own record (the edge hook's, or
    the weight stage's copy, with its signature) is kept as it is (`affinity.write_artefact`)."""
    del variables, step  # A and w are measured on the anchor before the stage, not trained
    if self.stage in ("pretrain", "anchor") or self.affinity is None:
      return {}
    return {"affinity": affinity_lib.write_artefact(
        directory, [t.name for t in self.tasks], self.affinity, self.task_weights, plot=plot)}

  def control_space(self) -> base.ControlSpace:
    """A preference and a resource c once the edge hypernetwork is trained; none before."""
    if self.stage in ("pretrain", "anchor"):
      return base.ControlSpace()
    return base.ControlSpace(("preference", "resource"))

  def evaluation_variants(self, variables):
    """Stage "weight": "edge" (the argmax trees on the frozen anchor, exactly the edge stage's
    network) and "weight" (with g(r, c)'s shifts); stage "edge": "edge"; else the network."""
    if self.stage in ("pretrain", "anchor"):
      return {self.name: variables}
    anchor, edge, weight = self.parts(variables)
    edge_only = {"params": {"edge_hypernet": edge}, "anchor": anchor}
    return {"edge": edge_only} if weight is None else {"edge": edge_only, "weight": variables}

  def describe(self, variables, controls=None, prepared=None, *, image_shape):
    """The argmax tree and its cost (no batch-norm shifts computed)."""
    del prepared
    controls = self.control_space().check(controls)
    if self.stage in ("pretrain", "anchor"):
      tree = self.net.shared_tree(0) if self.stage == "pretrain" else self.net.separate_tree()
    else:
      r = controls.get("preference", np.full(self.num_tasks, 1.0 / self.num_tasks))
      tree = self.controller(variables).tree(r, controls.get("resource", 0.0))
    cost = self.net.tree_cost(tree, image_shape)
    return {"tree": [list(p) for p in tree.parents]}, cost_lib.Cost(cost.macs, cost.params)

  def cost_range(self, variables, prepared=None, *, image_shape):
    """One shared trunk (every task on stream 0) and the anchor's separate streams."""
    del variables, prepared
    costs = [self.net.tree_cost(tree, image_shape)
             for tree in (self.net.shared_tree(0), self.net.separate_tree())]
    return tuple(cost_lib.Cost(c.macs, c.params) for c in costs)

  def full_network(self, variables, prepared=None, *, image_shape, standalone=True):
    """The anchor's separate streams (the most expensive tree), for stages edge and weight."""
    del prepared, standalone
    if self.stage in ("pretrain", "anchor"):
      return None
    anchor, _, _ = self.parts(variables)
    tree = self.net.separate_tree()
    image_shape = tuple(int(d) for d in image_shape)
    cost = self.net.tree_cost(tree, image_shape)
    structure = {"tree": [list(p) for p in tree.parents]}
    return base.Deployed(branched.TreeNetwork(self.net, tree), anchor, image_shape, {},
                         key=tree, info={**structure, "name": "anchor", "macs_fraction": 1.0,
                                         "params_fraction": 1.0},
                         known_cost=cost_lib.Cost(cost.macs, cost.params), structure=structure)

  def deploy(self, variables, controls=None, prepared=None, *, image_shape,
             standalone: bool = True) -> base.Deployed:
    """The argmax tree of h(r, c) on the anchor with g(r, c)'s batch-norm shifts (stage
    "weight"), only its nodes computed; the anchor's separate streams (stage "anchor") or the
    trunk (stage "pretrain") before. A missing preference is uniform, a missing resource 0."""
    del prepared, standalone  # one form: the tree network exports as it is
    controls = self.control_space().check(controls)
    image_shape = tuple(int(d) for d in image_shape)
    anchor, _, weight = self.parts(variables)
    if self.stage in ("pretrain", "anchor"):
      tree = self.net.shared_tree(0) if self.stage == "pretrain" else self.net.separate_tree()
      adapted, controls = anchor, {}
    else:
      r = _preference(controls.get("preference", np.full(self.num_tasks, 1.0 / self.num_tasks)),
                      self.num_tasks)
      c = controls_lib.check_resource(controls.get("resource", 0.0))
      tree, adapted = self.controller(variables).predict(r, c)
      controls = {"preference": tuple(float(x) for x in r), "resource": float(c)}
    # With the weight hypernetwork, one tree runs different batch norms for each (r, c).
    key = tree if weight is None else (tree, controls["preference"], controls["resource"])
    cost = self.net.tree_cost(tree, image_shape)
    structure = {"tree": [list(p) for p in tree.parents]}
    info = {**structure, "anchor_macs": cost.full_macs, "macs_fraction": cost.macs_fraction,
            "params_fraction": cost.params_fraction}
    return base.Deployed(branched.TreeNetwork(self.net, tree), adapted, image_shape, controls,
                         key=key, info=info, known_cost=cost_lib.Cost(cost.macs, cost.params),
                         structure=structure)


@functools.partial(jax.jit, static_argnums=(0, 3))
def apply_tree(net: BranchedNet, variables, images, tree: Tree) -> dict[str, jax.Array]:
  """Jitted `net.apply_tree` in evaluation mode (one compilation per net and tree)."""
  return net.apply_tree(variables, images, tree)


@dataclasses.dataclass(frozen=True)
class DymuController:
  """(r, c) -> (argmax tree, adapted anchor variables), outside jit.

  Attributes:
    method: the trained method (stage "edge" or "weight").
    variables: its variables.
  """

  method: DymuMethod
  variables: Any = dataclasses.field(compare=False, hash=False, repr=False)

  def __post_init__(self):
    _, edge, _ = self.method.parts(self.variables)
    if edge is None:
      raise ValueError("A DYMU controller needs variables with a trained edge hypernetwork "
                       "(stage 'edge' or 'weight').")

  def parent_logits(self, preference, resource) -> np.ndarray:
    """h(r, c): the parent logits (L, N, N)."""
    r = _preference(preference, self.method.num_tasks)
    c = controls_lib.check_resource(resource)
    _, edge, _ = self.method.parts(self.variables)
    return np.asarray(_parent_logits(self.method.edge_hypernet(), edge, r, np.float32(c)))

  def tree(self, preference, resource) -> Tree:
    """The argmax tree for (r, c)."""
    return Tree.from_scores(self.parent_logits(preference, resource))

  def predict(self, preference, resource) -> tuple[Tree, PyTree]:
    """(the argmax tree, the anchor's variables with g(r, c)'s batch-norm shifts)."""
    tree = self.tree(preference, resource)
    r = _preference(preference, self.method.num_tasks)
    c = np.float32(controls_lib.check_resource(resource))
    anchor, _, weight = self.method.parts(self.variables)
    if weight is None:
      return tree, anchor
    return tree, _adapted_anchor(self.method, anchor, weight, r, c)

  def cost(self, preference, resource, image_shape: Sequence[int]) -> TreeCost:
    """Per-example MACs and parameters of the tree for (r, c), and of the full anchor."""
    return self.method.net.tree_cost(self.tree(preference, resource), image_shape)

  def __call__(self, images, preference, resource) -> dict[str, jax.Array]:
    """Predictions of the controlled network (only the tree's nodes compute)."""
    tree, adapted = self.predict(preference, resource)
    return apply_tree(self.method.net, adapted, images, tree)


@functools.partial(jax.jit, static_argnums=0)
def _parent_logits(hypernet: EdgeHypernet, params, r, c):
  return hypernet.apply({"params": params}, r, c)


@functools.partial(jax.jit, static_argnums=0)
def _adapted_anchor(method: DymuMethod, anchor, weight, r, c):
  return method.adapted_anchor(anchor, weight, r, c)


# ----------------------------------------------------------------------------------------------
# Construction.

MODEL_OPTIONS = ("backbone", "backbone_kwargs", "head_width", "head_hidden_layers",
                 "head_batch_norm", "atrous_rates", "image_pooling", "in_channels", "pixel_mean",
                 "pixel_std", "bn_momentum")
OPTIONS = ("stage", "affinity", "lambda_active", "lambda_inactive", "tau_factor",
           "dirichlet_alpha", "initial_temperature", "temperature_decay", "temperature_every",
           "embedding_features", "edge_hidden", "weight_hidden", "self_logit", "anchor_init",
           "depth_factor", "use_gradient", "eval_resources")


def build(tasks: Sequence[tasks_lib.Task], *, model_options: Mapping[str, Any] | None = None,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> DymuMethod:
  """A `DymuMethod` whose `BranchedNet` is built from `model_options`.

  Args:
    tasks: the tasks.
    model_options: keyword arguments of `branched.build_branched` among `MODEL_OPTIONS`
      (backbone "lenet", "resnet_small", "resnet18", "mobilenet_v2" or "mlp",
      backbone_kwargs, head_width, atrous_rates, ...); dense tasks get `DenseHead` decoders on
      the ResNet and MobileNetV2 stacks.
    task_weights: w_i (e.g. `task_weights_from_losses(anchor_task_losses(...))`).
    axis_name: the pmap axis batch norms pool over (anchor stage under --parallel=pmap).
    **options: `DymuMethod` fields among `OPTIONS`.
  """
  model_options = dict(model_options or {})
  unknown = sorted(set(model_options) - set(MODEL_OPTIONS))
  if unknown:
    raise ValueError(f"DYMU's branched network does not take {', '.join(unknown)}; it takes "
                     f"{', '.join(MODEL_OPTIONS)}.")
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"Unknown DYMU option(s) {', '.join(unknown)}; allowed: "
                     f"{', '.join(OPTIONS)}.")
  tasks = tuple(tasks)
  net = branched.build_branched(tasks, bn_axis_name=axis_name, **model_options)
  return DymuMethod(tasks, net, task_weights=tuple(task_weights) if task_weights else None,
                    axis_name=axis_name, **options)


def build_registered(tasks: Sequence[tasks_lib.Task], model_options: Mapping[str, Any] | None,
                     *, config, task_weights=None, axis_name=None, **inputs) -> DymuMethod:
  """`build` under the registry's builder contract (`config`: a `dymu.Config`).

  Of `model_options` (the multi-task network's) the branched network takes `MODEL_OPTIONS`
  (others are left out), with the decoders' hidden layers from `config.head_hidden_layers`;
  a backbone without branched streams, `head_batch_norm` on decoders without hidden layers
  and backbone options the streams do not take stop with one sentence.
  """
  options_for_net = {k: v for k, v in dict(model_options or {}).items() if k in MODEL_OPTIONS}
  backbone = options_for_net.get("backbone", "lenet")
  if backbone not in branched.BACKBONES:
    raise ValueError(f"DYMU's anchor streams are built on --backbone="
                     f"{' or '.join(branched.BACKBONES)}, got {backbone!r}.")
  hidden_layers = config.head_hidden_layers
  if hidden_layers >= 0:
    options_for_net["head_hidden_layers"] = hidden_layers
  else:
    hidden_layers = branched.DEFAULT_HEAD_HIDDEN_LAYERS[backbone]
  if options_for_net.get("head_batch_norm") and hidden_layers == 0:
    raise ValueError(f"--head_batch_norm puts batch norm in the decoders' hidden layers, but "
                     f"DYMU's {backbone} decoders have none; add --dymu_head_hidden_layers=1 "
                     f"or drop --head_batch_norm.")
  stream_options = dict(options_for_net.get("backbone_kwargs") or {})
  if stream_options:
    blocks = branched.STACKS[backbone]
    known = set(inspect.signature(blocks).parameters) - {"bn_momentum", "bn_axis_name"}
    unknown = sorted(set(stream_options) - known)
    if unknown:
      raise ValueError(f"--backbone_options has {', '.join(unknown)}, which DYMU's {backbone} "
                       f"streams do not take; they take {', '.join(sorted(known))}.")
  return build(tasks, model_options=options_for_net, task_weights=task_weights,
               axis_name=axis_name, **config.options(), **inputs)
