"""A trained run, rebuilt from its workdir: the flags it was trained with, its data, its method
and its newest checkpoint's variables. Shared by `evaluate` and `export`.

Workdirs may be on any `etils.epath` filesystem (gs://bucket/run): they are kept as strings
(`files.run_dir`: the absolute local path, or the URI) and read through `dymu_jax.files`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from experiments import common
from dymu_jax import data as data_lib
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.data import base as data_base
from dymu_jax.methods import affinity as affinity_lib
from dymu_jax.methods import base as methods_base
from dymu_jax.methods import dymu
from dymu_jax import train as train_lib
from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import state as state_lib

flags.DEFINE_string("output_dir", None, "Where results go; default <workdir>/eval (evaluate) "
                    "or <workdir>/export/<preference and budget> (export).")
# Steering a trained run (`steer`): the held-out training images a method's `prepare` reads,
# and the deployment options (`Method.DEPLOY_OPTIONS`) a user may set, as flags of their names.
flags.DEFINE_integer("calibration_examples", 512,
                     "Training images that re-estimate each SubNet's batch-norm statistics.",
                     lower_bound=1)
flags.DEFINE_integer("score_examples", 256,
                     "Held-out training images that score the encoder configurations.",
                     lower_bound=1)
flags.DEFINE_float("decoder_reserve", 0.5,
                   "ECMT search: fraction of the decoders' MACs span kept free for the "
                   "preference.")
common.require_number("decoder_reserve", 0, 1)
flags.DEFINE_bool("preference_cap", True,
                  "ECMT: cap each decoder's extra MACs at r_t / max(r) in the search "
                  "(`ecmt.search(preference_cap=...)`); --nopreference_cap measures rank "
                  "controllability without it.")
flags.DEFINE_alias("ecmt_preference_cap", "preference_cap")
FLAGS = flags.FLAGS

# Flags added after some runs were saved: their values for older runs.
_LATER_FLAGS = {"backbone_options": [], "tasks": [], "task_weights": []}
# DYMU's files next to its edge- and weight-stage checkpoints.
AFFINITY_FILE = "dymu_affinity.json"
AFFINITY_PLOT = "dymu_affinity.png"
# The anchor stage's report: stream divergence and the cost of the cheapest tree changes.
ANCHOR_REPORT = "anchor_report.json"
ANCHOR_REPORT_MD = "anchor_report.md"


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


def steered_method(run: TrainedRun):
  """The run's method with the deployment options the flags set (`DEPLOY_OPTIONS`; a flag left
  unset keeps the method's own value)."""
  return run.method.replace_options(**{
      name: FLAGS[name].value for name in run.method.DEPLOY_OPTIONS
      if name in FLAGS and FLAGS[name].present})


def steer(run: TrainedRun):
  """(`steered_method(run)`, its `prepare` result): held-out training images are loaded only
  for a method whose `prepare` reads them (`PREPARE_USES_HELD_OUT`); caches go to the run."""
  method = steered_method(run)
  held = None
  if method.PREPARE_USES_HELD_OUT:
    held = held_out(run, FLAGS.calibration_examples, FLAGS.score_examples,
                    FLAGS.eval_batch_size or 256)
  return method, method.prepare(run.variables, held, cache_dir=run.workdir)


