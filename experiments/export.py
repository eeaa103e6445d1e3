r"""Export the network a trained run deploys for the controls you set, as a standalone network.

    python -m experiments.export --workdir=workdirs/utkface_ecmt \
        --preference=0.6,0.2,0.2 --budget=0.5 --output_dir=exported/utk_half
    python -m experiments.export --workdir=workdirs/utkface_static

The run's method deploys its network (`Method.deploy`) for the controls it takes
(`Method.control_space`: none, `--preference`, and `--budget` or `--resource`); a control it
does not take stops with one sentence, a missing one takes the method's default (uniform
preference, budget 1.0, resource 0). A method whose `prepare` reads held-out training images
takes them here (`--calibration_examples`, `--score_examples`). The folder then holds
`network.json` (the network's definition, the controls, MACs and parameters, the method's
facts) and `variables.msgpack`; loading it needs nothing else:

    from dymu_jax.models import serialize
    model, variables, info = serialize.load_network("exported/utk_half")
    predictions = model.apply(variables, images)          # images (B, H, W, C) in [0, 1]
    age = model.tasks[0].label_units(predictions["age"])  # regression in the label's units

A tabular run's network takes raw feature vectors (B, D): it standardises them itself with the
training split's statistics (also in `info["input_stats"]`). What each method exports is in
docs/evaluation.md. `--workdir` and `--output_dir` may be on any `etils.epath` filesystem.
"""

from __future__ import annotations

import math
import os

from absl import app
from absl import flags
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.runs import settings
from experiments import cli_help
from experiments import common
from experiments import runs

flags.DEFINE_list("preference", [], "Task preference, one number per task in task order, "
                  "summing to 1; empty = uniform (methods steered by a preference).")
flags.DEFINE_float("budget", None, "Budget (methods steered by one): a fraction of the full "
                   "network's MACs "
                   "in (0, 1], or MACs per example when above 1; unset = 1.0.")
flags.DEFINE_float("resource", None, "Resource level c in [0, 1] (methods steered by one; larger: "
                   "more frugal); "
                   "unset = 0.")
flags.register_validator(
    "budget", lambda b: b is None or (math.isfinite(b) and (0 < b <= 1 or (b > 1 and b == int(b)))),
    message="must be a fraction of the SuperNet's MACs in (0, 1] or a whole number of MACs "
            "per example above 1")

FLAGS = flags.FLAGS


def _budget(value: float):
  return int(value) if value > 1.0 else float(value)


def _controls(method) -> dict:
  """The controls the flags set, refusing one the method does not take."""
  given = {}
  if FLAGS.preference:
    given["preference"] = settings.parse_floats(FLAGS.preference, "--preference")
  if FLAGS.budget is not None:
    given["budget"] = _budget(FLAGS.budget)
  if FLAGS.resource is not None:
    given["resource"] = float(FLAGS.resource)
  names = method.control_space().names
  extra = [name for name in given if name not in names]
  if extra:
    takes = ", ".join(f"--{n}" for n in names) if names else "no controls (its network is fixed)"
    raise ValueError(f"--{extra[0]} does not steer a {method.name!r} run, which takes "
                     f"{takes}; drop it.")
  return given


def _label(controls: dict) -> str:
  parts = []
  for name, value in controls.items():
    text = ("_".join(f"{x:.3g}" for x in value) if isinstance(value, (tuple, list))
            else f"{value:g}")
    parts.append(f"{name[:4] if name == 'preference' else name}={text}")
  return "_".join(parts) or "network"


def export() -> str:
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder of a trained run.")
  if FLAGS.output_dir:  # an output folder that cannot be written stops before the search
    common.ensure_workdir(FLAGS.output_dir, "--output_dir")
  # A parent folder of stages: its newest trained stage.
  run = runs.load(FLAGS.workdir)
  controls = _controls(run.method)  # a control the method does not take stops before the search
  image_shape = tuple(run.test_source.image_shape)
  method, prepared = runs.steer(run)
  deployed = method.deploy(run.variables, controls, prepared, image_shape=image_shape)
  if not deployed.exportable:
    raise ValueError(f"{run.workdir} holds a {method.name!r} run, whose deployed network "
                     f"({type(deployed.network).__name__}) cannot be exported yet; "
                     f"`experiments.evaluate` measures it.")
  names = [t.name for t in method.tasks]
  info = {"source_workdir": run.workdir, "checkpoint_step": run.step, "method": method.name}
  for name, value in deployed.controls.items():
    info[name] = (dict(zip(names, (float(x) for x in value))) if name == "preference"
                  else value)
  stats = getattr(run.test_source, "input_stats", None)
  if stats:  # feature vectors: the network standardises raw rows with the training statistics
    info["input_stats"] = {k: np.asarray(v).tolist() for k, v in stats.items()}
    deployed = deployed.with_input_normalisation(stats["mean"], stats["std"])
  output_dir = FLAGS.output_dir or os.fspath(
      files_lib.run_path(run.workdir) / "export" / _label(deployed.controls))
  deployed.export(output_dir, extra=info)
  cost = deployed.cost()
  described = ", ".join(f"{k} {v}" for k, v in deployed.info.items() if k == "widths")
  print(f"exported the {method.name} network{' (' + described + ')' if described else ''}: "
        f"{cost.macs:,} MACs per example, {cost.params:,} parameters, to {output_dir}")
  return output_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors("--output_dir"):
    export()


EXPORT_GROUPS = (
    ("Run", ("workdir", "data_dir", "output_dir")),
    ("Steering", ("preference", "budget", "resource")),
    *runs.STEERING_GROUPS,
    ("Errors", ("traceback",)),
    cli_help.RUNTIME_GROUP,
)

if __name__ == "__main__":
  cli_help.run(main, __doc__, EXPORT_GROUPS)
