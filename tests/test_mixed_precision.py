"""Mixed precision (`compute_dtype="bfloat16"`): activations in bfloat16, everything kept float32.

A static ResNet-small with batch norm on 8 px images and two regression tasks: the step runs with
bfloat16 convolutions, parameters, optimizer state and running statistics stay float32, the loss
falls over a short training, and the results stay within the stated tolerances of float32
(bfloat16 keeps 8 significant bits: about 0.4 % per rounding).
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.train import state as state_lib
from dymu_jax.train import step as step_lib

import random_variables as test_variables

RESNET = {"backbone": "resnet_small", "head_width": 8,
          "backbone_kwargs": {"stage_channels": (8, 16), "stage_sizes": (1, 1)}}
TASKS = (tasks_lib.regression("a"), tasks_lib.regression("b"))
IMAGE_SHAPE = (8, 8, 3)
# Stated tolerances of bfloat16 against float32 on this network.
FIRST_LOSS_RTOL = 2e-2        # the first step's loss
GRADIENT_COSINE_MIN = 0.99    # cosine of the first step's whole gradient with float32's
FINAL_LOSS_RTOL = 0.15        # the mean loss of the last 5 of 40 steps


def _problem():
  method = methods.build("static", TASKS, model_options=RESNET)
  images = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes, 0)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(16, *IMAGE_SHAPE)).astype(np.float32)
  # Learnable targets: linear functions of the mean colour.
  batch = {"image": x, "a": (x.mean(axis=(1, 2)) @ np.array([3.0, -2.0, 1.0])).astype(np.float32),
           "b": (x[..., 0].mean(axis=(1, 2)) * 4 - 2).astype(np.float32)}
  return method, variables, batch


def _state(variables, optimizer):
  return state_lib.create(variables, optimizer, jnp.asarray(np.asarray(jax.random.PRNGKey(0))))


def _train(compute_dtype: str, steps: int):
  method, variables, batch = _problem()
  optimizer = optax.adam(3e-3)
  step = jax.jit(step_lib.make_train_step(method, optimizer, compute_dtype=compute_dtype))
  state = _state(variables, optimizer)
  losses, first = [], None
  for _ in range(steps):
    if first is None:
      grad_fn = jax.grad(lambda p: method.loss(
          p, state.model_state, step_lib.cast_inputs(batch, jnp.dtype(compute_dtype)), None,
          jnp.asarray(0))[0])
      first = jax.jit(grad_fn)(state.params)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, first


def _convolution_dtypes(jaxpr) -> set[str]:
  out = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.update(str(v.aval.dtype) for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _convolution_dtypes(sub)
  return out


def test_bfloat16_step_computes_in_bfloat16_and_keeps_float32_state():
  method, variables, batch = _problem()
  optimizer = optax.adam(1e-3)
  step = step_lib.make_train_step(method, optimizer, compute_dtype="bfloat16")
  state = _state(variables, optimizer)
  assert _convolution_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr) == {"bfloat16"}
  float32_step = step_lib.make_train_step(method, optimizer)
  assert _convolution_dtypes(jax.make_jaxpr(float32_step)(state, batch).jaxpr) == {"float32"}
  new_state, metrics = jax.jit(step)(state, batch)
  for tree in (new_state.params, new_state.opt_state, new_state.model_state):
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {"float32"}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))


def test_bfloat16_training_learns_and_stays_close_to_float32():
  _, losses32, grads32 = _train("float32", 40)
  _, losses16, grads16 = _train("bfloat16", 40)
  assert np.mean(losses16[-5:]) < 0.5 * losses16[0], losses16
  np.testing.assert_allclose(losses16[0], losses32[0], rtol=FIRST_LOSS_RTOL)
  flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
  flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > GRADIENT_COSINE_MIN, cosine
  np.testing.assert_allclose(np.mean(losses16[-5:]), np.mean(losses32[-5:]),
                             rtol=FINAL_LOSS_RTOL)


def test_unknown_compute_dtype_is_one_sentence():
  method, _, _ = _problem()
  with pytest.raises(ValueError, match=r"compute_dtype 'float16' is not one of float32, "
                                       r"bfloat16"):
    step_lib.make_train_step(method, optax.adam(1e-3), compute_dtype="float16")


def _dymu(stage: str):
  import test_methods_dymu as dymu_tests  # its numpy-filled anchor and hypernetworks
  if stage == "anchor":
    method, variables = dymu_tests.anchor()
  else:
    method, variables = dymu_tests.trained(stage)
  return method, variables, dymu_tests.digits_batch(0, size=8)


def _method(name: str):
  method = methods.build(name, TASKS, model_options=RESNET)
  images = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  return method, test_variables.fill(shapes, 0), _problem()[2]


@pytest.mark.parametrize("name", ["ecmt", "gradsplit", "phn_bn", "dymu_anchor", "dymu_edge",
                                  "dymu_weight"])
def test_every_method_steps_in_bfloat16_near_float32(name):
  method, variables, batch = (_dymu(name[len("dymu_"):]) if name.startswith("dymu_")
                              else _method(name))
  optimizer = optax.adam(1e-3)
  state = _state(variables, optimizer)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    step = jax.jit(step_lib.make_train_step(method, optimizer, compute_dtype=dtype))
    new_state, metrics = step(state, batch)
    losses[dtype] = float(metrics["loss"])
    assert {str(leaf.dtype) for leaf in jax.tree.leaves(new_state.params)} == {"float32"}
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=FIRST_LOSS_RTOL)
