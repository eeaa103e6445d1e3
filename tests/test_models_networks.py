"""Backbones, decoders and the multi-task network: shapes, slimming, export equivalence, jit.

Variables are mostly random numpy fills of the shapes that `init` gives (`jax.eval_shape`, no
compilation), so that batch-norm statistics are not trivial and the file stays fast on CPU.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import BACKBONES, MultiTaskNet, build_multitask, layers
from dymu_jax.models import backbones as B
from dymu_jax.models.decoders import DenseHead, MLPHead
from dymu_jax.models.widths import DynamicWidths, WidthConfig, channels

import random_variables as test_variables


def random_variables(module, *args, seed=0, **kwargs):
  """Random variables with the shapes of `module.init(...)`, filled by numpy."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return test_variables.fill(shapes, seed)


def images(shape, seed=0):
  return jax.device_put(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


def out_shapes(module, variables, x, **kwargs):
  return [tuple(o.shape) for o in jax.eval_shape(
      lambda v, x: module.apply(v, x, **kwargs), variables, x)]


# name -> (module, input shape, full stage output shapes)
CASES = {
    "lenet": (B.LeNet(batch_norm=True), (2, 36, 36, 1),
              [(2, 14, 14, 10), (2, 5, 5, 20), (2, 50)]),
    "resnet_small": (B.ResNetSmall(), (2, 32, 32, 3),
                     [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128)]),
    "resnet18": (B.ResNet18(), (2, 64, 64, 3),
                 [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256), (2, 2, 2, 512)]),
    "resnet34": (B.ResNet34(), (1, 32, 32, 3),
                 [(1, 8, 8, 64), (1, 4, 4, 128), (1, 2, 2, 256), (1, 1, 1, 512)]),
    "mobilenet_v2": (B.MobileNetV2(), (2, 32, 32, 3),
                     [(2, 16, 16, 16), (2, 8, 8, 24), (2, 4, 4, 32), (2, 2, 2, 96),
                      (2, 1, 1, 1280)]),
}
SLIM = {  # a mixed configuration per backbone
    "lenet": (0.25, 0.75, 0.5),
    "resnet_small": (0.5, 1.0, 0.25, 0.75),
    "resnet18": (0.75, 0.25, 0.5, 0.25),
    "resnet34": (0.25, 0.5, 0.75, 0.5),
    "mobilenet_v2": (0.5, 0.25, 1.0, 0.75, 0.25),
}

# Networks for the numerical tests: shallower twins of each class, since compiling the full
# depths is slow on a 2-core CPU (depth repeats the same blocks; ResNet34 is ResNet18's code with
# other `stage_sizes`).
MBV2_SHORT = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2), (6, 64, 1, 2), (6, 96, 1, 1),
              (6, 160, 1, 2), (6, 320, 1, 1))
SHALLOW = {
    "lenet": (B.LeNet(batch_norm=True), (2, 36, 36, 1)),
    "resnet_small": (B.ResNetSmall(stage_sizes=(1, 2, 1, 1)), (2, 16, 16, 3)),
    "resnet18": (B.ResNet18(stage_sizes=(1, 1, 1, 1)), (2, 64, 64, 3)),
    "mobilenet_v2": (B.MobileNetV2(block_setting=MBV2_SHORT), (2, 32, 32, 3)),
}


def explicit_sliced(name, widths):
  """The physically smaller network of `SHALLOW[name]` written out by hand (not via `sliced`)."""
  net = SHALLOW[name][0]
  small = tuple(channels(c, m) for c, m in zip(net.stage_channels, widths))
  if name == "lenet":
    return B.LeNet(conv_channels=small[:2], fc_features=small[2], batch_norm=True)
  if name.startswith("resnet"):
    return net.clone(parent=None, stage_channels=small)
  # MobileNetV2: every layer of stage s keeps channels(full, widths[s]); expanded widths are
  # 6x the block input at full width (t = 1 for the first block, which has none).
  m = widths
  setting = ((1, channels(16, m[0]), 1, 1), (6, channels(24, m[1]), 2, 2),
             (6, channels(32, m[2]), 1, 2), (6, channels(64, m[3]), 1, 2),
             (6, channels(96, m[3]), 1, 1), (6, channels(160, m[4]), 1, 2),
             (6, channels(320, m[4]), 1, 1))
  full_inputs = [32, 16, 24, 24, 32, 64, 96, 160]
  stages = [0, 1, 1, 2, 3, 3, 4, 4]
  expanded = tuple(channels(c if k == 0 else 6 * c, m[s])
                   for k, (c, s) in enumerate(zip(full_inputs, stages)))
  return B.MobileNetV2(block_setting=setting, stem_channels=channels(32, m[0]),
                       last_channels=channels(1280, m[4]), expanded_channels=expanded)


