r"""Train a (controllable) multi-task model.

    python -m experiments.train --flagfile=experiments/flags/synthetic_static.flags \
        --workdir=/tmp/dymu/synthetic_static

A run resumes from the newest checkpoint in `--workdir` (same flags, same seed): killing and
restarting it loses at most the steps since the last checkpoint. `--helpfull` lists every flag.

A method trained in stages runs each stage in `<workdir>/<stage>` through the library's stage
runner (`dymu_jax.train.stages`; the stages come from the method's config, `MethodConfig.plan`,
and its flags say which to run and on which finished earlier stage), each resuming from its own
checkpoints, and writes
`<workdir>/summary.json` with every stage's summary and the command's flags.
"""

from __future__ import annotations

import contextlib
import dataclasses

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax import runs as runs_lib
from dymu_jax import train as train_lib
from dymu_jax.data import augment as augment_lib
from dymu_jax.runs import guard
from dymu_jax.runs import settings
from dymu_jax.train import stages as stages_lib
from experiments import cli_help
from experiments import common

flags.DEFINE_enum("method", methods_lib.DEFAULT_METHOD, list(methods_lib.METHODS),
                  "Training method: " + "; ".join(f"{k}: {v}"
                                                  for k, v in methods_lib.METHODS.items()))
flags.DEFINE_list("task_weights", [],
                  "Fixed loss weight per task, in task order (every method; a stage that "
                  "measures its task weights on its earlier stage uses those); empty = 1 each.")
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


