"""The train step, the non-finite guard, per-task gradients, optimizers and schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.train import optim
from dymu_jax.train import state as state_lib
from dymu_jax.train import step as step_lib
import toy_method

# --------------------------------------------------------------------------------------------
# Per-task gradients.


def _per_task_losses(params, x, y):
  """Three task losses sharing `w` (each task t also owns column t of `head`)."""
  hidden = jnp.tanh(x @ params["w"])
  predictions = hidden @ params["head"]  # (B, 3)
  return jnp.mean((predictions - y) ** 2, axis=0) * jnp.array([1.0, 2.0, 0.5])


def test_per_task_grads_equal_separate_grads():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 4)).astype(np.float32),
            "head": rng.normal(size=(4, 3)).astype(np.float32)}
  x, y = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)

  @jax.jit
  def both(params):
    fused = step_lib.per_task_losses_and_grads(_per_task_losses, params, x, y)
    separate = [jax.grad(lambda p, t=t: _per_task_losses(p, x, y)[t])(params) for t in range(3)]
    return fused, _per_task_losses(params, x, y), separate

  (losses, grads), expected_losses, separate = both(params)
  assert losses.shape == (3,)
  assert grads["w"].shape == (3, 5, 4) and grads["head"].shape == (3, 4, 3)
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
  for t, expected in enumerate(separate):
    np.testing.assert_allclose(grads["w"][t], expected["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["head"][t], expected["head"], rtol=1e-5, atol=1e-6)
  # Task t's loss only reaches column t of the head.
  assert np.all(np.asarray(grads["head"][0][:, 1:]) == 0)


def test_per_task_grads_with_aux_and_bad_output():
  params = {"w": jnp.array([1.0, 2.0])}
  fn = lambda p, s: (jnp.stack([p["w"][0] ** 2, s * p["w"][1] ** 3]), {"n": 7})
  losses, grads, aux = step_lib.per_task_losses_and_grads(fn, params, 2.0, has_aux=True)
  np.testing.assert_allclose(losses, [1.0, 16.0])
  np.testing.assert_allclose(grads["w"], [[2.0, 0.0], [0.0, 24.0]])  # d(2 w1^3) = 6 w1^2
  assert aux == {"n": 7}
  with pytest.raises(ValueError, match=r"must return a vector of T task losses, got shape \(\)"):
    step_lib.per_task_losses_and_grads(lambda p: jnp.sum(p["w"]), params)


# --------------------------------------------------------------------------------------------
# The train step and its guard.

NAN_STEP = 2


@pytest.fixture(scope="module")
def toy_run():
  """Four steps of the toy method with plain SGD; task 1's loss is NaN at step NAN_STEP."""
  method = toy_method.ToyMethod(nan_at_step=NAN_STEP, nan_task=1)
  optimizer = optim.make_optimizer("sgd", 0.1)
  batch = {k: jnp.asarray(v) for k, v in toy_method.make_source().get(np.arange(16)).items()}
  state = jax.jit(state_lib.init_fn(method, optimizer))(jax.random.PRNGKey(3), batch)
  train_step = jax.jit(step_lib.make_train_step(method, optimizer))
  states, metrics = [state], []
  for _ in range(4):
    state, m = train_step(state, batch)
    states.append(state)
    metrics.append(jax.device_get(m))
  return method, batch, states, metrics


