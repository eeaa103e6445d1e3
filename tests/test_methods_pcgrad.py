"""PCGrad: the projection against hand-computed cases, the orders, and the method's gradient."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import pcgrad

import random_variables as test_variables

RESNET = {"backbone": "resnet_small", "head_width": 8,
          "backbone_kwargs": {"stage_channels": (8, 16), "stage_sizes": (1, 1)}}
TASKS = (tasks_lib.regression("a"), tasks_lib.regression("b"))


def combine(task_grads, order="fixed", key=None):
  tx = pcgrad.pcgrad(order)
  combined, _ = tx.update(task_grads, tx.init(None), key=key)
  return combined


def reference(grads: np.ndarray, orders) -> np.ndarray:
  """PCGrad in numpy, float64: task i projected onto the tasks of orders[i], in turn."""
  grads = np.asarray(grads, np.float64)
  out = []
  for i, order in enumerate(orders):
    g = grads[i].copy()
    for j in order:
      if j != i and g @ grads[j] < 0:
        g -= (g @ grads[j]) / (grads[j] @ grads[j]) * grads[j]
    out.append(g)
  return np.sum(out, axis=0)


def test_two_conflicting_gradients_match_the_hand_computed_projection():
  # g1 = (1, 0), g2 = (-1, 1): <g1, g2> = -1, so
  # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5) and g2' = g2 - (-1 / 1) g1 = (0, 1); sum (0.5, 1.5).
  combined = combine({"w": jnp.asarray([[1.0, 0.0], [-1.0, 1.0]])})
  np.testing.assert_allclose(np.asarray(combined["w"]), [0.5, 1.5], atol=1e-7)
  assert np.asarray(combined["w"]).shape == (2,)


def test_agreeing_gradients_are_summed_unchanged():
  combined = combine({"w": jnp.asarray([[1.0, 0.0], [1.0, 1.0]])})
  np.testing.assert_allclose(np.asarray(combined["w"]), [2.0, 1.0], atol=1e-7)


def test_projection_runs_over_the_whole_tree():
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(3, 2, 3)).astype(np.float32),
          "b": {"c": rng.normal(size=(3, 4)).astype(np.float32)}}
  flat = np.concatenate([tree["a"].reshape(3, -1), tree["b"]["c"]], axis=1)
  expected = reference(flat, [range(3)] * 3)
  combined = combine(jax.tree.map(jnp.asarray, tree))
  got = np.concatenate([np.asarray(combined["a"]).ravel(), np.asarray(combined["b"]["c"])])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert combined["a"].shape == (2, 3) and combined["b"]["c"].shape == (4,)


def test_random_order_is_seeded_and_is_one_of_the_orders():
  # Three pairwise conflicting gradients: the result depends on the projection order.
  grads = np.array([[1.0, 0.0, 0.2], [-0.6, 1.0, 0.0], [-0.5, -0.8, 1.0]], np.float32)
  others = [[j for j in range(3) if j != i] for i in range(3)]
  candidates = [reference(grads, orders)
                for orders in itertools.product(*[list(itertools.permutations(o))
                                                  for o in others])]
  assert len({tuple(np.round(c, 6)) for c in candidates}) > 1  # the order matters here
  results = []
  for seed in range(6):
    key = jax.random.PRNGKey(seed)
    got = np.asarray(combine({"w": jnp.asarray(grads)}, "random", key)["w"])
    again = np.asarray(combine({"w": jnp.asarray(grads)}, "random", key)["w"])
    np.testing.assert_array_equal(got, again)  # same key, same order
    assert min(np.abs(got - c).max() for c in candidates) < 1e-5
    results.append(tuple(np.round(got, 5)))
  assert len(set(results)) > 1  # different keys draw different orders
  fixed = np.asarray(combine({"w": jnp.asarray(grads)})["w"])
  np.testing.assert_allclose(fixed, reference(grads, others), rtol=1e-5, atol=1e-6)


def test_state_key_advances_when_no_key_is_given():
  tx = pcgrad.pcgrad("random", seed=3)
  state = tx.init(None)
  _, new_state = tx.update({"w": jnp.ones((2, 3))}, state)
  assert not np.array_equal(np.asarray(state.key), np.asarray(new_state.key))


@pytest.mark.parametrize("call, message", [
    (lambda: pcgrad.pcgrad("sorted"), "PCGrad order 'sorted' is unknown; use one of fixed"),
    (lambda: combine({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}),
     "same leading task axis"),
    (lambda: methods.build("pcgrad", TASKS, model_options=RESNET,
                           method_options={"order": "best"}),
     "PCGrad options: order='best' is not allowed; choose one of fixed, random"),
    (lambda: methods.build("pcgrad", TASKS, model_options=RESNET,
                           method_options={"kd": "none"}), "Unknown PCGrad option(s) kd"),
])
def test_bad_arguments_stop_with_one_sentence(call, message):
  with pytest.raises(ValueError) as error:
    call()
  assert message in str(error.value)


def test_method_projects_the_shared_encoder_and_sums_the_heads():
  method = methods.build("pcgrad", TASKS, model_options=RESNET, task_weights=(1.0, 2.0))
  assert method.backward_passes == 2
  images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes, 0)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  rng = np.random.default_rng(1)
  batch = {"image": rng.uniform(size=(4, 8, 8, 3)).astype(np.float32),
           "a": rng.normal(size=4).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
  key = jax.random.PRNGKey(0)
  (loss, (aux, _)), grads = jax.jit(method.loss_and_grad)(params, model_state, batch, key,
                                                          jnp.asarray(0))

  # Reference: each task's gradient on its own (weighted), then PCGrad on the encoder part.
  def task_grad(name, weight):
    def f(p):
      outputs, _ = method.model.apply({"params": p, **model_state}, batch["image"], train=True,
                                      mutable=list(model_state))
      task = {t.name: t for t in TASKS}[name]
      return weight * task.loss(outputs[name], batch[name])
    return jax.grad(f)(params)

  both = jax.jit(lambda: (task_grad("a", 1.0), task_grad("b", 2.0)))()
  stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), *both)
  expected_encoder = combine(stacked["encoder"])
  for g, r in zip(jax.tree.leaves(grads["encoder"]), jax.tree.leaves(expected_encoder)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                               atol=1e-6 * np.abs(np.asarray(r)).max())
  for head, task in (("head_a", 0), ("head_b", 1)):
    for g, r in zip(jax.tree.leaves(grads[head]), jax.tree.leaves(both[task][head])):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)
  assert np.isclose(float(loss), float(aux["loss/a"]) + 2 * float(aux["loss/b"]), rtol=1e-6)
