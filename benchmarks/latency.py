"""Forward latency of width configurations next to their analytic MACs.

  python -m benchmarks.latency --backbone=resnet_small --image_size=64 --batch=32

For every configuration: the jitted evaluation-mode forward of the backbone is compiled, run
`--warmup` times, then timed `--repeats` times (median, with `block_until_ready`). Printed next
to it: analytic MACs and used parameters per example (`models/cost.py`, padding taps included as
usual), XLA's whole-program count of the compiled forward per example (multiply-adds = flops / 2,
elementwise work included, padding taps excluded), and the latency relative to the full width.
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from dymu_jax.models import backbones, cost

_BACKBONE = flags.DEFINE_enum("backbone", "resnet_small", list(backbones.REGISTRY),
                              "Backbone to time.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input side length in pixels.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed runs per configuration (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed runs after compilation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")


def width_configs(num_stages: int) -> dict[str, tuple[float, ...]]:
  """Uniform widths from full to the smallest, and two mixed ones (narrow early / late)."""
  configs = {f"uniform {m:g}": (m,) * num_stages for m in (1.0, 0.75, 0.5, 0.25)}
  ramp = tuple(0.25 + 0.75 * s / max(num_stages - 1, 1) for s in range(num_stages))
  configs["narrow early"] = tuple(min((0.25, 0.5, 0.75, 1.0), key=lambda c: abs(c - r))
                                  for r in ramp)
  configs["narrow late"] = configs["narrow early"][::-1]
  return configs


def time_forward(fn, *args, warmup: int, repeats: int):
  """(compiled program, compile seconds, median seconds per call) of a jitted function."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    timings.append(time.perf_counter() - start)
  return compiled, compile_s, statistics.median(timings)


def main(argv):
  del argv
  name, size, batch = _BACKBONE.value, _IMAGE_SIZE.value, _BATCH.value
  net = backbones.get_backbone(name)()
  channels = 1 if name == "lenet" else 3
  key_init, key_x = jax.random.split(jax.random.key(_SEED.value))
  x = jax.random.uniform(key_x, (batch, size, size, channels), jnp.float32)
  variables = jax.jit(net.init)(key_init, x)
  print(f"{name}, {size}x{size}x{channels} images, batch {batch}, on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}); median of "
        f"{_REPEATS.value} runs after {_WARMUP.value} warm-up runs.")
  header = (f"{'configuration':<14} {'widths':<26} {'MMACs/img':>10} {'XLA MMACs':>10} "
            f"{'params':>10} {'ms/batch':>9} {'ms/img':>8} {'vs full':>8} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  full_ms = None
  for label, widths in width_configs(net.num_stages).items():
    fn = lambda v, x_, w=widths: net.apply(v, x_, widths=w, train=False)
    analytic = cost.count(net, variables, x, widths=widths, train=False)
    compiled, compile_s, median_s = time_forward(fn, variables, x, warmup=_WARMUP.value,
                                                 repeats=_REPEATS.value)
    xla_flops = cost.compiled_flops(compiled)
    ms = median_s * 1e3
    full_ms = full_ms or ms
    print(f"{label:<14} {','.join(f'{w:g}' for w in widths):<26} {analytic.macs / 1e6:>10.2f} "
          f"{xla_flops / 2 / batch / 1e6:>10.2f} {analytic.params:>10,d} {ms:>9.2f} "
          f"{ms / batch:>8.3f} {ms / full_ms:>8.2f} {compile_s:>9.2f}")


if __name__ == "__main__":
  app.run(main)
