"""DYMU: controllable dynamic multi-task architectures (METHODS.md section 1).

Given a task preference `r` (on the simplex) and a resource preference `c` in [0, 1] (larger is
more frugal), one trained system outputs a tree-structured multi-task network (`branched.Tree`)
and batch-norm-adapted weights, without retraining. The training stages share one
`DymuMethod` (field `stage`):

0. **"pretrain"** (with `anchor_init="trunk"`, the default): one trunk trained with hard
   sharing on every task (the shared tree of stream 0 and all decoders), the stand-in for the
   paper's one pretrained backbone that every stream fine-tunes.
1. **"anchor"** [known]: the N single-task streams of a `branched.BranchedNet`, trained on the
   separate tree with `sum_t w_t L_t` (streams share no parameters, so each learns alone). Then
   frozen; `affinity.task_affinity` computes the RSA task affinity A from it, and
   `anchor_task_losses` the single-task losses that set `w_i = 1 / L_i^anchor`, scaled to
   mean 1 [ours], measured on held-out images. The paper's anchor "is initialized using
   weights from N pre-trained single-task models" that fine-tune one pretrained backbone: with
   `anchor_init="trunk"` every stream starts as a copy of the pretrained trunk and is
   fine-tuned gently (its own learning rate and steps), so the streams' channels still
   correspond and a low-level cross-task edge is cheap. Streams from one random draw
   ("shared") or independent draws ("independent") end as far apart as independent networks,
   and every cross edge is catastrophic (`stream_divergence` and `probe_trees` measure this
   on a trained anchor).
2. **"edge"** [known]: the edge hypernetwork h(r, c) -> parent logits (L, N, N), trained with
   `sum_i r_i w_i L_i + Omega` on the soft mixing of the frozen anchor, parents drawn by
   Gumbel-softmax (temperature 5, x0.97 every 300 steps) [known]; soft weighted-sum relaxation
   [ours, as in the branched-search code it builds on].
3. **"weight"** [known]: the weight hypernetwork g(r, c) -> additive shifts of every node's
   batch-norm scale and bias, trained with the task loss `sum_i r_i w_i L_i` only; anchor and
   edge hypernetwork frozen; the network is the argmax tree of h(r, c) [ours], run as the soft
   mixing with one-hot parents (equal to the tree forward, and one compiled program whatever
   tree the preference selects).

Every step draws one preference per batch, r ~ Dirichlet(0.2 * 1_N), c ~ Uniform(0, 1) [known]
(`controls.sample_controls`).

**Branching regulariser** (`branching_regularizer`) [known form]: A = {i : r_i >= tau} (active
tasks), I the rest, tau = 0.6 / N;

  L_active = sum_{l=1..L} sum_{i != j in A} ((L - l) / L) A(i, j) P_use(l, i) P_use(l, j)
             ||nu_l(i) - nu_l(j)||^2
  L_inactive = sum_l sum_{j in I} min_{i in A} ||nu_l(i) - nu_l(j)||^2
  Omega = c * lambda_A * L_active + lambda_I * L_inactive   (lambda_A = 1, lambda_I = 0.1)

with `nu_l(j)` = `nu[l - 1][j]`, the parent distribution of node (l, j) (decoder j for l = L).
As printed, the depth factor is (L - l) / L with l = 1..L (`depth_factor="paper"`, the default):
the decoders' parent choice weighs 0, the first weighs (L - 1) / L, so sharing is pulled into
low layers first. `depth_factor="shifted"` [ours, earlier default] counts l from 0 (1 down to
1 / L, every choice pulled). `P_use(l, i)`, the probability that node (l, i) is in the sampled
tree [ours]: decoders (node layer L) have P_use = 1; going down,
`P_use(l, i) = 1 - prod_k (1 - nu[l][k, i] P_use(l + 1, k))` (`parent_use_probability`). It is
a usage weight: by default its gradient is stopped (`use_gradient="stop"`); "flow" lets h lower
the term by making nodes unused, which measured as strong a pull at the decoders as at the
first block. There is no FLOPs loss: cost emerges from c.

**Batch norm [ours].** The anchor is frozen with its running statistics: stages 2 and 3 run
its batch norms in evaluation mode, so the only thing that adapts normalisation is the weight
hypernetwork's shift.

**Hypernetworks** [known sizes]: each has learned task embeddings e_1..e_N and a resource
embedding e_c (dimension 32) and reads `p = sum_i r_i e_i + c e_c`. The edge hypernetwork has an
MLP of 2 hidden layers of width 100 and L linear heads of N x N logits; the weight
hypernetwork an MLP of 3 hidden layers of width 100 and one linear head onto every batch-norm
scale and bias of every node (equivalent to one head per batch-norm layer). Its head starts at
zero [ours], so stage 3 starts from the anchor exactly.

**Controls and inference.** `predict(variables, images, {"preference": r, "resource": c})`;
`{"tree": Tree}` runs a given tree on the anchor, None the anchor itself. `controller(variables)
.predict(r, c)` returns the argmax tree and the adapted variables; `BranchedNet.apply_tree` then
computes only the used nodes and `BranchedNet.tree_cost` prices them. r and c are checked by
`controls.check_preference` and `controls.check_resource` (one sentence for a bad value).

Variables per stage (the engine differentiates "params" only; the frozen parts ride along as
other collections of the model state):

  pretrain, anchor: {"params": <BranchedNet params>, "batch_stats": ...}
  edge:   {"params": {"edge_hypernet": ...}, "anchor": <anchor variables>}
  weight: {"params": {"weight_hypernet": ...}, "anchor": ..., "edge_hypernet": {"params": ...}}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dymu_jax import controls as controls_lib
from dymu_jax import losses as losses_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base as data_lib
from dymu_jax.methods import base
from dymu_jax.models import cost as cost_lib
from dymu_jax.models import branched
from dymu_jax.models.branched import BranchedNet, Tree, TreeCost

PyTree = Any
STAGES = ("pretrain", "anchor", "edge", "weight")
# How the anchor's streams start: copies of one trunk trained with hard sharing (stage
# "pretrain"; the paper's recipe), one random draw for every stream, or a draw per stream.
ANCHOR_INITS = ("trunk", "shared", "independent")
# The regulariser's depth factor: the paper's (L - l) / L with l = 1..L (the decoders' parent
# choice weighs 0), or the earlier [ours] shift l = 0..L-1 (every choice weighs >= 1 / L).
DEPTH_FACTORS = ("paper", "shifted")
# Whether gradients flow through P_use in L_active: "stop" treats it as a usage weight (the
# paper states it is a weight; stopping the gradient is ours, measured); "flow" lets h also
# lower the usage of nodes to shrink the term.
USE_GRADIENTS = ("stop", "flow")


# ----------------------------------------------------------------------------------------------
# Controls (checked and drawn by `dymu_jax.controls`).


def _preference(preference, num_tasks: int) -> np.ndarray:
  """`controls.check_preference` as float32 (N,), the dtype the hypernetworks read."""
  return controls_lib.check_preference(preference, num_tasks).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Sampling parents and the branching regulariser.


def temperature(step, initial: float = 5.0, decay: float = 0.97, every: int = 300):
  """Gumbel-softmax temperature at `step`: initial * decay ** floor(step / every)."""
  return initial * jnp.power(decay, jnp.floor_divide(jnp.asarray(step), every)).astype(
      jnp.float32)


def gumbel_softmax(rng: jax.Array, logits: jax.Array, tau) -> jax.Array:
  """softmax((logits + Gumbel noise) / tau) over the last axis (the soft relaxation)."""
  noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax((logits + noise) / tau, axis=-1)


def hard_parents(logits: jax.Array) -> jax.Array:
  """One-hot argmax rows of parent logits (L, N, N): the argmax tree as nu."""
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def parent_use_probability(nu: jax.Array) -> jax.Array:
  """P_use (L + 1, N): probability that node (l, i) is in the tree, node layers 0..L.

  Row L (the decoders) is 1; `P_use(l, i) = 1 - prod_k (1 - nu[l][k, i] P_use(l + 1, k))`.
  With one-hot `nu` it is exactly 1 for the nodes the tree uses and 0 for the others.
  """
  num_layers, num_tasks = nu.shape[0], nu.shape[1]
  rows = [jnp.ones((num_tasks,), nu.dtype)]
  for l in reversed(range(num_layers)):
    picked = nu[l] * rows[0][:, None]  # [k, i]: child k uses parent i
    rows.insert(0, 1.0 - jnp.prod(1.0 - picked, axis=0))
  return jnp.stack(rows)


def active_tasks(preference: jax.Array, tau_factor: float = 0.6) -> jax.Array:
  """Boolean (N,): r_i >= tau = tau_factor / N."""
  return preference >= tau_factor / preference.shape[-1]


def depth_weights(num_layers: int, depth_factor: str = "paper") -> jax.Array:
  """The depth factor of each of the L parent choices (choice 0 feeds block layer 1).

  "paper": (L - l) / L with l = 1..L, so L - 1 .. 0 over L (the decoders' parents weigh 0:
  decoders stay task-specific, sharing is pushed into low layers first). "shifted" [ours,
  earlier default]: l = 0..L - 1, so 1 .. 1 / L.
  """
  if depth_factor not in DEPTH_FACTORS:
    raise ValueError(f"Unknown depth factor {depth_factor!r}; allowed: "
                     f"{', '.join(DEPTH_FACTORS)}.")
  l = jnp.arange(num_layers, dtype=jnp.float32) + (1.0 if depth_factor == "paper" else 0.0)
  return (num_layers - l) / num_layers


def branching_regularizer(nu: jax.Array, preference: jax.Array, resource: jax.Array,
                          affinity: jax.Array, lambda_active: float = 1.0,
                          lambda_inactive: float = 0.1, tau_factor: float = 0.6,
                          depth_factor: str = "paper", use_gradient: str = "stop"
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Omega = c lambda_A L_active + lambda_I L_inactive (module docstring).

  Args:
    nu: parent distributions (L, N, N), `nu[l][j]` those of node (l + 1, j).
    preference: r (N,).
    resource: c (scalar).
    affinity: A (N, N).
    lambda_active, lambda_inactive, tau_factor: see the module docstring.
    depth_factor: "paper" or "shifted" (`depth_weights`).
    use_gradient: "stop" (P_use is a usage weight, no gradient) or "flow".

  Returns:
    (Omega, {"l_active": ..., "l_inactive": ...}).
  """
  if use_gradient not in USE_GRADIENTS:
    raise ValueError(f"Unknown use_gradient {use_gradient!r}; allowed: "
                     f"{', '.join(USE_GRADIENTS)}.")
  num_layers, num_tasks = nu.shape[0], nu.shape[1]
  active = active_tasks(preference, tau_factor)
  # dist[l, i, j] = ||nu[l][i] - nu[l][j]||^2
  dist = jnp.sum(jnp.square(nu[:, :, None, :] - nu[:, None, :, :]), axis=-1)
  p_use = parent_use_probability(nu)[1:]  # children's usage, (L, N)
  if use_gradient == "stop":
    p_use = jax.lax.stop_gradient(p_use)
  depth = depth_weights(num_layers, depth_factor)
  pair = (active[:, None] & active[None, :] & ~jnp.eye(num_tasks, dtype=bool)).astype(
      jnp.float32)
  weights = (depth[:, None, None] * pair[None] * jnp.asarray(affinity, jnp.float32)[None]
             * p_use[:, :, None] * p_use[:, None, :])
  l_active = jnp.sum(weights * dist)
  # Each inactive task follows its nearest active task (A is never empty: max r >= 1/N).
  to_active = jnp.where(active[None, :, None], dist, jnp.inf)  # [l, i (active), j]
  nearest = jnp.min(to_active, axis=1)  # [l, j]
  l_inactive = jnp.sum(jnp.where(~active[None, :], nearest, 0.0))
  omega = resource * lambda_active * l_active + lambda_inactive * l_inactive
  return omega, {"l_active": l_active, "l_inactive": l_inactive}


