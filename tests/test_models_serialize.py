"""Standalone export: the JSON definition, save/load of sliced ECMT SubNets, the error messages.

Networks are small (resnet_small with 16-wide heads on 16 px synthetic scenes; LeNet with batch
norm on 28 px digit pairs) and their variables are filled by numpy, so that nothing but the
forward passes compiles on a shared CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import data, methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import ecmt
from dymu_jax.models import WidthConfig, build_multitask, serialize
from dymu_jax.models.multitask import MultiTaskNet

import random_variables as test_variables

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
# (model options, image shape, a non-trivial SubNet) per case; tasks come from `case_tasks`.
CASES = {
    "resnet_small_dense": (
        {"backbone": "resnet_small", "head_width": 16}, (16, 16, 3),
        WidthConfig((0.5, 0.25, 0.75, 1.0), (0.25, 0.5, 1.0, 0.75))),
    "lenet_digits": (
        {"backbone": "lenet", "head_width": 16,
         "backbone_kwargs": {"batch_norm": True, "channel_divisor": 2}}, (28, 28, 1),
        WidthConfig((0.5, 1.0, 0.25), (0.75, 0.25))),
}


def case_tasks(name: str) -> tuple[tasks_lib.Task, ...]:
  if name == "lenet_digits":
    return DIGITS
  config = data.DataConfig(name="synthetic", image_size=16, num_train=8, num_test=8)
  return data.load(config, "train").tasks  # segmentation, depth, normals, edges


def exported(name: str, directory: str):
  """Saves the SubNet of case `name` to `directory`; returns what the checks compare with."""
  options, image_shape, config = CASES[name]
  method = methods.build("ecmt", case_tasks(name), model_options=options)
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes, seed=3)
  sub, sub_variables = ecmt.slice_subnet(method.model, variables, config, image_shape)
  extra = {"widths": config, "macs": np.int64(1234), "preference": (0.5, 0.5), "budget": 0.5}
  serialize.save_network(directory, sub, sub_variables, extra, image_shape=image_shape)
  x = np.random.default_rng(0).uniform(size=(3, *image_shape)).astype(np.float32)
  return method.model, variables, config, sub_variables, x


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """Case name -> (name, export folder, SuperNet, its variables, widths, sliced variables, x),
  built once per module on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = str(tmp_path_factory.mktemp(name) / "export")
      cache[name] = (name, directory, *exported(name, directory))
    return cache[name]

  return get


@pytest.fixture(params=sorted(CASES))
def saved(request, exports):
  return exports(request.param)


def leaves(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): np.asarray(v) for path, v in flat}


# ----------------------------------------------------------------------------------------------
# The definition.


