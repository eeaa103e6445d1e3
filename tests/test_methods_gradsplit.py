"""GradSplit: gradient routing over channel groups, conflict estimation, one compiled step.

The network is a two-stage ResNet (one block each, 8 and 16 channels) on 8 px images with two
regression tasks (MLP heads); its last stage is split, so the routed layers include a
projection shortcut and batch norms in training mode. Each jitted function below is compiled
once and shared by the tests (compiling dominates the time on a shared CPU).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import methods, models, train
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import gradsplit, static
from dymu_jax.train import state as state_lib

import random_variables as test_variables

RESNET = {"backbone": "resnet_small", "head_width": 8,
          "backbone_kwargs": {"stage_channels": (8, 16), "stage_sizes": (1, 1)}}
TASKS = (tasks_lib.regression("a"), tasks_lib.regression("b"))
IMAGE_SHAPE = (8, 8, 3)
SPLIT_LAYERS = {"conv1", "bn1", "conv2", "bn2", "downsample_conv", "downsample_bn"}


def make(**options) -> gradsplit.GradSplitMethod:
  return methods.build("gradsplit", TASKS, model_options=RESNET, method_options=options)


ACTIVATION = make(routing="fixed", routing_matrix="identity")
WEIGHT = make(routing="fixed", routing_matrix="identity", mode="weight")
LEARNED = make(warmup_steps=3)
# The routing matrix is an argument: one program per method serves every M.
activation_grads = jax.jit(ACTIVATION.per_task_grads)
weight_grads = jax.jit(WEIGHT.per_task_grads)
learned_step = jax.jit(LEARNED.loss_and_grad)
# Hard sharing on the same network, differentiated the plain way: the reference.
HARD = static.StaticMethod(TASKS, LEARNED.model)
hard_step = jax.jit(jax.value_and_grad(HARD.loss, has_aux=True))


def hard_sharing(variables, batch):
  """((loss, (aux, model_state)), grads) of plain hard sharing (no GradSplit collection)."""
  params, state = split(variables)
  state = {k: v for k, v in state.items() if k != gradsplit.STATE_COLLECTION}
  return hard_step(params, state, batch, None, jnp.asarray(0, jnp.int32))


def toy_batch(seed: int = 0, size: int = 4) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
          "a": rng.normal(size=size).astype(np.float32) * 3,
          "b": rng.normal(size=size).astype(np.float32) * 3}


def variables_of(method, seed: int = 0) -> dict:
  """Variables with `method.init`'s shapes, filled by numpy; fresh conflict statistics."""
  images = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes, seed)
  variables[gradsplit.STATE_COLLECTION] = method.initial_statistics()
  return variables


def split(variables):
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def channel_groups(method, num_channels):
  bounds = gradsplit.group_boundaries(num_channels, method.sizes)
  return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_leaves(method, tree):
  """[(path, leaf)] of the split layers' parameters (leaves keep their leading task axis)."""
  flat = jax.tree_util.tree_flatten_with_path(method.split_params(tree))[0]
  return [("/".join(str(k.key) for k in path), np.asarray(leaf)) for path, leaf in flat]


def per_task_grads(fn, variables, batch, matrix):
  params, state = split(variables)
  grads, losses, _ = fn(params, state, batch, jnp.asarray(matrix, jnp.float32))
  return jax.tree.map(np.asarray, grads), np.asarray(losses)


@pytest.fixture(scope="module")
def setup():
  return variables_of(ACTIVATION), toy_batch()


# ----------------------------------------------------------------------------------------------
# Routing.


def test_split_covers_the_last_stage_and_every_layer_in_it(setup):
  variables, _ = setup
  assert ACTIVATION.split_names() == {"stage2_block0": 1}
  names = {path.split("/")[1] for path, _ in split_leaves(ACTIVATION, variables["params"])}
  assert names == SPLIT_LAYERS


def test_forward_is_unchanged_by_the_split(setup):
  variables, batch = setup
  (_, (aux, _)), _ = hard_sharing(variables, batch)
  plain = np.array([aux["loss/a"], aux["loss/b"]])
  for matrix in (np.eye(2), np.ones((2, 2)), [[1, 1], [0, 1]]):
    _, routed = per_task_grads(activation_grads, variables, batch, matrix)
    np.testing.assert_array_equal(routed, plain)


