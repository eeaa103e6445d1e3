"""The deployment half of the Method protocol: control spaces, `deploy` for every method, the
deployed network's cost, and export to a folder `models.serialize` loads without the method.

Networks are tiny LeNets on 16 px digits; variables are filled by numpy (nothing is trained).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base as data_base
from dymu_jax.methods import base, dymu
from dymu_jax.models import branched, serialize

import random_variables as test_variables
import test_methods_dymu as dymu_tests

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
SHAPE = (16, 16, 1)
LENET = {"backbone": "lenet", "head_width": 8,
         "backbone_kwargs": {"conv_channels": (4, 6), "kernel_sizes": (5, 3), "fc_features": 8,
                             "batch_norm": True}}
METHOD_OPTIONS = {
    "static": {}, "single_task": {}, "pcgrad": {},
    "gradsplit": {"routing": "fixed", "routing_matrix": "1,0;0,1"},
    "phn": {"chunk_size": 64, "hidden": (8,)}, "phn_bn": {"hidden": (8,)},
    "ecmt": {"width_choices": (0.5, 1.0)},
}
ECMT_LENET = {**LENET, "head_width": 16, "backbone_kwargs": {**LENET["backbone_kwargs"], "channel_divisor": 2}}


# Random 16 px digit batches {"image", "left", "right"} (the same shape as here).
digits_batch = dymu_tests.digits_batch


@functools.lru_cache(maxsize=None)
def setup(name: str):
  """(method, variables with `init`'s shapes filled by numpy)."""
  model = ECMT_LENET if name == "ecmt" else LENET
  method = methods.build(name, DIGITS, model_options=model, method_options=METHOD_OPTIONS[name])
  shapes = jax.eval_shape(method.init, jax.random.key(0),
                          {"image": jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)})
  return method, test_variables.fill(shapes, seed=1, other_scale=0.5)


def held_out() -> base.HeldOut:
  validation = digits_batch(5, 16)
  validation[data_base.VALID_KEY] = np.ones(16, bool)
  return base.HeldOut((digits_batch(4, 8)["image"], digits_batch(6, 8)["image"]),
                      (validation,), "test")


CONTROLS = {
    "static": None, "single_task": None, "pcgrad": None, "gradsplit": None,
    "phn": {"preference": (0.7, 0.3)}, "phn_bn": {"preference": (0.2, 0.8)},
    "ecmt": {"preference": (0.7, 0.3), "budget": 0.6},
}
SPACES = {"static": (), "single_task": (), "pcgrad": (), "gradsplit": (),
          "phn": ("preference",), "phn_bn": ("preference",), "ecmt": ("preference", "budget")}


@pytest.mark.parametrize("name", sorted(METHOD_OPTIONS))
def test_deployed_network_predicts_what_the_method_predicts(name, tmp_path):
  """For every method: the deployed network's predictions equal `method.predict` for the same
  controls (ECMT: on the recalibrated SuperNet at the searched widths), its cost is counted,
  and an exportable network loads back without the method and predicts the same."""
  method, variables = setup(name)
  assert method.control_space().names == SPACES[name]
  prepared = method.prepare(variables, held_out(), cache_dir=tmp_path)
  deployed = method.deploy(variables, CONTROLS[name], prepared, image_shape=SHAPE)
  images = digits_batch(7, 8)["image"]
  if name == "ecmt":
    config = deployed.key
    recalibrated = method.recalibrate(variables, config, prepared)
    expected = method.predict(recalibrated, images, {"widths": config})
    assert deployed.cost().macs == prepared.cost_table.macs(config)
    assert deployed.info["macs_fraction"] <= 0.6 + 1e-9
    assert (tmp_path / "cost_table.json").exists() and (tmp_path / "encoder_scores.json").exists()
  else:
    expected = method.predict(variables, images, CONTROLS[name])
  got = deployed.apply(images)
  for task in DIGITS:
    np.testing.assert_allclose(got[task.name], expected[task.name], rtol=1e-5, atol=1e-5)
  cost = deployed.cost()
  assert cost.macs > 0 and cost.params > 0
  folder = deployed.export(tmp_path / "net", extra={"source": "test"})
  network, loaded, info = serialize.load_network(folder)
  reloaded = network.apply(loaded, images)
  for task in DIGITS:
    np.testing.assert_allclose(reloaded[task.name], got[task.name], rtol=1e-5, atol=1e-5)
  assert info["macs"] == cost.macs and info["params"] == cost.params
  assert info["source"] == "test"
  assert info["controls"] == {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in deployed.controls.items()}


def test_phn_deploys_the_network_generated_for_each_preference():
  method, variables = setup("phn")
  a = method.deploy(variables, {"preference": (0.9, 0.1)}, image_shape=SHAPE)
  b = method.deploy(variables, {"preference": (0.1, 0.9)}, image_shape=SHAPE)
  uniform = method.deploy(variables, None, image_shape=SHAPE)
  assert uniform.controls == {"preference": (0.5, 0.5)}
  assert a.key != b.key
  kernels = [jax.tree.leaves(d.variables["params"])[0] for d in (a, b)]
  assert not np.allclose(kernels[0], kernels[1])


