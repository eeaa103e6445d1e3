"""How long DYMU's inference controller takes to answer a new (preference, resource) request.

  python -m benchmarks.controller_latency --workdir=workdirs/multi_mnist_dymu
  python -m benchmarks.controller_latency          # random DYMU on Multi-MNIST-sized LeNet

`controller.predict(r, c)` runs the edge hypernetwork (-> argmax tree, a static structure) and
the weight hypernetwork (-> the anchor's variables with batch-norm shifts). Both are jitted on
(r, c) as arrays, so only the first request compiles; afterwards a new preference costs one
small MLP call each. Running the predicted network on images compiles once per distinct tree
(the tree is static: only its nodes compute), so the report separates:

  * predict, first call: compilation of both hypernetworks included;
  * predict, new requests: median / 90th percentile over `--requests` fresh random (r, c)
    (r ~ Dirichlet(1), c ~ U[0, 1]), adapted variables ready (`block_until_ready`);
  * forward, first call per tree: compilation of that tree's network included (median);
  * forward, compiled tree: median over the requests whose tree was already compiled.

With `--workdir` the trained run (the parent folder of a `--dymu_stage=all` run, or its edge or
weight stage) is loaded with its data; without it, a DYMU with random anchor and hypernetworks
on the LeNet of multi_mnist_dymu.flags (36 x 36 x 1 images, batch norm) is timed, which needs
no data: latency does not depend on the weights.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import dymu
from dymu_jax import runs as runs_lib

# --workdir (a trained DYMU run; default: random weights, no data needed) and --data_dir (where
# its dataset is now, if it moved) are the experiments' flags.
_REQUESTS = flags.DEFINE_integer("requests", 100, "Fresh random (r, c) requests to time.")
_BATCH = flags.DEFINE_integer("batch", 32, "Images per forward call.")
_SEED = flags.DEFINE_integer("request_seed", 0,
                             "Seed of the requests, images and random weights.")

FLAGS = flags.FLAGS

DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
MNIST_SHAPE = (36, 36, 1)


def _random_dymu(seed: int):
  """(weight-stage method, variables, image shape): random anchor and hypernetworks (`init`'s
  stand-ins of the frozen anchor and edge hypernetwork are random draws of their shapes)."""
  model = {"backbone": "lenet", "backbone_kwargs": {"batch_norm": True}, "head_width": 50}
  batch = {"image": jnp.zeros((1, *MNIST_SHAPE), jnp.float32),
           "left": jnp.zeros((1,), jnp.int32), "right": jnp.zeros((1,), jnp.int32)}
  method = dymu.build(DIGITS, model_options=model, stage="weight")
  variables = method.init(jax.random.key(seed), batch)
  # The weight hypernetwork's head starts at zero; random shifts time the same.
  return method, variables, MNIST_SHAPE


def _trained_dymu(workdir: str, data_dir: str | None):
  run = runs_lib.load_run(runs_lib.resolve(workdir), data_dir=data_dir)
  if not isinstance(run.method, dymu.DymuMethod) or run.method.stage == "anchor":
    raise ValueError(f"{run.workdir} is not a DYMU edge or weight stage; give a run trained "
                     f"with --method=dymu past its anchor stage.")
  return run.method, run.variables, tuple(run.test_source.image_shape)


def _ms(seconds: float) -> str:
  return f"{1000 * seconds:8.2f} ms"


def main(argv):
  del argv
  if FLAGS.workdir:
    method, variables, image_shape = _trained_dymu(FLAGS.workdir, FLAGS.data_dir or None)
    source = f"trained run {FLAGS.workdir} (stage {method.stage})"
  else:
    method, variables, image_shape = _random_dymu(_SEED.value)
    source = "random DYMU, Multi-MNIST LeNet with batch norm"
  rng = np.random.default_rng(_SEED.value)
  images = jnp.asarray(rng.uniform(size=(_BATCH.value, *image_shape)), jnp.float32)
  requests = [(rng.dirichlet(np.ones(method.num_tasks)).astype(np.float32),
               float(rng.uniform())) for _ in range(_REQUESTS.value + 1)]
  controller = method.controller(variables)

  def predict(r, c):
    started = time.perf_counter()
    tree, adapted = controller.predict(r, c)
    jax.block_until_ready(adapted)
    return tree, adapted, time.perf_counter() - started

  def forward(tree, adapted):
    started = time.perf_counter()
    jax.block_until_ready(dymu.apply_tree(method.net, adapted, images, tree))
    return time.perf_counter() - started

  tree, adapted, first_predict = predict(*requests[0])
  first_forward = {tree: forward(tree, adapted)}
  predict_times, compiled_forward = [], []
  for r, c in requests[1:]:
    tree, adapted, seconds = predict(r, c)
    predict_times.append(seconds)
    if tree in first_forward:
      compiled_forward.append(forward(tree, adapted))
    else:
      first_forward[tree] = forward(tree, adapted)

  print(f"DYMU controller latency: {source}, {method.num_tasks} tasks, images "
        f"{'x'.join(map(str, image_shape))}, {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s))")
  print(f"  predict(r, c), first call (compiles):   {_ms(first_predict)}")
  print(f"  predict(r, c), new request, median:     {_ms(statistics.median(predict_times))}"
        f"   (90th percentile {_ms(float(np.percentile(predict_times, 90))).strip()}, "
        f"{len(predict_times)} requests)")
  print(f"  forward of {_BATCH.value} images, new tree (compiles), median: "
        f"{_ms(statistics.median(first_forward.values()))}   ({len(first_forward)} distinct "
        f"trees)")
  if compiled_forward:
    print(f"  forward of {_BATCH.value} images, compiled tree, median: "
          f"{_ms(statistics.median(compiled_forward))}")


if __name__ == "__main__":
  app.run(main)
