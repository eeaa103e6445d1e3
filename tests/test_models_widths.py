"""Width configurations and the slimmable layers (conv, dense, batch norm, pools)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax.models import layers
from dymu_jax.models import widths as W
from dymu_jax.models.layers import SlimBatchNorm, SlimConv, SlimDense

import random_variables as test_variables


def _normal(shape, seed=0):
  # numpy data: each new shape of a jax.random call would compile its own program.
  return jax.device_put(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _init(module, *args, seed=0, **kwargs):
  """Random variables of `module` with the shapes its init gives, filled by numpy.

  Shapes come from `jax.eval_shape` (no compilation; jax.random programs compile slowly on
  CPU). Kernels are He-scaled normals, batch-norm scales and variances lie in [0.5, 1.5].
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return test_variables.fill(shapes, seed, other_scale=0.5)


def _apply(module, variables, *args, **kwargs):
  """module.apply in one compiled program; array arguments become traced, the rest static."""
  leaves, tree = jax.tree.flatten((args, kwargs), is_leaf=lambda a: a is None)
  dynamic = [isinstance(a, (jax.Array, np.ndarray)) for a in leaves]

  def run(v, arrays):
    it = iter(arrays)
    full = [next(it) if d else a for a, d in zip(leaves, dynamic)]
    call_args, call_kwargs = jax.tree.unflatten(tree, full)
    return module.apply(v, *call_args, **call_kwargs)
  return jax.jit(run)(variables, [a for a, d in zip(leaves, dynamic) if d])


# ---------------------------------------------------------------------------- channel rounding

@pytest.mark.parametrize("full, multiplier, expected", [
    (64, 1.0, 64), (64, 0.25, 16), (64, 0.75, 48),
    (10, 1.0, 10),        # full width is exact even when not a multiple of 8
    (10, 0.25, 8),        # at least 8
    (5, 0.5, 5),          # never above the full width
    (20, 0.75, 16),       # 15 -> nearest multiple of 8 is 16
    (20, 0.5, 8),         # 10 -> 8
    (24, 0.5, 16),        # 12 is halfway between 8 and 16: rounds up
    (100, 0.75, 72),      # 75 -> 72
    (1280, 0.25, 320),
])
def test_channels_golden(full, multiplier, expected):
  assert W.channels(full, multiplier) == expected


def test_channels_errors():
  with pytest.raises(ValueError, match=r"multiplier must lie in \(0, 1\], got 1.5"):
    W.channels(64, 1.5)
  with pytest.raises(ValueError, match=r"multiplier must lie in \(0, 1\], got 0.0"):
    W.channels(64, 0.0)
  with pytest.raises(ValueError, match="at least 1 channel, got 0"):
    W.channels(0, 0.5)


# ---------------------------------------------------------------------------- WidthConfig

def test_width_config_is_a_hashable_value():
  a = W.WidthConfig([1, 0.5], [0.25])
  b = W.WidthConfig((1.0, 0.5), (0.25,))
  assert a == b and hash(a) == hash(b)
  assert a.encoder == (1.0, 0.5) and isinstance(a.encoder[0], float)
  assert W.WidthConfig((1.0, 0.75), (0.25,)) != a
  assert len({a, b}) == 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.encoder = (1.0,)


def test_width_config_constructors():
  assert W.WidthConfig.full(3, 2) == W.WidthConfig((1.0, 1.0, 1.0), (1.0, 1.0))
  assert W.WidthConfig.smallest(2, 1) == W.WidthConfig((0.25, 0.25), (0.25,))
  assert W.WidthConfig.smallest(1, 1, choices=(0.5, 1.0)) == W.WidthConfig((0.5,), (0.5,))
  configs = list(W.enumerate_configs(2, 1))
  assert len(configs) == 4 ** 3 == len(set(configs))
  assert configs[-1] == W.WidthConfig.full(2, 1)
  encs = W.encoder_configs(3, (0.5, 1.0))
  assert len(encs) == 8 and encs[0] == (0.5, 0.5, 0.5) and encs[-1] == (1.0, 1.0, 1.0)


def test_width_config_sample_is_seeded_and_in_choices():
  draw = lambda seed: [W.WidthConfig.sample(np.random.default_rng(seed), 4, 2) for _ in range(50)]
  first, again, other = draw(0), draw(0), draw(1)
  assert first == again and first != other
  seen = {m for c in first for m in c.encoder + c.decoders}
  assert seen == set(W.WIDTH_CHOICES)
  tied = W.WidthConfig.sample(np.random.default_rng(3), 4, 2, tied_encoder=True)
  assert len(set(tied.encoder)) == 1


