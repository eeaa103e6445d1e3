"""Branched networks: stacked streams, soft mixing vs static trees, cost, batch-norm shifts.

Networks are tiny (a 4-6-8 channel LeNet on 16 px, a two-stage ResNet with one 4- and one
8-channel block on 8 px, the same ResNet with two dense heads of width 8 and a classifier,
a 4-stage ResNet-18 of 4-8 channels on 32 px, a 4-stage MobileNetV2 of 4-16 channels and one
or two blocks per row on 16 and 32 px) and every forward pass is jitted (eager vmapped
convolutions are slower than compiling) so that the file stays fast on a shared CPU.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones, branched, build_multitask, cost, serialize
from dymu_jax.models.branched import Tree
from dymu_jax.models.decoders import DenseHead

import random_variables as test_variables

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
FACES = (tasks_lib.regression("age"), tasks_lib.classification("gender", 2),
         tasks_lib.classification("race", 5))
TINY_LENET = {"conv_channels": (4, 6), "kernel_sizes": (5, 3), "fc_features": 8}
TINY_RESNET = {"stage_channels": (4, 8), "stage_sizes": (1, 1)}
# Dense and other tasks mixed (the synthetic scenes' kinds, and a classifier).
SCENES = (tasks_lib.segmentation("segmentation", 3), tasks_lib.depth(),
          tasks_lib.classification("shape", 4))
# Seven rows of one block (two in row 1, so that one block is residual), expansion 2.
TINY_MOBILENET = {"block_setting": ((1, 4, 1, 1), (2, 4, 2, 2), (2, 8, 1, 2), (2, 8, 1, 2),
                                    (2, 8, 1, 1), (2, 8, 1, 2), (2, 16, 1, 1)),
                  "stem_channels": 4, "last_channels": 16}
CASES = {
    "lenet": (DIGITS, "lenet", TINY_LENET, (16, 16, 1)),
    # Output stride 32 on 16 px: the last stage's depthwise convolutions see 1x1 maps.
    "mobilenet_v2": (FACES, "mobilenet_v2", TINY_MOBILENET, (16, 16, 3)),
    "resnet_small": (FACES, "resnet_small", TINY_RESNET, (8, 8, 3)),
    # Stride 2: the dense heads upsample their 4x4 maps to the 8x8 images.
    "dense": (SCENES, "resnet_small", TINY_RESNET, (8, 8, 3)),
}
NETS = {
    **CASES,
    # Output stride 1 (the second stage dilated): no upsampling, which XLA counts as dots.
    "dense_full_resolution": (SCENES, "resnet_small", {**TINY_RESNET, "output_stride": 1},
                              (8, 8, 3)),
}


@functools.lru_cache(maxsize=None)
def setup(case: str):
  """(net, variables filled by numpy, images (3, H, W, C))."""
  tasks, backbone, options, shape = NETS[case]
  net = branched.build_branched(tasks, backbone, backbone_kwargs=options, head_width=8)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape),
                                                                           jnp.float32))
  variables = test_variables.fill(shapes, seed=1)
  images = np.random.default_rng(0).uniform(size=(3, *shape)).astype(np.float32)
  return net, variables, images


def stream_variables(variables, layer: int, stream: int):
  key = f"block{layer}"
  return {col: jax.tree.map(lambda a: a[stream], tree[key])
          for col, tree in variables.items() if key in tree}


@functools.partial(jax.jit, static_argnums=(0, 3))
def run_streams_one_by_one(net, variables, images, train=False):
  """Each task's own stream, one block at a time with its unstacked variables."""
  predictions, stats = {}, []
  for j, task in enumerate(net.tasks):
    x = net._normalise(images)
    stream_stats = []
    for l, block in enumerate(net.blocks):
      v = stream_variables(variables, l, j)
      if train:
        x, state = block.apply(v, x, train=True, mutable=["batch_stats"])
        stream_stats.append(state["batch_stats"])
      else:
        x = block.apply(v, x, train=False)
    head = {col: tree[f"head_{task.name}"] for col, tree in variables.items()
            if f"head_{task.name}" in tree}
    dense = {"out_size": images.shape[1:3]} if task.is_dense else {}
    if train and "batch_stats" in head:  # dense heads: batch statistics, as the streams
      predictions[task.name], _ = net.heads[j].apply(head, x, train=True,
                                                     mutable=["batch_stats"], **dense)
    else:
      predictions[task.name] = net.heads[j].apply(head, x, **dense)
    stats.append(stream_stats)
  return predictions, stats


