"""The CPU speed changes leave results unchanged: every rewrite against the plain version.

Plain versions (what `fast_ops.plain()` traces): `lax.conv_general_dilated` for the convolution
lowerings of `models/fast_ops.py`, `jnp.max` over the reshaped 2x2 windows for `max_pool_2x2`,
and autodiff of the two-pass batch norm for `batch_normalize`. "Unchanged" means within 1e-5 of
the largest magnitude of the plain result (float32 sums taken in another order), on outputs and
on gradients; pooling is bit-exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib
from dymu_jax.models import fast_ops, layers
from dymu_jax.models.layers import SlimBatchNorm, SlimConv
from dymu_jax.train import state as state_lib

TOL = 1e-5
# After an optimizer update, float32 rounding differences of the first gradients (each within
# TOL) are carried into the parameters and everything computed from them. In the ResNet-small
# case (16 images, batch norm on channels whose batch variance is near zero) the second step
# amplifies them: measured on a 2-core x86_64 CPU, 1.2e-4 relative on its gradient norm and
# 3.8e-4 on the stem kernel after two SGD steps (lr 0.1; lr 0.01 did not help), while every
# first-step gradient agreed within TOL. Its quantities after an update get this bound; a
# wrong operation gives errors of order one.
TOL_AFTER_UPDATE = {"lenet": TOL, "resnet_small": 1e-3}


def assert_close(actual, expected, what="", tol=TOL):
  """max |actual - expected| <= tol * max(1, max |expected|), leaf by leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), what
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, what
    scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
    err = float(np.max(np.abs(a - e))) if e.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} for scale {scale:.3g}"


def normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


# (input shape, kernel shape, strides, padding, lowering); None = "auto".
CONV_CASES = {
    "lenet_conv1": ((8, 36, 36, 1), (9, 9, 1, 10), (1, 1), "VALID", None),
    "resnet_stem": ((4, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), None),
    "lenet_fc_dense": ((8, 5, 5, 20), (5, 5, 20, 50), (1, 1), "VALID", None),
    "lenet_conv2": ((8, 14, 14, 10), (5, 5, 10, 20), (1, 1), "VALID", None),
    "resnet_mid_channels": ((4, 8, 8, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)), None),
    "block_not_dividing": ((3, 13, 11, 2), (4, 3, 2, 5), (1, 1), "VALID", "toeplitz"),
    "strided_asymmetric": ((2, 17, 19, 3), (3, 5, 3, 7), (2, 3), ((2, 1), (0, 3)), "toeplitz"),
    "same_padding": ((2, 9, 10, 6), (3, 3, 6, 4), (1, 1), "SAME", "toeplitz"),
    "strided_same": ((2, 15, 15, 3), (7, 7, 3, 16), (2, 2), "SAME", "toeplitz"),
    "forced_dense": ((3, 4, 6, 5), (4, 6, 5, 3), (1, 1), "VALID", "dense"),
    # 5x5 and larger stride-1 kernels take the input gradient through the Toeplitz GEMM too:
    # padding, a block that does not divide the width, windows spanning 2 and 4 chunks.
    "large_kernel_padded": ((2, 11, 13, 3), (5, 5, 3, 4), (1, 1), ((2, 1), (1, 2)), "toeplitz"),
    "large_kernel_narrow_blocks": ((2, 12, 12, 4), (7, 7, 4, 32), (1, 1), "SAME", "toeplitz"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES) + ["lenet_conv1_split_weight_grad"])
