"""Pareto HyperNetworks: PHN and PHN-BN, the DYMU paper's baselines (METHODS.md section 1).

A preference-conditioned hypernetwork generates the weights of one shared multi-task network
(a `MultiTaskNet`, or any module `model(images, train=...) -> {task: prediction}`):

* **"all" (PHN) [known].** The hypernetwork outputs every parameter of the network. As in
  chunked hypernetworks, its output is produced in chunks: one shared linear head maps
  `[MLP(r); chunk embedding k]` to the k-th chunk of `chunk_size` values; the concatenated
  chunks are cut into the network's parameters [ours: chunk size 1024, chunk embeddings of
  dimension 32, MLP 2 x 100].
* **"bn" (PHN-BN) [known].** The hypernetwork outputs only the network's batch-norm scales
  and biases; every other parameter is shared and learned directly. Needs a network with batch
  norm (LeNet: `backbone_kwargs={"batch_norm": True}`).

Output scaling [ours]: a generated value is `offset + scale * raw`, with offset 1 for batch-norm
scales and 0 otherwise, and scale He's `sqrt(2 / fan_in)` for kernels and 0.1 for biases and
batch-norm parameters, so a fresh hypernetwork generates weights of the usual initial size.
In "bn" mode the output head starts at zero (scales 1, biases 0: the usual batch-norm start).

Training [known]: linear scalarisation `sum_i r_i w_i L_i` with one preference per batch,
r ~ Dirichlet(alpha 1_N), alpha = 0.2 (`controls.sample_controls`). Batch norm [ours]: batch
statistics in training, one set of running statistics shared by all preferences.

Controls: `{"preference": r}` (checked by `controls.check_preference`); None takes the uniform
preference.

Variables: "all": `{"params": {"hypernet": ...}, "batch_stats": ...}`; "bn": `{"params":
{"hypernet": ..., "network": <the network's params without batch-norm scales and biases>},
"batch_stats": ...}`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dymu_jax import controls as controls_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.methods import options as options_lib
from dymu_jax.models import branched

PyTree = Any
MODES = ("all", "bn")


class ChunkedHypernet(nn.Module):
  """r -> a flat vector of `num_outputs` values, generated `chunk_size` values at a time.

  Attributes:
    num_outputs: length of the generated vector.
    hidden: widths of the preference MLP.
    chunk_size: values per chunk (0: one linear head onto the whole vector).
    chunk_features: dimension of the learned chunk embeddings.
    zero_head: start the output head at zero.
  """

  num_outputs: int
  hidden: tuple[int, ...] = (100, 100)
  chunk_size: int = 1024
  chunk_features: int = 32
  zero_head: bool = False

  @nn.compact
  def __call__(self, preference: jax.Array) -> jax.Array:
    x = jnp.asarray(preference, jnp.float32)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
    head_init = nn.initializers.zeros if self.zero_head else nn.initializers.lecun_normal()
    if not self.chunk_size or self.chunk_size >= self.num_outputs:
      return nn.Dense(self.num_outputs, kernel_init=head_init, name="head")(x)
    num_chunks = -(-self.num_outputs // self.chunk_size)
    embeddings = self.param("chunk_embeddings", nn.initializers.normal(1.0),
                            (num_chunks, self.chunk_features), jnp.float32)
    inputs = jnp.concatenate(
        [jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], num_chunks, x.shape[-1])),
         jnp.broadcast_to(embeddings, (*x.shape[:-1], *embeddings.shape))], axis=-1)
    chunks = nn.Dense(self.chunk_size, kernel_init=head_init, name="head")(inputs)
    return chunks.reshape(*x.shape[:-1], -1)[..., :self.num_outputs]


def _split(params: Mapping[str, PyTree], paths: Sequence[tuple[str, ...]]):
  """(the batch-norm scale/bias subtree at `paths`, the rest of `params`)."""
  selected: dict = {}
  rest = _copy_dicts(params)
  for path in paths:
    source, target = rest, selected
    for key in path[:-1]:
      source = source[key]
      target = target.setdefault(key, {})
    norm = dict(source[path[-1]])
    target[path[-1]] = {k: norm.pop(k) for k in ("scale", "bias") if k in norm}
    if norm:
      source[path[-1]] = norm
    else:
      del source[path[-1]]
  return selected, rest


def _copy_dicts(tree):
  """A copy of the nested dicts (leaves shared), safe to edit in place."""
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _merge(a: Mapping[str, PyTree], b: Mapping[str, PyTree]) -> dict:
  """Nested dict union (b's leaves where both have a key)."""
  out = dict(a)
  for key, value in b.items():
    if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def _offsets_and_scales(template: PyTree, bn_paths: Sequence[tuple[str, ...]]):
  """Flat (offset, scale) vectors of the generated values (module docstring)."""
  norms = {tuple(p) for p in bn_paths}

  def leaf_values(path, leaf):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    name, owner = keys[-1], keys[:-1]
    shape = jnp.shape(leaf)
    if owner in norms:
      offset, scale = (1.0 if name == "scale" else 0.0), 0.1
    elif name == "kernel" and len(shape) >= 2:
      offset, scale = 0.0, math.sqrt(2.0 / max(1, int(np.prod(shape[:-1]))))
    else:
      offset, scale = 0.0, 0.1
    return (jnp.full(shape, offset, jnp.float32), jnp.full(shape, scale, jnp.float32))

  pairs = jax.tree_util.tree_map_with_path(leaf_values, template)
  offsets = jax.tree.map(lambda p: p[0], pairs, is_leaf=lambda x: isinstance(x, tuple))
  scales = jax.tree.map(lambda p: p[1], pairs, is_leaf=lambda x: isinstance(x, tuple))
  return ravel_pytree(offsets)[0], ravel_pytree(scales)[0]


@dataclasses.dataclass(frozen=True)
class PHNMethod(base.MethodBase):
  """PHN ("all") or PHN-BN ("bn") on one shared network (module docstring).

  Attributes:
    tasks: the tasks, in preference order.
    model: the shared network, `model(images, train=...) -> {task name: prediction}`.
    mode: "all" (PHN) or "bn" (PHN-BN).
    task_weights: w_i (default 1 each).
    dirichlet_alpha: preferences are drawn from Dirichlet(alpha 1_N).
    hidden: widths of the hypernetwork's preference MLP.
    chunk_size: generated values per chunk (0: no chunking).
    chunk_features: dimension of the chunk embeddings.
    name: the method name in logs ("phn" or "phn_bn").
    axis_name: the pmap axis the network's batch norms pool over.
  """

  tasks: tuple[tasks_lib.Task, ...]
  model: nn.Module
  mode: str = "all"
  task_weights: tuple[float, ...] | None = None
  dirichlet_alpha: float = 0.2
  hidden: tuple[int, ...] = (100, 100)
  chunk_size: int = 1024
  chunk_features: int = 32
  name: str = "phn"
  axis_name: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    if self.mode not in MODES:
      raise ValueError(f"Unknown PHN mode {self.mode!r}; allowed: {', '.join(MODES)}.")
    if self.task_weights is not None:
      weights = tuple(float(w) for w in self.task_weights)
      if len(weights) != len(self.tasks):
        raise ValueError(f"Got {len(weights)} task weights for {len(self.tasks)} tasks; give "
                         f"one weight per task.")
      object.__setattr__(self, "task_weights", weights)
    if not self.dirichlet_alpha > 0:
      raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha!r}.")
    if self.chunk_size < 0 or self.chunk_features < 1:
      raise ValueError(f"chunk_size must be >= 0 and chunk_features >= 1, got "
                       f"{self.chunk_size!r} and {self.chunk_features!r}.")
    object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  # -- generation ------------------------------------------------------------------------------

  def network_shapes(self, image_shape: Sequence[int]) -> PyTree:
    """The shared network's variables as shapes, for images of shape (H, W, C)."""
    return _network_shapes(self.model, tuple(int(d) for d in image_shape))

  def generated_template(self, image_shape: Sequence[int]):
    """(shapes of the generated params, the network's batch-norm paths)."""
    shapes = self.network_shapes(image_shape)
    paths = branched.batch_norm_paths(shapes)
    if self.mode == "all":
      return shapes["params"], paths
    if not paths:
      raise ValueError("PHN-BN generates batch-norm parameters, but the network has no batch "
                       "norm; build it with batch norm (LeNet: batch_norm=True).")
    return _split(shapes["params"], paths)[0], paths

  def hypernet(self, num_outputs: int) -> ChunkedHypernet:
    return ChunkedHypernet(num_outputs, self.hidden, self.chunk_size, self.chunk_features,
                           zero_head=self.mode == "bn")

  def network_params(self, params: Mapping[str, PyTree], image_shape: Sequence[int],
                     preference) -> PyTree:
    """The shared network's params for preference r: generated (and, for PHN-BN, merged with
    the directly learned ones)."""
    template, paths = self.generated_template(image_shape)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), template)
    flat, unravel = ravel_pytree(zeros)
    offsets, scales = _offsets_and_scales(zeros, paths)
    raw = self.hypernet(int(flat.shape[0])).apply({"params": params["hypernet"]}, preference)
    generated = unravel(offsets + scales * raw)
    return generated if self.mode == "all" else _merge(params["network"], generated)

  # -- the Method interface --------------------------------------------------------------------

  def load_pretrained(self, variables: PyTree, path: str) -> PyTree:
    """Refused: the hypernetwork generates the network's weights (PHN-BN: its batch norms)."""
    del variables, path
    raise ValueError(f"{self.name} generates its network's weights with a hypernetwork, so it "
                     f"cannot start from a pretrained backbone; train it from random "
                     f"initialisation.")

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    image_shape = tuple(batch["image"].shape[1:])
    template, paths = self.generated_template(image_shape)  # abstract: fails fast
    model_key, hyper_key = jax.random.split(rng)
    network = self.model.init(model_key, jnp.zeros((1, *image_shape), jnp.float32),
                              train=False)
    size = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(template))
    uniform = jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)
    params = {"hypernet": self.hypernet(size).init(hyper_key, uniform)["params"]}
    if self.mode == "bn":
      params["network"] = _split(network["params"], paths)[1]
    return {"params": params, **{k: v for k, v in network.items() if k != "params"}}

  def _weights(self) -> tuple[float, ...]:
    return self.task_weights or (1.0,) * self.num_tasks

  def loss(self, params, model_state, batch, rng, step):
    """Linear scalarisation for one preference per batch: sum_i r_i w_i L_i."""
    del step
    r, _ = controls_lib.sample_controls(rng, self.num_tasks, self.dirichlet_alpha)
    images = batch["image"]
    network = self.network_params(params, images.shape[1:], r)
    predictions, new_state = self.model.apply({"params": network, **model_state}, images,
                                              train=True, mutable=list(model_state))
    losses = {t.name: t.loss(predictions[t.name], batch[t.name]) for t in self.tasks}
    total = sum(r[i] * w * losses[t.name]
                for i, (w, t) in enumerate(zip(self._weights(), self.tasks)))
    aux = {f"loss/{name}": value for name, value in losses.items()}
    return total, (aux, {**model_state, **new_state})

  def predict(self, variables, images, controls=None):
    """Predictions of the network generated for `{"preference": r}` (None: uniform)."""
    if controls:
      controls = dict(controls)
      if set(controls) != {"preference"}:
        raise ValueError(f"PHN controls must be {{'preference': r}}, got keys "
                         f"{sorted(controls)}.")
      r = controls_lib.check_preference(controls["preference"], self.num_tasks).astype(
          np.float32)
    else:
      r = np.full((self.num_tasks,), 1.0 / self.num_tasks, np.float32)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    network = self.network_params(params, images.shape[1:], jnp.asarray(r))
    return self.model.apply({"params": network, **state}, images, train=False)

  def eval_controls(self):
    """The uniform preference."""
    return [{"preference": tuple([1.0 / self.num_tasks] * self.num_tasks)}]

  def control_space(self) -> base.ControlSpace:
    return base.ControlSpace(("preference",))

  def deploy(self, variables, controls=None, prepared=None, *, image_shape,
             standalone: bool = True) -> base.Deployed:
    """The shared network with the weights generated for the preference (default uniform)."""
    del prepared, standalone  # one form: the generated network exports as it is
    controls = self.control_space().check(controls)
    r = controls_lib.check_preference(
        controls.get("preference", np.full(self.num_tasks, 1.0 / self.num_tasks)),
        self.num_tasks).astype(np.float32)
    image_shape = tuple(int(d) for d in image_shape)
    state = {k: v for k, v in variables.items() if k != "params"}
    network = _generate(self, variables["params"], image_shape, jnp.asarray(r, jnp.float32))
    preference = tuple(float(x) for x in r)
    return base.Deployed(self.model, {"params": network, **state}, image_shape,
                         {"preference": preference}, key=(self.name, preference))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _generate(method: PHNMethod, params, image_shape: tuple[int, ...], preference):
  return method.network_params(params, image_shape, preference)


