"""`--pretrained`: torchvision weights into a fresh run's backbone (`Method.load_pretrained`,
`train(..., pretrained=...)`), DYMU's streams, and the one-sentence refusals."""

from __future__ import annotations

import dataclasses

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones
from experiments import cli_help
from dymu_jax import runs as runs_lib
from dymu_jax.runs import guard
from experiments import train

from random_variables import torchvision_state
from test_bad_inputs import TINY, cli_error, run_main

TASKS = (tasks_lib.classification("a", 3), tasks_lib.regression("b"))
IMAGES = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)


def _zeros(fn, *args):
  """Zero variables of the shapes `fn(key, *args)` returns (nothing computed)."""
  shapes = jax.eval_shape(fn, jax.random.key(0), *args)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(path of a fake torchvision resnet18 .npz, its state dict)."""
  reference = jax.eval_shape(backbones.get_backbone("resnet18")().init, jax.random.key(0),
                             jnp.zeros((1, 16, 16, 3)))
  state = torchvision_state("resnet18", reference)
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.npz")
  np.savez(path, **state)
  return path, state


def _stem(state):
  return state["conv1.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO


def test_multitask_and_single_task_methods_load_their_encoders(weights):
  path, state = weights
  method = methods.build("static", TASKS, model_options={"backbone": "resnet18"})
  variables = _zeros(method.init, {"image": IMAGES})
  loaded = method.load_pretrained(variables, path)
  np.testing.assert_array_equal(loaded["params"]["encoder"]["stem_conv"]["kernel"], _stem(state))
  np.testing.assert_array_equal(loaded["batch_stats"]["encoder"]["stem_bn"]["var"],
                                state["bn1.running_var"])
  assert not any(np.any(x) for x in jax.tree.leaves(loaded["params"]["head_a"]))  # unchanged
  single = methods.build("single_task", TASKS, model_options={"backbone": "resnet18"})
  loaded = single.load_pretrained(_zeros(single.init, {"image": IMAGES}), path)
  for task in TASKS:
    np.testing.assert_array_equal(
        loaded["params"][f"net_{task.name}"]["encoder"]["stem_conv"]["kernel"], _stem(state))


def test_dymu_first_stage_loads_every_stream_later_stages_refuse(weights):
  path, state = weights
  method = methods.build("dymu", TASKS, model_options={"backbone": "resnet18"},
                         method_options={"stage": "pretrain"})
  variables = _zeros(method.init, {"image": IMAGES})
  loaded = method.load_pretrained(variables, path)
  kernel = loaded["params"]["block0"]["stem_conv"]["kernel"]
  assert kernel.shape[0] == len(TASKS)
  for stream in range(len(TASKS)):
    np.testing.assert_array_equal(kernel[stream], _stem(state))
  anchor = dataclasses.replace(method, stage="anchor", anchor_init="independent")
  assert np.array_equal(anchor.load_pretrained(variables, path)["params"]["block0"][
      "stem_conv"]["kernel"][1], _stem(state))
  for later in (dataclasses.replace(method, stage="anchor"),
                dataclasses.replace(method, stage="edge")):
    with pytest.raises(ValueError, match="starts from its earlier stage's weights"):
      later.load_pretrained(variables, path)


def test_methods_that_cannot_load_refuse_in_one_sentence(weights):
  path, _ = weights
  for name in ("phn", "phn_bn"):
    method = methods.build(name, TASKS, model_options={"backbone": "resnet18"})
    with pytest.raises(ValueError, match=f"^{name} generates its network's weights with a "
                                         f"hypernetwork, so it cannot start from a pretrained "
                                         f"backbone; train it from random initialisation.$"):
      method.load_pretrained({}, path)
  lenet = methods.build("static", TASKS, model_options={"backbone": "lenet"})
  with pytest.raises(ValueError, match="No torchvision checkpoint layout is known for "
                                       "backbone 'lenet'"):
    lenet.load_pretrained(_zeros(lenet.init, {"image": jax.ShapeDtypeStruct(
        (2, 20, 20, 3), jnp.float32)}), path)


def test_cli_run_starts_from_the_file_and_records_it(weights, tmp_path):
  path, state = weights
  workdir = tmp_path / "w"
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    cli_help.parse_flags(["train", *TINY, "--method=static", "--backbone=resnet18",
                          f"--pretrained={path}", "--eval_every=0", "--learning_rate=1e-12",
                          f"--workdir={workdir}"])
    train.main(["train"])
  finally:
    fv.unparse_flags()
  run = runs_lib.load_run(str(workdir))
  assert run.values["pretrained"] == path
  np.testing.assert_allclose(run.variables["params"]["encoder"]["stem_conv"]["kernel"],
                             _stem(state), atol=1e-6)
  # A resumed run may not change it (workdir_guard's default).
  assert guard.changed_flags({"pretrained": path}, {"pretrained": ""}) == {
      "pretrained": (path, "")}


def test_bad_pretrained_flags_are_one_sentence(capsys, tmp_path, weights):
  path, _ = weights
  error = run_main(capsys, train, *TINY, "--backbone=lenet", f"--pretrained={path}",
                   f"--workdir={tmp_path / 'w'}")
  assert error == (f"error: --pretrained={path} loads torchvision weights into a resnet18, "
                   f"resnet34 or mobilenet_v2 backbone, but --backbone=lenet has no torchvision "
                   f"layout; choose one of those backbones or drop --pretrained.")
  other = tmp_path / "weights.bin"
  other.write_bytes(b"")
  error = run_main(capsys, train, *TINY, "--backbone=resnet18", f"--pretrained={other}",
                   f"--workdir={tmp_path / 'w'}")
  assert error == (f"error: --pretrained={other} must be a .safetensors, .npz, .pth or .pt "
                   f"file holding a torchvision state dict of resnet18, resnet34 or "
                   f"mobilenet_v2."), error
  assert not (tmp_path / "w").exists()  # refused before anything was made
  error = cli_error("train", *TINY, "--backbone=resnet18", "--pretrained=/no/such/file",
                    f"--workdir={tmp_path / 'w'}")
  assert error == ("error: --pretrained=/no/such/file is not a file; give a .safetensors, "
                   ".npz, .pth or .pt torchvision state dict of resnet18, resnet34 or "
                   "mobilenet_v2, or leave it empty for random initialisation."), error
  assert not (tmp_path / "w").exists()
