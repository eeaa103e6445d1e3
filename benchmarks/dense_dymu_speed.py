"""DYMU's stages on dense synthetic scenes: train-step speed and memory beside the static step.

  python -m benchmarks.dense_dymu_speed                          # 64x64, batch 16
  python -m benchmarks.dense_dymu_speed --image_size=96 --repeats=5

The four synthetic tasks (segmentation, depth, normals, edges) on ResNet-small with the dense
(DeepLab-style) heads of `--head_width`: the static network's train step, and DYMU's anchor
(N = 4 single-task streams, each with its own dense head, trained separately), edge (every
stream and head run soft-mixed by the Gumbel-softmax parents; gradients reach only the edge
hypernetwork through the frozen anchor's activations) and weight stages (the same mixing with
the weight hypernetwork's batch-norm shifts). Each step is the compiled, state-donating step
`dymu_jax.train.train` runs, timed in `--repeats` rounds that alternate the stages (load from
other processes hits all alike); the table gives samples/s (median), the slowdown against the
static step, the theoretical ratio (XLA's FLOP count of the compiled step relative to the
static step's) and XLA's memory estimate of the step (arguments + temporaries).
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import step_speed
from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib

_SIZE = flags.DEFINE_integer("image_size", 64, "Image side length (synthetic scenes).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Batch size.")
_HEAD = flags.DEFINE_integer("head_width", 64, "Hidden width of the dense heads.")
# --steps, --repeats and --warmup_steps are `benchmarks.step_speed`'s flags.

FLAGS = flags.FLAGS
STAGES = ("static", "anchor", "edge", "weight")


def build_methods(tasks) -> dict:
  """The static method and DYMU's three stage methods; the edge and weight stages run on
  `init`'s stand-ins of their frozen earlier stages (speed does not depend on their values)."""
  model = {"backbone": "resnet_small", "head_width": _HEAD.value}
  built = {"static": methods_lib.build("static", tasks, model_options=model)}
  common = {"anchor_init": "shared", "temperature_every": 10}
  affinity = np.eye(len(tasks)).tolist()
  for stage in ("anchor", "edge", "weight"):
    options = {**common, "stage": stage, **({"affinity": affinity} if stage != "anchor" else {})}
    built[stage] = methods_lib.build("dymu", tasks, model_options=model, method_options=options)
  return built


def compiled_step(method, batches):
  """(run(num_steps) -> seconds, XLA FLOPs of one step, XLA bytes of one step): the step of
  `step_speed.step_runner`, with XLA's analyses of its compiled program."""
  run, compiled = step_speed.step_runner(method, batches, with_compiled=True)
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  memory = compiled.memory_analysis()
  nbytes = (memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes) if memory else 0
  return run, float(analysis.get("flops", float("nan"))), nbytes


def main(argv):
  del argv
  size, batch = _SIZE.value, _BATCH.value
  config = data_lib.DataConfig(name="synthetic", image_size=size, num_train=4 * batch,
                               num_test=16)
  source = data_lib.load(config, "train")
  batcher = data_lib.Batcher(source, batch, seed=0)
  batches = [batcher.batch(i) for i in range(4)]
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, load average "
        f"{os.getloadavg()[0]:.1f}; synthetic scenes {size}x{size}, batch {batch}, tasks "
        f"{', '.join(t.name for t in source.tasks)}; {FLAGS.steps} steps per run, median of "
        f"{FLAGS.repeats} alternating runs", flush=True)
  built = build_methods(source.tasks)
  runners, flops, memory = {}, {}, {}
  for name in STAGES:
    start = time.perf_counter()
    runners[name], flops[name], memory[name] = compiled_step(built[name], batches)
    runners[name](FLAGS.warmup_steps)
    print(f"  compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
  rates = {name: [] for name in STAGES}
  for _ in range(FLAGS.repeats):
    for name in STAGES:
      rates[name].append(FLAGS.steps * batch / runners[name](FLAGS.steps))
  medians = {name: statistics.median(r) for name, r in rates.items()}
  print(f"{'step':<8}{'samples/s':>10}{'vs static':>11}{'theory':>9}{'memory MB':>11}   runs")
  for name in STAGES:
    print(f"{name:<8}{medians[name]:>10.1f}{medians['static'] / medians[name]:>10.2f}x"
          f"{flops[name] / flops['static']:>8.2f}x{memory[name] / 2**20:>11.0f}   "
          + " ".join(f"{r:.1f}" for r in rates[name]))
  print("vs static = static samples/s / stage samples/s (the step's slowdown); theory = XLA "
        "FLOPs of the compiled step / the static step's; memory = XLA's estimate of the "
        "step's arguments, outputs and temporaries.")


if __name__ == "__main__":
  app.run(main)
