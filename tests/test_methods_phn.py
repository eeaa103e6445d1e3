"""PHN and PHN-BN: generated parameters, chunking, the scalarised loss and the controls.

The shared network is a 4-6-8 channel LeNet with batch norm on 16 px images and 8-wide heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import models
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import phn
from dymu_jax.models import cost

import random_variables as test_variables

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
LENET = {"conv_channels": (4, 6), "kernel_sizes": (5, 3), "fc_features": 8}
SHAPE = (16, 16, 1)


def make_net(batch_norm: bool = True):
  return functools.partial(models.build_multitask, backbone="lenet", head_width=8,
                           backbone_kwargs={**LENET, "batch_norm": batch_norm})


def digits_batch(seed: int, size: int = 4) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(size, *SHAPE)).astype(np.float32),
          "left": rng.integers(0, 10, size).astype(np.int32),
          "right": rng.integers(0, 10, size).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def phn_setup(mode: str):
  """(method, variables with `init`'s shapes filled by numpy; PHN-BN's head zero as in init)."""
  method = phn.build(DIGITS, make_net(), mode=mode, chunk_size=64, hidden=(8,))
  shapes = jax.eval_shape(method.init, jax.random.key(0),
                          {"image": jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)})
  variables = test_variables.fill(shapes, seed=1, other_scale=1.0)
  if mode == "bn":
    head = variables["params"]["hypernet"]["head"]
    variables["params"]["hypernet"]["head"] = jax.tree.map(jnp.zeros_like, head)
  return method, variables


def shapes_of(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_chunked_hypernet_output_size_and_zero_head():
  zero = phn.ChunkedHypernet(10, hidden=(4,), chunk_size=4, zero_head=True)
  head = jax.jit(zero.init)(jax.random.key(0), jnp.ones((2,)))["params"]["head"]
  assert not np.any(head["kernel"]) and not np.any(head["bias"])
  assert phn_setup("bn")[0].hypernet(10).zero_head
  assert not phn_setup("all")[0].hypernet(10).zero_head
  for chunk_size, expected_chunks in ((64, 4), (0, None), (500, None)):
    net = phn.ChunkedHypernet(200, hidden=(4,), chunk_size=chunk_size, chunk_features=3)
    variables = jax.eval_shape(net.init, jax.random.key(0), jnp.ones((2,)))
    out = jax.eval_shape(net.apply, variables, jnp.ones((2,)))
    assert out.shape == (200,)
    params = variables["params"]
    if expected_chunks is None:
      assert "chunk_embeddings" not in params and params["head"]["kernel"].shape == (4, 200)
    else:  # 4 chunks of 64 cover 200 values; one head shared by the chunks
      assert params["chunk_embeddings"].shape == (4, 3)
      assert params["head"]["kernel"].shape == (4 + 3, 64)


def test_phn_generates_every_parameter_of_the_shared_network():
  method, variables = phn_setup("all")
  network_shapes = method.network_shapes(SHAPE)
  assert set(variables["params"]) == {"hypernet"}
  assert "batch_stats" in variables
  generate = jax.jit(lambda p, r: method.network_params(p, SHAPE, r))
  params = {r: generate(variables["params"], jnp.asarray(r)) for r in ((0.9, 0.1), (0.1, 0.9))}
  assert shapes_of(params[(0.9, 0.1)]) == shapes_of(network_shapes["params"])
  a, b = (jax.tree.leaves(p) for p in params.values())
  assert all(not np.allclose(x, y) for x, y in zip(a, b))  # every tensor depends on r
  # Fresh weights of the usual size: He-scaled kernels, batch-norm scales near 1.
  encoder = params[(0.9, 0.1)]["encoder"]
  assert 0.3 < np.std(encoder["conv1"]["kernel"]) / np.sqrt(2 / 25) < 3.0
  assert abs(np.mean(encoder["bn1"]["scale"]) - 1.0) < 0.5
  # The hypernetwork is far smaller than the generated network only thanks to chunking.
  total = cost.num_params(network_shapes["params"])
  assert total > 64 * 4 and variables["params"]["hypernet"]["head"]["kernel"].shape[-1] == 64
  # predict runs the network generated for the preference.
  images = digits_batch(1)["image"]
  expected = method.model.apply({"params": params[(0.9, 0.1)],
                                 "batch_stats": variables["batch_stats"]}, images)
  got = jax.jit(lambda v, x: method.predict(v, x, {"preference": (0.9, 0.1)}))(variables,
                                                                               images)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], atol=1e-5)


def test_phn_bn_generates_only_batch_norm_parameters():
  method, variables = phn_setup("bn")
  params = variables["params"]
  encoder = params["network"]["encoder"]
  assert set(encoder) == {"conv1", "conv2", "fc"}  # no bn1, bn2, bn_fc: those are generated
  generate = jax.jit(lambda p, r: method.network_params(p, SHAPE, r))
  # A fresh PHN-BN starts at the usual batch-norm values, whatever the preference.
  fresh = generate(params, jnp.asarray((0.3, 0.7)))
  np.testing.assert_array_equal(fresh["encoder"]["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(fresh["encoder"]["bn2"]["bias"], 0.0)
  np.testing.assert_array_equal(fresh["encoder"]["conv1"]["kernel"], encoder["conv1"]["kernel"])
  # With a trained head, the preference moves batch-norm parameters and nothing else.
  hyper = jax.tree.map(lambda a: a, params["hypernet"])
  hyper["head"]["kernel"] = jnp.ones_like(hyper["head"]["kernel"])
  moved = {r: generate({**params, "hypernet": hyper}, jnp.asarray(r))
           for r in ((0.9, 0.1), (0.1, 0.9))}
  first, second = moved.values()
  assert not np.allclose(first["encoder"]["bn1"]["scale"], second["encoder"]["bn1"]["scale"])
  np.testing.assert_array_equal(first["encoder"]["fc"]["kernel"],
                                second["encoder"]["fc"]["kernel"])
  with pytest.raises(ValueError, match="the network has no batch norm"):
    phn.build(DIGITS, make_net(batch_norm=False), mode="bn").init(jax.random.key(0),
                                                                  digits_batch(0))


@pytest.mark.parametrize("mode", phn.MODES)
def test_scalarised_loss_trains_the_hypernet(mode):
  method, variables = phn_setup(mode)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  grad_fn = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
  (loss, (aux, new_state)), grads = grad_fn(params, state, digits_batch(2), jax.random.key(3),
                                            0)
  assert np.isfinite(loss) and set(aux) == {"loss/left", "loss/right"}
  # Linear scalarisation with a preference on the simplex: between the two task losses.
  low, high = sorted(float(v) for v in aux.values())
  assert low - 1e-5 <= float(loss) <= high + 1e-5
  assert np.any(grads["hypernet"]["head"]["kernel"])
  if mode == "bn":
    assert np.any(grads["network"]["encoder"]["conv1"]["kernel"])
  assert not np.allclose(new_state["batch_stats"]["encoder"]["bn1"]["mean"],
                         state["batch_stats"]["encoder"]["bn1"]["mean"])


def test_phn_controls_and_options():
  method, variables = phn_setup("all")
  images = digits_batch(0)["image"]
  with pytest.raises(ValueError, match=r"^The preference \(0.5, 0.6\) is not on the simplex: "
                                       r"entries must be >= 0 and sum to 1 "
                                       r"\(they sum to 1.1\)\.$"):
    method.predict(variables, images, {"preference": (0.5, 0.6)})
  with pytest.raises(ValueError, match=r"^The preference has 3 entries \(0.2, 0.3, 0.5\) but "
                                       r"there are 2 tasks\.$"):
    method.predict(variables, images, {"preference": (0.2, 0.3, 0.5)})
  with pytest.raises(ValueError, match="PHN controls must be"):
    method.predict(variables, images, {"preference": (0.5, 0.5), "resource": 0.5})
  assert method.eval_controls() == [{"preference": (0.5, 0.5)}]
  assert method.name == "phn" and phn_setup("bn")[0].name == "phn_bn"
  with pytest.raises(ValueError, match="Unknown PHN mode 'weights'"):
    phn.build(DIGITS, make_net(), mode="weights")
  with pytest.raises(ValueError, match="Unknown PHN and PHN-BN option"):
    phn.build(DIGITS, make_net(), lambda_kd=1.0)