# ---------------------------------------------------------------------------- backbones

@pytest.mark.parametrize("name", list(CASES))
def test_backbone_shapes_full_and_slimmed(name):
  net, shape, full_shapes = CASES[name]
  assert BACKBONES[name] is type(net)
  x = images(shape)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x))
  assert out_shapes(net, variables, x) == full_shapes
  assert net.num_stages == len(full_shapes)
  assert net.stage_channels == tuple(s[-1] for s in full_shapes)
  slim = SLIM[name]
  got = out_shapes(net, variables, x, widths=slim)
  assert [s[:-1] for s in got] == [s[:-1] for s in full_shapes]
  assert [s[-1] for s in got] == [channels(c, m) for c, m in zip(net.stage_channels, slim)]
  # Initialising with a slimmed configuration still creates full-size variables.
  slim_init = jax.eval_shape(lambda: net.init(jax.random.key(0), x, widths=slim))
  assert jax.tree.map(lambda a: a.shape, slim_init) == jax.tree.map(lambda a: a.shape, variables)


@pytest.mark.parametrize("name", list(SHALLOW))
def test_slimmed_forward_equals_physically_sliced_network(name):
  net, shape = SHALLOW[name]
  x = images(shape)
  variables = random_variables(net, x)
  widths = SLIM[name]
  slim_out = jax.jit(lambda v, x: net.apply(v, x, widths=widths))(variables, x)
  small = explicit_sliced(name, widths)
  assert small.stage_channels == net.sliced(widths).stage_channels
  small_shapes = jax.eval_shape(lambda: small.init(jax.random.key(0), x))
  cut = jax.tree.map(lambda v, s: np.asarray(v)[tuple(slice(0, n) for n in s.shape)],
                     variables, small_shapes)
  small_out = jax.jit(small.apply)(cut, x)
  for a, b in zip(slim_out, small_out):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mobilenet_sliced_attributes():
  net = B.MobileNetV2()
  got = net.sliced((0.5, 0.25, 1.0, 0.75, 0.25))
  assert got.stem_channels == 16 and got.last_channels == 320
  assert got.block_setting[0] == (1, 8, 1, 1) and got.block_setting[3] == (6, 48, 4, 2)
  assert got.expanded_channels[:3] == (16, 24, 40)  # 32 (t=1), 96 * 0.25, 144 * 0.25
  assert got.stage_channels == (8, 8, 32, 72, 320)


def test_train_mode_slimmed_equals_sliced_and_updates_only_sliced_stats():
  net = B.LeNet(batch_norm=True)
  x = images((4, 36, 36, 1))
  variables = random_variables(net, x)
  widths = (0.5, 0.75, 0.25)
  run = lambda n, w: jax.jit(lambda v, x: n.apply(v, x, widths=w, train=True,
                                                   mutable=["batch_stats"]))
  out, state = run(net, widths)(variables, x)
  small = net.sliced(widths)
  cut = layers.slice_variables(variables,
                               jax.eval_shape(lambda: small.init(jax.random.key(0), x)))
  small_out, small_state = run(small, None)(cut, x)
  for a, b in zip(out, small_out):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  for bn, full, k in (("bn2", 20, channels(20, 0.75)), ("bn_fc", 50, channels(50, 0.25))):
    old = variables["batch_stats"][bn]["var"]
    new = state["batch_stats"][bn]["var"]
    assert new.shape == (full,)
    np.testing.assert_array_equal(new[k:], old[k:])
    assert np.all(np.asarray(new[:k]) != np.asarray(old[:k]))
    np.testing.assert_allclose(new[:k], small_state["batch_stats"][bn]["var"], atol=1e-5)


