"""The baselines: hard sharing (`static`) and independent single-task networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import data, methods
from dymu_jax import tasks as tasks_lib

CONFIG = data.DataConfig(name="synthetic", image_size=16, num_train=8, num_test=8)
OPTIONS = {"backbone": "resnet_small", "head_width": 8}


@pytest.fixture(scope="module")
def batch_and_tasks():
  source = data.load(CONFIG, "train").with_tasks("segmentation,depth")
  return source.get(np.arange(4)), source.tasks


def _split(variables):
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def test_static_loss_is_weighted_sum_of_task_losses(batch_and_tasks):
  batch, tasks = batch_and_tasks
  method = methods.build("static", tasks, model_options=OPTIONS, task_weights=(2.0, 0.5))
  variables = method.init(jax.random.PRNGKey(0), batch)
  params, state = _split(variables)
  total, (aux, new_state) = jax.jit(method.loss)(params, state, batch, jax.random.PRNGKey(1), 0)
  expected = 2.0 * aux["loss/segmentation"] + 0.5 * aux["loss/depth"]
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  # Training mode updates the running batch statistics.
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), state, new_state)
  assert any(jax.tree_util.tree_leaves(changed))
  outputs = jax.jit(method.predict)(variables, batch["image"])
  assert outputs["segmentation"].shape == (4, 16, 16, tasks[0].num_outputs)
  assert outputs["depth"].shape == (4, 16, 16, 1)


def test_static_shares_the_encoder(batch_and_tasks):
  batch, tasks = batch_and_tasks
  method = methods.build("static", tasks, model_options=OPTIONS)
  params, state = _split(method.init(jax.random.PRNGKey(0), batch))

  def depth_loss(p):
    return method.loss(p, state, batch, None, 0)[1][0]["loss/depth"]

  grads = jax.jit(jax.grad(depth_loss))(params)
  encoder_norm = sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads["encoder"]))
  assert encoder_norm > 0  # the shared encoder learns from the depth task


def test_single_task_networks_are_independent(batch_and_tasks):
  batch, tasks = batch_and_tasks
  method = methods.build("single_task", tasks, model_options=OPTIONS)
  params, state = _split(method.init(jax.random.PRNGKey(0), batch))
  assert set(params) == {"net_segmentation", "net_depth"}

  def depth_loss(p):
    return method.loss(p, state, batch, None, 0)[1][0]["loss/depth"]

  grads = jax.jit(jax.grad(depth_loss))(params)
  leaves = lambda tree: jax.tree_util.tree_leaves(tree)  # noqa: E731
  assert all(float(jnp.abs(g).max()) == 0 for g in leaves(grads["net_segmentation"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves(grads["net_depth"]))


def test_bad_arguments_name_the_value(batch_and_tasks):
  _, tasks = batch_and_tasks
  with pytest.raises(ValueError, match="Unknown method 'ecmt2'; available methods are"):
    methods.build("ecmt2", tasks)
  with pytest.raises(ValueError, match="Got 3 task weights for 2 tasks"):
    methods.build("static", tasks, model_options=OPTIONS, task_weights=(1, 1, 1))
  with pytest.raises(tasks_lib.UnknownTaskError, match="Unknown task 'sky'"):
    data.load(CONFIG, "train").with_tasks("sky")