def load_run(workdir: str, *, data_dir: str | None = None) -> TrainedRun:
  """Rebuilds the run trained in `workdir` from its newest checkpoint.

  Args:
    workdir: a folder written by `python -m experiments.train`.
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
    values = {**_LATER_FLAGS, **dict(metadata.get("run", {}).get("flags", {}))}
    if "method" not in values or "dataset" not in values:
      raise ValueError(f"Checkpoint {metadata.get('step')} in {workdir} does not record the "
                       f"flags it was trained with; it was not written by experiments.train.")
    if data_dir:
      values["data_dir"] = data_dir
    fields = {f.name for f in dataclasses.fields(train_lib.TrainConfig)}
    config = train_lib.TrainConfig(**{k: v for k, v in metadata["config"].items()
                                      if k in fields})
    config = dataclasses.replace(config, parallel="mesh", progress=False)
    train_source, test_source = common.load_sources(values)
    batcher = data_lib.Batcher(train_source, min(config.batch_size, len(train_source)),
                               config.seed)
    sample = {k: np.zeros_like(v) for k, v in batcher.batch(0).items()}
    # A stage's checkpoint holds what it started from (DYMU: the frozen anchor and edge
    # hypernetwork), so the earlier stages' workdirs need not exist any more; the options
    # measured on them (task affinity and weights) are read from the run's own folder.
    method = common.build_method(values, train_source.tasks, axis_name=None,
                                 inputs=_stage_options(values, workdir,
                                                       len(train_source.tasks)))
    par = train_lib.Parallel("mesh")
    init = state_lib.init_fn(method, config.make_optimizer())
    abstract = par.abstract_state(init, jax.random.PRNGKey(config.seed), sample)
    # The newest checkpoint that reads and verifies: a damaged newer one is reported and
    # skipped (left in place: evaluation and export do not change a run's folder).
    step, state, _ = checkpointer.restore_intact(abstract)
  variables = state.variables
  return TrainedRun(workdir=workdir, values=values, config=config, step=int(step),
                    method=method, train_source=train_source, test_source=test_source,
                    variables=variables)


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
# DYMU: a run of three stages, each in its own workdir.
#
# `--dymu_stage=all` trains <workdir>/anchor, <workdir>/edge and <workdir>/weight in sequence;
# each is an ordinary single-stage run whose saved flags name its stage and its input folder
# (--dymu_anchor_dir for edge, --dymu_edge_dir for weight), so `load_run` rebuilds any of them
# alone. The edge stage writes the task affinity A and the task weights w (AFFINITY_FILE, with
# a heat map AFFINITY_PLOT); the weight stage copies both from its edge folder.


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step in `workdir`, or None (no folder, no checkpoint)."""
  if not checkpoint_lib.has_checkpoint_dir(workdir):
    return None
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    return checkpointer.latest_step()


def saved_metadata(workdir: str) -> dict | None:
  """The JSON record of `workdir`'s newest checkpoint, or None when it has none."""
  if latest_step(workdir) is None:
    return None
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as checkpointer:
    return checkpointer.metadata()


def resolve_workdir(workdir: str) -> str:
  """The run folder to load for `workdir`: itself, or for the parent folder of a
  `--dymu_stage=all` run its newest trained stage (weight, else edge, else anchor)."""
  workdir = files_lib.run_dir(workdir)
  if checkpoint_lib.has_checkpoint_dir(workdir):
    return workdir
  for stage in reversed(dymu.STAGES):
    folder = os.fspath(files_lib.run_path(workdir) / stage)
    if latest_step(folder) is not None:
      return folder
  return workdir


def _stage_options(values: Mapping[str, Any], workdir: str, num_tasks: int) -> dict | None:
  """The options a DYMU edge or weight stage was built with besides its flags: the task
  affinity and weights of its affinity record (None for other runs)."""
  if values["method"] != "dymu" or values.get("dymu_stage") not in ("edge", "weight"):
    return None
  record = read_affinity(workdir)
  if record is None:
    return {"affinity": np.eye(num_tasks).tolist()}
  return {"affinity": record["affinity"], "task_weights": tuple(record["task_weights"])}


def read_affinity(workdir: str) -> dict | None:
  """The affinity record (AFFINITY_FILE) of a DYMU edge/weight workdir, or None."""
  path = files_lib.run_path(workdir) / AFFINITY_FILE
  if not files_lib.is_file(path):
    return None
  return files_lib.read_json(path)