def assert_close(a, b, atol=1e-5):
  """The predictions of `a`'s tasks agree with `b`'s (b may hold more tasks)."""
  chex.assert_trees_all_close(dict(a), {key: b[key] for key in a}, atol=atol, rtol=1e-5)


# Stream initialisation does not depend on the decoders: the dense case (slow to initialise
# with jax.random) is left out.
@pytest.mark.parametrize("case", ["lenet", "resnet_small"])
def test_streams_start_from_one_draw_or_their_own(case):
  tasks, backbone, options, shape = CASES[case]
  net = branched.build_branched(tasks, backbone, backbone_kwargs=options, head_width=8)
  images = jnp.zeros((1, *shape), jnp.float32)
  shared = jax.jit(net.init, static_argnums=2)(jax.random.key(3), images, "shared")
  independent = jax.jit(net.init, static_argnums=2)(jax.random.key(3), images, "independent")
  for l in range(net.num_layers):
    for leaf in jax.tree.leaves(shared["params"][f"block{l}"]):
      for j in range(1, net.num_tasks):
        np.testing.assert_array_equal(leaf[j], leaf[0])
    kernels = [leaf for leaf in jax.tree.leaves(independent["params"][f"block{l}"])
               if leaf.ndim >= 3]  # conv / dense kernels (stacked): streams differ
    assert kernels and all(not np.allclose(k[0], k[1]) for k in kernels)
  # Decoders draw their own weights either way.
  heads = [shared["params"][f"head_{t.name}"] for t in tasks]
  assert not np.allclose(jax.tree.leaves(heads[0])[-1][..., :1],
                         jax.tree.leaves(heads[1])[-1][..., :1])
  with pytest.raises(ValueError, match="Unknown stream_init 'pretrained'; allowed: "
                                       "independent, shared"):
    net.init(jax.random.key(0), images, "pretrained")


@pytest.mark.parametrize("case", sorted(CASES))
def test_vmap_over_stacked_streams_equals_streams_one_by_one(case):
  net, variables, images = setup(case)
  expected, expected_stats = run_streams_one_by_one(net, variables, images, train=True)
  separate = net.separate_tree()
  predictions, state = jax.jit(
      lambda v, x: net.apply_tree(v, x, separate, train=True))(variables, images)
  assert_close(expected, predictions)
  for l in range(net.num_layers):  # stacked batch statistics = each stream's own
    for j in range(net.num_tasks):
      got = jax.tree.map(lambda a: a[j], state["batch_stats"][f"block{l}"])
      chex.assert_trees_all_close(got, expected_stats[j][l], atol=1e-5, rtol=1e-7)


def mixed_trees(num_layers: int, num_tasks: int, num_random: int = 2):
  """The separate tree, a shared trunk and random trees."""
  rng = np.random.default_rng(3)
  trees = [Tree.separate(num_layers, num_tasks), Tree.shared(num_layers, num_tasks, 1)]
  trees += [Tree(tuple(tuple(int(p) for p in rng.integers(0, num_tasks, num_tasks))
                       for _ in range(num_layers))) for _ in range(num_random)]
  return trees