def run() -> dict[str, dict]:
  """Builds everything from the flags and trains every stage of the method's plan; returns
  {stage name ("" for a run of one stage): its summary}.

  One training command at a time per workdir (`runs.guard.WorkdirLock`), and a resumed run
  keeps its flags (`runs.guard.check_resume_flags`; `--allow_changed_flags` overrides).
  """
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder for checkpoints and metrics.")
  cli_help.check_method_flags(FLAGS.method, cli_help.given_flags())
  values = common.flag_values()
  settings.check_task_weights(values)
  settings.check_pretrained(values)
  config = settings.method_config(values)  # the method's own options, before any data is read
  plan = config.plan(FLAGS.workdir, FLAGS.steps,
                     name=lambda field: "--" + type(config).flag_name(field))
  train_lib.initialize_distributed(FLAGS.multi_host)
  root = common.ensure_workdir(FLAGS.workdir)
  lock = (guard.WorkdirLock(root) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return run_plan(config, plan, root)


def _augment(train_source):
  """The training augmentation of --augment (dense datasets only), or None."""
  if not FLAGS.augment:
    return None
  if not any(t.is_dense for t in train_source.tasks):
    # A flip would swap Multi-MNIST's left and right digits: only dense labels move along.
    raise ValueError(f"--augment applies to datasets with per-pixel tasks; {FLAGS.dataset!r} "
                     f"has none, so drop --augment.")
  return augment_lib.make_augment(train_source.tasks)


def stage_values(config, stage: stages_lib.Stage) -> dict:
  """The flags saved with a stage: the command's, with the stage's own method options (which
  stage, its input folders), folder and steps, so `dymu_jax.runs.load_run` rebuilds it alone."""
  values = common.flag_values()
  for field in type(config).fields():
    if getattr(stage.config, field.name) != getattr(config, field.name):
      values[type(config).flag_name(field.name)] = getattr(stage.config, field.name)
  if stage.name:
    values.update(workdir=stage.folder, steps=stage.steps)
  return values


def _run_metadata(values: dict, config, train_source, source: dict) -> dict:
  metadata = {"flags": values,
              "record": settings.run_record(config, values, cli_help.FLAG_FILES),
              stages_lib.SOURCE_KEY: source}
  if getattr(train_source, "input_stats", None):  # feature vectors: the standardisation used
    metadata["input_stats"] = {k: np.asarray(v).tolist()
                               for k, v in train_source.input_stats.items()}
  scaled = {t.name: {"offset": t.label_offset, "scale": t.label_scale}
            for t in train_source.tasks if t.label_offset != 0.0 or t.label_scale != 1.0}
  if scaled:  # regression predicted in (label - offset) / scale; Task.label_units maps back
    metadata["regression_label_units"] = scaled
  return metadata


def run_plan(config, plan: tuple[stages_lib.Stage, ...], root: str) -> dict[str, dict]:
  """Trains the stages of `plan` (`stages.run_stages`); a run in stages also writes
  <workdir>/summary.json with every stage's summary."""
  values = common.flag_values()
  train_source, test_source = settings.load_sources(values)
  axis_name = train_lib.method_axis_name(FLAGS.parallel)
  # Before any stage holds examples out or reads an earlier one: the model options (by building
  # the first stage's method), then the batch and image sizes they need.
  settings.build_method(stage_values(config, plan[0]), train_source.tasks, axis_name=axis_name)
  settings.check_data_fits(train_source, FLAGS.batch_size, values)
  augment = _augment(train_source)
  is_chief = jax.process_index() == 0
  title = type(config).TITLE or FLAGS.method
  staged = any(stage.name for stage in plan)

  def load(folder: str, stage_name: str) -> stages_lib.Finished:
    run = runs_lib.finished_run(folder, stage_name, values, train_source)
    return stages_lib.Finished(run.workdir, run.step, run.method, run.variables)

  def check(stage: stages_lib.Stage) -> None:
    prefix = type(config).PREFIX + "_" if staged and type(config).PREFIX else ""
    guard.check_resume_flags(stage.folder, stage_values(config, stage),
                             allow=FLAGS.allow_changed_flags, ignore_prefix=prefix)

  def train_stage(stage, start, source, stage_source) -> dict:
    values = stage_values(config, stage)
    workdir = common.ensure_workdir(stage.folder)
    method = settings.build_method(values, train_source.tasks, axis_name=axis_name,
                                   inputs=dict(start.options) or None)
    train_config_ = dataclasses.replace(settings.train_config(values), steps=stage.steps)
    if stage.learning_rate:
      train_config_ = dataclasses.replace(train_config_, learning_rate=stage.learning_rate)
    if stage.name:
      print(f"{title} stage {stage.name}: {stage.steps} steps at learning rate "
            f"{train_config_.learning_rate:g} on {len(stage_source)} training examples in "
            f"{workdir}", flush=True)
    else:
      logging.info("Training %s on %r (%d train, %d test examples) in %s", FLAGS.method,
                   train_source.name, len(stage_source), len(test_source), workdir)
    result = train_lib.train(method, stage_source, test_source, train_config_, workdir,
                             run_metadata=_run_metadata(values, train_config_, train_source,
                                                        source),
                             augment=augment, initial_variables=dict(start.variables) or None,
                             pretrained=None if stage.reads else FLAGS.pretrained or None)
    summary = {"method": FLAGS.method, **({"stage": stage.name} if stage.name else {}),
               "dataset": FLAGS.dataset, "steps": stage.steps,
               "seconds": round(result.seconds, 1), "eval": result.eval_metrics,
               "controls": list(method.control_space().names)}
    if is_chief:
      files_lib.write_json(files_lib.run_path(workdir) / "summary.json", summary, indent=1)
      # Methods with a learned structure write it next to the run (`Method.artefacts`).
      for name, record in method.artefacts(result.state.variables, workdir,
                                           step=stage.steps).items():
        print(f"wrote {record['file']} ({name})")
    print(common.format_eval(result.eval_metrics, train_source.tasks, result.eval_labelled))
    label = f"{stage.label}: " if stage.name else ""
    print(f"{label}wall time {result.seconds:.1f} s; results in {workdir}", flush=True)
    return summary

  if FLAGS.pretrained and plan[0].reads:
    print(f"--pretrained is not loaded: {title} {plan[0].label} starts from the "
          f"{plan[0].reads_stage} stage in {plan[0].reads}.", flush=True)
  summaries = stages_lib.run_stages(plan, train_source=train_source, test_source=test_source,
                                    seed=FLAGS.seed, load=load, train_stage=train_stage,
                                    check=check, is_chief=is_chief, title=title)
  if len(plan) > 1 and is_chief:
    last = summaries[plan[-1].name]
    # The command's own flags: what trains the whole run again (each stage saved its own).
    summary = {"method": FLAGS.method, "dataset": FLAGS.dataset, "flags": values,
               "steps": sum(s["steps"] for s in summaries.values()),
               "seconds": round(sum(s["seconds"] for s in summaries.values()), 1),
               "eval": last["eval"], "controls": last.get("controls", []),
               "stages": summaries}
    files_lib.write_json(files_lib.run_path(root) / "summary.json", summary, indent=1)
    print(f"{title} stages done: {', '.join(s.name for s in plan)}; summary in "
          f"{root}/summary.json")
  return summaries


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors():
    run()


if __name__ == "__main__":
  cli_help.run(main, __doc__, cli_help.TRAIN_GROUPS)