def test_definition_round_trips_every_field():
  tasks = (tasks_lib.Task("seg", "segmentation", 7, loss_type="focal", label_scale=2.5),
           tasks_lib.edges("edges", pos_weight=0.95), tasks_lib.regression("age", 10.0))
  net = build_multitask(
      tasks, "resnet_small", backbone_kwargs={"stage_channels": [8, 16, 24, 32],
                                              "output_stride": 4, "zero_init_residual": True},
      head_width=24, head_widths=(8, 16, 24), head_hidden_layers=2, head_batch_norm=True,
      atrous_rates=(1, 3),
      image_pooling=False, pixel_mean=(0.1, 0.2, 0.3), pixel_std=(1.0, 2.0, 0.5),
      width_choices=(0.5, 1.0), bn_momentum=0.97, bn_axis_name="batch")
  record = serialize.network_to_json(net)
  # Through text, as on disk: tuples become lists and must come back as tuples.
  back = serialize.network_from_json(json.loads(json.dumps(record)))
  assert back == net
  fields = [f.name for f in dataclasses.fields(MultiTaskNet) if f.name not in ("parent", "name")]
  for field in fields:
    assert getattr(back, field) == getattr(net, field), field
    assert type(getattr(back, field)) is type(getattr(net, field)), field
  assert set(record) == {"version", *fields}
  # Records written before head_batch_norm existed still load, without head batch norm.
  del record["head_batch_norm"]
  assert serialize.network_from_json(record) == net.clone(head_batch_norm=False)
  assert record["version"] == serialize.VERSION
  assert back.tasks[0].loss_type == "focal" and back.tasks[1].pos_weight == 0.95
  assert back.tasks[2].label_scale == 10.0
  # Nested tuples in backbone options (MobileNetV2's sliced block setting) survive too.
  mobile = build_multitask(tasks[:1], "mobilenet_v2", head_width=16).sliced(
      WidthConfig((0.25, 0.5, 0.75, 1.0, 0.5), (0.5,)))
  again = serialize.network_from_json(json.loads(json.dumps(serialize.network_to_json(mobile))))
  assert again == mobile
  assert isinstance(dict(again.backbone_kwargs)["block_setting"][0], tuple)


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(version=2), "version 2 is not supported"),
    (lambda r: r.pop("head_width"), "missing key(s) [head_width]"),
    (lambda r: r.update(colour="red"), "unknown key(s) [colour]"),
    (lambda r: r["tasks"][0].update(kind="bogus"), "unknown kind 'bogus'"),
    (lambda r: r["tasks"][1].pop("num_outputs"), "Task 1 has missing key(s) [num_outputs]"),
    (lambda r: r.update(head_width="64"), "'head_width' must be an int"),
    (lambda r: r.update(backbone="vgg"), "Unknown backbone 'vgg'"),
    (lambda r: r["backbone_kwargs"].append(["depth", 3]), "does not take option(s) depth"),
])
def test_bad_definitions_fail_with_one_sentence(change, words):
  record = json.loads(json.dumps(serialize.network_to_json(build_multitask(DIGITS, "lenet"))))
  change(record)
  with pytest.raises(ValueError) as info:
    serialize.network_from_json(record)
  message = str(info.value)
  assert words in message and "\n" not in message and message.endswith(".")


def test_definitions_json_cannot_hold_are_refused():
  net = build_multitask(DIGITS, "lenet", backbone_kwargs={"kernel_sizes": (9, np.float32)})
  with pytest.raises(ValueError, match="backbone option 'kernel_sizes' is a type"):
    serialize.network_to_json(net)


# ----------------------------------------------------------------------------------------------
# Save and load of sliced SubNets.


def test_loaded_subnet_equals_the_supernet_at_its_widths(saved, tmp_path):
  name, directory, model, variables, config, sub_variables, x = saved
  # Only the two files travel: load from a copy elsewhere.
  assert sorted(os.listdir(directory)) == ["network.json", "variables.msgpack"]
  copy = shutil.copytree(directory, tmp_path / "moved")
  net, loaded, extra = serialize.load_network(copy)
  got = jax.jit(net.apply)(loaded, x)
  want = jax.jit(lambda v, x_: model.apply(v, x_, widths=config))(variables, x)
  assert set(got) == {t.name for t in model.tasks}
  for task in model.tasks:
    assert got[task.name].shape == want[task.name].shape
    assert float(jnp.max(jnp.abs(got[task.name] - want[task.name]))) <= 1e-5, task.name
  assert extra == {"widths": {"encoder": list(config.encoder), "decoders": list(config.decoders)},
                   "macs": 1234, "preference": [0.5, 0.5], "budget": 0.5}


def test_loaded_variables_have_the_sliced_shapes(saved):
  name, directory, model, variables, config, sub_variables, x = saved
  _, loaded, _ = serialize.load_network(directory)
  full, sliced, got = leaves(variables), leaves(sub_variables), leaves(loaded)
  assert set(got) == set(sliced) == set(full)
  assert "batch_stats" in loaded
  for key in got:
    assert got[key].shape == sliced[key].shape, key
    np.testing.assert_array_equal(got[key], sliced[key])
    assert all(s <= f for s, f in zip(got[key].shape, full[key].shape)), key
  smaller = [k for k in got if got[k].shape != full[k].shape]
  assert len(smaller) > len(got) // 2
  assert sum(v.size for v in got.values()) < sum(v.size for v in full.values())


