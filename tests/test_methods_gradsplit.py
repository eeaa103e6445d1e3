"""GradSplit: gradient routing over channel groups (one M or one per split module), conflict
estimation and the routing criteria, one compiled step.

The network is a two-stage ResNet (one block each, 8 and 16 channels) on 8 px images with two
regression tasks (MLP heads); its last stage is split, so the routed layers include a
projection shortcut and batch norms in training mode. Each jitted function below is compiled
once and shared by the tests (compiling dominates the time on a shared CPU): routing matrices
are always passed per module (K, T, T), so one program serves every M.
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
MODULES = tuple(f"stage2_block0/{n}" for n in sorted(SPLIT_LAYERS))  # the params tree's order


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
  # The draws do not depend on the statistics' layout (they are not drawn).
  variables = test_variables.fill(
      {k: v for k, v in shapes.items() if k != gradsplit.STATE_COLLECTION}, seed)
  variables[gradsplit.STATE_COLLECTION] = method.initial_statistics(variables["params"])
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


def per_module(matrix, overrides=None) -> np.ndarray:
  """(K, 2, 2): `matrix` for every split module, except {module: M} in `overrides`."""
  matrices = np.broadcast_to(np.asarray(matrix, np.float32), (len(MODULES), 2, 2)).copy()
  for name, m in (overrides or {}).items():
    matrices[MODULES.index(name)] = m
  return matrices


def per_task_grads(fn, variables, batch, matrix):
  params, state = split(variables)
  matrix = np.asarray(matrix, np.float32)
  if matrix.ndim == 2:
    matrix = per_module(matrix)
  grads, losses, _ = fn(params, state, batch, jnp.asarray(matrix))
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


def test_per_module_routing_all_ones_is_hard_sharing_and_identity_splits_only_that_module(setup):
  variables, batch = setup
  assert ACTIVATION.split_modules(variables["params"]) == MODULES
  ones, ones_losses = per_task_grads(activation_grads, variables, batch, np.ones((2, 2)))
  strict, _ = per_task_grads(activation_grads, variables, batch, np.eye(2))
  (_, (aux, _)), hard = hard_sharing(variables, batch)
  # Per-module M all ones: the per-task gradients sum to hard sharing's.
  for g, r in zip(jax.tree.leaves(jax.tree.map(lambda g: g.sum(0), ones)),
                  jax.tree.leaves(hard)):
    np.testing.assert_allclose(g, np.asarray(r), rtol=1e-6, atol=1e-6 * np.abs(r).max())
  # M identity on the shortcut's batch norm only: that module is split as under the strict M
  # (nothing routed lies above it), the shortcut convolution below it gets no cross-group
  # gradient either (a zero cotangent on a channel stops at every layer of that channel), and
  # the main branch keeps hard sharing's per-task gradients.
  target = "stage2_block0/downsample_bn"
  one, losses = per_task_grads(activation_grads, variables, batch,
                               per_module(np.ones((2, 2)), {target: np.eye(2)}))
  np.testing.assert_array_equal(losses, ones_losses)  # the forward is unchanged
  np.testing.assert_array_equal(losses, [aux["loss/a"], aux["loss/b"]])
  for (path, leaf), (_, full), (_, split_all) in zip(
      split_leaves(ACTIVATION, one), split_leaves(ACTIVATION, ones),
      split_leaves(ACTIVATION, strict)):
    module = path.rsplit("/", 1)[0]
    groups = channel_groups(ACTIVATION, leaf.shape[-1])
    if module == target:
      np.testing.assert_allclose(leaf, split_all, rtol=1e-6, atol=1e-7 * np.abs(split_all).max())
    if module in (target, "stage2_block0/downsample_conv"):
      for s in range(2):
        assert np.all(leaf[s][..., groups[1 - s]] == 0), path  # exactly zero
        assert np.abs(leaf[s][..., groups[s]]).max() > 0, path
    else:
      np.testing.assert_allclose(leaf, full, rtol=1e-6, atol=1e-7 * np.abs(full).max())
      for s in range(2):
        assert np.abs(leaf[s][..., groups[1 - s]]).max() > 0, path


def test_weight_routing_per_module_masks_only_that_module(setup):
  variables, batch = setup
  target = "stage2_block0/conv2"
  one, _ = per_task_grads(weight_grads, variables, batch,
                          per_module(np.ones((2, 2)), {target: [[1, 1], [0, 1]]}))
  ones, _ = per_task_grads(weight_grads, variables, batch, np.ones((2, 2)))
  for (path, leaf), (_, full) in zip(split_leaves(WEIGHT, one), split_leaves(WEIGHT, ones)):
    g0, g1 = channel_groups(WEIGHT, leaf.shape[-1])
    if path.rsplit("/", 1)[0] == target:  # task a stays out of group 1, the rest as shared
      assert np.all(leaf[0][..., g1] == 0) and np.abs(full[0][..., g1]).max() > 0, path
      np.testing.assert_array_equal(leaf[0][..., g0], full[0][..., g0])
      np.testing.assert_array_equal(leaf[1], full[1])
    else:
      np.testing.assert_array_equal(leaf, full)


def test_a_routing_of_the_wrong_shape_is_one_sentence(setup):
  variables, batch = setup
  params, state = split(variables)
  with pytest.raises(ValueError, match=r"fits neither one \(2, 2\) matrix nor one per split "
                                       r"module \(6\)"):
    ACTIVATION.per_task_grads(params, state, batch, jnp.ones((3, 2, 2)))


def test_lenet_layers_directly_under_the_encoder_are_routed():
  """LeNet's split stage is the encoder's own `fc` and `bn_fc` (no block around them)."""
  method = methods.build("gradsplit", TASKS, method_options={"routing": "fixed",
                                                            "routing_matrix": "identity"},
                         model_options={"backbone": "lenet", "head_width": 8, "backbone_kwargs": {
                             "conv_channels": (4, 4), "kernel_sizes": (3, 3), "fc_features": 8,
                             "batch_norm": True}})
  images = jax.ShapeDtypeStruct((1, 12, 12, 1), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes, 0)
  variables[gradsplit.STATE_COLLECTION] = method.initial_statistics(variables["params"])
  assert method.split_modules(variables["params"]) == ("bn_fc", "fc")
  batch = toy_batch()
  batch["image"] = np.random.default_rng(0).uniform(size=(4, 12, 12, 1)).astype(np.float32)
  grads, _ = per_task_grads(jax.jit(method.per_task_grads), variables, batch,
                            np.broadcast_to(np.eye(2), (2, 2, 2)))
  leaves = split_leaves(method, grads)
  assert {p.split("/")[0] for p, _ in leaves} == {"fc", "bn_fc"}
  for path, leaf in leaves:
    groups = channel_groups(method, leaf.shape[-1])
    for s in range(2):
      assert np.all(leaf[s][..., groups[1 - s]] == 0), path
      assert np.abs(leaf[s][..., groups[s]]).max() > 0, path


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
    matrices = np.asarray(LEARNED.matrices_at(state[gradsplit.STATE_COLLECTION],
                                              jnp.asarray(step + 1)))
    assert matrices.shape == (len(MODULES), 2, 2)
    if step + 1 < 3:
      np.testing.assert_array_equal(matrices, 1.0)  # hard sharing while warming up
  statistics = state[gradsplit.STATE_COLLECTION]
  assert int(statistics["count"]) == 3  # the fourth step is past the warm-up: stats frozen
  np.testing.assert_allclose(np.asarray(LEARNED.mean_cosine(statistics)),
                             [[1, -1], [-1, 1]], atol=1e-3)
  # Every split module sees the same opposition: each splits, and every step conflicted.
  np.testing.assert_allclose(np.asarray(LEARNED.module_mean_cosine(statistics)),
                             np.broadcast_to([[1, -1], [-1, 1]], matrices.shape), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(LEARNED.module_conflict_frequency(statistics)),
                                np.broadcast_to([[0, 1], [1, 0]], matrices.shape))
  np.testing.assert_array_equal(matrices, np.broadcast_to(np.eye(2), matrices.shape))
  assert float(aux["gradsplit/M_a_b"]) == 0.0 and float(aux["gradsplit/cos_a_b"]) < -0.99


def hand_split(module_grads: dict) -> dict:
  """A params-shaped tree of per-task gradients: {module: {leaf: (2, ..., C)}} in the split
  stage of the test network."""
  return {"encoder": {"stage2_block0": module_grads}}


def accumulated(method, steps, in_warmup=None):
  """`method`'s statistics after `steps` (hand-made per-task split gradients)."""
  statistics = method.initial_statistics(steps[0])
  for k, grads in enumerate(steps):
    warm = True if in_warmup is None else in_warmup[k]
    statistics = method.accumulate(statistics, method.split_params(grads), jnp.asarray(warm))
  return jax.tree.map(np.asarray, statistics)