def test_route_gradient_matches_the_stop_gradient_formula():
  h = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  formula = lambda x: jnp.sum(jnp.sin(x * mask + jax.lax.stop_gradient(x * (1 - mask))) * weights)
  routed = lambda x: jnp.sum(jnp.sin(gradsplit.route_gradient(x, mask)) * weights)
  assert float(formula(h)) == float(routed(h))
  np.testing.assert_allclose(jax.grad(routed)(h), jax.grad(formula)(h), rtol=1e-6)


def test_identity_routing_keeps_each_task_out_of_the_other_groups(setup):
  variables, batch = setup
  grads, _ = per_task_grads(activation_grads, variables, batch, np.eye(2))
  for path, leaf in split_leaves(ACTIVATION, grads):
    groups = channel_groups(ACTIVATION, leaf.shape[-1])
    for s in range(2):
      for t in range(2):
        part = leaf[s][..., groups[t]]
        if t == s:
          assert np.abs(part).max() > 0, (path, s)
        else:
          assert np.all(part == 0), (path, s, t)  # exactly zero
  # Layers below the split still learn from every task.
  for name in ("stem_conv", "stage1_block0"):
    for s in range(2):
      below = jax.tree.leaves(jax.tree.map(lambda g: g[s], grads["encoder"][name]))
      assert max(np.abs(x).max() for x in below) > 0, (name, s)


def test_all_ones_during_warmup_is_hard_sharing(setup):
  variables, batch = setup
  params, state = split(variables)
  step = jnp.asarray(0, jnp.int32)  # in the warm-up of the learned routing: M is all ones
  (loss, (aux, _)), grads = learned_step(params, state, batch, None, step)
  assert float(aux["gradsplit/M_a_b"]) == 1.0 and float(aux["gradsplit/M_b_a"]) == 1.0
  (ref_loss, _), ref_grads = hard_sharing(variables, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert set(aux) >= {"loss/a", "loss/b"}
  # The same gradient summed in another order (T backward passes, then the weighted sum):
  # equal up to float32 rounding (eps 1.2e-7 times a few accumulations), i.e. within 1e-6 of
  # each layer's largest entry and 3e-6 in norm.
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    g, r = np.asarray(g), np.asarray(r)
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6 * np.abs(r).max())
    assert np.linalg.norm(g - r) <= 3e-6 * np.linalg.norm(r)
  # The routed program with M all ones gives the same per-task gradients.
  ones, _ = per_task_grads(activation_grads, variables, batch, np.ones((2, 2)))
  summed = jax.tree.map(lambda g: g.sum(0), ones)
  for g, r in zip(jax.tree.leaves(summed), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, np.asarray(r), rtol=1e-6, atol=1e-6 * np.abs(r).max())


def test_asymmetric_routing_goes_one_way_only(setup):
  variables, batch = setup
  # Group 0 takes task b's gradient, group 1 does not take task a's.
  matrix = np.array([[1, 1], [0, 1]], np.float32)
  grads, _ = per_task_grads(activation_grads, variables, batch, matrix)
  for path, leaf in split_leaves(ACTIVATION, grads):
    g0, g1 = channel_groups(ACTIVATION, leaf.shape[-1])
    assert np.all(leaf[0][..., g1] == 0), path  # task a stays out of group 1
    assert np.abs(leaf[0][..., g0]).max() > 0, path
    assert np.abs(leaf[1][..., g0]).max() > 0, path  # task b reaches both groups
    assert np.abs(leaf[1][..., g1]).max() > 0, path


