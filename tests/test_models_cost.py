"""Tests of dymu_jax.models.cost: analytic MACs / parameters against hand counts and XLA."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones, build_multitask, cost, layers
from dymu_jax.models.widths import DynamicWidths, WidthConfig

# (backbone, input side, input channels, full parameter count or None): small inputs keep
# tracing and compiling fast. torchvision's counts (resnet18 11,689,512, resnet34 21,797,672,
# mobilenet_v2 3,504,872) less their ImageNet classifiers (512*1000+1000, 1280*1000+1000).
# LeNet at 28 px: conv 10@9x9 (820), conv 20@5x5 (5,020), fc over the 3x3x20 map to 50 (9,050).
BACKBONES = (("lenet", 28, 1, 820 + 5_020 + 9_050), ("resnet_small", 32, 3, None),
             ("resnet18", 32, 3, 11_689_512 - 513_000),
             ("resnet34", 32, 3, 21_797_672 - 513_000),
             ("mobilenet_v2", 32, 3, 3_504_872 - 1_281_000))


@functools.lru_cache(maxsize=None)
def _setup(name: str, size: int, channels: int):
  net = backbones.get_backbone(name)()
  x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape)))
  return net, x, variables


def _width_configs(num_stages: int):
  mixed = (0.25, 0.5, 1.0, 0.75, 0.5)[:num_stages]
  return {"full": (1.0,) * num_stages, "smallest": (0.25,) * num_stages, "mixed": mixed}


class Tiny(nn.Module):
  """conv 3x3 (3 -> 16, bias) + BN + global pool + dense (16 -> 10): hand-countable."""

  @nn.compact
  def __call__(self, x, width: int = 16):
    x = layers.SlimConv(16, 3, padding=1, use_bias=True, in_features=3, name="conv")(x, width)
    x = layers.SlimBatchNorm(features=16, name="bn")(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return layers.SlimDense(10, in_features=16, name="fc")(x)


def _tiny():
  net = Tiny()
  x = jnp.ones((1, 8, 8, 3))
  return net, jax.eval_shape(net.init, jax.random.key(0), x), x


def test_tiny_net_golden_values():
  net, variables, x = _tiny()
  full = cost.count(net, variables, x)
  # conv: 8*8 positions * 3*3*3 taps * 16 outputs; dense: 16*10.
  assert full == cost.Cost(macs=8 * 8 * 9 * 3 * 16 + 16 * 10,
                           params=(9 * 3 * 16 + 16) + 2 * 16 + (16 * 10 + 10))
  assert full.params == cost.num_params(variables["params"]) == 650
  half = cost.count(net, variables, x, width=8)
  assert half == cost.Cost(macs=8 * 8 * 9 * 3 * 8 + 8 * 10,
                           params=(9 * 3 * 8 + 8) + 2 * 8 + (8 * 10 + 10))
  # Without padding taps: each axis has 8 * 3 - 2 taps on real pixels.
  no_pad = cost.count(net, variables, x, width=8, exclude_padding=True)
  assert no_pad.macs == 22 * 22 * 3 * 8 + 8 * 10
  assert no_pad.params == half.params


def test_per_layer_breakdown_and_batch_independence():
  net, variables, x = _tiny()
  layer_costs = cost.count_layers(net, variables, jnp.ones((4, 8, 8, 3)), width=8)
  assert [(c.path, c.kind, c.macs, c.params) for c in layer_costs] == [
      ("conv", "conv", 8 * 8 * 9 * 3 * 8, 9 * 3 * 8 + 8),
      ("bn", "norm", 0, 16),
      ("fc", "dense", 80, 90)]
  assert layer_costs[0].in_shape == (4, 8, 8, 3) and layer_costs[0].out_shape == (4, 8, 8, 8)
  # Figures are per example whatever the batch; variables may be shapes only (or None).
  assert cost.count(net, None, jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32), width=8) == (
      cost.count(net, variables, x, width=8))


class Branchy(nn.Module):
  """A shared layer called twice, an unused branch and a raw parameter: generic counting."""

  @nn.compact
  def __call__(self, x, use_branch: bool):
    embedding = self.param("embedding", nn.initializers.zeros, (5, 4))
    shared = layers.SlimDense(6, in_features=4, use_bias=False, name="shared")
    y = shared(x + embedding[0]) + shared(x)
    if use_branch:
      y = nn.Dense(3, name="branch")(y)
    return y


def test_shared_layers_unused_branches_and_other_modules():
  net = Branchy()
  x = jnp.ones((1, 4))
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, True))
  with_branch = cost.count(net, variables, x, True)
  # Two calls of the shared dense layer compute twice but own their weights once.
  assert with_branch == cost.Cost(macs=2 * 4 * 6 + 6 * 3, params=5 * 4 + 4 * 6 + 6 * 3 + 3)
  assert with_branch.params == cost.num_params(variables["params"])
  assert cost.count(net, variables, x, False) == cost.Cost(macs=2 * 4 * 6, params=5 * 4 + 4 * 6)
  # An input without a batch axis (a preference vector, say): the batch size is given.
  assert cost.count(net, variables, jnp.ones(4), False, batch_size=1).macs == 2 * 4 * 6
  with pytest.raises(ValueError, match="batch_size must be a positive number of examples, got 0"):
    cost.count(net, variables, x, False, batch_size=0)


def test_resnet18_imagenet_macs_by_hand():
  net = backbones.ResNet18()
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  stem = 112 * 112 * 7 * 7 * 3 * 64
  stage1 = 4 * 56 * 56 * 9 * 64 * 64
  # Every later stage: a strided 3x3 from c/2 to c, three 3x3 c->c, a 1x1 c/2->c shortcut.
  later = sum(s * s * (9 * c // 2 * c + 3 * 9 * c * c + c // 2 * c)
              for s, c in ((28, 128), (14, 256), (7, 512)))
  assert cost.count(net, None, x).macs == stem + stage1 + later == 1_813_561_344


@pytest.mark.parametrize("name, size, channels, expected_params", BACKBONES)
def test_backbone_matches_xla_and_physical_slicing(name, size, channels, expected_params):
  net, x, variables = _setup(name, size, channels)
  configs = _width_configs(net.num_stages)
  full_params = cost.num_params(variables["params"])
  assert expected_params in (None, full_params)
  for label, widths in configs.items():
    analytic = cost.count(net, variables, x, widths=widths, train=False, exclude_padding=True)
    fn = lambda v, x_, w=widths: net.apply(v, x_, widths=w, train=False)
    # XLA's own count of the program's convolutions and dots (padding taps excluded).
    assert analytic.macs == pytest.approx(cost.xla_matmul_flops(fn, variables, x) / 2,
                                          rel=0.05), label
    if label == "mixed":
      # The whole program adds elementwise work (batch norm, activations, pooling, adds). It is
      # lowered, not compiled, to keep this test fast (see the compiled check below).
      xla = cost.xla_cost(fn, variables, x, optimized=False)
      assert analytic.macs == xla["matmul_macs"]
      assert 0.5 * xla["macs"] < analytic.macs <= xla["macs"], label
    if label == "full":
      assert analytic.params == full_params
      continue
    assert analytic.params < full_params
    if label != "mixed":
      continue
    # The used parameters are those of the physically sliced network.
    sliced = net.sliced(widths)
    sliced_vars = jax.eval_shape(lambda s=sliced: s.init(jax.random.key(0), jnp.zeros(x.shape)))
    assert analytic.params == cost.num_params(sliced_vars["params"]), label


def test_padding_convention_and_compiled_program():
  net, x, variables = _setup("resnet_small", 32, 3)
  widths = (0.25, 0.5, 0.75, 1.0)
  conventional = cost.count(net, variables, x, widths=widths)
  no_pad = cost.count(net, variables, x, widths=widths, exclude_padding=True)
  assert conventional.params == no_pad.params
  # Training mode (batch statistics, running averages updated) costs the same.
  assert cost.count(net, variables, x, widths=widths, train=True) == conventional
  # 3x3 convolutions lose their border taps: 12% of them on a 32 px map, 44% on a 4 px one.
  assert 0.75 * conventional.macs < no_pad.macs < 0.9 * conventional.macs
  xla = cost.xla_cost(lambda v, x_: net.apply(v, x_, widths=widths), variables, x)
  assert no_pad.macs == pytest.approx(xla["matmul_macs"], rel=1e-6)
  # Batch norm, ReLU and residual adds, fused and simplified: a few percent on top.
  assert no_pad.macs <= xla["macs"] < 1.1 * no_pad.macs


def test_xla_cost_counts_a_multiply_add_as_two_flops():
  xla = cost.xla_cost(lambda a, b: a @ b, jnp.ones((3, 10)), jnp.ones((10, 20)))
  assert xla["flops"] == xla["matmul_flops"] == 2 * 3 * 10 * 20
  assert xla["macs"] == xla["matmul_macs"] == 3 * 10 * 20


def test_multitask_net_static_and_masked_widths():
  net = build_multitask([tasks_lib.segmentation("seg", 5), tasks_lib.depth(),
                         tasks_lib.classification("cls", 3)], "resnet_small", head_width=32)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape)))
  widths = WidthConfig((0.25, 0.5, 0.75, 1.0), (1.0, 0.25, 0.5))
  analytic = cost.count(net, variables, x, widths=widths, exclude_padding=True)
  xla = cost.xla_cost(lambda v, x_: net.apply(v, x_, widths=widths), variables, x,
                      optimized=False)
  # XLA also counts the bilinear upsampling of the two dense heads, which runs as dots.
  assert analytic.macs == pytest.approx(xla["matmul_macs"], rel=0.05)
  assert analytic.macs < xla["matmul_macs"]
  sliced = net.sliced(widths)
  sliced_vars = jax.eval_shape(lambda: sliced.init(jax.random.key(0), jnp.zeros(x.shape)))
  assert analytic.params == cost.num_params(sliced_vars["params"])
  # The physically sliced network (export) costs what the slimmed one does.
  assert cost.count(sliced, sliced_vars, x, exclude_padding=True) == analytic
  # The masked path computes every channel, so it costs what the full network costs.
  assert cost.count(net, variables, x, widths=DynamicWidths.from_config(widths)) == (
      cost.count(net, variables, x)) == cost.Cost(39_189_600, cost.num_params(variables["params"]))


class PlainFlax(nn.Module):
  """Stock Flax layers (a hypernetwork may use them): conv, layer norm, dense."""

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Conv(4, (3, 3), padding="SAME")(x))
    return nn.Dense(2)(x.mean(axis=(1, 2)))


def test_plain_flax_layers_are_counted():
  net = PlainFlax()
  x = jnp.ones((1, 6, 6, 2))
  variables = jax.eval_shape(net.init, jax.random.key(0), x)
  assert cost.count(net, variables, x) == cost.Cost(
      macs=6 * 6 * 9 * 2 * 4 + 4 * 2, params=(9 * 2 * 4 + 4) + 2 * 4 + (4 * 2 + 2))
  no_pad = cost.count(net, variables, x, exclude_padding=True)
  assert no_pad.macs == (6 * 3 - 2) ** 2 * 2 * 4 + 4 * 2
  assert no_pad.macs == cost.xla_cost(net.apply, variables, x)["matmul_macs"]