@functools.partial(jax.jit, static_argnums=(0, 3))
def tree_forward(net, variables, images, tree):
  return net.apply_tree(variables, images, tree, return_features=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_hot_soft_forward_equals_the_tree_forward(case):
  net, variables, images = setup(case)
  soft = jax.jit(lambda v, x, nu: net.apply_soft(v, x, nu, return_features=True))
  # One random tree on ResNet (3 tasks) and LeNet (2 tasks) keeps compilation short.
  for tree in mixed_trees(net.num_layers, net.num_tasks, num_random=1):
    tree_predictions, tree_features = tree_forward(net, variables, images, tree)
    soft_predictions, soft_features = soft(variables, images, tree.one_hot())
    assert_close(tree_predictions, soft_predictions)
    for used, got, full in zip(tree.used_nodes(), tree_features, soft_features):
      assert got.shape[0] == len(used)
      np.testing.assert_allclose(got, np.asarray(full)[list(used)], atol=1e-5)


def test_soft_mixing_is_the_weighted_sum_of_parents():
  net, variables, images = setup("lenet")
  nu = np.zeros((3, 2, 2), np.float32)
  nu[:] = np.eye(2)
  nu[1, 0] = (0.25, 0.75)  # node (2, 0) reads 0.25 Y[1][0] + 0.75 Y[1][1]
  _, features = jax.jit(lambda v, x: net.apply_soft(v, x, nu, return_features=True))(
      variables, images)
  mixed = 0.25 * features[1][0] + 0.75 * features[1][1]
  expected = net.blocks[2].apply(stream_variables(variables, 2, 0), mixed)
  np.testing.assert_allclose(features[2][0], expected, atol=1e-5)


def test_trees_used_nodes_and_messages():
  tree = Tree(((0, 1, 1), (1, 1, 2), (0, 0, 2), (0, 2, 2)))
  # Decoders read nodes {0, 2} of layer 3; those read {0, 2} of layer 2; ... of layer 0: {1}.
  assert tree.used_nodes() == ((1,), (1, 2), (0, 2), (0, 2))
  assert tree.num_used_nodes() == 7
  assert Tree.shared(4, 3, 2).used_nodes() == ((2,),) * 4
  assert Tree.separate(2, 3).used_nodes() == ((0, 1, 2),) * 2
  logits = np.zeros((2, 3, 3))
  logits[0, :, 1] = 1.0
  logits[1] = np.eye(3)
  assert Tree.from_scores(logits).parents == ((1, 1, 1), (0, 1, 2))
  assert hash(Tree(((0, 1),))) == hash(Tree([[0, 1]]))
  with pytest.raises(ValueError, match=r"parents\[1\]\[0\] is 3, but a parent index must lie "
                                       r"in \[0, 3\)"):
    Tree(((0, 1, 2), (3, 0, 0)))
  with pytest.raises(ValueError, match="one parent per stream"):
    Tree(((0, 1), (0,)))
  net, variables, images = setup("lenet")
  with pytest.raises(ValueError, match="3 layers of 2 streams, but the tree has 2 layers"):
    net.apply_tree(variables, images, Tree(((0, 1), (0, 1))))
  with pytest.raises(ValueError, match=r"nu must have shape \(layers, tasks, tasks\)"):
    net.apply_soft(variables, images, np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="Unknown branched backbone 'vgg'"):
    branched.build_branched(DIGITS, "vgg")


def test_parameter_and_mac_counts_of_shared_and_separate_trees():
  """LeNet on 36 px Multi-MNIST, counted by hand (per example)."""
  net = branched.build_branched(DIGITS, "lenet")
  shape = (36, 36, 1)
  # conv 10@9x9 (no bias) + BN: 810 + 20; conv 20@5x5: 5,000 + 40; dense 500 -> 50: 25,000 +
  # 100; two linear decoders 50 -> 10: 510 each.
  stream_params, decoder_params = 830 + 5_040 + 25_100, 2 * 510
  # conv1: 28x28 positions x 81 taps x 10; conv2: 10x10 x 25 x 10 x 20; dense; decoders.
  stream_macs, decoder_macs = 28 * 28 * 81 * 10 + 10 * 10 * 250 * 20 + 500 * 50, 2 * 500
  separate = net.tree_cost(net.separate_tree(), shape)
  shared = net.tree_cost(net.shared_tree(1), shape)
  assert (separate.params, separate.macs) == (2 * stream_params + decoder_params,
                                              2 * stream_macs + decoder_macs)
  assert (shared.params, shared.macs) == (stream_params + decoder_params,
                                          stream_macs + decoder_macs)
  assert shared.full_params == separate.params and separate.macs_fraction == 1.0
  assert shared.params_fraction == pytest.approx(31_990 / 62_960)
  variables = jax.eval_shape(net.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  assert separate.params == cost.num_params(variables["params"])


@pytest.mark.parametrize("case", ["resnet_small", "dense_full_resolution", "mobilenet_v2"])
def test_tree_cost_matches_xla_cost_analysis(case):
  # Padded and dilated 3x3 convolutions, dense heads; strided depthwise convolutions.
  net, variables, images = setup(case)
  shape = images.shape[1:]
  flops = {}
  for tree in mixed_trees(net.num_layers, net.num_tasks):
    analytic = net.tree_cost(tree, shape, exclude_padding=True)
    fn = lambda v, x, t=tree: net.apply_tree(v, x, t)
    # XLA's count of every convolution and dot the traced program runs.
    flops[tree] = cost.xla_matmul_flops(fn, variables, images)
    assert analytic.macs * images.shape[0] == flops[tree] / 2, tree
  # The program of a shared trunk holds only the used nodes' work (the saving is real); the
  # dense heads (every task's, whatever the tree) dominate the small dense net.
  separate, shared = net.separate_tree(), net.shared_tree(1)
  ratio = 0.9 if case == "dense_full_resolution" else 0.4
  assert flops[shared] / flops[separate] < ratio
  assert net.tree_cost(shared, shape).macs_fraction < ratio


def test_dense_tree_cost_leaves_out_only_the_upsampling():
  """At output stride 2 the dense heads upsample, which XLA runs as dots and the analytic
  count, by convention, leaves out: the rest is counted exactly."""
  net, variables, images = setup("dense")
  tree = net.shared_tree(0)
  analytic = net.tree_cost(tree, images.shape[1:], exclude_padding=True)
  xla = cost.xla_matmul_flops(lambda v, x: net.apply_tree(v, x, tree), variables, images) / 2
  assert analytic.macs * images.shape[0] < xla < 1.05 * analytic.macs * images.shape[0]
  head = net.heads[0]
  assert isinstance(head, DenseHead) and head.atrous_rates == (1, 2, 3)
  counted = cost.count(head, None, jax.ShapeDtypeStruct((1, 4, 4, 8), jnp.float32))
  assert net.node_costs(images.shape[1:])[1][0] == counted


def test_batch_norm_shifts():
  net, variables, images = setup("resnet_small")
  template = branched.batch_norm_shift_template(variables)
  # Every block's batch norms, stacked over the 3 streams; decoders have none.
  assert set(template) == {"block0", "block1"}
  assert template["block0"]["stem_bn"]["scale"].shape == (3, 4)
  assert template["block1"]["block0"]["downsample_bn"]["bias"].shape == (3, 8)
  run = jax.jit(lambda v, x: net.apply_tree(v, x, net.separate_tree()))
  anchor = run(variables, images)
  zero = branched.apply_batch_norm_shifts(variables, template)
  assert_close(anchor, run(zero, images), atol=0.0)
  # A shift of one stream's batch norm moves that task only.
  delta = jax.tree.map(jnp.zeros_like, template)
  delta["block1"]["block0"]["bn2"]["bias"] = delta["block1"]["block0"]["bn2"]["bias"].at[2].set(
      1.0)
  moved = run(branched.apply_batch_norm_shifts(variables, delta), images)
  assert_close({k: anchor[k] for k in ("age", "gender")}, moved)
  assert not np.allclose(anchor["race"], moved["race"])
  bad = {"block0": {"stem_bn": {"scale": jnp.zeros((2, 4))}}}
  with pytest.raises(ValueError, match="block0/stem_bn/scale has shape"):
    branched.apply_batch_norm_shifts(variables, bad)


def test_batch_norm_shifts_cover_every_mobilenet_v2_batch_norm():
  net, variables, images = setup("mobilenet_v2")
  template = branched.batch_norm_shift_template(variables)
  # Every batch norm of the blocks (stem, expansion, depthwise, projection, last conv),
  # stacked over the 3 streams; the MLP heads have none.
  leaves = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  norms = {tuple(k.key for k in path[:-1]) for path, _ in leaves if path[-2].key.endswith("_bn")}
  assert set(branched.batch_norm_paths(variables)) == norms
  assert set(template) == {f"block{l}" for l in range(4)} and len(norms) == 2 + 3 * 8 - 1
  assert set(template["block0"]["block1"]) == {"depthwise_bn", "project_bn"}  # t = 1
  assert set(template["block1"]["block4"]) == {"expand_bn", "depthwise_bn", "project_bn"}
  assert template["block0"]["stem_bn"]["scale"].shape == (3, 4)
  assert template["block1"]["block4"]["expand_bn"]["bias"].shape == (3, 8)  # 4 in, t = 2
  assert template["block3"]["last_bn"]["bias"].shape == (3, 16)
  run = jax.jit(lambda v, x: net.apply_tree(v, x, net.separate_tree()))
  anchor = run(variables, images)
  delta = jax.tree.map(jnp.zeros_like, template)
  delta["block1"]["block4"]["depthwise_bn"]["bias"] = (
      delta["block1"]["block4"]["depthwise_bn"]["bias"].at[2].set(1.0))
  moved = run(branched.apply_batch_norm_shifts(variables, delta), images)
  assert_close({k: anchor[k] for k in ("age", "gender")}, moved)
  assert not np.allclose(anchor["race"], moved["race"])


def test_train_mode_updates_the_statistics_of_used_nodes_only():
  net, variables, images = setup("lenet")
  tree = net.shared_tree(1)
  _, state = jax.jit(lambda v, x: net.apply_tree(v, x, tree, train=True))(variables, images)
  for l in range(net.num_layers):
    old, new = variables["batch_stats"][f"block{l}"], state["batch_stats"][f"block{l}"]
    np.testing.assert_array_equal(old["bn"]["mean"][0], new["bn"]["mean"][0])
    assert not np.allclose(old["bn"]["mean"][1], new["bn"]["mean"][1])


def test_decoder_batch_norm_shifts_move_that_task_only():
  net, variables, images = setup("dense")
  template = branched.batch_norm_shift_template(variables)
  # The dense heads' batch norms (one per branch, the projection's and the 3x3 conv's) are
  # shifted too, unstacked; the classifier's MLP head has none.
  assert set(template) == {"block0", "block1", "head_segmentation", "head_depth"}
  assert set(template["head_depth"]) == {"aspp0_bn", "aspp1_bn", "aspp2_bn", "aspp3_bn",
                                         "pool_bn", "project_bn", "bn"}
  assert template["head_depth"]["project_bn"]["scale"].shape == (8,)
  run = jax.jit(lambda v, x: net.apply_tree(v, x, net.shared_tree(0)))
  anchor = run(variables, images)
  delta = jax.tree.map(jnp.zeros_like, template)
  delta["head_depth"]["bn"]["scale"] = delta["head_depth"]["bn"]["scale"].at[3].set(0.5)
  moved = run(branched.apply_batch_norm_shifts(variables, delta), images)
  assert_close({k: anchor[k] for k in ("segmentation", "shape")}, moved)
  assert not np.allclose(anchor["depth"], moved["depth"])


def test_dense_forward_shapes_and_errors():
  net, variables, images = setup("dense")
  predictions = tree_forward(net, variables, images, Tree(((0, 0, 2), (1, 0, 1))))[0]
  assert {k: v.shape for k, v in predictions.items()} == {
      "segmentation": (3, 8, 8, 3), "depth": (3, 8, 8, 1), "shape": (3, 4)}
  # Defaults follow build_multitask's dense heads: width 256, the backbone's atrous rates.
  default = branched.build_branched(SCENES, "resnet18")
  assert [type(h).__name__ for h in default.heads] == ["DenseHead", "DenseHead", "MLPHead"]
  assert (default.heads[0].hidden_features, default.heads[0].atrous_rates) == (256, (6, 12, 18))
  assert default.heads[2].hidden_features == 64 and default.stack == "resnet18"
  # An exported tree rebuilds the same dense heads (`build_branched`'s options are saved).
  exported = branched.TreeNetwork(net, net.shared_tree(1))
  assert serialize.network_from_json(serialize.network_to_json(exported)) == exported
  with pytest.raises(ValueError, match="Task.s. segmentation, depth are dense, but the lenet "
                                       "streams end in a flat vector"):
    branched.build_branched(SCENES, "lenet")
  with pytest.raises(ValueError, match="resnet_small streams cannot reach output_stride=3"):
    branched.build_branched(SCENES, "resnet_small", backbone_kwargs={"output_stride": 3})
  # MobileNetV2 streams: four stages, the dense heads read the last 1x1 conv's 1280 channels.
  mobile = branched.build_branched(SCENES, "mobilenet_v2")
  assert mobile.stack == "mobilenet_v2" and [b.features for b in mobile.blocks] == [
      24, 32, 96, 1280]
  assert (mobile.heads[0].in_features, mobile.heads[0].atrous_rates) == (1280, (6, 12, 18))
  with pytest.raises(ValueError, match=r"mobilenet_v2 streams stage_rows \(\(0,\), \(1, 2\)\) "
                                       r"must list the block_setting rows 0..6 once each"):
    branched.build_branched(SCENES, "mobilenet_v2",
                            backbone_kwargs={"stage_rows": ((0,), (1, 2))})


TINY_RESNET18 = {"stage_channels": (4, 4, 8, 8), "stage_sizes": (1, 1, 1, 1),
                 "output_stride": 8}


@pytest.mark.parametrize("backbone, options", [
    ("resnet18", TINY_RESNET18), ("mobilenet_v2", {**TINY_MOBILENET, "output_stride": 8})])
def test_stream_and_dense_head_are_the_static_network(backbone, options):
  """One stream of "resnet18" or "mobilenet_v2" blocks + its DenseHead is `build_multitask`'s
  single-task network: the same parameter names per stage (the blocks' union is the encoder),
  the same dilated stages at output stride 8, the same head."""
  tasks = SCENES[:2]
  net = branched.build_branched(tasks, backbone, backbone_kwargs=options, head_width=8)
  shape = (32, 32, 3)
  variables = test_variables.fill(jax.eval_shape(
      net.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32)), seed=2)
  images = np.random.default_rng(1).uniform(size=(2, *shape)).astype(np.float32)
  static = build_multitask(tasks[1:], backbone, backbone_kwargs=options, head_width=8)
  encoder = {col: {name: module for l in range(net.num_layers)
                   for name, module in stream_variables(variables, l, 1)[col].items()}
             for col in variables}
  static_variables = {col: {"encoder": encoder[col], "head_depth": variables[col]["head_depth"]}
                      for col in variables}
  shapes = jax.eval_shape(static.init, jax.random.key(0), jnp.zeros((1, *shape)))
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, static_variables)
  expected = jax.jit(static.apply)(static_variables, images)["depth"]
  got = tree_forward(net, variables, images, net.separate_tree())[0]["depth"]
  assert got.shape == (2, 32, 32, 1)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