def test_gradients_reach_only_the_used_channels():
  net = B.LeNet()
  x = images((2, 36, 36, 1))
  variables = random_variables(net, x)
  loss = lambda p: jnp.sum(net.apply({"params": p}, x, widths=(0.5, 0.75, 1.0))[-1] ** 2)
  grads = jax.jit(jax.grad(loss))(variables["params"])
  k1, k2 = channels(10, 0.5), channels(20, 0.75)
  g = grads["conv2"]["kernel"]
  assert np.all(np.asarray(g[:, :, k1:, :]) == 0) and np.all(np.asarray(g[..., k2:]) == 0)
  assert np.any(np.asarray(g[:, :, :k1, :k2]) != 0)
  assert np.all(np.asarray(grads["conv1"]["bias"][k1:]) == 0)


def test_output_stride_dilates_the_last_stages():
  x = images((1, 64, 64, 3))
  for net, expected in [
      (B.ResNet18(output_stride=8), [(1, 16, 16, 64), (1, 8, 8, 128), (1, 8, 8, 256),
                                     (1, 8, 8, 512)]),
      (B.ResNetSmall(output_stride=4), [(1, 64, 64, 16), (1, 32, 32, 32), (1, 16, 16, 64),
                                        (1, 16, 16, 128)]),
      (B.MobileNetV2(output_stride=16), [(1, 32, 32, 16), (1, 16, 16, 24), (1, 8, 8, 32),
                                         (1, 4, 4, 96), (1, 4, 4, 1280)])]:
    variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x))
    assert out_shapes(net, variables, x) == expected
  with pytest.raises(ValueError, match="ResNet18 cannot reach output_stride=2; possible values: "
                     "4, 8, 16, 32"):
    jax.eval_shape(lambda: B.ResNet18(output_stride=2).init(jax.random.key(0), x))


def test_backbone_width_errors():
  net = B.ResNetSmall()
  x = images((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r"ResNetSmall has 4 stages but widths has 2 multipliers "
                     r"\(1.0, 0.5\)"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, widths=(1.0, 0.5)))
  with pytest.raises(ValueError, match=r"ResNetSmall got width multiplier 1.5; multipliers must "
                     r"lie in \(0, 1\]"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, widths=(1.0, 1.5, 1.0, 1.0)))
  with pytest.raises(ValueError, match=r"ResNetSmall takes widths as a sequence of per-stage "
                     r"multipliers \(or None\), got WidthConfig"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), x, widths=WidthConfig.full(4, 1)))
  with pytest.raises(ValueError, match="has 3 stage_sizes but 4 stage_channels"):
    jax.eval_shape(lambda: B.ResNet(stage_sizes=(1, 1, 1)).init(jax.random.key(0), x))
  with pytest.raises(ValueError, match="got stem='tiny'; use 'imagenet' or 'small'"):
    jax.eval_shape(lambda: B.ResNet(stem="tiny").init(jax.random.key(0), x))
  with pytest.raises(ValueError, match="stage_rows .* must list the block_setting rows 0..6"):
    _ = B.MobileNetV2(stage_rows=((0, 1), (3,))).stage_channels
  with pytest.raises(ValueError, match="Unknown backbone 'vgg'; available: lenet, resnet_small, "
                     "resnet18, resnet34, mobilenet_v2"):
    B.get_backbone("vgg")


def test_same_seed_same_init():
  net = MLPHead(3, hidden_features=16)
  x = images((1, 4, 4, 8))
  init = jax.jit(net.init)
  a, b, c = init(jax.random.key(3), x), init(jax.random.key(3), x), init(jax.random.key(4), x)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["params"]["hidden0"]["kernel"], c["params"]["hidden0"]["kernel"])


def test_jit_compiles_once_per_distinct_width_config():
  net = build_multitask((tasks_lib.classification("digit", 10),), "lenet")
  x = images((1, 36, 36, 1))
  variables = random_variables(net, x)
  traces = []

  def forward(v, x, widths):
    traces.append(widths)
    return net.apply(v, x, widths=widths, return_features=True)[1][-1]
  forward = jax.jit(forward, static_argnames="widths")
  small = forward(variables, x, widths=WidthConfig((0.5, 0.5, 0.25), (1.0,)))
  again = forward(variables, x, widths=WidthConfig([0.5, 0.5, 0.25], [1]))  # an equal value
  full = forward(variables, x, widths=WidthConfig.full(3, 1))
  assert len(traces) == 2
  np.testing.assert_array_equal(small, again)
  assert small.shape[-1] == 16 and full.shape[-1] == 50


# ---------------------------------------------------------------------------- decoders