def test_width_config_validation_messages():
  cfg = W.WidthConfig((1.0, 0.5), (0.25,))
  assert cfg.validate(2, 1) is cfg
  with pytest.raises(ValueError, match="2 encoder multipliers .* but the encoder has 3 stages"):
    cfg.validate(3, 1)
  with pytest.raises(ValueError, match="1 decoder multipliers .* but the network has 2 task"):
    cfg.validate(2, 2)
  with pytest.raises(ValueError, match="Width multiplier 0.3 of the encoder is not an allowed "
                     "choice; allowed: 0.25, 0.5, 0.75, 1.0"):
    W.WidthConfig((0.3, 1.0), (1.0,)).validate(2, 1)
  assert W.WidthConfig((0.3, 1.0), (1.0,)).validate(2, 1, choices=None)
  with pytest.raises(ValueError, match=r"WidthConfig.decoders has multiplier 2.0; multipliers "
                     r"must lie in \(0, 1\]"):
    W.WidthConfig((1.0,), (2.0,))
  with pytest.raises(ValueError, match="must be a sequence of multipliers"):
    W.WidthConfig(0.5, (1.0,))
  with pytest.raises(ValueError, match="Width choices must be distinct multipliers"):
    W.WidthConfig.smallest(1, 1, choices=(0.5, 0.5))


def test_dynamic_widths_round_trip_and_validation():
  cfg = W.WidthConfig((1.0, 0.25, 0.75), (0.5,))
  dyn = W.DynamicWidths.from_config(cfg)
  np.testing.assert_array_equal(dyn.encoder, [3, 0, 2])
  np.testing.assert_array_equal(dyn.decoders, [1])
  assert [int(m.channels(64)) for m in dyn.encoder_multipliers()] == [64, 16, 48]
  assert int(W.channels(20, dyn.encoder_multipliers()[2])) == W.channels(20, 0.75) == 16
  a = W.DynamicWidths.sample(jax.random.key(0), 4, 2)
  b = W.DynamicWidths.sample(jax.random.key(0), 4, 2)
  np.testing.assert_array_equal(a.encoder, b.encoder)
  assert a.encoder.shape == (4,) and int(a.encoder.max()) < 4 and int(a.encoder.min()) >= 0
  with pytest.raises(ValueError, match=r"encoder has shape \(3,\) but the encoder has 4 stages"):
    dyn.validate(4, 1)
  with pytest.raises(ValueError, match="uses choices .* but the network allows"):
    dyn.validate(3, 1, choices=(0.5, 1.0))
  with pytest.raises(ValueError, match="not an allowed choice"):
    W.DynamicWidths.from_config(W.WidthConfig((0.3,), ()))


# ---------------------------------------------------------------------------- layers

def _conv_reference(x, kernel, bias, strides, padding, groups=1, dilation=1):
  """An independent reference: flax.linen.Conv run on a physically cut kernel."""
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=strides, padding=padding,
                 kernel_dilation=dilation, feature_group_count=groups,
                 use_bias=bias is not None)
  params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
  return conv.apply({"params": params}, x)


def test_slim_conv_equals_a_conv_with_the_cut_kernel():
  x = _normal((2, 9, 9, 6), 0)
  conv = SlimConv(12, 3, strides=2, dilation=1, use_bias=True, padding=1)
  variables = _init(conv, x, seed=1)
  variables = {"params": {"kernel": variables["params"]["kernel"],
                          "bias": _normal((12,), 2)}}
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert kernel.shape == (3, 3, 6, 12)
  y = _apply(conv, variables, x[..., :4], 8)
  ref = _conv_reference(x[..., :4], kernel[:, :, :4, :8], bias[:8], 2, ((1, 1), (1, 1)))
  assert y.shape == (2, 5, 5, 8)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  # Full width by default.
  np.testing.assert_allclose(_apply(conv, variables, x), _conv_reference(
      x, kernel, bias, 2, ((1, 1), (1, 1))), atol=1e-5)


