"""A trained run, rebuilt from its workdir: the flags it was trained with, its data, its method
and its newest checkpoint's variables. Shared by `evaluate` and `export`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from experiments import common
from dymu_jax import data as data_lib
from dymu_jax import train as train_lib
from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import state as state_lib

# Flags added after some runs were saved: their values for older runs.
_LATER_FLAGS = {"backbone_options": [], "tasks": [], "task_weights": [], "width_choices": []}


@dataclasses.dataclass
class TrainedRun:
  """Everything `load_run` rebuilds.

  Attributes:
    workdir: absolute path of the run's folder.
    values: the run's flags (name -> value), as saved with its checkpoints.
    config: its `TrainConfig`.
    step: the restored checkpoint's step.
    method: the method (built for single-program evaluation: no pmap axis).
    train_source, test_source: its data.
    variables: Flax variables {"params": ..., ...} of the checkpoint.
  """

  workdir: str
  values: dict
  config: train_lib.TrainConfig
  step: int
  method: Any
  train_source: data_lib.DataSource
  test_source: data_lib.DataSource
  variables: Any


def load_run(workdir: str, *, data_dir: str | None = None) -> TrainedRun:
  """Rebuilds the run trained in `workdir` from its newest checkpoint.

  Args:
    workdir: a folder written by `python -m experiments.train`.
    data_dir: where the dataset is now, when it moved since training (default: the saved
      `--data_dir`).

  Raises:
    FileNotFoundError: the folder or its checkpoints do not exist (one sentence).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"The workdir {workdir} does not exist; give the --workdir of a "
                            f"run trained with python -m experiments.train.")
  if not os.path.isdir(checkpoint_lib.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"{workdir} has no checkpoints folder; train it first with "
                            f"python -m experiments.train --workdir={workdir}.")
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"{checkpointer.directory} holds no complete checkpoint; train "
                              f"the run (or let it reach its first checkpoint) first.")
    metadata = checkpointer.metadata(step)
    values = {**_LATER_FLAGS, **dict(metadata.get("run", {}).get("flags", {}))}
    if "method" not in values or "dataset" not in values:
      raise ValueError(f"Checkpoint {step} in {workdir} does not record the flags it was "
                       f"trained with; it was not written by experiments.train.")
    if data_dir:
      values["data_dir"] = data_dir
    fields = {f.name for f in dataclasses.fields(train_lib.TrainConfig)}
    config = train_lib.TrainConfig(**{k: v for k, v in metadata["config"].items()
                                      if k in fields})
    config = dataclasses.replace(config, parallel="mesh", progress=False)
    train_source, test_source = common.load_sources(values)
    method = common.build_method(values, train_source.tasks, axis_name=None)
    par = train_lib.Parallel("mesh")
    init = state_lib.init_fn(method, config.make_optimizer())
    batcher = data_lib.Batcher(train_source, min(config.batch_size, len(train_source)),
                               config.seed)
    sample = {k: np.zeros_like(v) for k, v in batcher.batch(0).items()}
    abstract = par.abstract_state(init, jax.random.PRNGKey(config.seed), sample)
    state, _ = checkpointer.restore(step, abstract)
  return TrainedRun(workdir=workdir, values=values, config=config, step=int(step),
                    method=method, train_source=train_source, test_source=test_source,
                    variables=state.variables)


def summary_metrics(workdir: str) -> dict:
  """The final evaluation {control label: {task: {metric: value}}} of a run's summary.json."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "summary.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist; give the workdir of a finished "
                            f"experiments.train run.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)["eval"]