def test_controls_a_method_does_not_take_are_refused_in_one_sentence():
  method, variables = setup("static")
  with pytest.raises(ValueError, match=r"^This method takes the controls none \(its network is "
                                       r"fixed\); preference cannot be set\.$"):
    method.deploy(variables, {"preference": (0.5, 0.5)}, image_shape=SHAPE)
  method, variables = setup("phn")
  with pytest.raises(ValueError, match=r"takes the controls preference; budget cannot be set"):
    method.deploy(variables, {"budget": 0.5}, image_shape=SHAPE)
  with pytest.raises(ValueError, match=r"^The preference \(0.9, 0.9\) is not on the simplex: "
                                       r"entries must be >= 0 and sum to 1 "
                                       r"\(they sum to 1.8\)\.$"):
    method.deploy(variables, {"preference": (0.9, 0.9)}, image_shape=SHAPE)
  method, variables = setup("ecmt")
  with pytest.raises(ValueError, match="needs held-out training images"):
    method.prepare(variables, None)
  with pytest.raises(ValueError, match=r"in that order"):
    base.ControlSpace(("budget", "preference"))


def test_ecmt_deploy_options_change_the_search():
  method, variables = setup("ecmt")
  prepared = method.prepare(variables, held_out())
  assert set(method.DEPLOY_OPTIONS) == {"decoder_reserve", "preference_cap"}
  uncapped = method.replace_options(preference_cap=False)
  configs = {m.deploy(variables, {"preference": (0.9, 0.1), "budget": 1.0}, prepared,
                      image_shape=SHAPE).key for m in (method, uncapped)}
  # With the cap, the less preferred decoder is held below full width even at budget 1.
  assert len(configs) == 2, configs
  with pytest.raises(ValueError, match=r"decoder_reserve must lie in \[0, 1\], got 2"):
    method.replace_options(decoder_reserve=2.0)


def test_dymu_deploys_and_exports_the_tree_with_shifted_batch_norms(tmp_path):
  """The weight stage's deployed tree is the controller's, computes only its nodes, and costs
  what `BranchedNet.tree_cost` counts; the anchor stage deploys its separate streams."""
  method, variables = dymu_tests.trained("weight")
  assert method.control_space().names == ("preference", "resource")
  images = dymu_tests.digits_batch(9)["image"]
  controls = {"preference": (0.8, 0.2), "resource": 1.0}
  deployed = method.deploy(variables, controls, image_shape=dymu_tests.SHAPE)
  tree, _ = method.controller(variables).predict(np.array((0.8, 0.2)), 1.0)
  # The preference is recorded as the float32 values the hypernetworks read.
  assert deployed.controls == {"preference": tuple(float(x) for x in np.float32([0.8, 0.2])),
                               "resource": 1.0}
  # With the weight hypernetwork the batch norms depend on (r, c): they are part of the key.
  assert deployed.key == (tree, deployed.controls["preference"], 1.0)
  assert deployed.structure == {"tree": [list(p) for p in tree.parents]}
  expected = method.predict(variables, images, controls)
  got = deployed.apply(images)
  for task in DIGITS:
    np.testing.assert_allclose(got[task.name], expected[task.name], rtol=1e-5, atol=1e-5)
  cost = method.net.tree_cost(tree, dymu_tests.SHAPE)
  assert (deployed.cost().macs, deployed.cost().params) == (cost.macs, cost.params)
  assert deployed.info["tree"] == [list(p) for p in tree.parents]
  # Exported: the tree and the shifted anchor load back without the method and predict the same.
  network, loaded, info = serialize.load_network(deployed.export(tmp_path / "tree"))
  assert isinstance(network, branched.TreeNetwork) and network.tree == tree
  assert network.net == method.net
  reloaded = network.apply(loaded, images)
  for task in DIGITS:
    np.testing.assert_allclose(reloaded[task.name], got[task.name], rtol=1e-5, atol=1e-5)
  assert info["controls"] == {"preference": list(deployed.controls["preference"]),
                              "resource": 1.0}
  assert (info["macs"], info["params"]) == (cost.macs, cost.params)
  # A BranchedNet built by hand (no build_branched options) cannot be described for export.
  bare = base.Deployed(branched.TreeNetwork(dataclasses.replace(method.net, build_options=()),
                                            tree), deployed.variables, dymu_tests.SHAPE)
  assert not bare.exportable
  with pytest.raises(ValueError, match="A deployed TreeNetwork cannot be exported yet"):
    bare.export(tmp_path / "bare")
  anchor_method, anchor_variables = dymu_tests.anchor()
  assert anchor_method.control_space().names == ()
  anchor = anchor_method.deploy(anchor_variables, image_shape=dymu_tests.SHAPE)
  assert anchor.key == anchor_method.net.separate_tree()
  assert isinstance(anchor.network, branched.TreeNetwork)