def plot_affinity(record: Mapping[str, Any], path: str) -> None:
  """A heat map of the task affinity A as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = record["tasks"]
  values = np.asarray(record["affinity"], float)
  size = 1.6 + 0.6 * len(names)
  fig, ax = plt.subplots(figsize=(size + 0.8, size))
  image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
            color="black" if v > 0.5 else "white")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  ax.set_title(f"task affinity A (RSA, {record['normalisation']} normalisation, "
               f"K={record['num_images']})", fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  files_lib.save_figure(fig, path, dpi=110)
  plt.close(fig)


def _finished_stage(folder: str, stage: str, flag: str, values: Mapping[str, Any],
                    train_source) -> TrainedRun:
  """The finished DYMU `stage` run in `folder`, checked against this run's tasks and model."""
  if not files_lib.is_dir(files_lib.run_path(folder)):
    raise ValueError(f"{flag}={folder} does not exist; give the workdir of a finished "
                     f"--dymu_stage={stage} run.")
  run = load_run(folder)
  if run.values.get("method") != "dymu" or run.values.get("dymu_stage") != stage:
    raise ValueError(f"{flag}={folder} holds a --method={run.values.get('method')} run "
                     f"(stage {run.values.get('dymu_stage')}), not a DYMU {stage} stage.")
  if run.step < run.config.steps:
    raise ValueError(f"The {stage} stage in {folder} stopped at step {run.step} of "
                     f"{run.config.steps}; finish it first (re-run its command).")
  names = [t.name for t in train_source.tasks]
  if [t.name for t in run.method.tasks] != names:
    raise ValueError(f"The {stage} stage in {folder} learned tasks "
                     f"{', '.join(t.name for t in run.method.tasks)}, but this run has "
                     f"{', '.join(names)}.")
  model = lambda v: {**common.model_options(v),
                     "head_hidden_layers": common.method_config(v).head_hidden_layers}
  if model(run.values) != model(values):
    raise ValueError(f"The {stage} stage in {folder} was built with model options "
                     f"{model(run.values)}, but this run asks for {model(values)}; use the "
                     f"same model flags.")
  if tuple(run.train_source.image_shape) != tuple(train_source.image_shape):
    raise ValueError(f"The {stage} stage in {folder} saw images of shape "
                     f"{tuple(run.train_source.image_shape)}, but this run's are "
                     f"{tuple(train_source.image_shape)}; use the same data flags.")
  return run


def affinity_signature(values: Mapping[str, Any], anchor_dir: str, anchor_step: int) -> dict:
  """What the edge stage's affinity record depends on: the anchor and the affinity flags."""
  return {"anchor_dir": anchor_dir, "anchor_step": anchor_step,
          "num_images": int(values["dymu_affinity_images"]),
          "normalisation": values["dymu_affinity_normalisation"],
          "task_weight_examples": int(values["dymu_task_weight_examples"]),
          "task_weights": values.get("dymu_task_weights", "train"),
          "task_weight_normalise": bool(values.get("dymu_task_weight_normalise", False)),
          "validation_examples": int(values.get("dymu_validation_examples", 0)),
          "seed": int(values["seed"])}


def check_affinity(workdir: str, signature: Mapping[str, Any]) -> None:
  """One sentence when the edge stage in `workdir` was trained with another affinity."""
  record = read_affinity(workdir) or {}
  saved = record.get("signature") or {}
  if saved == dict(signature):
    return
  changes = ", ".join(f"{k} {saved.get(k)!r} then and {v!r} now"
                      for k, v in signature.items() if saved.get(k) != v)
  raise ValueError(f"The edge stage in {workdir} was trained with another task affinity "
                   f"({changes}); resume with the same anchor and affinity flags, or use a "
                   f"new workdir.")


# The stage each DYMU stage reads its input from.
_INPUT_STAGE = {"anchor": "pretrain", "edge": "anchor", "weight": "edge"}


def _has_input(stage: str, values: Mapping[str, Any]) -> bool:
  if stage == "pretrain":
    return False
  return stage != "anchor" or values.get("dymu_anchor_init") == "trunk"