# ----------------------------------------------------------------------------------------------
# Hypernetworks.


class ControlEmbedding(nn.Module):
  """p = sum_i r_i e_i + c e_c, with learned embeddings (dimension `features`)."""

  num_tasks: int
  features: int = 32

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    init = nn.initializers.normal(1.0)
    tasks = self.param("task_embeddings", init, (self.num_tasks, self.features), jnp.float32)
    res = self.param("resource_embedding", init, (self.features,), jnp.float32)
    preference = jnp.asarray(preference, jnp.float32)
    resource = jnp.asarray(resource, jnp.float32)
    return preference @ tasks + resource[..., None] * res


class EdgeHypernet(nn.Module):
  """h(r, c) -> parent logits (L, N, N): embedding, MLP, one N x N linear head per layer.

  Attributes:
    num_tasks: N.
    num_layers: L (parent choices per child stream).
    embedding_features: embedding dimension (32).
    hidden: widths of the MLP's hidden layers ((100, 100)).
    self_logit: initial bias of every child's own-stream parent logit [ours option, default
      0: uniform start].
  """

  num_tasks: int
  num_layers: int
  embedding_features: int = 32
  hidden: tuple[int, ...] = (100, 100)
  self_logit: float = 0.0

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    n = self.num_tasks
    x = ControlEmbedding(n, self.embedding_features, name="embedding")(preference, resource)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
    bias = self.self_logit * jnp.eye(n, dtype=jnp.float32).reshape(-1)
    heads = [nn.Dense(n * n, bias_init=lambda *_: bias, name=f"layer{l}")(x)
             for l in range(self.num_layers)]
    return jnp.stack(heads, axis=-2).reshape(*x.shape[:-1], self.num_layers, n, n)