def test_conv_lowering_matches_xla(case, monkeypatch):
  if case == "lenet_conv1_split_weight_grad":
    # The weight-gradient GEMM in two halves, as for the full-size batch (8 * 28 * 4 rows).
    monkeypatch.setattr(fast_ops, "TOEPLITZ_SPLIT_WEIGHT_GRAD_ROWS", 8 * 28 * 4)
    case = "lenet_conv1"
  in_shape, k_shape, strides, padding, lowering = CONV_CASES[case]
  x = normal(0, in_shape)
  w = normal(1, k_shape, 1 / np.sqrt(np.prod(k_shape[:3])))
  plain = lambda x, w: fast_ops.conv2d(x, w, strides=strides, padding=padding, lowering="xla")
  fast = lambda x, w: fast_ops.conv2d(x, w, strides=strides, padding=padding,
                                      lowering=lowering or "auto")
  y_ref = plain(x, w)
  g = normal(2, y_ref.shape)
  loss = lambda f: (lambda x, w: jnp.vdot(f(x, w), g))
  # Undifferentiated call (inference): XLA's convolution itself.
  assert_close(jax.jit(fast)(x, w), y_ref, "inference")
  # Differentiated call: the primal that training uses, and both gradients.
  (y_fast, vjp) = jax.vjp(jax.jit(fast), x, w)
  assert_close(y_fast, y_ref, "primal under vjp")
  ref_grads = jax.grad(loss(plain), (0, 1))(x, w)
  assert_close(vjp(g), ref_grads, "gradients")
  assert_close(jax.jit(jax.grad(loss(fast), (0, 1)))(x, w), ref_grads, "jit gradients")
  # Weight gradient alone (the image's gradient is never computed).
  assert_close(jax.grad(loss(fast), 1)(x, w), ref_grads[1], "weight gradient")
  # Forward mode and vmap.
  dx, dw = normal(3, in_shape), normal(4, k_shape)
  y_jvp, t_jvp = jax.jvp(fast, (x, w), (dx, dw))
  y_ref_jvp, t_ref = jax.jvp(plain, (x, w), (dx, dw))
  assert_close(y_jvp, y_ref_jvp, "jvp primal")
  assert_close(t_jvp, t_ref, "jvp tangent")
  assert_close(jax.vmap(fast)(x[None], w[None])[0], y_ref, "vmap")


def test_auto_routes_only_the_shapes_it_is_measured_faster_on():
  choose = fast_ops.choose_lowering
  zero = ((0, 0), (0, 0))
  one = ((1, 1), (1, 1))
  assert choose((256, 36, 36, 1), (9, 9, 1, 10), (1, 1), zero, (1, 1), 1) == "toeplitz"
  assert choose((64, 32, 32, 3), (3, 3, 3, 16), (1, 1), one, (1, 1), 1) == "toeplitz"
  assert choose((256, 5, 5, 20), (5, 5, 20, 50), (1, 1), zero, (1, 1), 1) == "dense"
  # Up to 64 input channels take the Toeplitz lowering (LeNet's conv2, ResNet-small's 3x3s).
  assert choose((256, 14, 14, 10), (5, 5, 10, 20), (1, 1), zero, (1, 1), 1) == "toeplitz"
  assert choose((64, 32, 32, 16), (3, 3, 16, 16), (1, 1), one, (1, 1), 1) == "toeplitz"
  assert choose((64, 8, 8, 64), (3, 3, 64, 64), (1, 1), one, (1, 1), 1) == "toeplitz"
  # More input channels, strides, dilation, groups and 1x1 kernels stay on XLA.
  assert choose((64, 4, 4, 128), (3, 3, 128, 128), (1, 1), one, (1, 1), 1) == "xla"
  assert choose((64, 32, 32, 16), (3, 3, 16, 32), (2, 2), one, (1, 1), 1) == "xla"
  assert choose((8, 224, 224, 3), (7, 7, 3, 64), (2, 2), ((3, 3), (3, 3)), (1, 1), 1) == "xla"
  assert choose((8, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((2, 2), (2, 2)), (2, 2), 1) == "xla"
  assert choose((8, 32, 32, 4), (3, 3, 1, 4), (1, 1), one, (1, 1), 4) == "xla"
  assert choose((8, 32, 32, 3), (1, 1, 3, 16), (1, 1), zero, (1, 1), 1) == "xla"
  # Of those, 5x5 and larger stride-1 kernels also take the Toeplitz input gradient.
  assert fast_ops.toeplitz_input_gradient((5, 5, 10, 20), (1, 1))
  assert fast_ops.toeplitz_input_gradient((9, 9, 1, 10), (1, 1))
  assert not fast_ops.toeplitz_input_gradient((3, 3, 16, 16), (1, 1))
  assert not fast_ops.toeplitz_input_gradient((7, 7, 3, 16), (2, 2))
  # ... and the gradient really takes that route: no XLA convolution in LeNet conv2's input
  # gradient, one in a 3x3's.
  def input_grad_jaxpr(in_shape, k_shape, padding):
    w = jnp.ones(k_shape)
    grad = jax.grad(lambda x: jnp.sum(fast_ops.conv2d(x, w, padding=padding)))
    return str(jax.make_jaxpr(grad)(jnp.ones(in_shape)))
  assert "conv_general_dilated" not in input_grad_jaxpr((2, 14, 14, 10), (5, 5, 10, 20), "VALID")
  assert "conv_general_dilated" in input_grad_jaxpr((2, 8, 8, 16), (3, 3, 16, 16), "SAME")


def test_conv_lowering_errors_and_switch():
  x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError, match="Unknown conv lowering 'fast'"):
    fast_ops.conv2d(x, w, lowering="fast")
  with pytest.raises(ValueError, match="needs groups=1 and no dilation"):
    fast_ops.conv2d(x, w, dilation=(2, 2), lowering="toeplitz")
  with pytest.raises(ValueError, match="'dense' conv lowering needs a VALID kernel"):
    fast_ops.conv2d(x, w, lowering="dense")
  # The switch changes what is traced: the weight gradient of a 1-channel convolution is a
  # matmul (Toeplitz) normally and XLA's convolution within plain().
  x = jnp.ones((1, 8, 8, 1))
  grad_jaxpr = lambda: str(jax.make_jaxpr(jax.grad(
      lambda w: jnp.sum(fast_ops.conv2d(x, w[:, :, :1]))))(w))
  assert fast_ops.enabled()
  assert "dot_general" in grad_jaxpr() and "conv_general_dilated" not in grad_jaxpr()
  with fast_ops.plain():
    assert not fast_ops.enabled()
    assert "dot_general" not in grad_jaxpr() and "conv_general_dilated" in grad_jaxpr()
  assert fast_ops.enabled()


