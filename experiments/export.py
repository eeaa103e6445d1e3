r"""Export the SubNet of an ECMT run for a preference and a budget as a standalone network.

    python -m experiments.export --workdir=workdirs/utkface_ecmt \
        --preference=0.6,0.2,0.2 --budget=0.5 --output_dir=exported/utk_half

The search picks the width configuration (with the run's cached encoder scores, computed by
`python -m experiments.evaluate` or here when missing), the SubNet's batch norms are
recalibrated on `--calibration_examples` training images, and its variables are physically
sliced to those widths. The folder then holds `network.json` (the network's definition, its
widths, MACs, the preference and budget) and `variables.msgpack`; loading it needs nothing
else:

    from dymu_jax.models import serialize
    model, variables, info = serialize.load_network("exported/utk_half")
    predictions = model.apply(variables, images)          # images (B, H, W, C) in [0, 1]
    age = model.tasks[0].label_units(predictions["age"])  # regression in the label's units

A tabular run's network takes raw feature vectors (B, D): it standardises them itself with the
training split's statistics (also in `info["input_stats"]`), and regression tasks carry the
targets' standardisation (`Task.label_offset`, `label_scale`; `label_units` maps back).

`--budget` is a fraction of the SuperNet's MACs (0 < b <= 1) or, above 1, MACs per example.
`--workdir` and `--output_dir` may be on any `etils.epath` filesystem (gs://bucket/run).
"""

from __future__ import annotations

import dataclasses
import math
import os

from absl import app
from absl import flags
import numpy as np

from dymu_jax import files as files_lib
from experiments import cli_help
from experiments import common
from experiments import evaluate
from experiments import runs
from dymu_jax.methods import ecmt
from dymu_jax.models import serialize

flags.DEFINE_list("preference", [], "Task preference, one number per task in task order, "
                  "summing to 1; empty = uniform.")
flags.DEFINE_float("budget", 1.0, "Budget: a fraction of the SuperNet's MACs in (0, 1], or "
                   "MACs per example when above 1.")
flags.register_validator(
    "budget", lambda b: math.isfinite(b) and (0 < b <= 1 or (b > 1 and b == int(b))),
    message="must be a fraction of the SuperNet's MACs in (0, 1] or a whole number of MACs "
            "per example above 1")

FLAGS = flags.FLAGS


def _budget(value: float):
  if value > 1.0:
    if value != int(value):
      raise ValueError(f"--budget above 1 is MACs per example and must be a whole number, got "
                       f"{value}.")
    return int(value)
  return float(value)


def export() -> str:
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the folder of a trained ECMT run.")
  if FLAGS.output_dir:  # an output folder that cannot be written stops before the search
    common.ensure_workdir(FLAGS.output_dir, "--output_dir")
  run = runs.load_run(FLAGS.workdir, data_dir=FLAGS.data_dir)
  method = run.method
  if method.name != "ecmt":
    raise ValueError(f"{run.workdir} holds a {method.name!r} run; export slices ECMT SuperNets "
                     f"(train with --method=ecmt).")
  names = [t.name for t in method.tasks]
  preference = common.parse_floats(FLAGS.preference, "--preference")
  if preference is None:
    preference = tuple(np.full(len(names), 1.0 / len(names)))
  preference = ecmt.check_preference(preference, names)
  budget = _budget(FLAGS.budget)
  image_shape = tuple(run.test_source.image_shape)
  table = ecmt.cached_cost_table(method.model, image_shape, method.width_choices,
                                 path=files_lib.run_path(run.workdir) / "cost_table.json")
  calibration, validation, signature = evaluate.held_out_images(run, table)
  scores = evaluate.cached_encoder_scores(run, calibration, validation, signature)
  config = ecmt.search(preference, budget, cost_table=table, scores=scores,
                       decoder_reserve=FLAGS.decoder_reserve)
  variables = ecmt.recalibrate_bn(method, run.variables, config, calibration)
  sub, sub_variables = ecmt.slice_subnet(method.model, variables, config, image_shape)
  output_dir = FLAGS.output_dir or os.fspath(
      files_lib.run_path(run.workdir) / "export" /
      ("pref=" + "_".join(f"{x:.3g}" for x in preference) + f"_budget={budget:g}"))
  macs = table.macs(config)
  info = {
      "source_workdir": run.workdir, "checkpoint_step": run.step,
      "preference": dict(zip(names, (float(x) for x in preference))), "budget": budget,
      "widths": {"encoder": list(config.encoder), "decoders": list(config.decoders)},
      "macs": macs, "supernet_macs": table.full_macs, "macs_fraction": macs / table.full_macs,
  }
  stats = getattr(run.test_source, "input_stats", None)
  if stats:  # feature vectors: the network standardises raw rows with the training statistics
    info["input_stats"] = {k: np.asarray(v).tolist() for k, v in stats.items()}
    sub = dataclasses.replace(sub, pixel_mean=tuple(float(v) for v in stats["mean"]),
                              pixel_std=tuple(float(v) for v in stats["std"]))
  serialize.save_network(output_dir, sub, sub_variables, extra=info, image_shape=image_shape)
  print(f"exported SubNet encoder {config.encoder} decoders {dict(zip(names, config.decoders))}"
        f": {macs:,} MACs per example ({macs / table.full_macs:.3f} of the SuperNet) to "
        f"{output_dir}")
  return output_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  common.quiet_logging()
  with common.user_errors("--output_dir"):
    export()


EXPORT_GROUPS = (
    ("Run", ("workdir", "data_dir", "output_dir")),
    ("Steering", ("preference", "budget")),
    ("ECMT search", ("calibration_examples", "score_examples", "decoder_reserve")),
    ("Errors", ("traceback",)),
    cli_help.RUNTIME_GROUP,
)

if __name__ == "__main__":
  cli_help.run(main, __doc__, EXPORT_GROUPS)