@functools.lru_cache(maxsize=64)
def _network_shapes(model: nn.Module, image_shape: tuple[int, ...]) -> PyTree:
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(lambda a: model.init(jax.random.key(0), a, train=False), x)


@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """PHN's and PHN-BN's options; flags `--phn_<field>`."""

  PREFIX: ClassVar[str] = "phn"
  TITLE: ClassVar[str] = "PHN and PHN-BN"

  dirichlet_alpha: float = options_lib.option(
      0.2, "Training preferences are drawn from Dirichlet(alpha 1_N).", low=0, open_low=True)
  hidden: tuple[int, ...] = options_lib.option(
      (100, 100), "Hidden widths of the hypernetwork's preference MLP.", low=1)
  chunk_size: int = options_lib.option(
      1024, "Generated values per chunk (0: one head for all values).", low=0)
  chunk_features: int = options_lib.option(
      32, "Dimension of the learned chunk embeddings.", low=1)


OPTIONS = tuple(f.name for f in Config.fields())


def build(tasks: Sequence[tasks_lib.Task], make_net, *, mode: str = "all",
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> PHNMethod:
  """A `PHNMethod`; `make_net(tasks)` builds the shared network (e.g. a `MultiTaskNet`).

  Args:
    tasks: the tasks.
    make_net: builds the shared network from the task tuple.
    mode: "all" (PHN) or "bn" (PHN-BN).
    task_weights: w_i.
    axis_name: the pmap axis the network's batch norms pool over.
    **options: `PHNMethod` fields among `OPTIONS`.
  """
  options = Config.from_options(options).options()
  tasks = tuple(tasks)
  return PHNMethod(tasks, make_net(tasks), mode,
                   tuple(task_weights) if task_weights else None,
                   name="phn" if mode == "all" else "phn_bn", axis_name=axis_name, **options)
