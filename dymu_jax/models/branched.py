"""Branched multi-task networks: N single-task streams cut into L blocks (the DYMU anchor).

(Over 500 lines: trees, the network's two forward passes, its cost and its batch-norm shifts
are one value and its uses; the blocks and decoders live in `branched_blocks`.)

METHODS.md section 1. The anchor is N single-task networks of one architecture, one stream per
task, each cut into L blocks; node (l, j) is block l of stream j. Every node of block layer
l + 1 (and every task decoder, which is node layer L) takes its input from one parent among the
N nodes of block layer l; the nodes of block layer 0 all read the image. A tree is therefore L
tuples of N parent indices:

  parents[l][j] = the node of block layer l that feeds node (l + 1, j)   (l = 0 .. L - 2)
  parents[L - 1][j] = the node of the last block layer that feeds task decoder j

so there are L parent choices per child stream, matching the edge hypernetwork's L heads of
N x N logits. `Tree.separate` (parents[l][j] = j) is the anchor itself; `Tree.shared` sends every
child to one stream (a fully shared trunk, then N decoders).

Inputs follow the block stack (`BranchedNet.input_kind`): images (B, H, W, C) in [0, 1],
normalised inside (`pixel_mean`, `pixel_std`), or, for the "mlp" stack, feature vectors (B, D),
used as given (the arrays source standardises them with training-split statistics), as
`models.multitask` does. "Images" below means either.

JAX shape [ours]: block parameters of the N streams are stacked on a leading axis of size N,
and a layer maps stacked inputs to stacked outputs, `Y[l + 1] = vmap(block_{l + 1})(params_{l +
1}, X[l + 1])` in meaning. It is computed as one block call per stream, stacked (`_run_layer`):
the same values, but XLA's CPU backend runs a vmapped convolution (a grouped convolution)
several times slower than N separate ones. Two forward passes:

* `apply_soft(variables, images, nu)`, the training relaxation:
  `X[l + 1][j] = sum_i nu[l][j, i] * Y[l][i]`, `Y[l + 1] = block_{l + 1}(params_{l + 1},
  X[l + 1])` per stream, and decoder j reads `sum_i nu[L - 1][j, i] * Y[L - 1][i]`. Every node
  computes.
* `apply_tree(variables, images, tree)`, inference on a static, hashable `Tree`: only the nodes
  that some decoder depends on are computed (their parameters are gathered from the stack),
  which is where the compute saving is real. With a one-hot `nu` both passes agree.

Variables: `{"params": {"block0": stacked, ..., "head_<task>": ...}, "batch_stats":
{"block0": stacked, ...}}`; every leaf under "block<l>" has the leading stream axis N. Task
decoders are per task (their output sizes differ) and never stacked.

Block stacks (`build_branched`; the blocks and decoders live in `models.branched_blocks`,
whose names are re-exported here):

* "lenet" (Multi-MNIST, the PHN target network with batch norm): conv 10@9x9 + BN + ReLU + 2x2
  pool | conv 20@5x5 + BN + ReLU + 2x2 pool | dense 50 + BN + ReLU; decoders are linear (L = 3).
* "resnet_small" (UTKFace, synthetic scenes): stage 1 = 3x3 stem + BasicBlocks (16 ch), stages
  2-4 = BasicBlocks (32, 64, 128 ch, stride 2), the ResNet-small of `backbones` (L = 4);
  `output_stride` (backbone option) dilates the last stages instead of striding, as there.
* "resnet18": stage 1 = 7x7/2 stem + 3x3/2 max pool + 2 BasicBlocks (64 ch), stages 2-4 = 2
  BasicBlocks (128, 256, 512 ch, stride 2; `output_stride` 8 or 16 dilates), `backbones.ResNet18`
  with its parameter names per stage (L = 4), so `load_pretrained_streams` starts every stream
  from one torchvision ResNet-18 (the paper's recipe).
* "mobilenet_v2" (the paper's PASCAL-Context backbone): `backbones.MobileNetV2`'s
  inverted-residual blocks grouped by resolution, stage 1 = 3x3/2 stem + rows 0-1 (24 ch, /4),
  stage 2 = row 2 (32 ch, /8), stage 3 = rows 3-4 (96 ch, /16), stage 4 = rows 5-6 + the last
  1x1 conv (1280 ch, /32) (L = 4; `stage_rows` regroups them, `output_stride` 8 or 16
  dilates), with the backbone's parameter names, so `load_pretrained_streams` starts every
  stream from one torchvision MobileNetV2.
* "mlp" (tabular data, feature vectors): one `MLPBlock` per hidden layer, dense + BN + ReLU
  (256, 256 units by default; He initialisation, as the `backbones.MLP` encoder); decoders are
  MLP heads with one hidden layer (L = number of hidden layers).

Decoders: classification and regression tasks get MLP heads (global pooling of maps; linear on
lenet, one hidden layer on the others). Dense tasks (segmentation, depth, normals, edges; on
the ResNet and MobileNetV2 stacks, `DENSE_BACKBONES`) get the DeepLabv3-style
`decoders.DenseHead` with `build_multitask`'s defaults (hidden width 256 unless head_width is
given, the backbone's atrous rates, image pooling): it reads the parent stream's last-stage map and upsamples its prediction to the
image size, so a stream and its head are the static network's encoder and head. Dense and other
tasks mix freely.

Batch norm sits in every block (unless the stack's option `batch_norm` is off) so that the
weight hypernetwork has scales and biases to shift (`batch_norm_shift_template`,
`apply_batch_norm_shifts`); dense heads have batch norm in every layer but the classifier, and
with `head_batch_norm` the MLP heads' hidden layers have it too (the paper's DeepLab decoders
do): decoder batch norms are shifted as well.

Cost (`tree_cost`): parameters and MACs of the used nodes and the decoders (per example, the
conventions of `models.cost`: a dense head's bilinear upsampling is elementwise, not MACs), and
their fraction of the full anchor (the separate tree). All streams share one architecture, so a
node's cost depends on its layer only. The input shape is one example's: (H, W, C) of an image,
or (D,) of a feature vector.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones
from dymu_jax.models import cost as cost_lib
from dymu_jax.models import pretrained
from dymu_jax.models.branched_blocks import (
    BACKBONES, DEFAULT_DENSE_HEAD_WIDTH, DEFAULT_HEAD_HIDDEN_LAYERS, DEFAULT_HEAD_WIDTH,
    DENSE_BACKBONES, MOBILENET_V2_STREAM_STAGE_ROWS, STACKS, ConvPoolBlock, DenseBlock,
    MLPBlock, MobileNetV2Stage, ResNetStage, lenet_blocks, mlp_blocks, mobilenet_v2_blocks,
    resnet18_blocks, resnet_small_blocks, stack_blocks, stack_name, task_decoders)
from dymu_jax.models.decoders import DenseHead
from dymu_jax.models.multitask import normalise_images

# The blocks and stacks of `branched_blocks` are re-exported, so `branched.<name>` keeps working.
__all__ = [
    "BACKBONES", "DEFAULT_DENSE_HEAD_WIDTH", "DEFAULT_HEAD_HIDDEN_LAYERS", "DEFAULT_HEAD_WIDTH",
    "DENSE_BACKBONES", "MOBILENET_V2_STREAM_STAGE_ROWS", "PRETRAINED_STACKS", "STACKS",
    "STREAM_INITS", "BranchedNet", "ConvPoolBlock", "DenseBlock", "MLPBlock", "MobileNetV2Stage",
    "ResNetStage", "Tree", "TreeCost", "TreeNetwork", "apply_batch_norm_shifts",
    "batch_norm_paths", "batch_norm_shift_template", "build_branched", "lenet_blocks",
    "load_pretrained_streams", "mlp_blocks", "mobilenet_v2_blocks", "resnet18_blocks",
    "resnet_small_blocks", "stack_blocks", "stack_name", "task_decoders",
]

PyTree = Any
# How the N streams' block weights start (`BranchedNet.init`).
STREAM_INITS = ("independent", "shared")
# The stacks whose one stream is a torchvision backbone (`load_pretrained_streams`): each has
# its `backbones` twin's parameter names, under the same name in `pretrained`.
PRETRAINED_STACKS = tuple(s for s in BACKBONES if s in pretrained.PRETRAINED_BACKBONES)


# ----------------------------------------------------------------------------------------------
# Trees.


def _check_index(value, num_tasks: int, where: str) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{where} must be an integer stream index, got {value!r}.")
  if not 0 <= value < num_tasks:
    raise ValueError(f"{where} is {value}, but a parent index must lie in [0, {num_tasks}).")
  return int(value)


@dataclasses.dataclass(frozen=True)
class Tree:
  """A tree-structured multi-task network as the parent of every child node (static, hashable).

  Attributes:
    parents: L tuples of N ints; `parents[l][j]` is the node of block layer l that feeds node
      (l + 1, j), and `parents[L - 1][j]` the last-layer node that feeds task decoder j.
  """

  parents: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    try:
      rows = tuple(tuple(row) for row in self.parents)
    except TypeError:
      raise ValueError(f"A tree is a sequence of per-layer tuples of parent indices, got "
                       f"{self.parents!r}.") from None
    if not rows or not rows[0]:
      raise ValueError(f"A tree needs at least one layer and one stream, got {self.parents!r}.")
    num_tasks = len(rows[0])
    if any(len(row) != num_tasks for row in rows):
      raise ValueError(f"Every layer of a tree needs one parent per stream ({num_tasks}), got "
                       f"{self.parents!r}.")
    rows = tuple(tuple(_check_index(p, num_tasks, f"parents[{l}][{j}]")
                       for j, p in enumerate(row)) for l, row in enumerate(rows))
    object.__setattr__(self, "parents", rows)

  @property
  def num_layers(self) -> int:
    return len(self.parents)

  @property
  def num_tasks(self) -> int:
    return len(self.parents[0])

  @classmethod
  def separate(cls, num_layers: int, num_tasks: int) -> Tree:
    """Every stream on its own (the anchor): parents[l][j] = j."""
    return cls(tuple(tuple(range(num_tasks)) for _ in range(num_layers)))

  @classmethod
  def shared(cls, num_layers: int, num_tasks: int, stream: int = 0) -> Tree:
    """One shared trunk (stream `stream`'s blocks), then the N task decoders."""
    _check_index(stream, num_tasks, "stream")
    return cls(tuple((stream,) * num_tasks for _ in range(num_layers)))

  @classmethod
  def from_scores(cls, scores) -> Tree:
    """The argmax tree of parent scores (L, N, N): logits, probabilities or sampled `nu`."""
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[1] != scores.shape[2]:
      raise ValueError(f"Parent scores must have shape (layers, tasks, tasks), got "
                       f"{scores.shape}.")
    return cls(tuple(tuple(int(i) for i in row) for row in np.argmax(scores, axis=-1)))

  def validate(self, num_layers: int, num_tasks: int) -> Tree:
    if (self.num_layers, self.num_tasks) != (num_layers, num_tasks):
      raise ValueError(
          f"This network has {num_layers} layers of {num_tasks} streams, but the tree has "
          f"{self.num_layers} layers of {self.num_tasks}: {self.parents}.")
    return self

  def used_nodes(self) -> tuple[tuple[int, ...], ...]:
    """For each block layer 0..L-1, the sorted streams whose node some decoder depends on."""
    used = [()] * self.num_layers
    children = range(self.num_tasks)  # the decoders
    for l in reversed(range(self.num_layers)):
      used[l] = tuple(sorted({self.parents[l][k] for k in children}))
      children = used[l]
    return tuple(used)

  def num_used_nodes(self) -> int:
    return sum(len(u) for u in self.used_nodes())

  def one_hot(self) -> np.ndarray:
    """The tree as parent distributions nu (L, N, N), one-hot rows."""
    return np.eye(self.num_tasks, dtype=np.float32)[np.asarray(self.parents)]

  def __str__(self) -> str:
    return " | ".join(",".join(str(p) for p in row) for row in self.parents)


# ----------------------------------------------------------------------------------------------
# The branched network.


def _tree_take(tree: PyTree, index: Sequence[int], size: int) -> PyTree:
  """Rows `index` of every stacked leaf (no gather when it is all rows in order)."""
  index = tuple(index)
  if index == tuple(range(size)):
    return tree
  if len(index) == 1:
    return jax.tree.map(lambda a: a[index[0]:index[0] + 1], tree)
  rows = np.asarray(index)
  return jax.tree.map(lambda a: a[rows], tree)


def _mix(nu_layer: jax.Array, y: jax.Array) -> jax.Array:
  """X[j] = sum_i nu[j, i] Y[i] over the leading stream axis (full float32 precision)."""
  return jnp.einsum("ji,i...->j...", nu_layer.astype(y.dtype), y,
                    precision=jax.lax.Precision.HIGHEST)


@dataclasses.dataclass(frozen=True)
class TreeCost:
  """Per-example MACs and used parameters of a tree, and of the full anchor (separate tree)."""

  macs: int
  params: int
  full_macs: int
  full_params: int

  @property
  def macs_fraction(self) -> float:
    return self.macs / self.full_macs

  @property
  def params_fraction(self) -> float:
    return self.params / self.full_params


@dataclasses.dataclass(frozen=True)
class BranchedNet:
  """N stacked single-task streams of L blocks, with one decoder per task.

  A frozen, hashable value (usable as a static argument of `jax.jit`); its parameters live in
  an explicit variables pytree (module docstring).

  Attributes:
    tasks: the tasks, one stream and one decoder each, in stream order.
    blocks: one stream's block module per layer, `block(x, train=...) -> y`.
    heads: one decoder module per task, `head(x, train=...) -> prediction`; a
      `DenseHead` also gets `out_size`, the image's (H, W).
    pixel_mean, pixel_std: per-channel normalisation of the [0, 1] images; None takes the
      ImageNet statistics for 3-channel images and 0.5 / 0.5 otherwise (as `MultiTaskNet`).
      Feature vectors are used as given: leave them unset.
  """

  tasks: tuple[tasks_lib.Task, ...]
  blocks: tuple[nn.Module, ...]
  heads: tuple[nn.Module, ...]
  pixel_mean: tuple[float, ...] | None = None
  pixel_std: tuple[float, ...] | None = None
  # `build_branched`'s options as (name, value) pairs (backbone_kwargs as pairs too), so that
  # an exported tree (`models.serialize`) rebuilds the same blocks; () for a net built by hand.
  build_options: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False)

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "blocks", tuple(self.blocks))
    object.__setattr__(self, "heads", tuple(self.heads))
    if not self.tasks:
      raise ValueError("A branched network needs at least one task.")
    if not self.blocks:
      raise ValueError("A branched network needs at least one block layer.")
    if len(self.heads) != len(self.tasks):
      raise ValueError(f"Got {len(self.heads)} decoders for {len(self.tasks)} tasks; give one "
                       f"decoder per task.")

  @property
  def num_layers(self) -> int:
    return len(self.blocks)

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  @property
  def stack(self) -> str:
    """Which block stack this is (a name of `BACKBONES`)."""
    return stack_name(self.blocks)

  @property
  def input_kind(self) -> str:
    """`backbones.VECTORS` for the "mlp" stack (feature vectors), else `backbones.IMAGES`."""
    return backbones.input_kind(self.stack)

  @property
  def min_image_size(self) -> int:
    """The smallest image side the block stack accepts: LeNet's valid convolutions and pools
    need 20 px with their default kernels; the padded ResNet stages any size; the "mlp" stack
    takes no images, 1 (as `backbones.MLP`), so that image-size checks pass."""
    kernels = [b.kernel_size for b in self.blocks if isinstance(b, ConvPoolBlock)]
    return (backbones.lenet_min_image_size(kernels) if kernels
            else backbones.PADDED_MIN_IMAGE_SIZE)

  def separate_tree(self) -> Tree:
    return Tree.separate(self.num_layers, self.num_tasks)

  def shared_tree(self, stream: int = 0) -> Tree:
    return Tree.shared(self.num_layers, self.num_tasks, stream)

  # -- helpers ---------------------------------------------------------------------------------

  def _normalise(self, images: jax.Array) -> jax.Array:
    """Images normalised per channel; feature vectors (the "mlp" stack) as given."""
    stack = self.stack
    if self.input_kind == backbones.VECTORS:
      backbones.check_input_kind("BranchedNet", stack, images.shape)
      return normalise_images(images, self.pixel_mean, self.pixel_std)  # raises on pixel stats
    if images.ndim != 4:
      raise ValueError(f"BranchedNet expects images of shape (B, H, W, C), got "
                       f"{tuple(images.shape)}.")
    backbones.check_image_size(f"BranchedNet ({stack} blocks)", self.min_image_size,
                               images.shape)
    return normalise_images(images, self.pixel_mean, self.pixel_std)

  def _block_variables(self, variables: Mapping[str, PyTree], layer: int) -> dict:
    key = f"block{layer}"
    return {col: tree[key] for col, tree in variables.items() if key in tree}

  def _head_variables(self, variables: Mapping[str, PyTree], task: int) -> dict:
    key = f"head_{self.tasks[task].name}"
    return {col: tree[key] for col, tree in variables.items() if key in tree}

  def _check_variables(self, variables: Mapping[str, PyTree]):
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    for l in range(self.num_layers):
      leaves = jax.tree.leaves(params.get(f"block{l}", {}))
      if not leaves:
        raise ValueError(f"The variables have no params for block{l}; initialise them with "
                         f"this network's init.")
      if leaves[0].shape[0] != self.num_tasks:
        raise ValueError(f"block{l}'s parameters are stacked for {leaves[0].shape[0]} streams "
                         f"but the network has {self.num_tasks} tasks.")

  def _run_layer(self, layer: int, block_variables: dict, inputs: jax.Array,
                 in_axis: int | None, train: bool):
    """One block over stacked variables (and stacked inputs when in_axis is 0).

    Each stream's block runs as its own call and the outputs are stacked: the same values as a
    `jax.vmap` over the stream axis, but a vmapped convolution becomes a grouped convolution,
    which XLA's CPU backend runs several times slower than the separate ones (and which misses
    the fast lowerings of `fast_ops`); N is small (one stream per task).
    """
    block = self.blocks[layer]
    has_stats = "batch_stats" in block_variables
    count = jax.tree.leaves(block_variables)[0].shape[0]
    outputs, states = [], []
    for j in range(count):
      v = jax.tree.map(lambda a, j=j: a[j], block_variables)
      x = inputs if in_axis is None else inputs[j]
      if train and has_stats:
        y, state = block.apply(v, x, train=True, mutable=["batch_stats"])
        states.append(state["batch_stats"])
      else:
        y = block.apply(v, x, train=train)
      outputs.append(y)
    stacked = jnp.stack(outputs)
    if not states:
      return stacked, None
    return stacked, jax.tree.map(lambda *a: jnp.stack(a), *states)

  def _decode(self, variables, inputs: Sequence[jax.Array], images: jax.Array, train: bool
              ) -> tuple[dict, dict]:
    """({task: prediction}, {"head_<task>": updated batch stats} of decoders with batch norm);
    dense heads upsample to the images' (H, W)."""
    predictions, stats = {}, {}
    for j, task in enumerate(self.tasks):
      head_variables = self._head_variables(variables, j)
      head = self.heads[j]
      kwargs = ({"out_size": tuple(images.shape[1:3])} if isinstance(head, DenseHead) else {})
      if train and "batch_stats" in head_variables:
        y, state = head.apply(head_variables, inputs[j], train=True, mutable=["batch_stats"],
                              **kwargs)
        stats[f"head_{task.name}"] = state["batch_stats"]
      else:
        y = head.apply(head_variables, inputs[j], train=train, **kwargs)
      predictions[task.name] = y
    return predictions, stats

  # -- initialisation --------------------------------------------------------------------------

  def init(self, rng: jax.Array, images: jax.Array, stream_init: str = "independent") -> dict:
    """Variables for images (B, H, W, C) (feature vectors (B, D) for the "mlp" stack).

    Args:
      rng: the key.
      images: example images or feature vectors (only their shape is read).
      stream_init: "independent", each stream draws its own initial block weights; or
        "shared", every stream starts from one draw, as when the streams fine-tune one
        pretrained backbone, so that channel k means the same thing in every stream at the
        start and a cross-stream parent feeds a child features it can read. Decoders always
        draw their own.
    """
    if stream_init not in STREAM_INITS:
      raise ValueError(f"Unknown stream_init {stream_init!r}; allowed: "
                       f"{', '.join(STREAM_INITS)}.")
    x = jax.ShapeDtypeStruct(self._normalise(jnp.zeros((1, *images.shape[1:]))).shape,
                             jnp.float32)
    keys = jax.random.split(rng, self.num_layers + self.num_tasks)
    collections: dict[str, dict] = {}
    for l, block in enumerate(self.blocks):
      if stream_init == "shared":
        stream_keys = jnp.stack([keys[l]] * self.num_tasks)
      else:
        stream_keys = jax.random.split(keys[l], self.num_tasks)
      stacked = jax.vmap(lambda k, b=block, s=x: b.init(k, jnp.zeros(s.shape), train=False))(
          stream_keys)
      for col, tree in stacked.items():
        collections.setdefault(col, {})[f"block{l}"] = tree
      x = jax.eval_shape(lambda s, b=block: b.init_with_output(
          jax.random.key(0), jnp.zeros(s.shape), train=False)[0], x)
    for j, (task, head) in enumerate(zip(self.tasks, self.heads)):
      variables = head.init(keys[self.num_layers + j], jnp.zeros(x.shape), train=False)
      for col, tree in variables.items():
        collections.setdefault(col, {})[f"head_{task.name}"] = tree
    return collections

  # -- forward passes --------------------------------------------------------------------------

  def apply_soft(self, variables: Mapping[str, PyTree], images: jax.Array, nu: jax.Array, *,
                 train: bool = False, return_features: bool = False):
    """Every node computes; children read the nu-weighted sum of the parent layer.

    Args:
      variables: the network's variables (see the module docstring).
      images: float images (B, H, W, C) in [0, 1], or feature vectors (B, D) ("mlp").
      nu: parent distributions (L, N, N); `nu[l][j]` weighs the parents of node (l + 1, j)
        (of decoder j for l = L - 1). Rows are used as given (no check inside jit).
      train: batch statistics in batch norm; the updated statistics are returned.
      return_features: also return the block outputs, one (N, B, ...) array per layer.

    Returns:
      {task name: prediction}; with `train`, (predictions, {"batch_stats": ...}); with
      `return_features`, the features are appended to the returned tuple.
    """
    self._check_variables(variables)
    nu = jnp.asarray(nu)
    expected = (self.num_layers, self.num_tasks, self.num_tasks)
    if nu.shape != expected:
      raise ValueError(f"nu must have shape (layers, tasks, tasks) = {expected}, got "
                       f"{tuple(nu.shape)}.")
    x = self._normalise(images)
    features, new_stats = [], {}
    y = None
    for l in range(self.num_layers):
      inputs, in_axis = (x, None) if l == 0 else (_mix(nu[l - 1], y), 0)
      y, stats = self._run_layer(l, self._block_variables(variables, l), inputs, in_axis,
                                 train)
      if stats is not None:
        new_stats[f"block{l}"] = stats
      features.append(y)
    predictions, head_stats = self._decode(variables, _mix(nu[-1], y), images, train)
    new_stats.update(head_stats)
    return self._outputs(variables, predictions, new_stats, features, train, return_features)

  def apply_tree(self, variables: Mapping[str, PyTree], images: jax.Array, tree: Tree, *,
                 train: bool = False, return_features: bool = False):
    """Only the nodes the decoders depend on compute (static tree: jit with it static).

    Args:
      variables: the network's variables.
      images: float images (B, H, W, C) in [0, 1], or feature vectors (B, D) ("mlp").
      tree: the `Tree` to run.
      train: batch statistics in batch norm; the statistics of the used nodes are updated and
        returned (the other nodes keep theirs).
      return_features: also return the block outputs, one (used nodes, B, ...) array per
        layer, rows in the order of `tree.used_nodes()`.

    Returns:
      As `apply_soft`.
    """
    self._check_variables(variables)
    if not isinstance(tree, Tree):
      raise ValueError(f"apply_tree needs a Tree, got {type(tree).__name__}.")
    tree.validate(self.num_layers, self.num_tasks)
    used = tree.used_nodes()
    x = self._normalise(images)
    features, new_stats = [], {}
    y = None
    for l in range(self.num_layers):
      block_variables = _tree_take(self._block_variables(variables, l), used[l],
                                   self.num_tasks)
      if l == 0:
        inputs, in_axis = x, None
      else:
        positions = tuple(used[l - 1].index(tree.parents[l - 1][k]) for k in used[l])
        inputs, in_axis = _tree_take(y, positions, len(used[l - 1])), 0
      y, stats = self._run_layer(l, block_variables, inputs, in_axis, train)
      if stats is not None:
        old = variables["batch_stats"][f"block{l}"]
        rows = np.asarray(used[l])
        new_stats[f"block{l}"] = jax.tree.map(lambda a, b: a.at[rows].set(b), old, stats)
      features.append(y)
    decoder_inputs = [y[used[-1].index(p)] for p in tree.parents[-1]]
    predictions, head_stats = self._decode(variables, decoder_inputs, images, train)
    new_stats.update(head_stats)
    return self._outputs(variables, predictions, new_stats, features, train, return_features)

  def _outputs(self, variables, predictions, new_stats, features, train, return_features):
    out = (predictions,)
    if train:
      state = {}
      if "batch_stats" in variables:
        state["batch_stats"] = {**variables["batch_stats"], **new_stats}
      out += (state,)
    if return_features:
      out += (features,)
    return out[0] if len(out) == 1 else out

  # -- cost ------------------------------------------------------------------------------------

  def layer_input_shapes(self, image_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The per-example input shape of every block layer and of the decoders (L + 1 shapes);
    `image_shape` is (H, W, C), or (D,) for feature vectors."""
    return _layer_input_shapes(self, tuple(int(d) for d in image_shape))

  def node_costs(self, image_shape: Sequence[int], exclude_padding: bool = False
                 ) -> tuple[tuple[cost_lib.Cost, ...], tuple[cost_lib.Cost, ...]]:
    """(cost of one node of each block layer, cost of each decoder), per example, for inputs
    of one example's shape (H, W, C) or (D,)."""
    return _node_costs(self, tuple(int(d) for d in image_shape), exclude_padding)

  def tree_cost(self, tree: Tree, image_shape: Sequence[int],
                exclude_padding: bool = False) -> TreeCost:
    """MACs and parameters of the used nodes and the decoders, and of the full anchor.

    Args:
      tree: the tree to cost.
      image_shape: (H, W, C) of one image, or (D,) of one feature vector ("mlp").
      exclude_padding: count only convolution taps that read real input (XLA's convention,
        for cross-checks against `cost.xla_cost`).
    """
    tree.validate(self.num_layers, self.num_tasks)
    nodes, heads = self.node_costs(image_shape, exclude_padding)
    decoders = sum(heads, cost_lib.Cost(0, 0))
    used = cost_lib.Cost(0, 0)
    for layer_cost, streams in zip(nodes, tree.used_nodes()):
      used += cost_lib.Cost(layer_cost.macs * len(streams), layer_cost.params * len(streams))
    used += decoders
    full = sum(nodes, cost_lib.Cost(0, 0))
    full = cost_lib.Cost(full.macs * self.num_tasks, full.params * self.num_tasks) + decoders
    return TreeCost(used.macs, used.params, full.macs, full.params)


@functools.lru_cache(maxsize=64)
def _layer_input_shapes(net: BranchedNet, image_shape: tuple[int, ...]
                        ) -> tuple[tuple[int, ...], ...]:
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = [image_shape]
  for block in net.blocks:
    x = jax.eval_shape(lambda s, b=block: b.init_with_output(
        jax.random.key(0), jnp.zeros(s.shape), train=False)[0], x)
    shapes.append(tuple(x.shape[1:]))
  return tuple(shapes)


@functools.lru_cache(maxsize=64)
def _node_costs(net: BranchedNet, image_shape: tuple[int, ...], exclude_padding: bool):
  shapes = _layer_input_shapes(net, image_shape)
  nodes = tuple(
      cost_lib.count(block, None, jax.ShapeDtypeStruct((1, *shape), jnp.float32), train=False,
                     exclude_padding=exclude_padding)
      for block, shape in zip(net.blocks, shapes[:-1]))
  decoder_input = jax.ShapeDtypeStruct((1, *shapes[-1]), jnp.float32)
  heads = tuple(cost_lib.count(head, None, decoder_input, train=False,
                               exclude_padding=exclude_padding) for head in net.heads)
  return nodes, heads


# ----------------------------------------------------------------------------------------------
# Batch-norm shifts (what the DYMU weight hypernetwork predicts).


def batch_norm_paths(variables: Mapping[str, PyTree]) -> list[tuple[str, ...]]:
  """Paths of every batch norm of any Flax variables: the params dicts with a scale or a bias
  whose path also holds running statistics ("mean") in "batch_stats"."""
  stats = variables.get("batch_stats", {})
  paths = []

  def walk(params, path):
    if not isinstance(params, Mapping):
      return
    node = stats
    for key in path:
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    if path and isinstance(node, Mapping) and "mean" in node and (
        "scale" in params or "bias" in params):
      paths.append(path)
      return
    for key in sorted(params):
      walk(params[key], path + (key,))

  walk(variables.get("params", {}), ())
  return paths


def batch_norm_shift_template(variables: Mapping[str, PyTree]) -> dict:
  """Zeros shaped like every batch-norm scale and bias in `variables["params"]` (nested dict).

  Stacked block batch norms give (N, C) leaves (one shift per node); a decoder's batch norm,
  if any, gives (C,) leaves.
  """
  template: dict = {}
  params = variables["params"]
  for path in batch_norm_paths(variables):
    node = params
    for key in path:
      node = node[key]
    target = template
    for key in path[:-1]:
      target = target.setdefault(key, {})
    target[path[-1]] = {name: jnp.zeros(jnp.shape(node[name]), jnp.float32)
                        for name in ("scale", "bias") if name in node}
  return template


def apply_batch_norm_shifts(variables: Mapping[str, PyTree], shifts: Mapping[str, PyTree]
                            ) -> dict:
  """Variables whose batch-norm scales and biases are moved by the additive `shifts`.

  `shifts` is a nested dict shaped like `batch_norm_shift_template(variables)` (a subset of
  the params tree); every other variable is returned unchanged.
  """

  def add(params, delta, path):
    if not isinstance(delta, Mapping):
      if jnp.shape(delta) != jnp.shape(params):
        raise ValueError(f"The shift of {'/'.join(path)} has shape {jnp.shape(delta)} but the "
                         f"parameter has shape {jnp.shape(params)}.")
      return params + delta
    if not isinstance(params, Mapping):
      raise ValueError(f"The shifts name {'/'.join(path)}, which is not a group of parameters.")
    missing = sorted(set(delta) - set(params))
    if missing:
      raise ValueError(f"The shifts name {', '.join('/'.join(path + (m,)) for m in missing)}, "
                       f"which the variables do not have.")
    return {k: add(v, delta[k], path + (k,)) if k in delta else v for k, v in params.items()}

  return {**variables, "params": add(variables["params"], shifts, ())}


# ----------------------------------------------------------------------------------------------
# Factory.


def build_branched(tasks: Sequence[tasks_lib.Task], backbone: str = "lenet", *,
                   backbone_kwargs: Mapping[str, Any] | None = None,
                   head_width: int | None = None, head_hidden_layers: int | None = None,
                   head_batch_norm: bool = False, atrous_rates: Sequence[int] | None = None,
                   image_pooling: bool = True, in_channels: int | None = None,
                   bn_momentum: float = 0.9, bn_axis_name: str | None = None,
                   pixel_mean: Sequence[float] | None = None,
                   pixel_std: Sequence[float] | None = None) -> BranchedNet:
  """A `BranchedNet` for `tasks` on the "lenet", "resnet_small", "resnet18", "mobilenet_v2" or
  "mlp" stack.

  Args:
    tasks: the tasks (one stream and one decoder each); dense tasks need a ResNet or
      MobileNetV2 stack (`DENSE_BACKBONES`).
    backbone: "lenet" (`lenet_blocks`), "resnet_small" (`resnet_small_blocks`), "resnet18"
      (`resnet18_blocks`), "mobilenet_v2" (`mobilenet_v2_blocks`) or "mlp" (`mlp_blocks`,
      feature vectors).
    backbone_kwargs: options of the block stack (lenet: conv_channels, kernel_sizes,
      fc_features, batch_norm; resnet_small, resnet18: stage_channels, stage_sizes,
      output_stride; mobilenet_v2: width_multiplier, block_setting, stem_channels,
      last_channels, stage_rows, output_stride; mlp: hidden, batch_norm).
    head_width: hidden width of every decoder; None: 64 for the MLP heads, 256 for the dense
      heads (`build_multitask`'s).
    head_hidden_layers: hidden layers of each MLP head; None: 0 for lenet, 1 for the others.
    head_batch_norm: batch norm in the MLP heads' hidden layers, so that the DYMU weight
      hypernetwork has task-specific scales and biases to shift after a cross-task edge into a
      decoder (needs hidden layers; dense heads always have batch norm).
    atrous_rates: dilation rates of the dense heads' context branches; None: the backbone's
      `decoders.DEFAULT_ATROUS_RATES`, as `build_multitask`.
    image_pooling: the dense heads' global-pooling branch.
    in_channels: image channels (the ResNet stems; default 3; unused by lenet, mobilenet_v2
      (its stem reads them off the images) and mlp).
    bn_momentum, bn_axis_name: passed to every batch norm.
    pixel_mean, pixel_std: image normalisation (see `BranchedNet`); not for mlp.
  """
  tasks = tuple(tasks)
  if backbone == "mlp" and (pixel_mean is not None or pixel_std is not None):
    raise ValueError("pixel_mean and pixel_std normalise images, but the mlp streams read "
                     "feature vectors, standardised by the data source; leave them unset.")
  blocks = stack_blocks(backbone, dict(backbone_kwargs or {}), in_channels, bn_momentum,
                        bn_axis_name)
  heads = task_decoders(tasks, backbone, blocks[-1].features, head_width=head_width,
                        head_hidden_layers=head_hidden_layers,
                        head_batch_norm=bool(head_batch_norm), atrous_rates=atrous_rates,
                        image_pooling=image_pooling, bn_momentum=bn_momentum,
                        bn_axis_name=bn_axis_name)
  build_options = (("backbone", backbone),
                   ("backbone_kwargs", tuple(sorted(dict(backbone_kwargs or {}).items()))),
                   ("head_width", head_width), ("head_hidden_layers", head_hidden_layers),
                   ("head_batch_norm", bool(head_batch_norm)),
                   ("atrous_rates", None if atrous_rates is None else tuple(atrous_rates)),
                   ("image_pooling", bool(image_pooling)), ("in_channels", in_channels),
                   ("bn_momentum", bn_momentum))
  return BranchedNet(tasks, blocks, heads,
                     tuple(pixel_mean) if pixel_mean is not None else None,
                     tuple(pixel_std) if pixel_std is not None else None,
                     build_options=build_options)


def load_pretrained_streams(net: BranchedNet, variables: Mapping[str, PyTree], path: str
                            ) -> dict:
  """`variables` whose every stream starts from one torchvision checkpoint (ResNet-18 for a
  "resnet18" stack, MobileNetV2 for a "mobilenet_v2" stack: `PRETRAINED_STACKS`).

  The blocks of these stacks carry their `backbones` twin's names per stage, so one stream's
  blocks together are a `ResNet18` or `MobileNetV2` variable tree: it is loaded by
  `pretrained.load_pretrained` (names and shapes checked there, default widths only) and copied
  into every stream. Decoders keep their own weights.
  """
  if net.stack not in PRETRAINED_STACKS:
    raise ValueError(f"Pretrained streams load into a {' or '.join(PRETRAINED_STACKS)} stack "
                     f"(torchvision weights), but this network has {net.stack} streams.")
  keys = {}  # module name in the backbone -> the block layer that holds it
  one_stream: dict[str, dict] = {}
  for l in range(net.num_layers):
    for col, tree in variables.items():
      for name, module in tree.get(f"block{l}", {}).items():
        keys[name] = l
        one_stream.setdefault(col, {})[name] = jax.tree.map(lambda a: a[0], module)
  loaded = pretrained.load_pretrained(net.stack, one_stream, path)
  block_keys = {f"block{l}" for l in range(net.num_layers)}
  out = {col: {key: dict(value) if key in block_keys else value for key, value in tree.items()}
         for col, tree in variables.items()}
  for col, modules in loaded.items():
    for name, module in modules.items():
      key = f"block{keys[name]}"
      out[col][key][name] = jax.tree.map(lambda new, old: jnp.broadcast_to(new, old.shape),
                                         module, variables[col][key][name])
  return out


@dataclasses.dataclass(frozen=True)
class TreeNetwork:
  """One tree of a `BranchedNet` as a network of its own (a deployed DYMU network):
  `apply(variables, images)` computes only the tree's nodes, in evaluation mode, with the
  anchor's variables (possibly carrying the weight hypernetwork's batch-norm shifts).
  `models.serialize` saves and loads it (nets made by `build_branched`)."""

  net: BranchedNet
  tree: Tree

  @property
  def tasks(self) -> tuple[tasks_lib.Task, ...]:
    return self.net.tasks

  def apply(self, variables, images, train: bool = False) -> dict[str, jax.Array]:
    if train:
      raise ValueError("A tree network runs in evaluation mode only (train=False).")
    return _apply_tree(self.net, variables, images, self.tree)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply_tree(net: BranchedNet, variables, images, tree: Tree) -> dict[str, jax.Array]:
  return net.apply_tree(variables, images, tree)