def dymu_stage_source(stage: str, values: Mapping[str, Any]) -> dict:
  """Where a DYMU stage's input comes from, without loading it: {"pretrain_dir",
  "pretrain_step"} (anchor from a trunk), {"anchor_dir", "anchor_step"} (edge), {"edge_dir",
  "edge_step"} (weight) or {}; as `dymu_stage_inputs` records."""
  if not _has_input(stage, values):
    return {}
  key = _INPUT_STAGE[stage]
  folder = files_lib.run_dir(_input_dir(stage, values))
  return {f"{key}_dir": folder, f"{key}_step": latest_step(folder)}


def _input_dir(stage: str, values: Mapping[str, Any]) -> str:
  """--dymu_pretrain_dir (anchor), --dymu_anchor_dir (edge) or --dymu_edge_dir (weight), or
  one sentence when missing."""
  if stage not in _INPUT_STAGE:
    raise ValueError(f"Unknown --dymu_stage={stage}; allowed: {', '.join(dymu.STAGES)}, all.")
  key = _INPUT_STAGE[stage]
  folder = values.get(f"dymu_{key}_dir")
  if not folder:
    extra = " with --dymu_anchor_init=trunk" if stage == "anchor" else ""
    raise ValueError(f"--dymu_stage={stage}{extra} needs --dymu_{key}_dir, the workdir of a "
                     f"finished --dymu_stage={key} run (or train every stage with "
                     f"--dymu_stage=all).")
  return folder


def dymu_train_split(values: Mapping[str, Any], train_source):
  """(training examples of the pretrain and anchor stages, held-out examples or None):
  --dymu_validation_examples of the training set, drawn with --seed, are held out."""
  count = int(values.get("dymu_validation_examples", 0))
  if count < 0:
    raise ValueError(f"--dymu_validation_examples must be >= 0, got {count}.")
  return data_base.holdout_split(train_source, count, int(values["seed"]))


def _training_subset(source, count: int, seed: int) -> dict:
  order = np.random.default_rng(seed).permutation(len(source))
  return source.get(np.sort(order[:count]))


def _affinity_record(anchor_run: TrainedRun, values: Mapping[str, Any], train_source,
                     workdir: str, plot: bool) -> dict:
  """A and w for the edge stage: read from `workdir` when computed for this anchor, else
  computed on the frozen anchor and written there (JSON and heat map)."""
  num_images = int(values["dymu_affinity_images"])
  examples = int(values["dymu_task_weight_examples"])
  signature = affinity_signature(values, anchor_run.workdir, anchor_run.step)
  record = read_affinity(workdir)
  if record is not None:
    if record.get("signature") == signature:
      return record
    if latest_step(workdir) is not None:
      check_affinity(workdir, signature)
  if num_images < 2 or num_images > len(train_source):
    raise ValueError(f"--dymu_affinity_images={num_images} must lie in [2, "
                     f"{len(train_source)}] (the training examples).")
  if examples < 1:
    raise ValueError(f"--dymu_task_weight_examples must be at least 1, got {examples}.")
  method = anchor_run.method
  anchor = anchor_run.variables
  seed = int(values["seed"])
  images = _training_subset(train_source, num_images, seed)["image"]
  matrix = affinity_lib.task_affinity(method.net, anchor, images, num_images=num_images,
                                      normalisation=signature["normalisation"])
  mode = signature["task_weights"]
  _, validation = dymu_train_split(values, train_source)
  if mode == "validation" and validation is None:
    raise ValueError("--dymu_task_weights=validation needs held-out examples; set "
                     "--dymu_validation_examples > 0 or use --dymu_task_weights=train.")
  weight_source = validation if mode == "validation" else train_source
  batch = _training_subset(weight_source, min(examples, len(weight_source)), seed)
  batches = [{k: v[i:i + 256] for k, v in batch.items()}
             for i in range(0, len(batch["image"]), 256)]
  losses = dymu.anchor_task_losses(method.net, anchor, batches)
  if mode == "uniform":
    weights = (1.0,) * len(losses)
  else:
    weights = dymu.task_weights_from_losses(losses, signature["task_weight_normalise"])
  record = {"tasks": [t.name for t in method.tasks],
            "affinity": np.asarray(matrix, float).tolist(),
            "normalisation": signature["normalisation"], "num_images": num_images,
            "anchor_task_losses": list(losses),
            "task_weight_source": ("held-out" if mode == "validation" else mode),
            "task_weights": list(weights),
            "signature": signature}
  folder = files_lib.makedirs(files_lib.run_path(workdir))
  files_lib.write_json(folder / AFFINITY_FILE, record, indent=1)
  if plot:
    plot_affinity(record, folder / AFFINITY_PLOT)
  return record


