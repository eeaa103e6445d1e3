"""DYMU: P_use, the branching regulariser, hypernetworks, controls, affinity and the stages.

The network is a 4-6-8 channel LeNet with batch norm on 16 px images (two digit tasks), so
that the file stays fast on a shared CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import affinity, dymu
from dymu_jax.models import branched
from dymu_jax.models.branched import Tree
from dymu_jax.train import step as step_lib
from dymu_jax.train import state as state_lib

import random_variables as test_variables

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
MODEL = {"backbone": "lenet",
         "backbone_kwargs": {"conv_channels": (4, 6), "kernel_sizes": (5, 3), "fc_features": 8}}
SHAPE = (16, 16, 1)
HYPER = {"edge_hidden": (16, 16), "weight_hidden": (16, 16, 16), "embedding_features": 8}


def digits_batch(seed: int, size: int = 4) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(size, *SHAPE)).astype(np.float32),
          "left": rng.integers(0, 10, size).astype(np.int32),
          "right": rng.integers(0, 10, size).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def anchor():
  """(anchor-stage method, anchor variables filled by numpy)."""
  method = dymu.build(DIGITS, model_options=MODEL, stage="anchor", anchor_init="shared")
  shapes = jax.eval_shape(method.init, jax.random.key(0),
                          {"image": jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)})
  return method, test_variables.fill(shapes, seed=2)


def numpy_init(method, seed: int, edge_params=None):
  """`method.init`'s variables with numpy-filled hypernetwork params (nothing is compiled), on
  the numpy anchor (and, for the weight stage, the frozen `edge_params`)."""
  shapes = jax.eval_shape(method.init, jax.random.key(0),
                          {"image": jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)})
  return {"params": test_variables.fill(shapes["params"], seed, other_scale=1.0),
          **dymu.stage_variables(anchor=anchor()[1], edge_params=edge_params)}


@functools.lru_cache(maxsize=None)
def trained(stage: str):
  """(method of the stage, its variables: random hypernetworks on the numpy anchor).

  The weight hypernetwork's output head is zero, as `WeightHypernet` initialises it.
  """
  edge_method = dymu.build(DIGITS, model_options=MODEL, stage="edge",
                           affinity=((1.0, 0.5), (0.5, 1.0)), **HYPER)
  edge_variables = numpy_init(edge_method, seed=3)
  if stage == "edge":
    return edge_method, edge_variables
  weight_method = dymu.build(DIGITS, model_options=MODEL, stage="weight", **HYPER)
  variables = numpy_init(weight_method, seed=4,
                         edge_params=edge_variables["params"]["edge_hypernet"])
  head = variables["params"]["weight_hypernet"]["shifts"]
  variables["params"]["weight_hypernet"]["shifts"] = jax.tree.map(jnp.zeros_like, head)
  return weight_method, variables


def split(variables):
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


# ----------------------------------------------------------------------------------------------
# P_use and the regulariser.


def test_parent_use_probability_by_hand():
  nu = np.array([[[0.5, 0.5], [0.1, 0.9]],     # parents of nodes (1, 0) and (1, 1)
                 [[0.7, 0.3], [0.2, 0.8]]],    # parents of decoders 0 and 1
                np.float32)
  p = np.asarray(dymu.parent_use_probability(jnp.asarray(nu)))
  p1 = (1 - 0.3 * 0.8, 1 - 0.7 * 0.2)  # 0.76, 0.86
  p0 = (1 - (1 - 0.5 * p1[0]) * (1 - 0.1 * p1[1]), 1 - (1 - 0.5 * p1[0]) * (1 - 0.9 * p1[1]))
  np.testing.assert_allclose(p, [p0, p1, (1.0, 1.0)], rtol=1e-6)
  np.testing.assert_allclose(p0, (0.43332, 0.85988), rtol=1e-5)
  # One-hot parents: exactly the tree's used nodes.
  tree = Tree(((2, 2, 0), (0, 1, 1), (1, 1, 1)))
  p = np.asarray(dymu.parent_use_probability(jnp.asarray(tree.one_hot())))
  for layer, used in enumerate(tree.used_nodes()):
    np.testing.assert_array_equal(p[layer], [float(i in used) for i in range(3)])


def test_branching_regularizer_by_hand():
  nu = jnp.asarray(np.broadcast_to(np.eye(2, dtype=np.float32), (2, 2, 2)))  # separate
  affinity_matrix = jnp.asarray([[1.0, 0.5], [0.5, 1.0]])
  both = jnp.asarray([0.5, 0.5])
  # Every node used; ||e_0 - e_1||^2 = 2; ordered pairs (0,1), (1,0); A(0, 1) = 0.5.
  # The paper's depth factor (L - l) / L, l = 1..L: 1/2 for the first choice, 0 for the
  # decoders'.
  omega, terms = dymu.branching_regularizer(nu, both, 0.5, affinity_matrix)
  assert float(terms["l_active"]) == pytest.approx(0.5 * 2 * 0.5 * 2)
  assert float(terms["l_inactive"]) == 0.0
  assert float(omega) == pytest.approx(0.5 * 1.0 * 1.0)
  # The shifted factor counts l from 0: 1 and 1/2.
  omega, terms = dymu.branching_regularizer(nu, both, 0.5, affinity_matrix,
                                            depth_factor="shifted")
  assert float(terms["l_active"]) == pytest.approx(1.0 * 2 * 0.5 * 2 + 0.5 * 2 * 0.5 * 2)
  assert float(omega) == pytest.approx(0.5 * 1.0 * 3.0)
  np.testing.assert_allclose(dymu.depth_weights(3), [2 / 3, 1 / 3, 0.0], rtol=1e-6)
  np.testing.assert_allclose(dymu.depth_weights(3, "shifted"), [1.0, 2 / 3, 1 / 3], rtol=1e-6)
  assert float(dymu.branching_regularizer(nu, both, 0.0, affinity_matrix)[0]) == 0.0
  # r = (1, 0): task 1 is inactive (tau = 0.3) and follows task 0 at both layers.
  omega, terms = dymu.branching_regularizer(nu, jnp.asarray([1.0, 0.0]), 1.0, affinity_matrix,
                                            lambda_active=1.0, lambda_inactive=0.1)
  assert float(terms["l_active"]) == 0.0 and float(terms["l_inactive"]) == pytest.approx(4.0)
  assert float(omega) == pytest.approx(0.4)
  # Shared parents cost nothing.
  shared = jnp.asarray(Tree.shared(2, 2).one_hot())
  assert float(dymu.branching_regularizer(shared, both, 1.0, affinity_matrix)[0]) == 0.0
  np.testing.assert_array_equal(dymu.active_tasks(jnp.asarray([0.25, 0.2, 0.55])),
                                [True, True, True])
  np.testing.assert_array_equal(dymu.active_tasks(jnp.asarray([0.25, 0.19, 0.56])),
                                [True, False, True])


def test_inactive_loss_pulls_an_inactive_task_to_its_nearest_active_task():
  preference = jnp.asarray([0.5, 0.5, 0.0])  # tau = 0.2: tasks 0 and 1 active, 2 inactive
  logits = jnp.asarray([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 1.0]]])  # one layer

  def inactive(z):
    nu = jax.nn.softmax(z, axis=-1)
    return dymu.branching_regularizer(nu, preference, 0.0, jnp.ones((3, 3)))[1]["l_inactive"]

  def distances(z):
    nu = jax.nn.softmax(z, axis=-1)[0]
    return [float(jnp.sum(jnp.square(nu[2] - nu[i]))) for i in (0, 1)]

  start = distances(logits)
  assert start[0] < start[1]  # task 0 is the nearest active task
  grad_fn = jax.jit(jax.grad(inactive))
  np.testing.assert_array_equal(grad_fn(logits)[0, 1], 0.0)  # the farther task is not involved
  z = logits
  for _ in range(5):
    z = z - 1.0 * grad_fn(z)
  end = distances(z)
  assert end[0] < 0.5 * start[0]
  assert float(inactive(z)) < float(inactive(logits))


def test_temperature_schedule_and_gumbel_softmax():
  schedule = jax.jit(jax.vmap(dymu.temperature))(jnp.asarray([0, 299, 300, 1000]))
  np.testing.assert_allclose(schedule, [5.0, 5.0, 5.0 * 0.97, 5.0 * 0.97**3], rtol=1e-6)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4)), jnp.float32)
  sample = jax.jit(dymu.gumbel_softmax)
  nu = sample(jax.random.key(0), logits, 5.0)
  np.testing.assert_allclose(np.sum(nu, axis=-1), 1.0, rtol=1e-6)
  cold = sample(jax.random.key(0), logits, 1e-3)
  np.testing.assert_allclose(np.max(cold, axis=-1), 1.0, atol=1e-4)  # almost one-hot
  assert np.max(nu) < 0.99  # hot: soft


# ----------------------------------------------------------------------------------------------
# Hypernetworks and controls.


def test_hypernet_shapes_self_logit_and_zero_initial_shifts():
  weight_net = dymu.WeightHypernet(num_tasks=3, num_outputs=5, hidden=(4,))
  net = dymu.EdgeHypernet(num_tasks=3, num_layers=4, hidden=(4,), self_logit=2.0)
  uniform = jnp.ones((3,)) / 3

  @jax.jit
  def init_both(key):  # one compilation for both initialisations
    return weight_net.init(key, uniform, 0.5), net.init(key, uniform, 0.5)

  weight_variables, variables = init_both(jax.random.key(0))
  head = weight_variables["params"]["shifts"]
  assert not np.any(head["kernel"]) and not np.any(head["bias"])  # stage 3 starts at the anchor
  assert np.any(weight_variables["params"]["hidden0"]["kernel"])
  # Batched controls give batched logits; the single case is row 0.
  controls = jnp.asarray([[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
  logits = jax.jit(net.apply)(variables, controls, jnp.asarray([0.5, 0.0]))
  assert logits.shape == (2, 4, 3, 3)
  single = jax.eval_shape(net.apply, variables, controls[0], 0.5)
  assert single.shape == (4, 3, 3)
  # With the heads' kernels at zero the logits are their biases: the own stream (separate).
  zeroed = jax.tree.map(lambda a: a, variables)
  for l in range(4):
    zeroed["params"][f"layer{l}"]["kernel"] = jnp.zeros_like(
        zeroed["params"][f"layer{l}"]["kernel"])
  assert Tree.from_scores(jax.jit(net.apply)(zeroed, controls, jnp.zeros((2,)))[1]) == (
      Tree.separate(4, 3))


def test_weight_hypernet_output_of_zero_reproduces_the_anchor_exactly():
  method, variables = trained("weight")
  images = digits_batch(5)["image"]
  anchor_variables = variables["anchor"]
  controls = {"preference": (0.3, 0.7), "resource": 0.8}
  tree, adapted = method.controller(variables).predict(*controls.values())
  # A fresh weight hypernetwork outputs zero shifts: the adapted variables are the anchor's.
  chex.assert_trees_all_equal(adapted, anchor_variables)
  run = lambda v, x: dymu.apply_tree(method.net, v, x, tree)  # the compiled tree of predict
  expected = run(anchor_variables, images)
  got = method.predict(variables, images, controls)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])
  # A non-zero output head moves every node's batch-norm scales and biases, nothing else.
  params = jax.tree.map(lambda a: a, variables["params"])
  head = params["weight_hypernet"]["shifts"]
  head["bias"] = jnp.full_like(head["bias"], 0.1)
  _, moved = method.controller({**variables, "params": params}).predict(*controls.values())
  np.testing.assert_allclose(moved["params"]["block1"]["bn"]["bias"],
                             anchor_variables["params"]["block1"]["bn"]["bias"] + 0.1, rtol=1e-6)
  np.testing.assert_array_equal(moved["params"]["block1"]["conv"]["kernel"],
                                anchor_variables["params"]["block1"]["conv"]["kernel"])
  moved_predictions = run(moved, images)
  assert not np.allclose(moved_predictions["left"], expected["left"])


def test_invalid_preference_or_resource_is_rejected():
  method, variables = trained("edge")
  controller = method.controller(variables)
  images = digits_batch(0)["image"]
  # controls.check_preference's sentences (one tolerance, one message for every method).
  with pytest.raises(ValueError, match=r"^The preference \(0.5, 0.6\) is not on the simplex: "
                                       r"entries must be >= 0 and sum to 1 "
                                       r"\(they sum to 1.1\)\.$"):
    controller.predict((0.5, 0.6), 0.5)
  with pytest.raises(ValueError, match=r"preference \(1.2, -0.2\) is not on the simplex"):
    controller.predict((1.2, -0.2), 0.5)
  with pytest.raises(ValueError, match=r"^The preference has 3 entries \(0.2, 0.3, 0.5\) but "
                                       r"there are 2 tasks\.$"):
    method.predict(variables, images, {"preference": (0.2, 0.3, 0.5), "resource": 0.5})
  with pytest.raises(ValueError, match=r"they sum to 1.000011"):  # just past the tolerance
    controller.tree((0.5, 0.500011), 0.5)
  assert isinstance(controller.tree((0.5, 0.500009), 0.5), Tree)  # within it
  with pytest.raises(ValueError, match=r"The resource preference c must be a number in \[0, 1\], "
                                       r"got 1.5"):
    controller.predict((0.5, 0.5), 1.5)
  with pytest.raises(ValueError, match="got nan"):
    controller.tree((0.5, 0.5), float("nan"))
  with pytest.raises(ValueError, match="got 'low'"):
    method.predict(variables, images, {"preference": (0.5, 0.5), "resource": "low"})
  with pytest.raises(ValueError, match="DYMU controls must be"):
    method.predict(variables, images, {"preference": (0.5, 0.5), "budget": 0.5})


def test_predict_under_jit_equals_the_tree_and_the_controller_prices_it():
  method, variables = trained("edge")
  images = digits_batch(1)["image"]
  rng = np.random.default_rng(0)
  # Random hypernetwork outputs would pick random trees; sharpen them so (r, c) matter.
  params = jax.tree.map(lambda a: a * 4.0, variables["params"])
  variables = {**variables, "params": params}
  controller = method.controller(variables)
  for _ in range(1):
    r = tuple(rng.dirichlet((1.0, 1.0)))
    controls = {"preference": r, "resource": float(rng.uniform())}
    concrete = method.predict(variables, images, controls)
    traced = jax.jit(lambda v, x, c=controls: method.predict(v, x, c))(variables, images)
    for name in concrete:
      np.testing.assert_allclose(concrete[name], traced[name], atol=1e-5)
    tree = controller.tree(*controls.values())
    logits = controller.parent_logits(*controls.values())
    assert tree == Tree.from_scores(logits)
    tree_cost = controller.cost(*controls.values(), SHAPE)
    assert tree_cost == method.net.tree_cost(tree, SHAPE)
    assert 0 < tree_cost.macs_fraction <= 1.0
  anchor_predictions = method.predict(variables, images)
  separate = method.predict(variables, images, {"tree": method.net.separate_tree()})
  for name in anchor_predictions:
    np.testing.assert_array_equal(anchor_predictions[name], separate[name])


# ----------------------------------------------------------------------------------------------
# Affinity.


def test_affinity_of_identical_streams_is_one_and_random_streams_are_sane():
  method, variables = anchor()
  net = method.net
  images = np.random.default_rng(0).uniform(size=(8, *SHAPE)).astype(np.float32)
  twins = jax.tree.map(lambda a: jnp.stack([a[0], a[0]]) if a.ndim and a.shape[0] == 2 else a,
                       {k: {b: v for b, v in tree.items() if b.startswith("block")}
                        for k, tree in variables.items()})
  twins = {k: {**variables[k], **twins[k]} for k in variables}
  np.testing.assert_allclose(affinity.task_affinity(net, twins, images, num_images=8), 1.0,
                             atol=1e-5)
  # Three random streams: diagonal 1, values in [0, 1], each row's farthest stream at 0.
  features = [jnp.asarray(np.random.default_rng(s).normal(size=(3, 8, 5, 4)), jnp.float32)
              for s in range(2)]
  a = affinity.rsa_affinity(features)
  np.testing.assert_allclose(np.diag(a), 1.0)
  assert np.all(a >= -1e-6) and np.all(a <= 1 + 1e-6)
  layer_affinity = jax.jit(affinity.layer_affinity, static_argnums=1)
  np.testing.assert_allclose(layer_affinity(features[0]).min(axis=1), 0.0, atol=1e-6)
  # Permuting streams permutes the affinity.
  order = [2, 0, 1]
  permuted = affinity.rsa_affinity([f[np.asarray(order)] for f in features])
  np.testing.assert_allclose(permuted, a[np.ix_(order, order)], atol=1e-6)
  # A stream and a scaled copy of it (Pearson is scale-free) are as close as can be.
  copy = jnp.stack([features[0][0], 3.0 * features[0][0], features[0][2]])
  np.testing.assert_allclose(layer_affinity(copy)[0, 1], 1.0, atol=1e-5)
  # Two tasks: row normalisation is degenerate (A = I); "pair" keeps a graded value.
  two = features[0][:2]
  np.testing.assert_allclose(affinity.rsa_affinity([two]), np.eye(2), atol=1e-6)
  graded = affinity.rsa_affinity([two], normalisation="pair")
  assert 0.0 < graded[0, 1] < 1.0 and graded[0, 1] == pytest.approx(graded[1, 0])
  with pytest.raises(ValueError, match="Unknown affinity normalisation 'max'"):
    affinity.rsa_affinity([two], normalisation="max")
  with pytest.raises(ValueError, match="at least num_images=128 images"):
    affinity.task_affinity(net, variables, images)


# ----------------------------------------------------------------------------------------------
# The stages in the train step.


def run_steps(method, variables, steps: int, learning_rate: float = 1e-2):
  step_fn = jax.jit(step_lib.make_train_step(method, optax.adam(learning_rate)))
  state = state_lib.create(variables, optax.adam(learning_rate), jax.random.key(0))
  metrics = []
  for s in range(steps):
    state, m = step_fn(state, digits_batch(s))
    metrics.append(jax.device_get(m))
  return state, metrics


def test_anchor_stage_trains_each_stream_on_its_own_task():
  method, variables = anchor()
  params, model_state = split(variables)
  batch = digits_batch(3)
  grad_fn = jax.jit(jax.grad(lambda p, b: method.loss(p, model_state, b, jax.random.key(0),
                                                      0)[0]))
  grads = grad_fn(params, batch)
  # Only the "right" term reaches stream 1 and its decoder; check by dropping the left labels.
  single = dict(batch, left=np.full_like(batch["left"], tasks_lib.IGNORE_LABEL))
  right_only = grad_fn(params, single)
  np.testing.assert_allclose(grads["block0"]["conv"]["kernel"][1],
                             right_only["block0"]["conv"]["kernel"][1], rtol=1e-5, atol=1e-7)
  assert not np.any(right_only["block0"]["conv"]["kernel"][0])
  assert method.eval_controls() == [None]


def test_edge_stage_trains_the_edge_hypernet_only():
  method, variables = trained("edge")
  state, metrics = run_steps(method, variables, 2)
  for key in ("loss/left", "loss/right", "omega", "l_active", "l_inactive", "temperature",
              "task_loss", "used_nodes"):
    assert key in metrics[0], key
  assert all(np.isfinite(m["loss"]) for m in metrics)
  assert metrics[0]["temperature"] == 5.0
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, variables["params"])
  assert all(jax.tree.leaves(changed))
  chex.assert_trees_all_equal(state.model_state["anchor"], variables["anchor"])
  assert method.eval_controls() == [{"preference": (0.5, 0.5), "resource": 0.0},
                                    {"preference": (0.5, 0.5), "resource": 1.0}]


def test_weight_stage_trains_the_weight_hypernet_on_the_argmax_tree():
  method, variables = trained("weight")
  state, metrics = run_steps(method, variables, 2)
  assert "omega" not in metrics[0] and np.isfinite(metrics[-1]["loss"])
  head = state.params["weight_hypernet"]["shifts"]["kernel"]
  assert np.any(head != 0)  # left the anchor
  chex.assert_trees_all_equal(state.model_state["edge_hypernet"],
               variables["edge_hypernet"])
  chex.assert_trees_all_equal(state.model_state["anchor"], variables["anchor"])


def test_build_and_stage_messages():
  _, anchor_variables = anchor()
  with pytest.raises(ValueError, match="Unknown DYMU option"):
    dymu.build(DIGITS, model_options=MODEL, stage="edge", num_subnets=3)
  with pytest.raises(ValueError, match="does not take width_choices"):
    dymu.build(DIGITS, model_options={**MODEL, "width_choices": (0.5, 1.0)}, stage="anchor")
  with pytest.raises(ValueError, match="Unknown DYMU stage 'search'"):
    dymu.build(DIGITS, model_options=MODEL, stage="search")
  edge = dymu.build(DIGITS, model_options=MODEL, stage="edge")
  params, model_state = split({**edge.init(jax.random.key(0), digits_batch(0)),
                               **dymu.stage_variables(anchor=anchor_variables)})
  with pytest.raises(ValueError, match="The edge stage needs the task affinity"):
    edge.loss(params, model_state, digits_batch(0), jax.random.key(1), 0)
  with pytest.raises(ValueError, match=r"The task affinity must be a finite \(2, 2\) matrix"):
    dymu.build(DIGITS, model_options=MODEL, stage="edge", affinity=np.ones((3, 3)))
  # Without its earlier stages, a stage says what it must start from (train.train checks).
  assert dymu.build(DIGITS, model_options=MODEL, stage="weight").required_variables() == (
      "anchor", "edge_hypernet")
  assert dymu.build(DIGITS, model_options=MODEL, stage="anchor").required_variables() == (
      "params",)  # anchor_init="trunk": the streams start from the trunk
  assert edge.required_variables() == ("anchor",)
  assert dymu.build(DIGITS, model_options=MODEL, stage="anchor",
                    anchor_init="shared").required_variables() == ()
  assert dymu.build(DIGITS, model_options=MODEL, stage="pretrain").required_variables() == ()
  # The frozen parts are collections, not options.
  with pytest.raises(ValueError, match="Unknown DYMU option.*anchor_variables"):
    dymu.build(DIGITS, model_options=MODEL, stage="edge", anchor_variables=anchor_variables)
  given = dymu.stage_variables(anchor=anchor_variables, edge_params={"w": 1})
  assert set(given) == {"anchor", "edge_hypernet"} and given["anchor"] is anchor_variables
  assert given["edge_hypernet"] == {"params": {"w": 1}}
  with pytest.raises(ValueError, match="lambda_active must be a finite number >= 0"):
    dymu.build(DIGITS, model_options=MODEL, stage="anchor", lambda_active=-1.0)
  with pytest.raises(ValueError, match="Unknown DYMU anchor_init 'pretrained'; allowed: "
                                       "trunk, shared, independent"):
    dymu.build(DIGITS, model_options=MODEL, stage="anchor", anchor_init="pretrained")
  with pytest.raises(ValueError, match="Unknown DYMU depth_factor 'x'"):
    dymu.build(DIGITS, model_options=MODEL, stage="edge", depth_factor="x")
  with pytest.raises(ValueError, match="Unknown DYMU use_gradient 'x'"):
    dymu.build(DIGITS, model_options=MODEL, stage="edge", use_gradient="x")

  # 1 / L scaled to mean 1 (the default), or plain 1 / L.
  assert dymu.task_weights_from_losses((2.0, 0.5)) == pytest.approx((0.4, 1.6))
  assert dymu.task_weights_from_losses((2.0, 0.5), normalise=False) == (0.5, 2.0)
  with pytest.raises(ValueError, match="finite and > 0"):
    dymu.task_weights_from_losses((2.0, 0.0))
  losses = dymu.anchor_task_losses(anchor()[0].net, anchor_variables,
                                   [digits_batch(0), digits_batch(1)])
  assert len(losses) == 2 and all(np.isfinite(losses))


# ----------------------------------------------------------------------------------------------
# The regulariser's gradient through P_use, the trunk, the anchor diagnostics, head batch norm.


def test_use_gradient_stop_treats_p_use_as_a_weight():
  """With "stop", d Omega / d nu is the hand-computed gradient of the distance term alone."""
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2)), jnp.float32)
  affinity_matrix = jnp.asarray([[1.0, 0.8], [0.8, 1.0]])
  both = jnp.asarray([0.5, 0.5])

  def omega(nu, use_gradient):
    return dymu.branching_regularizer(nu, both, 1.0, affinity_matrix,
                                      depth_factor="shifted", use_gradient=use_gradient)[0]

  nu = jax.nn.softmax(logits, axis=-1)
  grad_stop = np.asarray(jax.grad(omega)(nu, "stop"))
  grad_flow = np.asarray(jax.grad(omega)(nu, "flow"))
  # By hand: Omega = sum_l d_l sum_{i != j} A_ij u_li u_lj ||nu_li - nu_lj||^2 with u fixed, so
  # dOmega/dnu_li = sum_{j != i} 2 * d_l A_ij u_li u_lj * 2 (nu_li - nu_lj) (both orders).
  p_use = np.asarray(dymu.parent_use_probability(nu))[1:]
  depth = np.asarray([1.0, 0.5])
  expected = np.zeros((2, 2, 2))
  nu_np = np.asarray(nu)
  for l in range(2):
    for i in range(2):
      for j in range(2):
        if i != j:
          expected[l, i] += (2 * depth[l] * float(affinity_matrix[i, j]) * p_use[l, i]
                             * p_use[l, j] * 2 * (nu_np[l, i] - nu_np[l, j]))
  np.testing.assert_allclose(grad_stop, expected, rtol=1e-5, atol=1e-6)
  # "flow" adds the gradient through P_use: the usage of block layer 1's nodes depends on the
  # decoders' parent choice nu[1] (the decoders' own usage is 1), so only nu[1] differs.
  np.testing.assert_allclose(grad_flow[0], grad_stop[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(grad_flow[1], grad_stop[1])


def test_pretrain_trains_one_shared_trunk_and_the_anchor_starts_from_its_copies():
  pretrain = dymu.build(DIGITS, model_options=MODEL, stage="pretrain")
  batch = digits_batch(0, 8)
  variables = pretrain.init(jax.random.key(1), batch)
  params, state = split(variables)
  grads = jax.grad(lambda p: pretrain.loss(p, state, batch, jax.random.key(2), 0)[0])(params)
  for l in range(3):  # only stream 0's blocks learn; the heads learn on the shared trunk
    block = jax.tree.leaves(grads[f"block{l}"])
    assert all(float(jnp.abs(g[1]).max()) == 0.0 for g in block)
    assert any(float(jnp.abs(g[0]).max()) > 0.0 for g in block)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["head_left"]))
  # Pretrain predictions are the shared trunk's, and every stream starts at the same draw.
  np.testing.assert_allclose(
      pretrain.predict(variables, batch["image"])["right"],
      pretrain.net.apply_tree(variables, batch["image"], pretrain.net.shared_tree(0))["right"],
      rtol=1e-6)
  trained_trunk = jax.tree.map(lambda a: a, variables)
  trained_trunk["params"]["block0"] = jax.tree.map(
      lambda a: a.at[0].add(1.0), variables["params"]["block0"])
  anchor_method = dymu.build(DIGITS, model_options=MODEL, stage="anchor")
  anchor_variables = {**anchor_method.init(jax.random.key(3), batch),
                      **dymu.stage_variables(trunk=trained_trunk)}
  assert set(anchor_variables) == {"params", "batch_stats"}
  for col in ("params", "batch_stats"):
    for l in range(3):
      for leaf, source in zip(jax.tree.leaves(anchor_variables[col][f"block{l}"]),
                              jax.tree.leaves(trained_trunk[col][f"block{l}"])):
        np.testing.assert_array_equal(leaf[0], source[0])
        np.testing.assert_array_equal(leaf[1], source[0])
  np.testing.assert_array_equal(anchor_variables["params"]["head_right"]["output"]["kernel"],
                                trained_trunk["params"]["head_right"]["output"]["kernel"])
  # The separate tree of copies equals the trunk's shared tree.
  np.testing.assert_allclose(
      anchor_method.predict(anchor_variables, batch["image"])["left"],
      pretrain.predict(trained_trunk, batch["image"])["left"], rtol=1e-5, atol=1e-6)
  # Copies do not diverge; a perturbed stream does, by the stated formula.
  assert np.allclose(dymu.stream_divergence(anchor_variables, 3), 0.0)
  moved = jax.tree.map(lambda a: a, anchor_variables)
  moved["params"]["block2"] = jax.tree.map(lambda a: a.at[1].multiply(2.0),
                                           anchor_variables["params"]["block2"])
  d = dymu.stream_divergence(moved, 3)
  # ||2a - a|| / ((||a|| + ||2a||) / 2) = 1 / 1.5
  assert d[2][0][1] == pytest.approx(1 / 1.5, rel=1e-6) and d[1][0][1] == 0.0


def test_probe_trees_are_one_edge_changes_and_prefix_sharing():
  trees = dict(dymu.probe_trees(3, 2))
  assert len(trees) == 12
  assert trees["block 1 of stream 1 reads stream 0"].parents == ((0, 0), (0, 1), (0, 1))
  assert trees["decoder of stream 0 reads stream 1"].parents == ((0, 1), (0, 1), (1, 1))
  assert trees["block 0 shared (stream 1)"].parents == ((1, 1), (0, 1), (0, 1))
  assert trees["blocks 0-2 shared (stream 0)"] == Tree.shared(3, 2, 0)
  assert len(dymu.probe_trees(2, 3)) == 2 * 3 * 2 + 3 * 2


def test_decoder_batch_norm_is_shifted_and_updated():
  method = dymu.build(DIGITS, model_options={**MODEL, "head_hidden_layers": 1,
                                             "head_batch_norm": True, "head_width": 8},
                      stage="anchor", anchor_init="shared")
  batch = digits_batch(1, 8)
  variables = method.init(jax.random.key(0), batch)
  assert "head_left" in variables["batch_stats"]
  template = branched.batch_norm_shift_template(variables)
  assert template["head_left"]["hidden0_bn"]["scale"].shape == (8,)
  # Training updates the decoders' running statistics too.
  _, state = method.net.apply_tree(variables, batch["image"], method.net.separate_tree(),
                                   train=True)
  assert not np.allclose(state["batch_stats"]["head_left"]["hidden0_bn"]["mean"],
                         variables["batch_stats"]["head_left"]["hidden0_bn"]["mean"])
  # A shift of the left decoder's bias moves only the left predictions.
  shifts = jax.tree.map(jnp.zeros_like, template)
  shifts["head_left"]["hidden0_bn"]["bias"] = jnp.ones((8,))
  shifted = branched.apply_batch_norm_shifts(variables, shifts)
  base = method.predict(variables, batch["image"])
  moved = method.predict(shifted, batch["image"])
  assert not np.allclose(base["left"], moved["left"])
  np.testing.assert_allclose(base["right"], moved["right"], rtol=1e-6)
  with pytest.raises(ValueError, match="give head_hidden_layers >= 1 or drop head_batch_norm"):
    dymu.build(DIGITS, model_options={**MODEL, "head_batch_norm": True}, stage="anchor")


def test_a_stage_starts_from_earlier_variables_given_to_train(tmp_path):
  """The stage runner's path: a stage is built without its earlier stages and takes them as
  variable collections (`stage_variables`) given to `train.train`. It trains on them (another
  anchor trains the edge hypernetwork differently) and keeps them exactly as given, also when
  resumed; without them, or with them in other shapes, it refuses to start."""
  from dymu_jax import train as train_lib
  from dymu_jax.data import base as data_base
  _, anchor_variables = anchor()
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(32, *SHAPE)).astype(np.float32)
  labels = {t.name: rng.integers(0, 10, 32).astype(np.int32) for t in DIGITS}
  source = data_base.ArraySource("digits", "train", images, labels, DIGITS)
  config = train_lib.TrainConfig(steps=2, batch_size=8, progress=False, prefetch=0,
                                 async_checkpoints=False, log_every=1)
  edge = dymu.build(DIGITS, model_options=MODEL, stage="edge",
                    affinity=((1.0, 0.5), (0.5, 1.0)), **HYPER)
  assert edge.required_variables() == ("anchor",)
  with pytest.raises(ValueError, match=r"starts from collection\(s\) anchor of an earlier stage"):
    train_lib.train(edge, source, None, config, tmp_path / "missing")
  given = train_lib.train(edge, source, None, config, tmp_path / "given",
                          initial_variables=dymu.stage_variables(anchor=anchor_variables))
  chex.assert_trees_all_equal(given.state.model_state["anchor"], anchor_variables)
  # The edge hypernetwork trained on the given anchor: the same run on another anchor differs.
  scaled = jax.tree.map(lambda x: 1.5 * x, anchor_variables)
  other = train_lib.train(edge, source, None, config, tmp_path / "other",
                          initial_variables=dymu.stage_variables(anchor=scaled))
  chex.assert_trees_all_equal(other.state.model_state["anchor"], scaled)
  edge_params = given.state.params["edge_hypernet"]
  assert not all(np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(edge_params), jax.tree.leaves(other.state.params["edge_hypernet"])))
  # Resuming restores the stage's own variables: no collection needed any more.
  again = train_lib.train(edge, source, None, dataclasses.replace(config, steps=3),
                          tmp_path / "given")
  chex.assert_trees_all_equal(again.state.model_state["anchor"], anchor_variables)
  with pytest.raises(ValueError, match="does not match the method's"):
    wrong = jax.tree.map(lambda x: x[..., :1], anchor_variables)
    train_lib.train(edge, source, None, config, tmp_path / "wrong",
                    initial_variables=dymu.stage_variables(anchor=wrong))
  # The weight stage starts from the anchor and the trained edge hypernetwork; both stay.
  weight = dymu.build(DIGITS, model_options=MODEL, stage="weight", **HYPER)
  assert weight.required_variables() == ("anchor", "edge_hypernet")
  with pytest.raises(ValueError, match=r"starts from collection\(s\) edge_hypernet of"):
    train_lib.train(weight, source, None, config, tmp_path / "weight",
                    initial_variables=dymu.stage_variables(anchor=anchor_variables))
  result = train_lib.train(weight, source, None, config, tmp_path / "weight",
                           initial_variables=dymu.stage_variables(anchor=anchor_variables,
                                                                  edge_params=edge_params))
  chex.assert_trees_all_equal(result.state.model_state["anchor"], anchor_variables)
  chex.assert_trees_all_equal(result.state.model_state["edge_hypernet"],
                              {"params": edge_params})