def test_dense_head_shapes_and_slimming():
  head = DenseHead(5, hidden_features=32, atrous_rates=(1, 2), in_features=64)
  feats = [jnp.ones((2, 8, 8, 16)), jnp.ones((2, 4, 4, 48))]  # encoder slimmed to 48 of 64
  variables = jax.eval_shape(lambda: head.init(jax.random.key(0), feats, width=0.5,
                                               out_size=(16, 16)))
  params = variables["params"]
  assert params["aspp1_conv"]["kernel"].shape == (3, 3, 64, 32)
  assert params["classifier"]["kernel"].shape == (1, 1, 32, 5)
  assert sorted(k for k in params if k.startswith("project")) == [
      "project0", "project1", "project2", "project3", "project_bn"]
  run = lambda **kw: jax.eval_shape(lambda v: head.apply(v, feats, **kw), variables).shape
  assert run(width=0.5, out_size=(16, 16)) == (2, 16, 16, 5)
  assert run(width=0.25) == (2, 4, 4, 5)
  with pytest.raises(ValueError, match=r"DenseHead needs a \(B, H, W, C\) feature map but got "
                     r"shape \(2, 48\)"):
    head.apply(variables, jnp.ones((2, 48)))


def test_dense_head_upsamples_bilinearly():
  head = DenseHead(1, hidden_features=8, atrous_rates=(), image_pooling=False)
  x = images((1, 4, 4, 8))
  variables = random_variables(head, x)
  low = jax.jit(lambda v: head.apply(v, x))(variables)
  high = jax.jit(lambda v: head.apply(v, x, out_size=(8, 8)))(variables)
  # Half-pixel centres (PyTorch align_corners=False): output row 1 lies at input row 0.25,
  # output column 2 at input column 0.75.
  lo = np.asarray(low[0, :, :, 0])
  want = 0.75 * (0.25 * lo[0, 0] + 0.75 * lo[0, 1]) + 0.25 * (0.25 * lo[1, 0] + 0.75 * lo[1, 1])
  np.testing.assert_allclose(high[0, 1, 2, 0], want, atol=1e-5)
  np.testing.assert_allclose(high[0, 0, 0, 0], lo[0, 0], atol=1e-5)  # edges clamp


def test_mlp_head_output_never_slims_and_pools_maps():
  head = MLPHead(3, hidden_features=32, num_hidden=2, in_features=16)
  maps = images((2, 4, 4, 8))
  variables = random_variables(head, maps, width=0.25)
  assert variables["params"]["hidden0"]["kernel"].shape == (16, 32)
  assert variables["params"]["output"]["kernel"].shape == (32, 3)
  out = head.apply(variables, [maps], width=0.25)
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out, head.apply(variables, maps.mean(axis=(1, 2)), width=0.25),
                             atol=1e-6)
  linear = MLPHead(3, num_hidden=0)
  assert linear.apply(random_variables(linear, maps), maps).shape == (2, 3)
  with pytest.raises(ValueError, match=r"MLPHead needs a \(B, H, W, C\) or \(B, C\) input but "
                     r"got shape \(2, 4, 8\)"):
    head.apply(variables, jnp.ones((2, 4, 8)))


# ---------------------------------------------------------------------------- multi-task

ALL_KINDS = (tasks_lib.segmentation("seg", 6), tasks_lib.depth(), tasks_lib.normals(),
             tasks_lib.edges(), tasks_lib.classification("cls", 4), tasks_lib.regression("age"))


@pytest.mark.parametrize("backbone", ["resnet_small", "resnet18", "mobilenet_v2"])
def test_multitask_output_shapes(backbone):
  net = build_multitask(ALL_KINDS, backbone, head_width=32)
  x = images((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x))
  cfg = WidthConfig.smallest(net.num_stages, len(ALL_KINDS))
  preds, feats = jax.eval_shape(
      lambda v: net.apply(v, x, widths=cfg, return_features=True), variables)
  assert {k: v.shape for k, v in preds.items()} == {
      "seg": (2, 32, 32, 6), "depth": (2, 32, 32, 1), "normals": (2, 32, 32, 3),
      "edges": (2, 32, 32, 1), "cls": (2, 4), "age": (2, 1)}
  encoder = net.make_encoder()
  assert [f.shape[-1] for f in feats] == [channels(c, 0.25) for c in encoder.stage_channels]
  assert set(variables["params"]) == {"encoder"} | {f"head_{t.name}" for t in ALL_KINDS}