def dymu_stage_inputs(stage: str, values: Mapping[str, Any], train_source, workdir: str, *,
                      plot: bool = True) -> tuple[dict, dict, dict]:
  """(options for `common.build_method`, the variables the stage starts from for
  `train.train(..., initial_variables=...)`, a record of where they came from) of a DYMU stage.

  anchor from a trunk: its streams are copies of the finished pretrain stage's trunk. edge: the
  frozen anchor of `values["dymu_anchor_dir"]` (finished), with A and w computed on it (or read
  from `workdir`). weight: the frozen anchor and edge hypernetwork of the finished edge stage
  in `values["dymu_edge_dir"]`, with A and w copied from there.
  """
  if not _has_input(stage, values):
    return {}, {}, {}
  folder = _input_dir(stage, values)
  if stage == "anchor":
    trunk_run = _finished_stage(folder, "pretrain", "--dymu_pretrain_dir", values, train_source)
    return ({}, dymu.streams_from_trunk(trunk_run.variables),
            {"pretrain_dir": trunk_run.workdir, "pretrain_step": trunk_run.step})
  if stage == "edge":
    anchor_run = _finished_stage(folder, "anchor", "--dymu_anchor_dir", values, train_source)
    record = _affinity_record(anchor_run, values, train_source, workdir, plot)
    options = {"affinity": record["affinity"], "task_weights": tuple(record["task_weights"])}
    return (options, {"anchor": anchor_run.variables},
            {"anchor_dir": anchor_run.workdir, "anchor_step": anchor_run.step})
  edge_run = _finished_stage(folder, "edge", "--dymu_edge_dir", values, train_source)
  record = read_affinity(edge_run.workdir)
  if record is None:
    raise ValueError(f"The edge stage in {folder} has no {AFFINITY_FILE}; it was not trained "
                     f"by experiments.train.")
  target = files_lib.makedirs(files_lib.run_path(workdir))
  for name in (AFFINITY_FILE, AFFINITY_PLOT):
    source = files_lib.run_path(edge_run.workdir) / name
    if files_lib.is_file(source) and os.fspath(target) != edge_run.workdir:
      files_lib.copy_file(source, target / name)
  variables = edge_run.variables
  options = {"affinity": record["affinity"], "task_weights": tuple(record["task_weights"])}
  initial = {"anchor": variables["anchor"],
             "edge_hypernet": {"params": variables["params"]["edge_hypernet"]}}
  return options, initial, {"edge_dir": edge_run.workdir, "edge_step": edge_run.step}


# ----------------------------------------------------------------------------------------------
# The anchor report: can sharing work on this anchor?


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tree_step(net, tree, variables, states, batch):
  predictions = net.apply_tree(variables, batch["image"], tree)
  valid = jnp.asarray(batch[data_base.VALID_KEY], jnp.float32)
  metric_states = metrics_lib.update_all(states["metrics"], predictions, batch, net.tasks)
  losses = {}
  for task in net.tasks:
    per_example = jax.vmap(lambda p, y, t=task: t.loss(p[None], y[None]))(
        predictions[task.name], batch[task.name])
    total, count = states["loss"][task.name]
    losses[task.name] = (total + jnp.sum(per_example * valid), count + jnp.sum(valid))
  return {"metrics": metric_states, "loss": losses}