def test_step_is_one_sgd_update_with_the_step_key(toy_run):
  method, batch, states, metrics = toy_run
  first = states[0]
  rng = jax.random.fold_in(first.rng, 0)

  @jax.jit
  def manual(params):
    loss_fn = lambda p: method.loss(p, first.model_state, batch, rng, jnp.int32(0))
    (loss, (aux, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, aux, model_state, grads

  loss, aux, model_state, grads = manual(first.params)
  expected = jax.tree.map(lambda p, g: p - 0.1 * g, first.params, grads)
  chex_close = lambda a, b: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  chex_close(states[1].params, expected)
  chex_close(states[1].model_state, model_state)
  assert set(metrics[0]) == {"loss", "loss/third", "loss/brightness", "grad_norm"}
  np.testing.assert_allclose(metrics[0]["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics[0]["loss/third"], aux["loss/third"], rtol=1e-6)
  np.testing.assert_allclose(metrics[0]["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
  assert [int(s.step) for s in states] == [0, 1, 2, 3, 4]
  assert states[1].step.dtype == jnp.int32
  # The batch statistics moved (momentum 0.9 from the zero initialisation).
  assert np.abs(np.asarray(model_state["batch_stats"]["BatchNorm_0"]["mean"])).max() > 0


def test_guard_skips_the_update_and_records_step_and_task(toy_run):
  _, _, states, metrics = toy_run
  before, at, after = states[NAN_STEP], states[NAN_STEP + 1], states[NAN_STEP + 2]
  assert int(before.nonfinite_step) == -1 and int(before.nonfinite_task) == -1
  assert np.isnan(metrics[NAN_STEP]["loss/brightness"])
  assert np.isfinite(metrics[NAN_STEP]["loss/third"])
  for name in ("params", "model_state", "opt_state"):
    chex.assert_trees_all_equal(getattr(at, name), getattr(before, name))
  assert int(at.nonfinite_step) == NAN_STEP and int(at.nonfinite_task) == 1
  assert int(at.step) == NAN_STEP + 1
  # The next (finite) step updates again, and the record keeps the first offence.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after.params, at.params)
  assert max(jax.tree.leaves(moved)) > 0
  assert int(after.nonfinite_step) == NAN_STEP and int(after.nonfinite_task) == 1


def test_step_requires_every_task_loss_in_aux():
  method = toy_method.ToyMethod()

  class NoBrightness(toy_method.ToyMethod):
    def loss(self, *args):
      loss, (aux, model_state) = method.loss(*args)
      return loss, ({"loss/third": aux["loss/third"]}, model_state)

  bad = NoBrightness()
  optimizer = optim.make_optimizer("sgd", 0.1)
  batch = {k: jnp.asarray(v) for k, v in toy_method.make_source().get(np.arange(4)).items()}
  state = jax.eval_shape(state_lib.init_fn(bad, optimizer), jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match="NoBrightness.loss must report the aux scalar "
                                       "'loss/<task>' for every task; missing brightness."):
    jax.eval_shape(step_lib.make_train_step(bad, optimizer), state, batch)


class _LinearTwoTask:
  """Two regression tasks on one linear map; `loss_and_grad` doubles task 0's gradient."""

  tasks = (tasks_lib.regression("a"), tasks_lib.regression("b"))

  def task_losses(self, params, batch):
    predictions = batch["image"] @ params["w"]  # (B, 2)
    return jnp.stack([t.loss(predictions[:, i:i + 1], batch[t.name])
                      for i, t in enumerate(self.tasks)])

  def loss(self, params, model_state, batch, rng, step):
    del rng, step
    losses = self.task_losses(params, batch)
    return jnp.sum(losses), ({"loss/a": losses[0], "loss/b": losses[1]}, model_state)

  def loss_and_grad(self, params, model_state, batch, rng, step):
    del rng, step
    losses, grads = step_lib.per_task_losses_and_grads(self.task_losses, params, batch)
    combined = jax.tree.map(lambda g: 2.0 * g[0] + g[1], grads)
    aux = {"loss/a": losses[0], "loss/b": losses[1]}
    return (jnp.sum(losses), (aux, model_state)), combined


def test_method_supplied_gradient_is_applied():
  method = _LinearTwoTask()
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(6, 3)).astype(np.float32),
           "a": rng.normal(size=(6,)).astype(np.float32),
           "b": rng.normal(size=(6,)).astype(np.float32)}
  params = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
  state = state_lib.create({"params": params}, optim.make_optimizer("sgd", 0.1),
                           jax.random.PRNGKey(0))
  new_state, metrics = jax.jit(step_lib.make_train_step(
      method, optim.make_optimizer("sgd", 0.1)))(state, batch)
  grad_a = jax.grad(lambda p: method.task_losses(p, batch)[0])(params)["w"]
  grad_b = jax.grad(lambda p: method.task_losses(p, batch)[1])(params)["w"]
  np.testing.assert_allclose(new_state.params["w"], params["w"] - 0.1 * (2 * grad_a + grad_b),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(2 * grad_a + grad_b),
                             rtol=1e-5)


def test_init_needs_params_collection():
  with pytest.raises(ValueError, match=r"must return variables with a 'params' collection; "
                                       r"got collections \['batch_stats'\]"):
    state_lib.split_variables({"batch_stats": {}})


# --------------------------------------------------------------------------------------------
# Optimizers and schedules.


def test_unknown_names_list_the_allowed_values():
  with pytest.raises(ValueError, match="Unknown optimizer 'rmsprop'; allowed optimizers are "
                                       "sgd, momentum, adam, adamw."):
    optim.make_optimizer("rmsprop", 0.1)
  with pytest.raises(ValueError, match="Unknown schedule 'linear'; allowed schedules are "
                                       "constant, cosine, step, warmup_cosine."):
    optim.make_optimizer("adam", 0.1, schedule="linear")
  with pytest.raises(ValueError, match="The step schedule needs decay_steps >= 1, got 0."):
    optim.make_schedule("step", 0.1)
  with pytest.raises(ValueError, match="The cosine schedule needs total_steps >= 1, got 0."):
    optim.make_schedule("cosine", 0.1)
  with pytest.raises(ValueError, match="The learning rate must be > 0, got 0.0."):
    optim.make_schedule("constant", 0.0)
  with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1."):
    optim.make_optimizer("sgd", 0.1, weight_decay=-1)
  with pytest.raises(ValueError, match=r"grad_clip must be >= 0 \(0 disables clipping\)"):
    optim.make_optimizer("sgd", 0.1, grad_clip=-1)


def test_schedules():
  step = optim.make_schedule("step", 0.1, decay_steps=10, decay_factor=0.5)
  np.testing.assert_allclose([step(0), step(9), step(10), step(25)], [0.1, 0.1, 0.05, 0.025],
                             rtol=1e-6)
  cosine = optim.make_schedule("cosine", 0.1, total_steps=100)
  np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [0.1, 0.05, 0.0],
                             rtol=1e-6, atol=1e-8)
  warm = optim.make_schedule("warmup_cosine", 0.1, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(60), warm(110)],
                             [0.0, 0.05, 0.1, 0.05, 0.0], rtol=1e-6, atol=1e-8)
  default_warm = optim.make_schedule("warmup_cosine", 0.1, total_steps=100)  # 5 warmup steps
  np.testing.assert_allclose([default_warm(0), default_warm(5)], [0.0, 0.1], rtol=1e-6)
  np.testing.assert_allclose(optim.make_schedule("constant", 0.3)(1000), 0.3)


def _apply(optimizer, params, grads, steps=1):
  @jax.jit
  def run(params):
    opt_state = optimizer.init(params)
    for _ in range(steps):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params

  return np.asarray(run(params))


def test_optimizers_by_hand():
  w, g = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
  lr, wd = 0.1, 0.01
  np.testing.assert_allclose(_apply(optim.make_optimizer("sgd", lr), w, g), w - lr * g)
  # Heavy ball with a constant gradient: w - lr * g - lr * (0.9 g + g).
  np.testing.assert_allclose(_apply(optim.make_optimizer("momentum", lr), w, g, steps=2),
                             w - lr * g - lr * 1.9 * g, rtol=1e-6)
  # Adam's first step moves every coordinate by lr against the gradient's sign.
  np.testing.assert_allclose(_apply(optim.make_optimizer("adam", lr), w, g),
                             w - lr * jnp.sign(g), rtol=1e-5)
  np.testing.assert_allclose(_apply(optim.make_optimizer("adamw", lr, weight_decay=wd), w, g),
                             w - lr * (jnp.sign(g) + wd * w), rtol=1e-5)
  np.testing.assert_allclose(_apply(optim.make_optimizer("sgd", lr, weight_decay=wd), w, g),
                             w - lr * (g + wd * w), rtol=1e-6)
  clipped = _apply(optim.make_optimizer("sgd", 1.0, grad_clip=1.0), jnp.zeros(2),
                   jnp.array([3.0, 4.0]))
  np.testing.assert_allclose(clipped, [-0.6, -0.8], rtol=1e-6)