def test_per_module_criterion_finds_the_conflict_that_pooling_hides():
  """conv1 (large, aligned in both groups) and bn2 (small, task b opposes task a on group 0):
  pooled, the kernel's agreement outweighs bn2's conflict; per module, bn2 splits."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(9, 4)).astype(np.float32) * 10
  scale = rng.normal(size=4).astype(np.float32)
  opposed = scale * np.array([-1, -1, 1, 1], np.float32)  # groups: channels 0-1 and 2-3
  grads = hand_split({"conv1": {"kernel": np.stack([kernel, kernel * 0.5])},
                      "bn2": {"scale": np.stack([scale, opposed]),
                              "bias": np.stack([scale, opposed])}})
  method = make(warmup_steps=3)
  assert method.criterion == "module_mean" and method.threshold == 0.0
  statistics = accumulated(method, [grads, grads])
  assert method.split_modules(grads) == ("stage2_block0/bn2", "stage2_block0/conv1")
  np.testing.assert_allclose(method.module_mean_cosine(statistics),
                             [[[1, -1], [1, 1]], [[1, 1], [1, 1]]], atol=1e-6)
  pooled = np.asarray(method.mean_cosine(statistics))
  assert pooled[0, 1] > 0.9  # the kernel dominates the pooled cosine
  np.testing.assert_array_equal(method.pooled_matrix(statistics), np.ones((2, 2)))
  np.testing.assert_array_equal(method.learned_matrices(statistics),
                                [[[1, 0], [1, 1]], np.ones((2, 2))])  # zeros in bn2 only
  np.testing.assert_array_equal(method.module_conflict_frequency(statistics),
                                [[[0, 1], [0, 0]], np.zeros((2, 2))])
  # The pooled criterion routes every module by the pooled cosine: hard sharing here.
  pooled_method = make(warmup_steps=3, criterion="pooled")
  np.testing.assert_array_equal(pooled_method.learned_matrices(statistics), np.ones((2, 2, 2)))
  # Before the end of the warm-up every module shares; after it, the learned M holds.
  np.testing.assert_array_equal(method.matrices_at(statistics, jnp.asarray(2)), 1.0)
  np.testing.assert_array_equal(method.matrices_at(statistics, jnp.asarray(3)),
                                method.learned_matrices(statistics))


def _pair(c: float) -> np.ndarray:
  """Unit vectors a = (1, 0) and b = (c, sqrt(1 - c^2)): cos(a, b) = c."""
  return np.array([[1.0, 0.0], [c, np.sqrt(1 - c * c)]], np.float32)


def test_frequency_criterion_with_hand_computed_frequencies():
  """One split module, 2 x 2 kernel: filter 0 is group 0, filter 1 group 1. Per warm-up step
  the cosine on group 0 is c0 and on group 1 c1; a fifth step after the warm-up conflicts on
  both groups and must not count."""
  c0 = [1.0, -0.1, -0.1, -0.1, -1.0]  # 3 of 4 warm-up steps negative, mean +0.175
  c1 = [-0.5, 0.2, 0.2, 0.2, -1.0]  # 1 of 4 negative, mean +0.025
  steps = [hand_split({"conv1": {"kernel": np.stack([_pair(a), _pair(b)], axis=-1)}})
           for a, b in zip(c0, c1)]
  method = make(warmup_steps=4, criterion="module_frequency")
  assert method.threshold == 0.5  # the default: split where most warm-up steps conflict
  statistics = accumulated(method, steps, in_warmup=[True] * 4 + [False])
  assert int(statistics["count"]) == 4
  np.testing.assert_array_equal(statistics["module_neg_count"], [[[0, 3], [1, 0]]])
  np.testing.assert_allclose(method.module_conflict_frequency(statistics), [[[0, 0.75],
                                                                              [0.25, 0]]])
  np.testing.assert_allclose(method.module_mean_cosine(statistics), [[[1, 0.175],
                                                                       [0.025, 1]]], atol=1e-6)
  # One module: the pooled statistics are the module's.
  np.testing.assert_allclose(method.conflict_frequency(statistics), [[0, 0.75], [0.25, 0]])
  expected = {("module_frequency", None): [[1, 0], [1, 1]],  # 0.75 > 0.5 splits group 0
              ("module_frequency", 0.75): [[1, 1], [1, 1]],  # <= threshold shares
              ("module_frequency", 0.2): [[1, 0], [0, 1]],
              ("module_mean", None): [[1, 1], [1, 1]],  # both means are positive
              ("module_mean", 0.1): [[1, 1], [0, 1]],  # 0.025 < 0.1
              ("pooled", 0.1): [[1, 1], [0, 1]]}
  for (criterion, margin), matrix in expected.items():
    m = make(warmup_steps=4, criterion=criterion, margin=margin)
    np.testing.assert_array_equal(m.learned_matrices(statistics), [matrix],
                                  err_msg=f"{criterion} {margin}")


def test_pooled_criterion_reproduces_the_pooled_cosine_routing(setup):
  """The statistics of the compiled warm-up step, read by the "pooled" criterion, give the
  first version's M: the pooled cosine of the per-task split gradients (`group_cosines`),
  averaged over the warm-up, >= 0, the same M in every module."""
  variables, _ = setup
  params, state = split(variables)
  pooled_method = make(warmup_steps=3, criterion="pooled")
  expected_sum = np.zeros((2, 2))
  for step in range(3):
    batch = toy_batch(10 + step)
    (_, (_, state)), _ = learned_step(params, state, batch, None, jnp.asarray(step, jnp.int32))
    grads, _ = per_task_grads(activation_grads, variables, batch, np.ones((2, 2)))
    expected_sum += np.asarray(gradsplit.group_cosines(ACTIVATION.split_params(grads),
                                                       ACTIVATION.sizes))
  statistics = jax.tree.map(np.asarray, state[gradsplit.STATE_COLLECTION])
  np.testing.assert_allclose(statistics["cos_sum"], expected_sum, rtol=1e-5, atol=1e-6)
  old = np.asarray(gradsplit.routing_from_cosines(statistics["cos_sum"] / 3))
  matrices = np.asarray(pooled_method.matrices_at(statistics, jnp.asarray(3)))
  np.testing.assert_array_equal(matrices, np.broadcast_to(old, (len(MODULES), 2, 2)))
  np.testing.assert_array_equal(pooled_method.pooled_matrix(statistics), old)


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
  assert record["criterion"] == "module_mean" and record["margin"] == 0.0
  pooled = record["pooled"]
  assert np.shape(pooled["matrix"]) == (2, 2) and np.shape(pooled["mean_cosine"]) == (2, 2)
  assert np.all(np.diag(pooled["matrix"]) == 1)
  assert [m["name"] for m in record["modules"]] == list(MODULES)
  statistics = state.model_state[gradsplit.STATE_COLLECTION]
  for k, module in enumerate(record["modules"]):
    cosine, frequency = np.asarray(module["mean_cosine"]), np.asarray(module["conflict_frequency"])
    np.testing.assert_allclose(cosine, np.asarray(statistics["module_cos_sum"][k]) / 3, atol=1e-6)
    np.testing.assert_allclose(frequency, np.asarray(statistics["module_neg_count"][k]) / 3,
                               atol=1e-6)
    np.testing.assert_array_equal(module["matrix"], (cosine >= 0) | np.eye(2, dtype=bool))
  np.testing.assert_allclose(record["share_routed"],
                             np.mean([m["matrix"] for m in record["modules"]], axis=0))
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
    ({"split_stages": 0}, "GradSplit options: split_stages=0 must be a whole number >= 1"),
    ({"group_sizes": (1.0,)}, "must be 2 positive numbers"),
    ({"routing": "fixed"}, "routing=fixed needs routing_matrix, such as 'identity'"),
    ({"routing_matrix": "identity"}, "routing_matrix=identity is only used with routing=fixed"),
    ({"warmup_steps": 0}, "leaves no step to estimate the conflicts"),
    ({"mode": "both"}, "mode='both' is not allowed; choose one of activation, weight"),
    ({"routing": "auto"}, "routing='auto' is not allowed"),
    ({"criterion": "median"}, "criterion='median' is not allowed; choose one of module_mean, "
                              "module_frequency, pooled"),
    ({"margin": 1.5}, "margin=1.5 must lie in [-1, 1] with criterion 'module_mean'"),
    ({"criterion": "module_frequency", "margin": -0.1}, "margin=-0.1 must lie in [0, 1]"),
    ({"routing": "fixed", "routing_matrix": "identity", "margin": 0.1},
     "margin=0.1 is only used with routing=learned"),
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