def test_load_needs_only_the_files_in_a_fresh_process(exports, tmp_path):
  # One case is enough here: LeNet compiles fastest.
  _, directory, model, variables, config, _, x = exports("lenet_digits")
  np.save(tmp_path / "x.npy", x)
  script = (
      "import sys, numpy as np\n"
      "from dymu_jax.models import serialize\n"
      "net, v, _ = serialize.load_network(sys.argv[1])\n"
      "out = net.apply(v, np.load(sys.argv[2]))\n"
      "np.savez(sys.argv[3], **{k: np.asarray(a) for k, a in out.items()})\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", script, directory, str(tmp_path / "x.npy"),
                  str(tmp_path / "out.npz")], check=True, cwd=root,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  got = np.load(tmp_path / "out.npz")
  want = model.apply(variables, x, widths=config)
  for task in model.tasks:
    np.testing.assert_allclose(got[task.name], want[task.name], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Errors users can hit.


@pytest.fixture
def lenet_export(exports):
  return exports("lenet_digits")[1]


def copy_of(directory, tmp_path) -> str:
  return str(shutil.copytree(directory, tmp_path / "copy"))


def edit_json(directory: str, change) -> str:
  path = os.path.join(directory, "network.json")
  with open(path) as f:
    record = json.load(f)
  change(record)
  with open(path, "w") as f:
    json.dump(record, f)
  return path


def load_error(directory: str) -> str:
  with pytest.raises(serialize.SavedNetworkError) as info:
    serialize.load_network(directory)
  message = str(info.value)
  assert "\n" not in message and message.endswith(".")
  return message


def test_missing_folder_and_files_name_the_path(lenet_export, tmp_path):
  missing = str(tmp_path / "nowhere")
  message = load_error(missing)
  assert message == f"No saved network at {missing}: the folder does not exist."
  for name in ("network.json", "variables.msgpack"):
    directory = str(shutil.copytree(lenet_export, tmp_path / name.replace(".", "_")))
    os.remove(os.path.join(directory, name))
    assert f"{os.path.join(directory, name)} is missing" in load_error(directory)


@pytest.mark.parametrize("change, words", [
    (lambda r: r["network"]["tasks"][0].update(kind="bogus"), "unknown kind 'bogus'"),
    (lambda r: r["network"].pop("atrous_rates"), "missing key(s) [atrous_rates]"),
    (lambda r: r.update(comment="hi"), "unknown key(s) [comment]"),
    (lambda r: r.update(version=0), "has version 0"),
    (lambda r: r.update(image_shape=[28, 28]), "has image_shape [28, 28]"),
])
def test_tampered_definition_names_the_file(lenet_export, tmp_path, change, words):
  directory = copy_of(lenet_export, tmp_path)
  path = edit_json(directory, change)
  message = load_error(directory)
  assert path in message and words in message


def test_definition_edited_to_other_widths_fails_the_shape_check(lenet_export, tmp_path):
  directory = copy_of(lenet_export, tmp_path)
  edit_json(directory, lambda r: r["network"].update(head_widths=[16, 16]))
  message = load_error(directory)
  assert os.path.join(directory, "variables.msgpack") in message
  # The SubNet's right decoder is 0.25 wide (8 of 16 channels); the edit claims 16.
  assert "params/head_right/hidden0/bias has shape (8,) but the network has (16,)" in message


def test_corrupt_files_name_the_path(lenet_export, tmp_path):
  directory = copy_of(lenet_export, tmp_path)
  json_path = os.path.join(directory, "network.json")
  with open(json_path, "a") as f:
    f.write("}")
  assert f"{json_path} is not valid JSON" in load_error(directory)
  shutil.copy(os.path.join(lenet_export, "network.json"), json_path)
  vars_path = os.path.join(directory, "variables.msgpack")
  with open(vars_path, "r+b") as f:
    f.seek(100)
    f.write(b"\xff\xff\xff\xff")
  assert f"{vars_path} does not match the SHA-256" in load_error(directory)


def test_save_refuses_variables_of_another_network(tmp_path):
  options, image_shape, config = CASES["lenet_digits"]
  method = methods.build("ecmt", DIGITS, model_options=options)
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  variables = test_variables.fill(shapes)
  with pytest.raises(ValueError, match="do not fit the network at image shape"):
    serialize.save_network(tmp_path / "x", method.model.sliced(config), variables,
                           image_shape=image_shape)
  assert not os.path.exists(tmp_path / "x")