def test_weight_only_routing_masks_split_weights_and_leaves_activations_alone(setup):
  variables, batch = setup
  grads, _ = per_task_grads(weight_grads, variables, batch, np.eye(2))
  shared, _ = per_task_grads(weight_grads, variables, batch, np.ones((2, 2)))
  routed, _ = per_task_grads(activation_grads, variables, batch, np.eye(2))
  for (path, leaf), (_, full) in zip(split_leaves(WEIGHT, grads), split_leaves(WEIGHT, shared)):
    groups = channel_groups(WEIGHT, leaf.shape[-1])
    for s in range(2):
      np.testing.assert_array_equal(leaf[s][..., groups[s]], full[s][..., groups[s]])
      assert np.all(leaf[s][..., groups[1 - s]] == 0), path
  # Below the split the activation gradient is the hard-sharing one (unlike activation routing).
  below = lambda g: np.concatenate([x.ravel() for x in jax.tree.leaves(
      g["encoder"]["stage1_block0"])])
  np.testing.assert_array_equal(below(grads), below(shared))
  assert np.abs(below(routed) - below(shared)).max() > 1e-6


# ----------------------------------------------------------------------------------------------
# Conflict estimation.


def test_group_cosines_and_routing_from_hand_made_gradients():
  # One split layer with 4 filters (2 per group); task b opposes task a on group 0 only.
  a = np.array([[1.0, 2.0, 1.0, 0.0], [0.5, 1.0, 0.0, 1.0]], np.float32)
  b = np.array([[-1.0, -2.0, 1.0, 0.0], [-0.5, -1.0, 0.0, 1.0]], np.float32)
  group_cosines = jax.jit(gradsplit.group_cosines, static_argnums=1)
  cos = np.asarray(group_cosines({"kernel": jnp.stack([a, b])}, (1.0, 1.0)))
  np.testing.assert_allclose(cos, [[1.0, -1.0], [1.0, 1.0]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gradsplit.routing_from_cosines(cos)),
                                [[1, 0], [1, 1]])
  # A zero gradient on a group counts as no conflict (cosine 0).
  zero = np.zeros_like(a)
  cos = np.asarray(group_cosines({"kernel": jnp.stack([a, zero])}, (1.0, 1.0)))
  np.testing.assert_array_equal(np.asarray(gradsplit.routing_from_cosines(cos)), np.ones((2, 2)))


def test_warmup_estimates_a_conflicting_pair_as_split():
  """Head b is head a negated and both fit the same labels: their gradients oppose."""
  variables = variables_of(LEARNED, seed=2)
  heads = variables["params"]
  last = sorted(k for k in heads["head_a"])[-1]
  heads["head_b"] = jax.tree.map(lambda x: x, heads["head_a"])
  heads["head_b"][last] = jax.tree.map(lambda x: -x, heads["head_a"][last])
  batch = toy_batch(1)
  batch["a"] = batch["b"] = np.full_like(batch["a"], 50.0)  # far from both predictions
  params, state = split(variables)
  for step in range(4):  # warm-up of 3 steps, then one step with the learned routing
    (_, (aux, state)), _ = learned_step(params, state, batch, None, jnp.asarray(step, jnp.int32))
    matrix = np.asarray(LEARNED.matrix_at(state[gradsplit.STATE_COLLECTION],
                                          jnp.asarray(step + 1)))
    if step + 1 < 3:
      np.testing.assert_array_equal(matrix, np.ones((2, 2)))  # hard sharing while warming up
  statistics = state[gradsplit.STATE_COLLECTION]
  assert int(statistics["count"]) == 3  # the fourth step is past the warm-up: stats frozen
  np.testing.assert_allclose(np.asarray(LEARNED.mean_cosine(statistics)),
                             [[1, -1], [-1, 1]], atol=1e-3)
  np.testing.assert_array_equal(matrix, np.eye(2))
  assert float(aux["gradsplit/M_a_b"]) == 0.0 and float(aux["gradsplit/cos_a_b"]) < -0.99