class WeightHypernet(nn.Module):
  """g(r, c) -> one flat vector of batch-norm shifts: embedding, MLP, a zero-initialised head.

  Attributes:
    num_tasks: N.
    num_outputs: size of the flattened shift tree (`batch_norm_shift_template`).
    embedding_features: embedding dimension (32).
    hidden: widths of the MLP's hidden layers ((100, 100, 100)).
  """

  num_tasks: int
  num_outputs: int
  embedding_features: int = 32
  hidden: tuple[int, ...] = (100, 100, 100)

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    x = ControlEmbedding(self.num_tasks, self.embedding_features, name="embedding")(
        preference, resource)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name="shifts")(x)


def shift_unraveler(anchor_variables: PyTree):
  """(size of the flat shift vector, fn flat -> shift tree) for the anchor's batch norms."""
  template = branched.batch_norm_shift_template(anchor_variables)
  if not template:
    raise ValueError("The anchor has no batch norm, so the weight hypernetwork has nothing to "
                     "shift; build the branched network with batch norm.")
  flat, unravel = ravel_pytree(template)
  return int(flat.shape[0]), unravel


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
      tasks (stage "pretrain"; `trunk_variables`), then fine-tuned on its own task, so the
      streams stay close and a low-level cross-task edge is cheap; "shared" [ours], one random
      draw for every stream; "independent", a draw per stream.
    depth_factor: the regulariser's depth factor (`depth_weights`): "paper" or "shifted".
    use_gradient: "stop" (P_use is a usage weight) or "flow" (`branching_regularizer`).
    trunk_variables: the pretrained trunk's variables (stage "anchor" with
      anchor_init="trunk").
    anchor_variables: the trained anchor's variables (stages "edge" and "weight").
    edge_params: the trained edge hypernetwork's params (stage "weight").
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
  trunk_variables: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
  anchor_variables: Any = dataclasses.field(default=None, compare=False, hash=False,
                                            repr=False)
  edge_params: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
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

  def _require(self, what: str, value):
    if value is None:
      hint = {"trunk_variables": "the pretrained trunk's variables (stage 'pretrain')",
              "anchor_variables": "the trained anchor's variables (stage 'anchor')",
              "edge_params": "the trained edge hypernetwork's params (stage 'edge')"}[what]
      raise ValueError(f"DYMU stage {self.stage!r} needs {what}: {hint}.")
    return value

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
    images = batch["image"]
    if self.stage == "pretrain":
      return self.net.init(rng, images, "shared")
    if self.stage == "anchor":
      if self.anchor_init == "trunk":
        return streams_from_trunk(self._require("trunk_variables", self.trunk_variables))
      return self.net.init(rng, images, self.anchor_init)
    anchor = self._require("anchor_variables", self.anchor_variables)
    if self.stage == "edge" and self.affinity is None:
      raise ValueError("The edge stage needs the task affinity; compute it on the trained "
                       "anchor with dymu_jax.methods.affinity.task_affinity.")
    r = jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)
    c = jnp.zeros((), jnp.float32)
    if self.stage == "edge":
      edge = self.edge_hypernet().init(rng, r, c)["params"]
      return {"params": {"edge_hypernet": edge}, "anchor": anchor}
    edge = self._require("edge_params", self.edge_params)
    size, _ = shift_unraveler(anchor)
    weight = self.weight_hypernet(size).init(rng, r, c)["params"]
    return {"params": {"weight_hypernet": weight}, "anchor": anchor,
            "edge_hypernet": {"params": edge}}

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
# Before the edge stage: single-task losses of the anchor.