@pytest.mark.parametrize("dynamic", [False, True])
def test_slim_conv_sliced_and_masked_paths_match(dynamic):
  """SlimConv on slimmed inputs and outputs, static and masked, against the plain lowering."""
  conv = SlimConv(10, 9, padding="VALID", use_bias=True, in_features=3, name="conv")
  variables = conv.init(jax.random.key(0), jnp.zeros((1, 36, 36, 3)))
  variables = jax.tree.map(lambda v: normal(5, v.shape, 0.1), variables)
  width = jnp.asarray(6, jnp.int32) if dynamic else 6
  cin = 3 if dynamic else 2  # the masked path takes full-width inputs
  x = normal(6, (4, 36, 36, cin))

  def loss(v, x):
    y = conv.apply(v, x, width)
    return jnp.sum(jnp.sin(y)), y

  with fast_ops.plain():
    (_, y_ref), g_ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(variables, x)
  (_, y), g = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables, x)
  assert y.shape == (4, 28, 28, 10 if dynamic else 6)
  if dynamic:
    assert not np.any(np.asarray(y[..., 6:]))
  assert_close(y, y_ref, "output")
  assert_close(g, g_ref, "gradients")


def _plain_max_pool(x):
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


@pytest.mark.parametrize("shape", [(4, 28, 28, 10), (3, 7, 9, 2)])
def test_max_pool_equals_jnp_max_bit_for_bit_with_ties(shape):
  # Values on a coarse grid and a ReLU in front: many tied maxima, as over blank borders.
  x = jnp.round(normal(7, shape) * 2) / 2
  g = normal(8, _plain_max_pool(x).shape)
  f_ref = lambda x: _plain_max_pool(jax.nn.relu(x))
  f_new = lambda x: layers.max_pool_2x2(jax.nn.relu(x))
  y_ref, vjp_ref = jax.vjp(f_ref, x)
  y_new, vjp_new = jax.vjp(jax.jit(f_new), x)
  np.testing.assert_array_equal(y_new, y_ref)
  np.testing.assert_array_equal(vjp_new(g)[0], vjp_ref(g)[0])
  assert float(jnp.sum(vjp_ref(g)[0] != 0)) > 0