def test_multitask_slimmed_equals_sliced_and_masked_path():
  net = build_multitask((tasks_lib.segmentation("seg", 5), tasks_lib.classification("cls", 3)),
                        "resnet_small", head_width=32, atrous_rates=(2,),
                        backbone_kwargs={"stage_sizes": (1, 1, 1, 1)})
  x = images((2, 16, 16, 3))
  variables = random_variables(net, x)
  cfg = WidthConfig((0.25, 0.75, 0.5, 1.0), (0.5, 0.25))
  preds, feats = jax.jit(lambda v: net.apply(v, x, widths=cfg, return_features=True))(variables)
  assert np.all(np.isfinite(preds["seg"])) and preds["seg"].shape == (2, 16, 16, 5)

  small = net.sliced(cfg)
  assert small.head_widths == (16, 8)
  assert dict(small.backbone_kwargs)["stage_channels"] == (8, 24, 32, 128)
  cut = layers.slice_variables(variables,
                               jax.eval_shape(lambda: small.init(jax.random.key(0), x)))
  small_preds = jax.jit(lambda v: small.apply(v, x))(cut)
  for name in preds:
    np.testing.assert_allclose(preds[name], small_preds[name], atol=1e-5, rtol=1e-5)

  # The masked path: one compiled program for every configuration, same predictions.
  traces = []

  def masked(v, dyn):
    traces.append(1)
    return net.apply(v, x, widths=dyn, return_features=True)
  masked = jax.jit(masked)
  other = WidthConfig((1.0, 0.25, 0.25, 0.5), (1.0, 0.75))
  static_other = jax.jit(lambda v: net.apply(v, x, widths=other, return_features=True))
  for config, (want, want_feats) in ((cfg, (preds, feats)), (other, static_other(variables))):
    got, got_feats = masked(variables, DynamicWidths.from_config(config))
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
    for g, w in zip(got_feats, want_feats):
      np.testing.assert_allclose(g[..., :w.shape[-1]], w, atol=1e-5, rtol=1e-5)
      np.testing.assert_array_equal(g[..., w.shape[-1]:], 0.0)
  assert len(traces) == 1


def test_multitask_normalises_images_inside():
  task = (tasks_lib.classification("digit", 10),)
  plain = build_multitask(task, "lenet", pixel_mean=(0.0,), pixel_std=(1.0,))
  shifted = build_multitask(task, "lenet", pixel_mean=(0.2,), pixel_std=(0.5,))
  x = images((2, 36, 36, 1))
  variables = random_variables(plain, x)
  np.testing.assert_allclose(jax.jit(shifted.apply)(variables, x)["digit"],
                             jax.jit(plain.apply)(variables, (x - 0.2) / 0.5)["digit"],
                             atol=1e-5)


def test_multitask_errors():
  tasks = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
  net = build_multitask(tasks, "lenet")
  x = images((1, 36, 36, 1))
  init = lambda n, **kw: jax.eval_shape(lambda: n.init(jax.random.key(0), x, **kw))
  assert net.num_stages == 3
  with pytest.raises(ValueError, match="WidthConfig has 2 encoder multipliers .* but the "
                     "encoder has 3 stages"):
    init(net, widths=WidthConfig((1.0, 1.0), (1.0, 1.0)))
  with pytest.raises(ValueError, match="1 decoder multipliers .* but the network has 2 task"):
    init(net, widths=WidthConfig((1.0,) * 3, (1.0,)))
  with pytest.raises(ValueError, match="Width multiplier 0.3 of the decoder is not an allowed "
                     "choice"):
    init(net, widths=WidthConfig((1.0,) * 3, (0.3, 1.0)))
  with pytest.raises(ValueError, match="widths must be a WidthConfig, DynamicWidths or None, "
                     "got tuple"):
    init(net, widths=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="Task 'seg' is dense .* ends in a flat vector"):
    init(build_multitask((tasks_lib.segmentation("seg", 3),), "lenet"))
  with pytest.raises(ValueError, match=r"pixel_mean \(0.5, 0.5, 0.5\) .* one value per image "
                     r"channel \(1\)"):
    init(build_multitask(tasks, "lenet", pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3))
  with pytest.raises(ValueError, match=r"expects images of shape \(B, H, W, C\)"):
    jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.ones((36, 36, 1))))
  with pytest.raises(ValueError, match="Unknown backbone 'resnet50'; available: lenet, "
                     "resnet_small, resnet18, resnet34, mobilenet_v2"):
    build_multitask(tasks, "resnet50")