# (stack, a torchvision kernel and our path to it: stage 1's first conv, the last stage's).
PRETRAINED_CASES = {
    "resnet18": ("conv1.weight", ("block0", "stem_conv"), "layer4.1.conv2.weight",
                 ("block3", "stage4_block1", "conv2"), "layer2.0.downsample.1.running_var",
                 ("block1", "stage2_block0", "downsample_bn")),
    "mobilenet_v2": ("features.0.0.weight", ("block0", "stem_conv"), "features.18.0.weight",
                     ("block3", "last_conv"), "features.9.conv.1.1.running_var",
                     ("block2", "block9", "depthwise_bn")),
}


@pytest.mark.parametrize("backbone", sorted(PRETRAINED_CASES))
def test_pretrained_weights_load_into_every_stream(tmp_path, backbone):
  net = branched.build_branched(SCENES[:2], backbone)
  shapes = jax.eval_shape(net.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  reference = jax.eval_shape(backbones.get_backbone(backbone)().init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  # torchvision's names and shapes, its classifier and step counters (skipped) included.
  state = test_variables.torchvision_state(backbone, reference)
  path = str(tmp_path / f"{backbone}.npz")
  np.savez(path, **state)
  loaded = branched.load_pretrained_streams(net, variables, path)
  chex.assert_trees_all_equal_shapes_and_dtypes(loaded, variables)
  first, first_path, last, last_path, stat, stat_path = PRETRAINED_CASES[backbone]

  def ours(col, module_path, leaf):
    node = loaded[col]
    for key in module_path:
      node = node[key]
    return node[leaf]

  for j in range(2):
    np.testing.assert_array_equal(ours("params", first_path, "kernel")[j],
                                  state[first].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(ours("params", last_path, "kernel")[j],
                                  state[last].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(ours("batch_stats", stat_path, "var")[1], state[stat])
  assert loaded["params"]["head_depth"] is variables["params"]["head_depth"]
  small = branched.build_branched(SCENES[:2], "resnet_small")
  with pytest.raises(ValueError, match="load into a resnet18 or mobilenet_v2 stack .* this "
                                       "network has resnet_small streams"):
    branched.load_pretrained_streams(small, variables, path)
