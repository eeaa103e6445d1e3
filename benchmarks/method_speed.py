"""Train-step speed of each method relative to the static step, beside its theoretical ratio.

  python -m benchmarks.method_speed                         # LeNet and ResNet-small
  python -m benchmarks.method_speed --models=lenet --methods=static,ecmt --repeats=5

The models and synthetic batches are those of `benchmarks.step_speed` (Multi-MNIST LeNet at
batch 256, UTKFace-size ResNet-small at batch 64). Every method's compiled, state-donating step
(`methods.build` + `Parallel.compile_step`, as `dymu_jax.train.train` runs it) is timed in
`--repeats` rounds that alternate the methods, so load from other processes hits all alike; the
table shows samples/s (median over rounds), the ratio to the static step and the theoretical
ratio: the MACs one step computes relative to the static step's, with a backward pass counted
as two forwards (the convention of `experiments.evaluate`):

* static: forward + one backward = 3 F (F: the network's forward MACs per example);
* gradsplit, pcgrad: forward + T backward passes (one per task) = (1 + 2 T) F, plus the
  per-step gradient arithmetic the method reports (`gradient_macs_per_step`);
* ecmt: the SuperNet, the smallest SubNet (sliced: its own MACs m F) and K - 2 random SubNets,
  which run masked at full width: 3 (1 + m + (K - 2)) F. The "useful" ratio beside it counts
  the random SubNets at their own expected MACs (what a sliced implementation would cost, at K
  - 2 compilations per distinct configuration): 3 (1 + m + (K - 2) E[r]) F.
"""

from __future__ import annotations

import statistics

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import step_speed
from dymu_jax import methods as methods_lib
from dymu_jax.methods import ecmt
from dymu_jax.models import cost as cost_lib
from dymu_jax.models.widths import WidthConfig

_METHODS = flags.DEFINE_list("methods", ["static", "ecmt", "gradsplit", "pcgrad"],
                             "Methods to time (static is always included as the reference).")
_NUM_SUBNETS = flags.DEFINE_integer("num_subnets", 4, "ECMT: configurations per step (K).")

FLAGS = flags.FLAGS


def build(model: str, name: str):
  spec = step_speed.SPECS[model]
  options = {"num_subnets": _NUM_SUBNETS.value} if name == "ecmt" else {}
  return methods_lib.build(
      name, spec["tasks"], method_options=options,
      model_options={"backbone": spec["backbone"], "head_width": step_speed.head_width(model)})


def theoretical(method, name: str, image_shape, batch_size: int, params) -> tuple[float, float]:
  """(MACs per example of one step relative to static's, the "useful" ratio; see the top)."""
  model = method.model
  images = jax.ShapeDtypeStruct((1, *image_shape), np.float32)
  forward = cost_lib.count(model, None, images, train=False).macs
  if name == "ecmt":
    table = ecmt.build_cost_table(model, image_shape, method.width_choices)
    smallest = table.smallest_macs / table.full_macs
    rng = np.random.default_rng(0)
    choices = method.width_choices
    draws = [table.macs(WidthConfig(tuple(rng.choice(choices, method.num_stages)),
                                    tuple(rng.choice(choices, len(method.tasks)))))
             for _ in range(2000)]
    expected = float(np.mean(draws)) / table.full_macs
    k = method.num_subnets
    return 1 + smallest + (k - 2), 1 + smallest + (k - 2) * expected
  passes = int(getattr(method, "backward_passes", 1))
  extra = getattr(method, "gradient_macs_per_step", None)
  extra = int(extra(params)) / batch_size if extra is not None else 0.0
  ratio = (forward * (1 + 2 * passes) + extra) / (3 * forward)
  return ratio, ratio


def main(argv):
  del argv
  names = ["static"] + [m for m in _METHODS.value if m != "static"]
  unknown = [m for m in names if m not in methods_lib.METHODS]
  if unknown:
    raise app.UsageError(f"Unknown methods {unknown}; choose from {', '.join(methods_lib.METHODS)}.")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, load average "
        f"{__import__('os').getloadavg()[0]:.1f}; {FLAGS.steps} steps per run, median of "
        f"{FLAGS.repeats} alternating runs")
  print(f"{'model':<14}{'method':<11}{'samples/s':>10}{'vs static':>10}{'theory':>8}"
        f"{'useful':>8}   runs")
  for model in FLAGS.models:
    size = step_speed.batch_size(model)
    batches = step_speed.make_batches(model, size)
    image_shape = step_speed.SPECS[model]["image_shape"]
    built = {name: build(model, name) for name in names}
    runners = {name: step_speed.step_runner(m, batches) for name, m in built.items()}
    for run in runners.values():
      run(FLAGS.warmup_steps)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(FLAGS.repeats):
      for name, run in runners.items():
        rates[name].append(FLAGS.steps * size / run(FLAGS.steps))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name in names:
      params = built[name].init(jax.random.PRNGKey(0), {"image": np.zeros(
          (1, *image_shape), np.float32)})["params"]
      ratio, useful = theoretical(built[name], name, image_shape, size, params)
      print(f"{model:<14}{name:<11}{medians[name]:>10.0f}"
            f"{medians['static'] / medians[name]:>9.2f}x{ratio:>7.2f}x{useful:>7.2f}x   "
            + " ".join(f"{r:.0f}" for r in rates[name]))
  print("vs static = static samples/s / method samples/s (the step's slowdown); theory and "
        "useful: MACs per step relative to static (see the module docstring).")


if __name__ == "__main__":
  app.run(main)
