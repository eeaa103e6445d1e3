r"""Train a (controllable) multi-task model.

    python -m experiments.train --flagfile=experiments/flags/synthetic_static.flags \
        --workdir=/tmp/dymu/synthetic_static

A run resumes from the newest checkpoint in `--workdir` (same flags, same seed): killing and
restarting it loses at most the steps since the last checkpoint. `--helpfull` lists every flag.

DYMU (`--method=dymu`) trains in stages: `--dymu_stage=all` (the default) runs the pretrained
trunk (with `--dymu_anchor_init=trunk`, the default), anchor, edge and weight stages in sequence
in `<workdir>/pretrain`, `<workdir>/anchor`, `<workdir>/edge` and `<workdir>/weight` (steps:
`--dymu_pretrain_steps`, `--dymu_stage_steps`), each resuming from its own checkpoints, and
writes `<workdir>/summary.json`; with `--dymu_anchor_dir=DIR` it trains only the edge and
weight stages, on that finished anchor. `--dymu_stage=edge --dymu_anchor_dir=DIR` or
`--dymu_stage=weight --dymu_edge_dir=DIR` trains one stage in `--workdir` on a finished earlier
stage. The edge stage writes the task affinity and the task weights to `dymu_affinity.json`
(heat map: `dymu_affinity.png`) in its folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dymu_jax import files as files_lib
from experiments import cli_help
from experiments import common
from experiments import runs
from experiments import workdir_guard
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib
from dymu_jax.data import augment as augment_lib

flags.DEFINE_enum("method", "static", list(methods_lib.METHODS),
                  "Training method: " + "; ".join(f"{k}: {v}"
                                                  for k, v in methods_lib.METHODS.items()))
flags.DEFINE_list("task_weights", [],
                  "Fixed loss weight per task, in task order (every method; DYMU's edge and "
                  "weight stages use 1 / the anchor's losses instead); empty = 1 each.")
# --- optimisation ---
flags.DEFINE_integer("steps", 2000, "Optimizer steps of the whole run.", lower_bound=1)
flags.DEFINE_bool("allow_changed_flags", False,
                  "Resume a workdir whose run was trained with other flags (method, model, "
                  "data, optimizer, ...); refused otherwise. The changes are recorded in "
                  "<workdir>/flag_history.jsonl.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (over all devices and hosts).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and per-step randomness.",
                     lower_bound=0)
flags.DEFINE_enum("optimizer", "adam", list(train_lib.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
common.require_number("learning_rate", 0, open_lower=True)
flags.DEFINE_enum("schedule", "constant", list(train_lib.SCHEDULES), "Learning-rate schedule.")
flags.DEFINE_integer("decay_steps", 0, "For --schedule=step: decay every this many steps.",
                     lower_bound=0)
flags.DEFINE_float("decay_factor", 0.1, "For --schedule=step: multiply the rate by this.")
common.require_number("decay_factor", 0, open_lower=True)
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps (warmup_cosine).",
                     lower_bound=0)
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (adamw) or L2 (others).")
common.require_number("weight_decay", 0)
flags.DEFINE_float("grad_clip", 0.0, "Clip the global gradient norm to this; 0 = off.")
common.require_number("grad_clip", 0)
flags.DEFINE_float("momentum", 0.9, "Momentum of sgd/momentum.")
common.require_number("momentum", 0, 1)
# --- loop ---
flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps; 0 = only at the end.",
                     lower_bound=0)
flags.DEFINE_integer("checkpoint_every", 500, "Checkpoint every this many steps; 0 = at the end.",
                     lower_bound=0)
flags.DEFINE_integer("keep_checkpoints", 3, "How many of the newest checkpoints to keep.",
                     lower_bound=1)
flags.DEFINE_integer("log_every", 50, "Log train metrics every this many steps.", lower_bound=1)
flags.DEFINE_enum("parallel", "mesh", list(train_lib.MODES),
                  "Data parallelism: mesh (jax.jit over a device Mesh) or pmap.")
flags.DEFINE_bool("multi_host", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_integer("prefetch", 2, "Batches prepared ahead of the accelerator.", lower_bound=0)
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Activations' dtype in the train step: bfloat16 = mixed precision "
                  "(parameters, optimizer state, batch-norm statistics, losses and evaluation "
                  "stay float32).")

FLAGS = flags.FLAGS


def train_config() -> train_lib.TrainConfig:
  return train_lib.TrainConfig(
      steps=FLAGS.steps, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
      optimizer=FLAGS.optimizer, learning_rate=FLAGS.learning_rate, schedule=FLAGS.schedule,
      decay_steps=FLAGS.decay_steps, decay_factor=FLAGS.decay_factor,
      warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
      grad_clip=FLAGS.grad_clip, momentum=FLAGS.momentum, eval_every=FLAGS.eval_every,
      eval_batch_size=FLAGS.eval_batch_size, checkpoint_every=FLAGS.checkpoint_every,
      keep_checkpoints=FLAGS.keep_checkpoints, log_every=FLAGS.log_every,
      parallel=FLAGS.parallel, prefetch=FLAGS.prefetch, progress=FLAGS.progress,
      compute_dtype=FLAGS.compute_dtype)


def run() -> train_lib.TrainResult:
  """Builds everything from the flags and trains; returns the result.

  One training command at a time per workdir (`workdir_guard.WorkdirLock`), and a resumed run
  keeps its flags (`workdir_guard.check_resume_flags`; `--allow_changed_flags` overrides).
  """
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder for checkpoints and metrics.")
  cli_help.check_method_flags(FLAGS.method, cli_help.given_flags())
  common.check_task_weights()
  common.method_config()  # the method's own options, before any data is read
  train_lib.initialize_distributed(FLAGS.multi_host)
  root = common.ensure_workdir(FLAGS.workdir)
  lock = (workdir_guard.WorkdirLock(root) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return run_dymu() if FLAGS.method == "dymu" else run_single()


def _augment(train_source):
  """The training augmentation of --augment (dense datasets only), or None."""
  if not FLAGS.augment:
    return None
  if not any(t.is_dense for t in train_source.tasks):
    # A flip would swap Multi-MNIST's left and right digits: only dense labels move along.
    raise ValueError(f"--augment applies to datasets with per-pixel tasks; {FLAGS.dataset!r} "
                     f"has none, so drop --augment.")
  return augment_lib.make_augment(train_source.tasks)


def run_single() -> train_lib.TrainResult:
  """Trains every method but DYMU in --workdir."""
  config = train_config()
  train_source, test_source = common.load_sources()
  method = common.build_method(tasks=train_source.tasks,
                               axis_name=train_lib.method_axis_name(FLAGS.parallel))
  common.check_data_fits(train_source, FLAGS.batch_size)
  augment = _augment(train_source)
  workdir = common.ensure_workdir(FLAGS.workdir)
  logging.info("Training %s on %r (%d train, %d test examples) in %s", FLAGS.method,
               train_source.name, len(train_source), len(test_source), workdir)
  workdir_guard.check_resume_flags(workdir, common.flag_values(),
                                   allow=FLAGS.allow_changed_flags)
  metadata = {"flags": common.flag_values(),
              "record": common.run_record(config, flag_files=cli_help.FLAG_FILES)}
  if getattr(train_source, "input_stats", None):  # feature vectors: the standardisation used
    metadata["input_stats"] = {k: np.asarray(v).tolist()
                               for k, v in train_source.input_stats.items()}
  scaled = {t.name: {"offset": t.label_offset, "scale": t.label_scale}
            for t in train_source.tasks if t.label_offset != 0.0 or t.label_scale != 1.0}
  if scaled:  # regression predicted in (label - offset) / scale; Task.label_units maps back
    metadata["regression_label_units"] = scaled
  # A finished run re-run keeps its training time: the no-op resume is not the run's cost.
  finished = _finished_summary(workdir, config.steps)
  result = train_lib.train(method, train_source, test_source, config, workdir,
                           run_metadata=metadata, augment=augment)
  seconds = finished["seconds"] if finished and "seconds" in finished else result.seconds
  summary = {"method": FLAGS.method, "dataset": FLAGS.dataset, "steps": config.steps,
             "seconds": round(seconds, 1), "eval": result.eval_metrics,
             "controls": list(method.control_space().names)}
  files_lib.write_json(files_lib.run_path(workdir) / "summary.json", summary, indent=1)
  # Methods with a learned structure write it next to the run (gradsplit: routing + heat map).
  if jax.process_index() == 0:
    for name, record in method.artefacts(result.state.variables, workdir,
                                         step=config.steps).items():
      print(f"wrote {record['file']} ({name})")
  print(common.format_eval(result.eval_metrics, train_source.tasks, result.eval_labelled))
  if finished:
    print(f"already trained ({config.steps} steps, {seconds:.1f} s); results in {workdir}")
  else:
    print(f"wall time {result.seconds:.1f} s; results in {workdir}")
  return result


# ----------------------------------------------------------------------------------------------
# DYMU: three stages (METHODS.md section 1).


def _dymu_plan() -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
  """(stages to train, their folders, {input stage: folder}) of the DYMU flags.

  --dymu_stage=all trains every stage in <workdir>/<stage> (pretrain only with
  --dymu_anchor_init=trunk); with --dymu_anchor_dir it trains the edge and weight stages on
  that finished anchor instead (ablations that share one anchor). A single stage trains in
  --workdir on --dymu_pretrain_dir (anchor from a trunk), --dymu_anchor_dir (edge) or
  --dymu_edge_dir (weight). Input folders a stage would not read stop with one sentence.
  """
  root = files_lib.run_dir(FLAGS.workdir)
  given = lambda path: files_lib.run_dir(path) if path else ""
  inputs = {"pretrain": given(FLAGS.dymu_pretrain_dir), "anchor": given(FLAGS.dymu_anchor_dir),
            "edge": given(FLAGS.dymu_edge_dir)}
  stages = common.method_config().stages()
  readers = {"pretrain": ("anchor",), "anchor": ("edge", "all"), "edge": ("weight",)}
  for key, allowed in readers.items():
    if inputs[key] and FLAGS.dymu_stage not in allowed:
      raise ValueError(f"--dymu_{key}_dir is read by --dymu_stage={' or '.join(allowed)}, not "
                       f"by --dymu_stage={FLAGS.dymu_stage}" + (
                           f" (which trains its own {key} stage in <workdir>/{key})"
                           if FLAGS.dymu_stage == "all" else "") + "; drop it.")
  if len(stages) == 1:
    return stages, {stages[0]: root}, inputs
  if inputs["anchor"]:
    stages = ("edge", "weight")
  folders = {stage: os.fspath(files_lib.run_path(root) / stage) for stage in stages}
  for stage in stages:
    key = runs._INPUT_STAGE.get(stage)  # pylint: disable=protected-access
    if key in folders:
      inputs[key] = folders[key]
  if inputs["anchor"] in (root, *folders.values()) and "anchor" not in folders:
    raise ValueError(f"--dymu_anchor_dir={FLAGS.dymu_anchor_dir} is this run's own folder; "
                     f"give the workdir of another, finished anchor stage.")
  return stages, folders, inputs


def _finished_summary(workdir: str, steps: int) -> dict | None:
  """The summary of a stage that already reached `steps` in `workdir`, or None."""
  path = files_lib.run_path(workdir) / "summary.json"
  if runs.latest_step(workdir) != steps or not files_lib.is_file(path):
    return None
  try:
    summary = files_lib.read_json(path)
  except files_lib.DamagedFile as error:
    print(f"{error}; evaluating the stage's final checkpoint again to rewrite it.", flush=True)
    return None
  return summary if isinstance(summary, dict) and summary.get("steps") == steps else None


def _check_resume(workdir: str, stage: str, source: dict) -> None:
  """A stage resumed in `workdir` must continue on the same inputs it started from."""
  metadata = runs.saved_metadata(workdir)
  if metadata is None:
    return
  saved = metadata.get("run", {}).get("dymu")
  if saved is not None and saved != source:
    raise ValueError(f"The {stage} stage in {workdir} was started from {saved}, but its input "
                     f"is now {source}; resume with the same input or use a new workdir.")


def run_dymu() -> train_lib.TrainResult:
  """Trains the DYMU stages of --dymu_stage; each resumes from its own checkpoints.

  --dymu_stage=all trains <workdir>/anchor, then <workdir>/edge on it, then <workdir>/weight on
  that (with --dymu_anchor_dir: only edge and weight, on that anchor), and writes
  <workdir>/summary.json with every stage's summary. A single stage trains in --workdir. A
  finished stage is not trained again: re-running the command continues where it stopped.

  Returns the last trained stage's result (None when every stage had already finished).
  """
  stages, folders, input_dirs = _dymu_plan()
  stage_steps = common.dymu_stage_steps()
  train_source, test_source = common.load_sources()
  augment = _augment(train_source)
  root = common.ensure_workdir(FLAGS.workdir)
  axis_name = train_lib.method_axis_name(FLAGS.parallel)
  summaries, result = {}, None
  for stage in stages:
    workdir = common.ensure_workdir(folders[stage])
    # The flags saved with the stage describe it alone, so runs.load_run rebuilds it.
    values = {**common.flag_values(), "dymu_stage": stage, "workdir": workdir,
              "steps": stage_steps[stage], "dymu_pretrain_dir": input_dirs["pretrain"],
              "dymu_anchor_dir": input_dirs["anchor"], "dymu_edge_dir": input_dirs["edge"]}
    is_chief = jax.process_index() == 0
    done = _finished_summary(workdir, stage_steps[stage])
    if done is not None:
      # Finished: check that its input is still the one it was trained on, and move on.
      source = runs.dymu_stage_source(stage, values)
      _check_resume(workdir, stage, source)
      if stage == "edge":
        runs.check_affinity(workdir, runs.affinity_signature(values, source["anchor_dir"],
                                                             source["anchor_step"]))
      workdir_guard.check_resume_flags(workdir, values, allow=FLAGS.allow_changed_flags,
                                       ignore_prefix="dymu_")
      summaries[stage] = {**done, "workdir": workdir}
      print(f"DYMU stage {stage}: already trained ({done['steps']} steps) in {workdir}",
            flush=True)
      continue
    inputs, initial, source = runs.dymu_stage_inputs(stage, values, train_source, workdir,
                                                     plot=is_chief)
    _check_resume(workdir, stage, source)
    workdir_guard.check_resume_flags(workdir, values, allow=FLAGS.allow_changed_flags,
                                     ignore_prefix="dymu_")
    method = common.build_method(values, train_source.tasks, axis_name=axis_name,
                                 inputs=inputs)
    common.check_data_fits(train_source, FLAGS.batch_size, values)  # before any tracing
    config = dataclasses.replace(train_config(), steps=stage_steps[stage])
    if stage == "anchor" and FLAGS.dymu_anchor_learning_rate:
      config = dataclasses.replace(config, learning_rate=FLAGS.dymu_anchor_learning_rate)
    stage_source, validation_source = train_source, None
    if stage in ("pretrain", "anchor"):
      # These stages never see the held-out examples that set the task weights.
      stage_source, validation_source = runs.dymu_train_split(values, train_source)
    print(f"DYMU stage {stage}: {config.steps} steps at learning rate {config.learning_rate:g} "
          f"on {len(stage_source)} training examples in {workdir}", flush=True)
    if stage == "edge" and is_chief:
      record = runs.read_affinity(workdir)
      print(f"task affinity A = {record['affinity']}; task weights w = "
            f"{record['task_weights']} (wrote {files_lib.run_path(workdir) / runs.AFFINITY_FILE})")
    record = common.run_record(config, values, cli_help.FLAG_FILES)
    result = train_lib.train(method, stage_source, test_source, config, workdir,
                             run_metadata={"flags": values, "record": record, "dymu": source},
                             augment=augment, initial_variables=initial)
    summary = {"method": "dymu", "dymu_stage": stage, "dataset": FLAGS.dataset,
               "steps": config.steps, "seconds": round(result.seconds, 1),
               "eval": result.eval_metrics, "controls": list(method.control_space().names)}
    if is_chief:
      files_lib.write_json(files_lib.run_path(workdir) / "summary.json", summary, indent=1)
    summaries[stage] = {**summary, "workdir": workdir}
    print(common.format_eval(result.eval_metrics, train_source.tasks, result.eval_labelled))
    if stage == "anchor" and is_chief:
      # Whether sharing can work on this anchor: on held-out examples (else the test set).
      report_source = validation_source if validation_source is not None else test_source
      print(runs.write_anchor_report(runs.load_run(workdir), report_source, workdir))
    print(f"stage {stage}: wall time {result.seconds:.1f} s; results in {workdir}", flush=True)
  if len(stages) > 1 and jax.process_index() == 0:
    last = summaries[stages[-1]]
    summary = {"method": "dymu", "dymu_stage": "all", "dataset": FLAGS.dataset,
               "anchor_dir": input_dirs["anchor"],
               "steps": sum(s["steps"] for s in summaries.values()),
               "seconds": round(sum(s["seconds"] for s in summaries.values()), 1),
               "eval": last["eval"], "controls": last.get("controls", []),
               "stages": summaries}
    files_lib.write_json(files_lib.run_path(root) / "summary.json", summary, indent=1)
    print(f"DYMU stages done: {', '.join(stages)}; summary in {root}/summary.json")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors():
    run()


if __name__ == "__main__":
  cli_help.run(main, __doc__, cli_help.TRAIN_GROUPS)
