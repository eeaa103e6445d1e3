"""Training throughput (examples/s) and compile count of the engine's train step.

  python -m benchmarks.train_throughput --dataset=synthetic --image_size=32 --method=static
  python -m benchmarks.train_throughput --dataset=multi_mnist --data_dir=../shared/data/mnist \
      --backbone=lenet --batch_size=256 --head_width=50 --image_size=0

Builds the same compiled, state-donating step that `dymu_jax.train.train` runs, feeds it
prefetched device batches from the real input pipeline, and times `--steps` steps after
`--warmup_steps` (which include compilation). Prints examples/s and the number of XLA
compilations of the step during the warm-up (1) and the timed part (0 when nothing recompiles).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax

from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib
from dymu_jax.train import state as state_lib

_DATASET = flags.DEFINE_string("dataset", "synthetic", "Dataset name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset folder (not for synthetic).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side (0 = dataset's own).")
_METHOD = flags.DEFINE_string("method", "static", "Method name.")
_BACKBONE = flags.DEFINE_string("backbone", "resnet_small", "Backbone.")
_HEAD_WIDTH = flags.DEFINE_integer("head_width", 64, "Decoder hidden width.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 5, "Untimed steps (compilation).")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps.")
_PARALLEL = flags.DEFINE_enum("parallel", "mesh", list(train_lib.MODES), "Parallel mode.")


def main(argv):
  del argv
  config = data_lib.DataConfig(name=_DATASET.value, data_dir=_DATA_DIR.value,
                               image_size=_IMAGE_SIZE.value, num_train=4096, num_test=256)
  source = data_lib.load(config, "train")
  method = methods_lib.build(
      _METHOD.value, source.tasks,
      model_options={"backbone": _BACKBONE.value, "head_width": _HEAD_WIDTH.value},
      axis_name=train_lib.method_axis_name(_PARALLEL.value))
  par = train_lib.Parallel(_PARALLEL.value)
  optimizer = train_lib.TrainConfig().make_optimizer()
  batcher = data_lib.Batcher(source, _BATCH.value, seed=0)
  state = par.place_state(par.init_state(
      state_lib.init_fn(method, optimizer), jax.random.PRNGKey(0), batcher.batch(0)))
  step_fn = par.compile_step(method, optimizer, source.tasks)
  total = _WARMUP.value + _STEPS.value
  batches = data_lib.prefetch(par.shard_batches(batcher(0, total)), 2)

  def run(num_steps, state):
    with train_lib.CompileCounter() as compiles:
      start = time.perf_counter()
      for _ in range(num_steps):
        state, metrics = step_fn(state, next(batches))
      jax.block_until_ready(metrics)
    return state, time.perf_counter() - start, compiles.count

  state, warm_s, warm_compiles = run(_WARMUP.value, state)
  state, timed_s, timed_compiles = run(_STEPS.value, state)
  print(f"{_METHOD.value} {_BACKBONE.value} on {_DATASET.value} {source.image_shape}, "
        f"batch {_BATCH.value}, {_PARALLEL.value} over {par.num_devices} device(s):")
  print(f"  warm-up: {_WARMUP.value} steps in {warm_s:.1f} s, step compilations "
        f"{warm_compiles}")
  print(f"  timed:   {_STEPS.value} steps in {timed_s:.2f} s = "
        f"{_STEPS.value * _BATCH.value / timed_s:.1f} examples/s, step compilations "
        f"{timed_compiles}")


if __name__ == "__main__":
  app.run(main)
