"""Backend-aware execution: the switch, the per-backend defaults, and the same results both ways.

The backend is reported as "gpu" by monkeypatching `jax.default_backend` (the arrays still live
on the CPU): the traced programs must then use XLA's own ops (no Toeplitz lowering) and one
vmapped pass over tasks, and give the CPU path's values within 1e-5.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import execution, methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.models import fast_ops

import random_variables as test_variables

RESNET = {"backbone": "resnet_small", "head_width": 8,
          "backbone_kwargs": {"stage_channels": (8, 16), "stage_sizes": (1, 1)}}
TASKS = (tasks_lib.regression("a"), tasks_lib.regression("b"))
IMAGE_SHAPE = (8, 8, 3)


@pytest.fixture
def backend(monkeypatch):
  """`backend("gpu")` makes JAX report that backend; the switch is reset afterwards."""
  monkeypatch.setattr(execution, "_overrides", {})
  monkeypatch.setattr(execution, "_spec", "auto")
  monkeypatch.setattr(fast_ops, "_plain", None)
  return lambda name: monkeypatch.setattr(jax, "default_backend", lambda: name)


def test_switch_values_and_errors():
  assert execution.parse("auto") == {} and execution.parse("") == {}
  assert execution.parse("cpu") == {"fast_ops": True, "passes": "unrolled"}
  assert execution.parse("Accelerator") == {"fast_ops": False, "passes": "vmap"}
  assert execution.parse("fast_ops=on, passes=vmap") == {"fast_ops": True, "passes": "vmap"}
  with pytest.raises(ValueError, match=r"'fast' in 'fast' is not one of 'auto', 'cpu'"):
    execution.parse("fast")
  with pytest.raises(ValueError, match=r"fast_ops='yes' must be 'on' or 'off'"):
    execution.parse("fast_ops=yes")
  with pytest.raises(ValueError, match=r"passes='batched' must be one of unrolled, vmap"):
    execution.parse("passes=batched")


def test_defaults_follow_the_backend_and_the_switch_overrides_them(backend):
  backend("cpu")
  assert execution.choices() == execution.CPU and fast_ops.enabled()
  backend("gpu")
  assert execution.choices() == execution.ACCELERATOR and not fast_ops.enabled()
  backend("tpu")
  assert execution.choices() == execution.ACCELERATOR
  assert execution.configure("fast_ops=on") == execution.Choices(True, "vmap")
  assert fast_ops.enabled()
  with fast_ops.plain():  # the older switch still wins
    assert not fast_ops.enabled()
  execution.configure("cpu")
  assert execution.choices() == execution.CPU and execution.spec() == "cpu"


def _variables(method):
  images = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  return test_variables.fill(shapes, 0)


def _batch(seed=0, size=4):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
          "a": rng.normal(size=size).astype(np.float32),
          "b": rng.normal(size=size).astype(np.float32)}


def _count(jaxpr, primitive: str) -> int:
  """Equations of `primitive` in a closed jaxpr, sub-jaxprs (custom_jvp, pjit, ...) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == primitive
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _count(sub, primitive)
  return total


def _traced(method, variables, batch):
  """(jaxpr of `method.loss_and_grad`, its gradients), traced and run under the choices now."""
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  fn = lambda p, b: method.loss_and_grad(p, state, b, jax.random.PRNGKey(0), jnp.asarray(0))
  closed = jax.make_jaxpr(fn)(params, batch)
  (_, _), grads = jax.jit(fn)(params, batch)
  return closed.jaxpr, jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("name,options", [
    ("pcgrad", {}),
    ("gradsplit", {"routing": "fixed", "routing_matrix": "identity"}),
])
def test_gpu_backend_traces_plain_ops_and_vmapped_task_passes(backend, monkeypatch, name,
                                                              options):
  method = methods.build(name, TASKS, model_options=RESNET, method_options=options)
  variables, batch = _variables(method), _batch()
  toeplitz_calls = []
  original = fast_ops._toeplitz_conv
  monkeypatch.setattr(fast_ops, "_toeplitz_conv",
                      lambda *a, **k: toeplitz_calls.append(1) or original(*a, **k))

  backend("cpu")
  cpu_jaxpr, cpu_grads = _traced(method, variables, batch)
  assert toeplitz_calls, "the CPU path should take the Toeplitz lowering"
  backend("gpu")
  toeplitz_calls.clear()
  gpu_jaxpr, gpu_grads = _traced(method, variables, batch)
  assert not toeplitz_calls
  vmapped = _count(gpu_jaxpr, "conv_general_dilated")
  execution.configure("passes=unrolled")
  unrolled_jaxpr, unrolled_grads = _traced(method, variables, batch)
  unrolled = _count(unrolled_jaxpr, "conv_general_dilated")
  # Forward + one backward per task unrolled; forward + one batched backward vmapped.
  assert 0 < vmapped < unrolled, (vmapped, unrolled)
  assert _count(cpu_jaxpr, "conv_general_dilated") < unrolled  # Toeplitz replaced some

  for got, other in ((gpu_grads, cpu_grads), (unrolled_grads, cpu_grads)):
    for g, c in zip(jax.tree.leaves(got), jax.tree.leaves(other)):
      np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(c).max()))


def test_ecmt_sampled_subnets_vmapped_on_gpu_give_the_cpu_loss(backend):
  method = methods.build("ecmt", TASKS, model_options=RESNET,
                         method_options={"num_subnets": 4})
  variables, batch = _variables(method), _batch(1)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  # A new function per trace: jit caches traces per function, not per execution choice.
  run = lambda: jax.jit(jax.value_and_grad(
      lambda p: method.loss(p, state, batch, jax.random.PRNGKey(3), jnp.asarray(0))[0]))(params)
  backend("cpu")
  cpu_loss, cpu_grads = run()
  backend("gpu")
  gpu_loss, gpu_grads = run()
  np.testing.assert_allclose(float(gpu_loss), float(cpu_loss), rtol=1e-5)
  for g, c in zip(jax.tree.leaves(gpu_grads), jax.tree.leaves(cpu_grads)):
    c = np.asarray(c)
    np.testing.assert_allclose(np.asarray(g), c, rtol=1e-5,
                               atol=1e-5 * max(1.0, np.abs(c).max()))
