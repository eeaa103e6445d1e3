"""Every registered method end to end through the library's public faces, and a new method added
with one module and one registry line.

For each method: a few training steps (`train.train`), the controllability sweep at one setting
(`evaluation.sweep`), export of the deployed network (`Deployed.export`), reload with
`models.serialize` alone, and the reloaded network's outputs equal to the method's own `predict`
for the same controls (1e-5), its test metrics equal to the sweep's.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dymu_jax import data, methods, train
from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base as data_base
from dymu_jax.evaluation import sweep as sweep_lib
from dymu_jax.methods import base, dymu, static
from dymu_jax.metrics import accumulate
from dymu_jax.models import serialize

SHAPE = (16, 16, 1)
TASKS = (tasks_lib.classification("quadrant", 4), tasks_lib.regression("brightness",
                                                                        label_scale=10.0))
LENET = {"backbone": "lenet", "head_width": 8,
         "backbone_kwargs": {"conv_channels": (4, 6), "kernel_sizes": (5, 3), "fc_features": 8,
                             "batch_norm": True}}
ECMT_LENET = {**LENET, "head_width": 16,
              "backbone_kwargs": {**LENET["backbone_kwargs"], "channel_divisor": 2}}
METHOD_OPTIONS = {
    "gradsplit": {"routing": "fixed", "routing_matrix": "1,0;0,1"},
    "phn": {"chunk_size": 64, "hidden": (8,)}, "phn_bn": {"hidden": (8,)},
    "ecmt": {"width_choices": (0.5, 1.0)},
}
CONFIG = train.TrainConfig(steps=2, batch_size=8, log_every=1, progress=False,
                           async_checkpoints=False, prefetch=0)


def source(split: str, n: int) -> data.DataSource:
  """Random images; the brightest quadrant and the mean brightness (x10) as labels."""
  rng = np.random.default_rng(0 if split == "train" else 1)
  images = rng.uniform(size=(n, *SHAPE)).astype(np.float32)
  quadrants = images.reshape(n, 2, 8, 2, 8).mean(axis=(2, 4)).reshape(n, 4)
  labels = {"quadrant": quadrants.argmax(-1).astype(np.int32),
            "brightness": (10 * images.mean(axis=(1, 2, 3))).astype(np.float32)}
  return data_base.ArraySource("toy", split, images, labels, TASKS)


def held_out(train_source) -> base.HeldOut:
  calibration = tuple(train_source.get(np.arange(k, k + 8))["image"] for k in (0, 8))
  validation = train_source.get(np.arange(16, 32))
  validation[data_base.VALID_KEY] = np.ones(16, bool)
  return base.HeldOut(calibration, (validation,), "first 32 training images")


def trained(name: str, tmp_path):
  """(method, its variables after two steps); DYMU: its anchor, then its edge stage on it."""
  train_source, test_source = source("train", 64), source("test", 16)
  earlier = None  # DYMU's edge stage starts from the trained anchor
  if name == "dymu":
    anchor = methods.build("dymu", TASKS, model_options=LENET,
                           method_options={"stage": "anchor", "anchor_init": "shared"})
    result = train.train(anchor, train_source, test_source, CONFIG, tmp_path / "anchor")
    method = methods.build("dymu", TASKS, model_options=LENET, method_options={
        "stage": "edge", "affinity": ((1.0, 0.3), (0.3, 1.0)),
        "edge_hidden": (8,), "embedding_features": 4})
    earlier = dymu.stage_variables(anchor=result.state.variables)
  else:
    method = methods.build(name, TASKS, model_options=ECMT_LENET if name == "ecmt" else LENET,
                           method_options=METHOD_OPTIONS.get(name))
  result = train.train(method, train_source, test_source, CONFIG, tmp_path / "run",
                       initial_variables=earlier)
  assert result.step_compiles <= 1
  return method, jax.device_get(result.state.variables), train_source, test_source


def settings(space: base.ControlSpace) -> tuple[dict, dict]:
  """(the sweep group's fixed controls, the full controls of one setting)."""
  (fixed,) = sweep_lib.groups(space, budgets=(0.7,), resources=(1.0,))
  controls = {"preference": (0.7, 0.3), **fixed} if "preference" in space.names else {}
  return fixed, controls


def check_end_to_end(method, variables, train_source, test_source, tmp_path):
  prepared = method.prepare(variables, held_out(train_source) if method.PREPARE_USES_HELD_OUT
                            else None, cache_dir=tmp_path)
  batches = list(data.eval_batches(test_source, 8))
  sweeper = sweep_lib.Sweeper(method, variables, batches, image_shape=SHAPE, prepared=prepared)
  fixed, controls = settings(method.control_space())
  if controls:
    (point,) = sweeper.sweep(fixed, np.array([controls["preference"]]))
  else:
    point = sweeper.point({})
  deployed = method.deploy(variables, controls, prepared, image_shape=SHAPE)
  network, loaded, info = serialize.load_network(deployed.export(tmp_path / "exported"))
  images = batches[0]["image"]
  if method.PREPARE_USES_HELD_OUT:  # ECMT: the searched SubNet, batch norms recalibrated
    recalibrated = method.recalibrate(variables, deployed.key, prepared)
    expected = method.predict(recalibrated, images, {"widths": deployed.key})
  else:
    expected = method.predict(variables, images, controls or None)
  got = network.apply(loaded, images)
  for task in TASKS:
    np.testing.assert_allclose(got[task.name], expected[task.name], rtol=1e-5, atol=1e-5)
  # The sweep measured the same network as the export (ECMT: on its masked path).
  exported = accumulate.evaluate(network, loaded, TASKS, batches)
  for task in TASKS:
    for metric, value in exported[task.name].items():
      assert value == pytest.approx(point["metrics"][task.name][metric], rel=1e-4, abs=1e-5)
  assert info["macs"] == point["macs"] > 0


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_registered_method_trains_sweeps_and_exports(name, tmp_path):
  method, variables, train_source, test_source = trained(name, tmp_path)
  assert method.name == name
  check_end_to_end(method, variables, train_source, test_source, tmp_path)


# A new method: one module (here, this test's) and one registry line. Hard sharing whose task
# weights follow the tasks' current losses (a softmax of the detached losses), so the method
# changes the training loss and nothing else; the engine, the sweep and export need no edit.


@dataclasses.dataclass(frozen=True)
class LossBalanced(static.StaticMethod):
  """Hard sharing, each task weighted by softmax(detached task losses) x number of tasks."""

  name: str = "loss_balanced"

  def loss(self, params, model_state, batch, rng, step):
    _, (aux, new_state) = super().loss(params, model_state, batch, rng, step)
    losses = jax.numpy.stack([aux[f"loss/{t.name}"] for t in self.tasks])
    weights = len(self.tasks) * jax.nn.softmax(jax.lax.stop_gradient(losses))
    return jax.numpy.sum(weights * losses), (aux, new_state)


def build_loss_balanced(tasks, make_net, *, task_weights=None, axis_name=None):
  return LossBalanced(tuple(tasks), make_net(tuple(tasks)), task_weights, axis_name=axis_name)


def test_a_method_added_with_one_registry_line(tmp_path):
  methods.register("loss_balanced", "hard sharing weighted by the tasks' current losses",
                   methods.on_multitask_net(build_loss_balanced))
  try:
    assert "loss_balanced" in methods.METHODS
    method, variables, train_source, test_source = trained("loss_balanced", tmp_path)
    assert isinstance(method, LossBalanced) and method.control_space().names == ()
    check_end_to_end(method, variables, train_source, test_source, tmp_path)
    with pytest.raises(ValueError, match="registered already"):
      methods.register("loss_balanced", "again", methods.on_multitask_net(build_loss_balanced))
  finally:
    methods._REGISTRY.pop("loss_balanced", None)  # pylint: disable=protected-access


# The same new method with an option, reaching the command line: registered before the entry
# points are imported (as a line in dymu_jax/methods/__init__.py would), it is a --method choice
# with its own flag group, trains, records its config, and evaluates, with no edit under
# experiments/.
_DRIVER = '''
import dataclasses, sys
from typing import ClassVar
sys.path.insert(0, {tests!r})
from dymu_jax import methods
from dymu_jax.methods import options
import test_method_registry as module


@dataclasses.dataclass(frozen=True)
class Config(options.MethodConfig):
  PREFIX: ClassVar[str] = "loss_balanced"
  TITLE: ClassVar[str] = "Loss-balanced"
  temperature: float = options.option(1.0, "Softmax temperature of the task weights.", low=0,
                                      open_low=True)


def build(tasks, make_net, *, task_weights=None, axis_name=None, temperature=1.0):
  return module.build_loss_balanced(tasks, make_net, task_weights=task_weights,
                                    axis_name=axis_name)


methods.register("loss_balanced", "hard sharing weighted by the tasks' current losses",
                 methods.on_multitask_net(build), Config)
from experiments import cli_help, evaluate, train
command = sys.argv.pop(1)
entry = train if command == "train" else evaluate
cli_help.run(entry.main, entry.__doc__,
             cli_help.TRAIN_GROUPS if command == "train" else evaluate.EVALUATE_GROUPS)
'''


def test_a_registered_method_reaches_the_command_line(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER.format(tests=os.path.join(root, "tests")))
  run = lambda *args: subprocess.run([sys.executable, str(driver), *args], cwd=root,
                                     capture_output=True, text=True, timeout=600,
                                     env={**os.environ, "PYTHONPATH": root})
  workdir = tmp_path / "run"
  common = ("--dataset=synthetic", "--image_size=16", "--num_train=32", "--num_test=16",
            "--tasks=depth,edges", "--backbone=resnet_small", "--head_width=8")
  result = run("train", *common, "--method=loss_balanced", "--loss_balanced_temperature=2",
               "--steps=2", "--batch_size=16", "--checkpoint_every=2", "--noprogress",
               f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  from dymu_jax import runs as runs_lib
  record = runs_lib.saved_metadata(str(workdir))["run"]["record"]
  assert record["method"] == "loss_balanced" and record["method_config"] == {"temperature": 2.0}
  bad = run("train", *common, "--method=loss_balanced", "--loss_balanced_temperature=0",
            f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode == 2 and ("--loss_balanced_temperature=0.0: must be a finite number > 0"
                                  in bad.stderr), bad.stderr
  shown = run("train", "--help")
  assert "Loss-balanced (--method=loss_balanced):" in shown.stdout
  assert "--loss_balanced_temperature: Loss-balanced: Softmax temperature" in shown.stdout
  evaluated = run("evaluate", f"--workdir={workdir}", "--max_test_examples=16")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert os.path.exists(workdir / "eval" / "report.md")