@pytest.mark.parametrize("dynamic", [False, True])
def test_batch_norm_values_gradients_and_statistics_match(dynamic):
  bn = SlimBatchNorm(momentum=0.9, features=8, name="bn")
  x = normal(9, (6, 5, 5, 8), 3.0) + 1.0
  variables = bn.init(jax.random.key(0), x, train=False)
  variables = {"params": jax.tree.map(lambda v: normal(10, v.shape), variables["params"]),
               "batch_stats": {"mean": normal(11, (8,)), "var": 1.0 + normal(12, (8,)) ** 2}}
  width = jnp.asarray(5, jnp.int32) if dynamic else None
  g = normal(13, x.shape)

  def loss(params, x):
    y, state = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        train=True, width=width, mutable=["batch_stats"])
    return jnp.vdot(jnp.tanh(y), g), (y, state)

  grad = jax.value_and_grad(loss, (0, 1), has_aux=True)
  with fast_ops.plain():
    (l_ref, (y_ref, s_ref)), g_ref = grad(variables["params"], x)
  (l_new, (y_new, s_new)), g_new = jax.jit(grad)(variables["params"], x)
  assert_close(y_new, y_ref, "output")
  assert_close(s_new, s_ref, "running statistics")
  assert_close(l_new, l_ref, "loss")
  assert_close(g_new, g_ref, "gradients")
  # The mean and variance outputs are differentiable too (zero cotangents in the train step).
  f = lambda x: sum(jnp.sum(jnp.sin(o)) for o in fast_ops.batch_normalize(x, 1e-5))
  with fast_ops.plain():
    g_plain = jax.grad(f)(x)
  assert_close(jax.grad(f)(x), g_plain, "mean/var gradients")


# -- the whole train step -----------------------------------------------------------------------

STEP_CASES = {
    # dataset, data folder, backbone, head width, batch, optimizer
    "lenet": ("multi_mnist", "mnist", "lenet", 50, 32, "adam"),
    # SGD here: Adam's first steps divide every gradient element by its own magnitude, and
    # ResNet's deepest kernels have elements ~1e-9 (1e-7 of the leaf's largest), i.e. rounding
    # noise in either version, which Adam turns into parameter moves of up to its learning
    # rate. The gradients themselves are compared to 1e-5 all the same.
    "resnet_small": ("utkface", "utkface", "resnet_small", 64, 16, "sgd"),
}


def _run_steps(shared_data, case, plain, num_steps=2):
  """Gradients of the first batch, metrics of every step and the final state of the project's
  compiled, state-donating train step, traced plain or with the rewrites."""
  dataset, folder, backbone, head_width, batch, optimizer = STEP_CASES[case]
  config = data_lib.DataConfig(name=dataset, data_dir=f"{shared_data}/{folder}",
                               num_train=batch * num_steps, num_test=8)
  source = data_lib.load(config, "train")
  method = methods_lib.build("static", source.tasks,
                             model_options={"backbone": backbone, "head_width": head_width})
  batcher = data_lib.Batcher(source, batch, seed=0)
  par = train_lib.Parallel("mesh")
  optimizer = train_lib.TrainConfig(optimizer=optimizer, learning_rate=(
      1e-3 if optimizer == "adam" else 0.1)).make_optimizer()
  batches = [par.shard_batch(batcher.batch(i)) for i in range(num_steps)]
  with fast_ops.plain(plain):
    state = par.place_state(par.init_state(
        state_lib.init_fn(method, optimizer), jax.random.PRNGKey(0), batcher.batch(0)))
    loss = lambda p, s, b: method.loss(p, s, b, None, 0)
    (_, (aux, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        state.params, state.model_state, batches[0])
    step = par.compile_step(method, optimizer, source.tasks)
    history = []
    for b in batches:
      state, metrics = step(state, b)
      history.append(par.read(metrics))
  return grads, aux, history, par.read(state)


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_train_step_results_unchanged(shared_data, case):
  """Gradients, losses, metrics, parameters, optimizer state and batch statistics after two
  steps of the real train step equal the plain version's."""
  grads_ref, aux_ref, history_ref, state_ref = _run_steps(shared_data, case, plain=True)
  grads, aux, history, state = _run_steps(shared_data, case, plain=False)
  assert_close(grads, grads_ref, "gradients")
  assert_close(aux, aux_ref, "task losses")
  for step, (m, m_ref) in enumerate(zip(history, history_ref)):
    assert sorted(m) == sorted(m_ref)
    for key in m_ref:
      assert_close(m[key], m_ref[key], f"step {step} {key}",
                   TOL if step == 0 else TOL_AFTER_UPDATE[case])
  after = TOL_AFTER_UPDATE[case]
  assert_close(state.params, state_ref.params, "params", after)
  assert_close(state.opt_state, state_ref.opt_state, "optimizer state", after)
  assert_close(state.model_state, state_ref.model_state, "batch statistics", after)
  assert int(state.step) == 2 and int(state.nonfinite_step) == -1
