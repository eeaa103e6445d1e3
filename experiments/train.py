r"""Train a (controllable) multi-task model.

    python -m experiments.train --flagfile=experiments/flags/synthetic_static.flags \
        --workdir=/tmp/dymu/synthetic_static

A run resumes from the newest checkpoint in `--workdir` (same flags, same seed): killing and
restarting it loses at most the steps since the last checkpoint. `--helpfull` lists every flag.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax

from experiments import common
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib
from dymu_jax.data import augment as augment_lib

flags.DEFINE_enum("method", "static", list(methods_lib.METHODS),
                  "Training method: " + "; ".join(f"{k}: {v}"
                                                  for k, v in methods_lib.METHODS.items()))
flags.DEFINE_list("task_weights", [], "Loss weight per task (static); empty = 1 each.")
# --- ECMT (--method=ecmt; METHODS.md section 2) ---
flags.DEFINE_integer("num_subnets", 4, "ECMT: configurations per step by the sandwich rule "
                     "(max, min and num_subnets-2 random).")
flags.DEFINE_float("lambda_kd", 1.0, "ECMT: weight of the CI-KD loss; 0 turns it off.")
flags.DEFINE_enum("kd", "ci_kd", ["ci_kd", "mutual", "none"],
                  "ECMT distillation: ci_kd (SuperNet features -> SubNets), mutual (CI-KD plus "
                  "two-way prediction matching) or none.")
flags.DEFINE_float("lambda_mutual", 1.0, "ECMT: weight of the mutual-learning loss.")
flags.DEFINE_float("mutual_temperature", 2.0, "ECMT: softening temperature of mutual learning.")
flags.DEFINE_list("width_choices", [], "ECMT: width multipliers; empty = 0.25,0.5,0.75,1.0.")
# --- optimisation ---
flags.DEFINE_integer("steps", 2000, "Optimizer steps of the whole run.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (over all devices and hosts).")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and per-step randomness.")
flags.DEFINE_enum("optimizer", "adam", list(train_lib.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
flags.DEFINE_enum("schedule", "constant", list(train_lib.SCHEDULES), "Learning-rate schedule.")
flags.DEFINE_integer("decay_steps", 0, "For --schedule=step: decay every this many steps.")
flags.DEFINE_float("decay_factor", 0.1, "For --schedule=step: multiply the rate by this.")
flags.DEFINE_integer("warmup_steps", None, "Linear warm-up steps (warmup_cosine).")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (adamw) or L2 (others).")
flags.DEFINE_float("grad_clip", 0.0, "Clip the global gradient norm to this; 0 = off.")
flags.DEFINE_float("momentum", 0.9, "Momentum of sgd/momentum.")
# --- loop ---
flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps; 0 = only at the end.")
flags.DEFINE_integer("checkpoint_every", 500, "Checkpoint every this many steps; 0 = at the end.")
flags.DEFINE_integer("keep_checkpoints", 3, "How many of the newest checkpoints to keep.")
flags.DEFINE_integer("log_every", 50, "Log train metrics every this many steps.")
flags.DEFINE_enum("parallel", "mesh", list(train_lib.MODES),
                  "Data parallelism: mesh (jax.jit over a device Mesh) or pmap.")
flags.DEFINE_bool("multi_host", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_integer("prefetch", 2, "Batches prepared ahead of the accelerator.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

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
      parallel=FLAGS.parallel, prefetch=FLAGS.prefetch, progress=FLAGS.progress)


def run() -> train_lib.TrainResult:
  """Builds everything from the flags and trains; returns the result."""
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder for checkpoints and metrics.")
  train_lib.initialize_distributed(FLAGS.multi_host)
  config = train_config()
  train_source, test_source = common.load_sources()
  method = common.build_method(tasks=train_source.tasks,
                               axis_name=train_lib.method_axis_name(FLAGS.parallel))
  augment = None
  if FLAGS.augment:
    if not any(t.is_dense for t in train_source.tasks):
      # A flip would swap Multi-MNIST's left and right digits: only dense labels move along.
      raise ValueError(f"--augment applies to datasets with per-pixel tasks; {FLAGS.dataset!r} "
                       f"has none, so drop --augment.")
    augment = augment_lib.make_augment(train_source.tasks)
  workdir = common.ensure_workdir(FLAGS.workdir)
  logging.info("Training %s on %r (%d train, %d test examples) in %s", FLAGS.method,
               train_source.name, len(train_source), len(test_source), workdir)
  result = train_lib.train(method, train_source, test_source, config, workdir,
                           run_metadata={"flags": common.flag_values()}, augment=augment)
  summary = {"method": FLAGS.method, "dataset": FLAGS.dataset, "steps": config.steps,
             "seconds": round(result.seconds, 1), "eval": result.eval_metrics}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  # Methods with a learned structure write it next to the run (gradsplit: routing + heat map).
  save_routing = getattr(method, "save_routing", None)
  if save_routing is not None and jax.process_index() == 0:
    for path in save_routing(result.state.variables, workdir, step=config.steps):
      print(f"wrote {path}")
  print(common.format_eval(result.eval_metrics, train_source.tasks))
  print(f"wall time {result.seconds:.1f} s; results in {workdir}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors():
    run()


if __name__ == "__main__":
  app.run(main)
