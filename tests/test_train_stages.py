"""The generic stage runner (`dymu_jax.train.stages`) on the toy method: a second stage starts
from the first's trained variables as restored collections, finished stages are skipped on a
re-run, a stage whose input changed is refused, and a parent folder resolves to its newest
stage. No method is named: the runner is the library's, DYMU only plans stages with it."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from dymu_jax import train as train_lib
from dymu_jax.train import stages as stages_lib
import toy_method


def _config(steps):
  return train_lib.TrainConfig(steps=steps, batch_size=32, seed=0, learning_rate=1e-2,
                               checkpoint_every=steps, eval_every=0, progress=False)


def _fine_tune(context):
  """The second stage starts from the first's parameters and batch statistics."""
  return stages_lib.StageStart(variables=dict(context.earlier.variables))


def _plan(root, steps=(4, 3)):
  first = stages_lib.Stage(name="first", folder=os.fspath(root / "first"), steps=steps[0])
  second = stages_lib.Stage(name="second", folder=os.fspath(root / "second"), steps=steps[1],
                            reads=first.folder, reads_stage="first", start=_fine_tune)
  return first, second


class Runner:
  """The caller's half: train one stage (and write its summary), load a finished one."""

  def __init__(self):
    self.trained, self.started, self.results = [], {}, {}

  def train_stage(self, stage, start, source, stage_source):
    self.trained.append(stage.name)
    self.started[stage.name] = start.variables
    result = train_lib.train(toy_method.ToyMethod(), stage_source,
                             toy_method.make_source("test", 64), _config(stage.steps),
                             stage.folder,
                             run_metadata={stages_lib.SOURCE_KEY: source},
                             initial_variables=dict(start.variables) or None)
    self.results[stage.folder] = result
    summary = {"steps": stage.steps, "seconds": result.seconds, "eval": result.eval_metrics}
    with open(os.path.join(stage.folder, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary

  def load(self, folder, name):
    result = self.results[folder]
    return stages_lib.Finished(folder, result.state.step.item(), toy_method.ToyMethod(),
                               jax.device_get(result.state.variables))

  def run(self, plan):
    return stages_lib.run_stages(plan, train_source=toy_method.make_source(),
                                 test_source=toy_method.make_source("test", 64), seed=0,
                                 load=self.load, train_stage=self.train_stage, title="Toy")


def test_a_stage_starts_from_the_earlier_stage_and_finished_ones_are_skipped(tmp_path, capsys):
  runner = Runner()
  plan = _plan(tmp_path)
  summaries = runner.run(plan)
  assert runner.trained == ["first", "second"] and set(summaries) == {"first", "second"}
  first = runner.results[plan[0].folder].state.variables
  started = runner.started["second"]
  for a, b in zip(jax.tree_util.tree_leaves(started["params"]),
                  jax.tree_util.tree_leaves(first["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved = stages_lib.saved_metadata(plan[1].folder)["run"][stages_lib.SOURCE_KEY]
  assert saved == {"first_dir": plan[0].folder, "first_step": 4}
  # The same plan again trains nothing.
  again = Runner()
  again.run(plan)
  assert again.trained == []
  assert "Toy stage second: already trained (3 steps" in capsys.readouterr().out
  assert stages_lib.resolve(os.fspath(tmp_path)) == plan[1].folder
  assert stages_lib.resolve(plan[0].folder) == plan[0].folder


def test_a_finished_stage_refuses_a_changed_input(tmp_path):
  runner = Runner()
  runner.run(_plan(tmp_path))
  longer = _plan(tmp_path, steps=(6, 3))  # the first stage trains on: its step moves
  with pytest.raises(ValueError, match=r"The second stage in .* was started from .*first_step"
                                       r"': 4\}, but its input is now .*first_step': 6\}"):
    runner.run(longer)
  assert runner.trained == ["first", "second", "first"]


def test_held_out_examples_stay_out_of_the_stage(tmp_path):
  runner = Runner()
  first, _ = _plan(tmp_path)
  seen = []
  train_stage = runner.train_stage
  runner.train_stage = lambda stage, start, source, data: (
      seen.append(len(data)), train_stage(stage, start, source, data))[1]
  runner.run((dataclasses.replace(first, holdout=56),))
  assert seen == [256 - 56]