def anchor_task_losses(net: BranchedNet, anchor_variables: PyTree,
                       batches: Iterable[Mapping[str, Any]]) -> tuple[float, ...]:
  """Mean loss of every task's own stream over `batches` (dicts of images and labels).

  Batches may carry the evaluation padding mask (`data.base.VALID_KEY`); padded rows are
  dropped. Use `1 / loss` as the DYMU task weights [ours].
  """
  run = jax.jit(lambda v, x: net.apply_tree(v, x, net.separate_tree()))
  # Per task: a batch's mean loss is over its labelled examples, so it weighs by their number.
  totals, counts = np.zeros(net.num_tasks), np.zeros(net.num_tasks)
  for batch in batches:
    batch = dict(batch)
    if data_lib.VALID_KEY in batch:
      keep = np.asarray(batch.pop(data_lib.VALID_KEY), bool)
      batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    if not int(np.shape(batch["image"])[0]):
      continue
    predictions = run(anchor_variables, jnp.asarray(batch["image"], jnp.float32))
    for i, t in enumerate(net.tasks):
      present = float(np.sum(np.asarray(losses_lib.example_present(t, batch[t.name]))))
      if present:
        totals[i] += present * float(t.loss(predictions[t.name], jnp.asarray(batch[t.name])))
        counts[i] += present
  if not counts.any():
    raise ValueError("anchor_task_losses needs at least one non-empty batch.")
  missing = [t.name for t, c in zip(net.tasks, counts) if not c]
  if missing:
    raise ValueError(f"anchor_task_losses found no labelled example of task(s) "
                     f"{', '.join(missing)} in the batches, so their losses are undefined.")
  return tuple(float(x) for x in totals / counts)