def test_build_multitask_options_reach_the_modules():
  net = build_multitask((tasks_lib.depth(),), "resnet18", head_width=16,
                        backbone_kwargs={"output_stride": 8})
  assert isinstance(net, MultiTaskNet) and net.atrous_rates == (6, 12, 18)
  assert build_multitask((tasks_lib.depth(),)).atrous_rates == (1, 2, 3)
  x = images((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x))
  _, feats = jax.eval_shape(lambda v: net.apply(v, x, return_features=True), variables)
  assert feats[-1].shape == (1, 8, 8, 512)
  assert variables["params"]["head_depth"]["conv"]["kernel"].shape == (3, 3, 16, 16)


def test_lenet_channel_divisor_lets_the_first_convolution_slim():
  x = np.zeros((2, 36, 36, 1), np.float32)
  for divisor, expected in ((8, (8, 8, 16)), (2, (2, 6, 12))):
    net = B.LeNet(channel_divisor=divisor)
    variables = net.init(jax.random.key(0), x)
    outputs = net.apply(variables, x, widths=(0.25, 0.25, 0.25))
    assert tuple(o.shape[-1] for o in outputs) == expected
    # Full-size variables whatever the divisor; the sliced twin has the slimmed widths.
    assert variables["params"]["conv1"]["kernel"].shape == (9, 9, 1, 10)
    assert net.sliced((0.25, 0.25, 0.25)).conv_channels == expected[:2]
    # The masked path keeps the same channels.
    dyn = DynamicWidths(jnp.zeros(3, jnp.int32), jnp.zeros(0, jnp.int32))
    masked = net.apply(variables, x + 0.5, widths=dyn.encoder_multipliers())
    sliced = net.apply(variables, x + 0.5, widths=(0.25, 0.25, 0.25))
    for m, s in zip(masked, sliced):
      np.testing.assert_allclose(m[..., :s.shape[-1]], s, atol=1e-5)
      assert not np.any(np.asarray(m[..., s.shape[-1]:]))


def test_mlp_head_batch_norm_slims_like_the_rest():
  """head_batch_norm: the heads' batch norms follow the slimmed width on every path."""
  tasks = (tasks_lib.classification("cls", 3), tasks_lib.regression("age", 10.0))
  net = build_multitask(tasks, "resnet_small", head_width=32, head_batch_norm=True,
                        backbone_kwargs={"stage_sizes": (1, 1, 1, 1)})
  x = images((4, 16, 16, 3))
  variables = random_variables(net, x)
  assert variables["batch_stats"]["head_cls"]["hidden0_bn"]["mean"].shape == (32,)
  without = build_multitask(tasks, "resnet_small", head_width=32,
                            backbone_kwargs={"stage_sizes": (1, 1, 1, 1)})
  assert "head_cls" not in random_variables(without, x)["batch_stats"]

  cfg = WidthConfig((0.25, 0.75, 0.5, 0.5), (0.5, 0.25))
  small = net.sliced(cfg)
  cut = layers.slice_variables(variables,
                               jax.eval_shape(lambda: small.init(jax.random.key(0), x)))
  for train in (False, True):
    kwargs = {"mutable": ["batch_stats"]} if train else {}
    want = net.apply(variables, x, widths=cfg, train=train, **kwargs)
    got = small.apply(cut, x, train=train, **kwargs)
    masked = net.apply(variables, x, widths=DynamicWidths.from_config(cfg), train=train,
                       **kwargs)
    if train:
      (want, want_state), (got, got_state), (masked, masked_state) = want, got, masked
      k = channels(32, 0.5)
      new = want_state["batch_stats"]["head_cls"]["hidden0_bn"]["mean"]
      np.testing.assert_allclose(new[:k], got_state["batch_stats"]["head_cls"]["hidden0_bn"][
          "mean"], atol=1e-5)
      np.testing.assert_array_equal(
          new[k:], variables["batch_stats"]["head_cls"]["hidden0_bn"]["mean"][k:])
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(masked[name], want[name], atol=1e-5, rtol=1e-5)
