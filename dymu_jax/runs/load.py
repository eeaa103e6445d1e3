"""A trained run, rebuilt from its workdir: the flags it was trained with, its data, its method
and its newest checkpoint's variables; and the held-out images that steer it.

    run = dymu_jax.runs.load_run("/tmp/dymu/synthetic_ecmt")
    method, prepared = dymu_jax.runs.steer(run)
    deployed = method.deploy(run.variables, {"preference": (0.5, 0.5), "budget": 0.6},
                             prepared, image_shape=run.test_source.image_shape)

Workdirs may be on any `etils.epath` filesystem (gs://bucket/run): they are kept as strings
(`files.run_dir`: the absolute local path, or the URI) and read through `dymu_jax.files`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from dymu_jax import data as data_lib
from dymu_jax import files as files_lib
from dymu_jax import train as train_lib
from dymu_jax.data import base as data_base
from dymu_jax.methods import base as methods_base
from dymu_jax.runs import settings
from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import state as state_lib


@dataclasses.dataclass
class TrainedRun:
  """Everything `load_run` rebuilds.

  Attributes:
    workdir: absolute path (or URI) of the run's folder.
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
  """Rebuilds the run trained in `workdir` from its newest checkpoint that reads and verifies
  (a damaged newer one is reported and skipped, left in place).

  Args:
    workdir: a folder written by `python -m experiments.train` (for a run in stages, the
      stage's own folder: `dymu_jax.train.stages.resolve` maps a parent to its last stage).
    data_dir: where the dataset is now, when it moved since training (default: the saved
      `--data_dir`).

  Raises:
    FileNotFoundError: the folder or its checkpoints do not exist (one sentence).
  """
  workdir = files_lib.run_dir(workdir)
  if not files_lib.is_dir(workdir):
    raise FileNotFoundError(f"The workdir {workdir} does not exist; give the --workdir of a "
                            f"run trained with python -m experiments.train.")
  if not checkpoint_lib.has_checkpoint_dir(workdir):
    raise FileNotFoundError(f"{workdir} has no checkpoints folder; train it first with "
                            f"python -m experiments.train --workdir={workdir}.")
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    if not checkpointer.all_steps():
      raise FileNotFoundError(f"{checkpointer.directory} holds no complete checkpoint; train "
                              f"the run (or let it reach its first checkpoint) first.")
    metadata = checkpointer.metadata()  # the newest record that reads
    values = settings.with_defaults(metadata.get("run", {}).get("flags", {}))
    if "method" not in values or "dataset" not in values:
      raise ValueError(f"Checkpoint {metadata.get('step')} in {workdir} does not record the "
                       f"flags it was trained with; it was not written by experiments.train.")
    if data_dir:
      values["data_dir"] = data_dir
    config = dataclasses.replace(settings.train_config(metadata["config"]), parallel="mesh",
                                 progress=False)
    train_source, test_source = settings.load_sources(values)
    batcher = data_lib.Batcher(train_source, min(config.batch_size, len(train_source)),
                               config.seed)
    sample = {k: np.zeros_like(v) for k, v in batcher.batch(0).items()}
    # A stage's checkpoint holds what it started from (DYMU: the frozen anchor and edge
    # hypernetwork), so the earlier stages' workdirs need not exist any more; the options
    # measured on them (DYMU: task affinity and weights) are read from the run's own folder.
    options = settings.method_config(values).restored_options(workdir,
                                                              len(train_source.tasks))
    method = settings.build_method(values, train_source.tasks, axis_name=None,
                                   inputs=options or None)
    init = state_lib.init_fn(method, config.make_optimizer())
    abstract = train_lib.Parallel("mesh").abstract_state(init, jax.random.PRNGKey(config.seed),
                                                         sample)
    step, state, _ = checkpointer.restore_intact(abstract)
  return TrainedRun(workdir=workdir, values=values, config=config, step=int(step),
                    method=method, train_source=train_source, test_source=test_source,
                    variables=state.variables)


def summary_metrics(workdir: str) -> dict:
  """The final evaluation {control label: {task: {metric: value}}} of a run's summary.json."""
  path = files_lib.run_path(workdir) / "summary.json"
  if not files_lib.is_file(path):
    raise FileNotFoundError(f"{path} does not exist; give the workdir of a finished "
                            f"experiments.train run.")
  try:
    return files_lib.read_json(path)["eval"]
  except (files_lib.DamagedFile, KeyError, TypeError) as error:
    reason = str(error) if isinstance(error, files_lib.DamagedFile) else f"{path} has no results"
    raise ValueError(f"{reason}; run the training command of {path.parent} again: it "
                     f"restores the final checkpoint and rewrites summary.json.") from None


