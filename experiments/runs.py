"""Steering a trained run from the command line (`evaluate`, `export`): the run's folder, the
held-out images a method's `prepare` reads, and each registered method's deployment options
(`MethodConfig.DEPLOY`) as flags of their names. The work is the library's (`dymu_jax.runs`).
"""

from __future__ import annotations

from absl import flags

from dymu_jax import methods as methods_lib
from dymu_jax import runs as runs_lib
from experiments import common

flags.DEFINE_string("output_dir", None, "Where results go; default <workdir>/eval (evaluate) "
                    "or <workdir>/export/<controls> (export).")
flags.DEFINE_integer("calibration_examples", 512,
                     "Held-out training images that re-estimate a deployed network's batch-norm "
                     "statistics (methods whose `prepare` reads held-out images).", lower_bound=1)
flags.DEFINE_integer("score_examples", 256,
                     "Held-out training images that score the configurations a search picks "
                     "from (methods whose `prepare` reads held-out images).", lower_bound=1)
FLAGS = flags.FLAGS

DEPLOY_CONFIGS = tuple(dict.fromkeys(c.DEPLOY for c in methods_lib.configs() if c.DEPLOY))
for _config in DEPLOY_CONFIGS:
  common.define_option_flags(_config, __name__)
# Help groups: the held-out images, then each method's deployment options.
STEERING_GROUPS = (
    ("Held-out images", ("calibration_examples", "score_examples", "eval_batch_size")),
    *((config.TITLE, tuple(config.flag_name(f.name) for f in config.fields()))
      for config in DEPLOY_CONFIGS))


def load(workdir: str) -> runs_lib.TrainedRun:
  """The run in `workdir` (a parent of stages: its newest trained stage), its data from
  `--data_dir` when given."""
  return runs_lib.load_run(runs_lib.resolve(workdir), data_dir=FLAGS.data_dir)


def deploy_options(method) -> dict:
  """The deployment options (`Method.DEPLOY_OPTIONS`) set on the command line; an unset one
  keeps the method's own value."""
  return {name: FLAGS[name].value for name in method.DEPLOY_OPTIONS
          if name in FLAGS and FLAGS[name].present}


def steer(run: runs_lib.TrainedRun):
  """(the run's method with the deployment flags, its `prepare` result) (`runs.steer`)."""
  return runs_lib.steer(run, deploy_options(run.method),
                        calibration_examples=FLAGS.calibration_examples,
                        score_examples=FLAGS.score_examples,
                        batch_size=FLAGS.eval_batch_size or 256)