def test_one_compiled_step_across_warmup_and_after(tmp_path):
  method = LEARNED  # warm-up of 3 steps; 5 steps run
  optimizer = optax.adam(1e-2)
  par = train.Parallel("mesh")
  state = par.place_state(state_lib.create(variables_of(method), optimizer,
                                           jnp.asarray(np.asarray(jax.random.PRNGKey(0)))))
  step_fn = par.compile_step(method, optimizer)
  batches = [par.shard_batch(toy_batch(s)) for s in range(5)]
  with train.CompileCounter() as compiles:
    for b in batches:
      state, metrics = step_fn(state, b)
  assert compiles.count == 1
  assert int(state.step) == 5
  assert int(state.model_state[gradsplit.STATE_COLLECTION]["count"]) == 3
  assert np.isfinite(float(metrics["loss"])) and "gradsplit/cos_a_b" in metrics
  paths = method.save_routing(state.variables, str(tmp_path), step=5)
  record = json.load(open(paths[0]))
  assert record["tasks"] == ["a", "b"] and record["warmup_complete"]
  assert np.shape(record["matrix"]) == (2, 2) and np.shape(record["mean_cosine"]) == (2, 2)
  assert np.all(np.diag(record["matrix"]) == 1)
  assert (tmp_path / gradsplit.HEATMAP_FILE).stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# Structure and bad options.


@pytest.mark.parametrize("backbone, kwargs", [
    ("lenet", {"batch_norm": True}), ("lenet", {}), ("resnet_small", {}), ("resnet18", {}),
    ("mobilenet_v2", {})])
def test_stage_modules_cover_every_encoder_parameter(backbone, kwargs):
  net = models.build_multitask(TASKS, backbone, backbone_kwargs=kwargs)
  size = 28 if backbone == "lenet" else 32
  images = jax.ShapeDtypeStruct((1, size, size, 1 if backbone == "lenet" else 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), images)
  stages = gradsplit.stage_modules(net.make_encoder())
  assert len(stages) == net.num_stages
  names = [n for stage in stages for n in stage]
  assert len(names) == len(set(names))
  assert set(names) == set(shapes["params"]["encoder"])


@pytest.mark.parametrize("text, message", [
    ("1,0;0,1;1,1", "has 3 row(s) of 2 entries; give 2 rows of 2"),
    ("1,0,0;0,1,0", "has 2 row(s) of 3 entries; give 2 rows of 2"),
    ("1,0.5;0,1", "entries must be 0 or 1, got 0.5"),
    ("0,1;1,1", "has 0 on its diagonal at row 0"),
    ("1,x;0,1", "must be rows of comma-separated 0/1 entries"),
])
def test_bad_routing_matrices_stop_with_one_sentence(text, message):
  with pytest.raises(ValueError, match="routing matrix") as error:
    gradsplit.parse_routing_matrix(text, 2)
  assert message in str(error.value)
  assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")  # one sentence


def test_routing_matrix_words():
  np.testing.assert_array_equal(gradsplit.parse_routing_matrix("identity", 3), np.eye(3))
  np.testing.assert_array_equal(gradsplit.parse_routing_matrix("ones", 2), np.ones((2, 2)))
  np.testing.assert_array_equal(gradsplit.parse_routing_matrix("1,1;0,1", 2), [[1, 1], [0, 1]])


@pytest.mark.parametrize("options, message", [
    ({"split_stages": 3}, "split_stages=3 must lie in 1..2"),
    ({"split_stages": 0}, "split_stages=0 must lie in 1..2"),
    ({"group_sizes": (1.0,)}, "must be 2 positive numbers"),
    ({"routing": "fixed"}, "needs a routing matrix"),
    ({"routing_matrix": "identity"}, "only used with routing 'fixed'"),
    ({"warmup_steps": 0}, "leaves no step to estimate the conflicts"),
    ({"mode": "both"}, "mode 'both' is unknown"),
    ({"routing": "auto"}, "routing 'auto' is unknown"),
    ({"lambda_kd": 1.0}, "Unknown GradSplit option(s) lambda_kd"),
])
def test_bad_options_stop_with_one_sentence(options, message):
  with pytest.raises(ValueError) as error:
    make(**options)
  assert message in str(error.value)


def test_too_few_channels_for_the_groups_is_one_sentence():
  method = make(group_sizes=(1.0, 40.0))  # 16 channels cannot hold a 1:40 split
  with pytest.raises(ValueError, match="too few for 2 non-empty groups"):
    variables_of(method)