# ----------------------------------------------------------------------------------------------
# Steering: the deployment options and the held-out images of a method's `prepare`.


def _subset(source: data_base.DataSource, count: int, seed: int, offset: int = 0) -> dict:
  """`count` examples of `source` after `offset` in a seeded permutation, as one batch dict."""
  order = np.random.default_rng(seed).permutation(len(source))
  index = np.sort(order[offset:offset + count])
  if not len(index):
    raise ValueError(f"{source.name} {source.split} has {len(source)} examples: too few for "
                     f"{count} held-out images after {offset}.")
  return source.get(index)


def _batches_of(batch: dict, size: int) -> list[dict]:
  n = len(next(iter(batch.values())))
  return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def held_out(run: TrainedRun, calibration_examples: int, score_examples: int,
             batch_size: int) -> methods_base.HeldOut:
  """Held-out training images for a method's `prepare`: `calibration_examples` then
  `score_examples` of a permutation of the training split seeded by the run's seed (the test
  split stays unseen), in batches of `batch_size`; small training sets give at most half to
  calibration and the rest to scoring."""
  seed = run.config.seed
  n = len(run.train_source)
  num_calibration = max(1, min(calibration_examples, n // 2))
  num_score = max(1, min(score_examples, n - num_calibration))
  calibration = [b["image"] for b in
                 _batches_of(_subset(run.train_source, num_calibration, seed), batch_size)]
  if len(calibration) > 1 and len(calibration[-1]) < batch_size:
    # Equal batch sizes (each batch counts once in the statistics): drop a short last batch.
    calibration = calibration[:-1]
  scoring = _subset(run.train_source, num_score, seed, offset=num_calibration)
  scoring[data_base.VALID_KEY] = np.ones(len(scoring["image"]), bool)
  signature = (f"step={run.step}|calibration={num_calibration}|score={num_score}|seed={seed}|"
               f"batch={batch_size}")
  return methods_base.HeldOut(tuple(calibration), tuple(_batches_of(scoring, batch_size)),
                              signature)


def steer(run: TrainedRun, deploy_options: Mapping[str, Any] | None = None, *,
          calibration_examples: int = 512, score_examples: int = 256, batch_size: int = 256):
  """(the run's method with `deploy_options` set (`Method.DEPLOY_OPTIONS`; unnamed ones keep
  the method's own values), its `prepare` result). Held-out training images are loaded only
  for a method whose `prepare` reads them (`PREPARE_USES_HELD_OUT`); caches go to the run."""
  method = run.method.replace_options(**dict(deploy_options or {}))
  held = None
  if method.PREPARE_USES_HELD_OUT:
    held = held_out(run, calibration_examples, score_examples, batch_size)
  return method, method.prepare(run.variables, held, cache_dir=run.workdir)


# ----------------------------------------------------------------------------------------------
# Runs in stages (`dymu_jax.train.stages`): each stage is a run of its own folder, whose saved
# flags name its stage and its input folder, so `load_run` rebuilds any of them alone.


def finished_run(folder: str, stage: str, values: Mapping[str, Any], train_source) -> TrainedRun:
  """The finished `stage` run in `folder`, checked against this run (`values`: its flags): the
  same method and stage, every step trained, the same tasks, model and image shape."""
  run = load_run(folder)
  method = values["method"]
  config = settings.method_config(values)
  title = type(config).TITLE or method
  saved_stage = settings.method_config(run.values).stage_name()
  if run.values.get("method") != method or saved_stage != stage:
    raise ValueError(f"{folder} holds a --method={run.values.get('method')} run (stage "
                     f"{saved_stage or 'none'}), not a {title} {stage} stage.")
  if run.step < run.config.steps:
    raise ValueError(f"The {stage} stage in {folder} stopped at step {run.step} of "
                     f"{run.config.steps}; finish it first (re-run its command).")
  names = [t.name for t in train_source.tasks]
  if [t.name for t in run.method.tasks] != names:
    raise ValueError(f"The {stage} stage in {folder} learned tasks "
                     f"{', '.join(t.name for t in run.method.tasks)}, but this run has "
                     f"{', '.join(names)}.")
  model = lambda v: {**settings.model_options(v), **{
      field: getattr(settings.method_config(v), field) for field in type(config).MODEL_FIELDS}}
  if model(run.values) != model(values):
    raise ValueError(f"The {stage} stage in {folder} was built with model options "
                     f"{model(run.values)}, but this run asks for {model(values)}; use the "
                     f"same model flags.")
  if tuple(run.train_source.image_shape) != tuple(train_source.image_shape):
    raise ValueError(f"The {stage} stage in {folder} saw images of shape "
                     f"{tuple(run.train_source.image_shape)}, but this run's are "
                     f"{tuple(train_source.image_shape)}; use the same data flags.")
  return run