def tree_metrics(net, variables, tree, batches) -> dict:
  """{task: {metric: value, "loss": mean loss}} of `tree` on `batches` (evaluation mode)."""
  zero = np.zeros((), np.float32)
  states = {"metrics": metrics_lib.init_all(net.tasks),
            "loss": {t.name: (zero, zero) for t in net.tasks}}
  for batch in batches:
    states = _tree_step(net, tree, variables, states, batch)
  states = jax.device_get(states)
  results = metrics_lib.compute_all(states["metrics"], net.tasks)
  for name, (total, count) in states["loss"].items():
    results[name]["loss"] = float(total) / max(float(count), 1.0)
  return results


def anchor_report(method, variables, source, image_shape, batch_size: int = 256) -> dict:
  """Stream divergence per block and the quality and cost of `dymu.probe_trees` on `source`.

  Every probe row gives each task's primary metric and loss, its change against the separate
  tree (the anchor itself), and the tree's MACs fraction of the anchor.
  """
  net = method.net
  keep = {"image", data_base.VALID_KEY, *(t.name for t in net.tasks)}
  batches = [{k: v for k, v in b.items() if k in keep}
             for b in data_base.eval_batches(source, batch_size)]
  primary = {t.name: metrics_lib.metric_for(t).primary for t in net.tasks}
  separate = tree_metrics(net, variables, net.separate_tree(), batches)
  rows = []
  for label, tree in dymu.probe_trees(net.num_layers, net.num_tasks):
    result = tree_metrics(net, variables, tree, batches)
    rows.append({"tree": label, "parents": [list(p) for p in tree.parents],
                 "macs_fraction": net.tree_cost(tree, image_shape).macs_fraction,
                 "tasks": {name: {"metric": result[name][primary[name]],
                                  "loss": result[name]["loss"],
                                  "metric_change": result[name][primary[name]]
                                  - separate[name][primary[name]]}
                           for name in primary}})
  return {"examples": len(source), "primary_metrics": primary,
          "divergence": dymu.stream_divergence(variables, net.num_layers),
          "anchor": {name: {"metric": separate[name][primary[name]],
                            "loss": separate[name]["loss"]} for name in primary},
          "probes": rows}


def anchor_report_markdown(report: Mapping[str, Any]) -> str:
  """The anchor report as Markdown (what `write_anchor_report` prints and saves)."""
  names = list(report["primary_metrics"])
  lines = [f"# DYMU anchor report ({report['examples']} held-out examples)", "",
           "Relative distance between the streams' parameters per block "
           "(||a - b|| / mean norm; 0 = copies, about 1.4 = independent draws):", ""]
  for l, d in enumerate(report["divergence"]):
    pairs = [f"{i}-{j}: {d[i][j]:.3f}" for i in range(len(d)) for j in range(i + 1, len(d))]
    lines.append(f"- block {l}: " + ", ".join(pairs))
  lines += ["", "Quality of the cheapest moves away from the separate tree (a cross edge can "
            "only be cheap when the streams still correspond):", "",
            "| tree | MACs fraction | " + " | ".join(
                f"{n} {report['primary_metrics'][n]} (change)" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
  lines.append("| separate (the anchor) | 1.000 | " + " | ".join(
      f"{report['anchor'][n]['metric']:.4f}" for n in names) + " |")
  for row in report["probes"]:
    lines.append(f"| {row['tree']} | {row['macs_fraction']:.3f} | " + " | ".join(
        f"{row['tasks'][n]['metric']:.4f} ({row['tasks'][n]['metric_change']:+.4f})"
        for n in names) + " |")
  return "\n".join(lines) + "\n"


def write_anchor_report(run: TrainedRun, source, workdir: str) -> str:
  """Computes the anchor report of a finished anchor stage on `source`; writes JSON and
  Markdown into `workdir` and returns the Markdown."""
  report = anchor_report(run.method, run.variables, source, run.train_source.image_shape)
  folder = files_lib.run_path(workdir)
  files_lib.write_json(folder / ANCHOR_REPORT, report, indent=1)
  text = anchor_report_markdown(report)
  files_lib.atomic_write(folder / ANCHOR_REPORT_MD, text)
  return text