def task_weights_from_losses(losses: Sequence[float], normalise: bool = True
                             ) -> tuple[float, ...]:
  """w_i = 1 / L_i^anchor [ours], scaled to mean 1 when `normalise` (the default).

  Normalising keeps the task term `sum_i r_i w_i L_i` near the scale of the anchor's losses
  relative to one another, so lambda_A and lambda_I keep the paper's meaning.
  """
  bad = [l for l in losses if not (math.isfinite(l) and l > 0)]
  if bad:
    raise ValueError(f"Single-task losses must be finite and > 0 to set the task weights, got "
                     f"{tuple(losses)}.")
  weights = [1.0 / float(l) for l in losses]
  if normalise:
    mean = sum(weights) / len(weights)
    weights = [w / mean for w in weights]
  return tuple(weights)


# ----------------------------------------------------------------------------------------------
# The anchor from a pretrained trunk, and what an anchor allows.


def streams_from_trunk(trunk_variables: Mapping[str, PyTree], stream: int = 0) -> dict:
  """Anchor variables whose every stream is a copy of the trunk's stream `stream`.

  `trunk_variables` are a pretrain stage's variables (stacked like any `BranchedNet`'s); the
  decoders are kept (each was trained on the shared trunk for its own task).
  """

  def copy(collection):
    out = {}
    for key, tree in collection.items():
      if key.startswith("block"):
        out[key] = jax.tree.map(
            lambda a: jnp.broadcast_to(a[stream:stream + 1], a.shape).copy(), tree)
      else:
        out[key] = tree
    return out

  return {col: copy(tree) for col, tree in trunk_variables.items()}