def test_slim_conv_pads_like_pytorch():
  # A centred delta kernel with padding 1 and stride 2 picks x[2i, 2j] (PyTorch alignment);
  # XLA's "SAME" on an even size would pad only at the end and pick x[2i + 1, 2j + 1].
  x = jnp.arange(64.0).reshape(1, 8, 8, 1)
  kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(1.0)
  y = _apply(SlimConv(1, 3, strides=2, padding=1), {"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(y[0, :, :, 0], x[0, ::2, ::2, 0])
  same = _apply(SlimConv(1, 3, strides=2, padding="SAME"), {"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(same[0, :, :, 0], x[0, 1::2, 1::2, 0])
  stem = SlimConv(4, 7, strides=2, padding=3)
  out = jax.eval_shape(lambda: stem.init_with_output(jax.random.key(0),
                                                     jnp.zeros((1, 224, 224, 3)))[0])
  assert out.shape == (1, 112, 112, 4)


def test_slim_depthwise_conv_slices_its_channel_axis():
  x = _normal((2, 6, 6, 16), 0)
  conv = SlimConv(16, 3, groups=16, dilation=2, padding=2)
  variables = _init(conv, x, seed=1)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (3, 3, 1, 16)
  y = _apply(conv, variables, x[..., :8])
  ref = _conv_reference(x[..., :8], kernel[..., :8], None, 1, ((2, 2), (2, 2)), groups=8,
                        dilation=2)
  assert y.shape == (2, 6, 6, 8)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  with pytest.raises(ValueError, match="out_channels must equal its input width 8, got 4"):
    conv.apply(variables, x[..., :8], 4)


def test_slim_conv_errors():
  x = jnp.ones((1, 4, 4, 8))
  conv = SlimConv(8, 1, name="proj")
  variables = _init(conv, x, seed=0)
  with pytest.raises(ValueError, match="SlimConv 'proj' got 12 channels but its full width is 8"):
    conv.apply(variables, jnp.ones((1, 4, 4, 12)))
  with pytest.raises(ValueError, match="got 16 channels but its full width is 8"):
    conv.apply(variables, x, 16)
  grouped = SlimConv(8, 1, groups=2)
  gv = _init(grouped, x, seed=0)
  with pytest.raises(ValueError, match=r"Grouped SlimConv .* \(groups=2\) cannot be slimmed"):
    grouped.apply(gv, x[..., :4])
  with pytest.raises(ValueError, match="groups=3 must divide both the input width 8"):
    jax.eval_shape(SlimConv(6, 1, groups=3).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="Unknown padding 'full'"):
    jax.eval_shape(SlimConv(6, 1, padding="full").init, jax.random.key(0), x)


def test_slim_conv_in_features_gives_full_variables_from_a_slim_input():
  conv = SlimConv(16, 3, in_features=32)
  variables = _init(conv, jnp.ones((1, 5, 5, 8)), 4, seed=0)
  assert variables["params"]["kernel"].shape == (3, 3, 32, 16)


def test_slim_dense_matches_numpy():
  x = np.asarray(_normal((3, 10), 0))
  dense = SlimDense(7, name="fc")
  variables = _init(dense, jnp.asarray(x), seed=1)
  kernel = np.asarray(variables["params"]["kernel"])
  bias = np.arange(7, dtype=np.float32)
  variables = {"params": {"kernel": kernel, "bias": bias}}
  y = _apply(dense, variables, jnp.asarray(x[:, :6]), 3)
  np.testing.assert_allclose(y, x[:, :6] @ kernel[:6, :3] + bias[:3], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="SlimDense 'fc' got 8 channels but its full width is 7"):
    dense.apply(variables, jnp.asarray(x), 8)


def _bn_variables(full, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "params": {"scale": rng.uniform(0.5, 1.5, full).astype(np.float32),
                 "bias": rng.normal(size=full).astype(np.float32)},
      "batch_stats": {"mean": rng.normal(size=full).astype(np.float32),
                      "var": rng.uniform(0.5, 2.0, full).astype(np.float32)},
  }


def test_slim_batch_norm_eval_uses_the_sliced_running_stats():
  v = _bn_variables(6)
  x = np.asarray(_normal((4, 3, 3, 4), 0))
  y = _apply(SlimBatchNorm(), v, jnp.asarray(x))
  p, s = v["params"], v["batch_stats"]
  ref = (x - s["mean"][:4]) / np.sqrt(s["var"][:4] + 1e-5) * p["scale"][:4] + p["bias"][:4]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_slim_batch_norm_train_updates_only_the_sliced_stats():
  v = _bn_variables(6)
  x = np.asarray(_normal((8, 2, 2, 4), 0)) * 3.0 + 1.0
  y, state = _apply(SlimBatchNorm(momentum=0.9), v, jnp.asarray(x), train=True,
                                                mutable=["batch_stats"])
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  new = state["batch_stats"]
  np.testing.assert_allclose(new["mean"][:4], 0.9 * v["batch_stats"]["mean"][:4] + 0.1 * mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["var"][:4], 0.9 * v["batch_stats"]["var"][:4] + 0.1 * var,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new["mean"][4:], v["batch_stats"]["mean"][4:])
  np.testing.assert_array_equal(new["var"][4:], v["batch_stats"]["var"][4:])
  ref = (x - mean) / np.sqrt(var + 1e-5) * v["params"]["scale"][:4] + v["params"]["bias"][:4]
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  # Initialising does not move the running statistics.
  init = SlimBatchNorm().init(jax.random.key(0), jnp.asarray(x), train=True)
  np.testing.assert_array_equal(init["batch_stats"]["mean"], np.zeros(4))


def test_slim_batch_norm_pooled_over_devices_equals_one_big_batch():
  v = _bn_variables(5)
  x = _normal((2, 4, 3, 3, 5), 0) + jnp.arange(5.0)
  bn = SlimBatchNorm(axis_name="data")
  shard = lambda xs: bn.apply(v, xs, train=True, mutable=["batch_stats"])
  y_sharded, state_sharded = jax.vmap(shard, axis_name="data")(x)
  y_big, state_big = _apply(bn.clone(axis_name=None), 
      v, x.reshape(8, 3, 3, 5), train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_sharded.reshape(8, 3, 3, 5), y_big, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(state_sharded["batch_stats"][key][0],
                               state_big["batch_stats"][key], atol=1e-6)


def test_slim_batch_norm_width_mismatch_error():
  with pytest.raises(ValueError, match="was told width 3 but its input has 4 channels"):
    SlimBatchNorm().init(jax.random.key(0), jnp.ones((2, 4)), False, 3)


# ---------------------------------------------------------------------------- masked path

def test_masked_layers_equal_the_sliced_layers():
  x = _normal((4, 5, 5, 6), 0)
  conv = SlimConv(12, 3, padding=1, use_bias=True)
  cv = _init(conv, x, seed=1)
  cv["params"]["bias"] = jnp.arange(12.0)
  x_masked = x * (jnp.arange(6) < 4)
  static = _apply(conv, cv, x[..., :4], 8)
  dynamic = _apply(conv, cv, x_masked, jnp.int32(8))
  np.testing.assert_allclose(dynamic[..., :8], static, atol=1e-5)
  np.testing.assert_array_equal(dynamic[..., 8:], 0.0)

  bv = _bn_variables(12)
  bn = SlimBatchNorm()
  s_out, s_state = _apply(bn, bv, static, True, 8, mutable=["batch_stats"])
  d_out, d_state = _apply(bn, bv, dynamic, True, jnp.int32(8), mutable=["batch_stats"])
  np.testing.assert_allclose(d_out[..., :8], s_out, atol=1e-5)
  np.testing.assert_array_equal(d_out[..., 8:], 0.0)
  for key in ("mean", "var"):
    np.testing.assert_allclose(d_state["batch_stats"][key], s_state["batch_stats"][key],
                               atol=1e-6)
    np.testing.assert_array_equal(d_state["batch_stats"][key][8:], bv["batch_stats"][key][8:])

  dense = SlimDense(5)
  dv = _init(dense, jnp.ones((2, 6)), seed=2)
  h = _normal((2, 6), 3)
  np.testing.assert_allclose(_apply(dense, dv, h * (jnp.arange(6) < 3), jnp.int32(2))[:, :2],
                             _apply(dense, dv, h[:, :3], 2), atol=1e-6)


# ---------------------------------------------------------------------------- pools, slicing

@pytest.mark.parametrize("size", [(9, 9), (8, 10), (7, 4)])
def test_max_pool_3x3_s2_matches_reduce_window(size):
  x = _normal((2, *size, 3), 0)
  ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_array_equal(layers.max_pool_3x3_s2(x), ref)


def test_max_pool_2x2_matches_numpy():
  x = np.asarray(_normal((2, 5, 6, 3), 0))
  ref = np.maximum.reduce([x[:, i:4:2, j:6:2] for i in range(2) for j in range(2)])
  np.testing.assert_array_equal(layers.max_pool_2x2(jnp.asarray(x)), ref)


def test_slice_variables_cuts_leading_blocks():
  full = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.arange(5.0)}
  target = {"a": jax.ShapeDtypeStruct((2, 2), jnp.float32), "b": jnp.zeros(3)}
  cut = layers.slice_variables(full, target)
  np.testing.assert_array_equal(cut["a"], [[0, 1], [4, 5]])
  np.testing.assert_array_equal(cut["b"], [0, 1, 2])
  with pytest.raises(ValueError, match=r"Cannot slice a variable of shape \(5,\) to \(6,\)"):
    layers.slice_variables({"b": jnp.zeros(5)}, {"b": jnp.zeros(6)})