def stream_divergence(anchor_variables: Mapping[str, PyTree], num_layers: int
                      ) -> list[list[list[float]]]:
  """Per block layer, the (N, N) relative distances between the streams' parameters.

  d_l(i, j) = ||theta_i - theta_j|| / ((||theta_i|| + ||theta_j||) / 2) over every parameter
  of block l (batch-norm scales and biases included): 0 for copies, about 1.4 for independent
  draws of the same scale (sqrt 2). The anchor report prints it so a user sees whether the
  streams still correspond (a cross edge can only be cheap when it is small).
  """
  out = []
  for l in range(num_layers):
    leaves = jax.tree.leaves(anchor_variables["params"][f"block{l}"])
    flat = np.concatenate([np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in leaves],
                          axis=1)
    norms = np.linalg.norm(flat, axis=1)
    n = flat.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = np.linalg.norm(flat[i] - flat[j]) / max((norms[i] + norms[j]) / 2, 1e-12)
    out.append(d.tolist())
  return out


def probe_trees(num_layers: int, num_tasks: int) -> list[tuple[str, Tree]]:
  """(label, tree) of the anchor's cheapest moves away from the separate tree.

  One-edge changes: child j of parent choice l reads stream i (i != j), everything else
  separate. Prefix sharing: the nodes of block layers 0..k of every stream replaced by
  stream s's (a trunk shared up to block k, then the streams; k = L - 1 is one shared trunk).
  """
  separate = [list(range(num_tasks)) for _ in range(num_layers)]
  trees = []
  for l in range(num_layers):
    for j in range(num_tasks):
      for i in range(num_tasks):
        if i != j:
          parents = [row[:] for row in separate]
          parents[l][j] = i
          where = f"block {l + 1}" if l < num_layers - 1 else "decoder"
          trees.append((f"{where} of stream {j} reads stream {i}", Tree(parents)))
  for s in range(num_tasks):
    for k in range(num_layers):
      parents = [[s] * num_tasks if l <= k else list(range(num_tasks))
                 for l in range(num_layers)]
      label = (f"blocks 0-{k} shared (stream {s})" if k else f"block 0 shared (stream {s})")
      trees.append((label, Tree(parents)))
  return trees


# ----------------------------------------------------------------------------------------------
# Construction.

MODEL_OPTIONS = ("backbone", "backbone_kwargs", "head_width", "head_hidden_layers",
                 "head_batch_norm", "in_channels", "pixel_mean", "pixel_std", "bn_momentum")
OPTIONS = ("stage", "affinity", "lambda_active", "lambda_inactive", "tau_factor",
           "dirichlet_alpha", "initial_temperature", "temperature_decay", "temperature_every",
           "embedding_features", "edge_hidden", "weight_hidden", "self_logit", "anchor_init",
           "depth_factor", "use_gradient", "trunk_variables", "anchor_variables",
           "edge_params", "eval_resources")


def build(tasks: Sequence[tasks_lib.Task], *, model_options: Mapping[str, Any] | None = None,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> DymuMethod:
  """A `DymuMethod` whose `BranchedNet` is built from `model_options`.

  Args:
    tasks: the tasks.
    model_options: keyword arguments of `branched.build_branched` among `MODEL_OPTIONS`
      (backbone "lenet", "resnet_small" or "mlp", backbone_kwargs, head_width, ...).
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
