"""Where a CPU train step spends its time: each op of the step alone, JAX against PyTorch.

  python -m benchmarks.step_profile                    # LeNet (batch 256) and ResNet-small (64)
  python -m benchmarks.step_profile --models=lenet --repeats=7
  python -m benchmarks.step_profile --trace            # the compiled step itself, per kernel

`benchmarks.step_speed` times whole steps; this splits them. Every op of the static baseline's
step (convolution, batch norm, ReLU, 2x2 max pool, dense layer, the Adam update) runs forward
and backward on its own, at the shapes it has in the step, in both frameworks:

* `jax`: the op as the project runs it (`models.fast_ops`: the chosen convolution lowering, the
  closed-form batch-norm gradient, the cheap pooling gradient), jitted, one compiled call per
  timed run, gradient with respect to what the step differentiates (the first layer's input
  is not differentiated, as in the step);
* `plain`: the same traced within `fast_ops.plain()` (XLA's own ops);
* `torch`: eager PyTorch on NCHW tensors, `backward()` on the same cotangent.

Each op is timed in `--repeats` alternating rounds of `--iters` calls and the table shows the
median ms per call, torch / jax (> 1: JAX is faster) and each op's share of the summed JAX time.
The last rows time one Adam update over the model's parameter count and the sum of the ops.
Comparing the sum with `step_speed`'s full step shows what the ops miss (fusion across ops,
dispatch). Run it on an otherwise idle machine: the figures are short and load distorts them.

`--trace` instead profiles the project's whole compiled train step (`step_speed`'s) with
`jax.profiler` and lists the kernels XLA ran in it ("thunks": fusions, GEMMs, convolutions),
with ms per step, share of the step, the op of the model each came from (HLO metadata) and
what it computes. Kernels that hand their work to the thread pool (XLA's own convolutions and
some dots) return at once: their time shows as the part of the step that no kernel covers.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import re
import statistics
import tempfile
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import step_speed
from dymu_jax.models import fast_ops

_ITERS = flags.DEFINE_integer("iters", 10, "Calls per timed run.")
# --models, --repeats, --torch_threads (0 here: one thread per usable core) and the batch flags
# are step_speed's, whose step --trace profiles.
_MODELS, _REPEATS, _TORCH_THREADS = (step_speed._MODELS, step_speed._REPEATS,  # pylint: disable=protected-access
                                     step_speed._TORCH_THREADS)  # pylint: disable=protected-access
_TRACE = flags.DEFINE_bool("trace", False, "Profile the compiled full step per XLA kernel "
                           "instead of timing the ops alone.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 20, "Steps traced with --trace.")
_TRACE_ROWS = flags.DEFINE_integer("trace_rows", 16, "Kernels listed with --trace.")

# (name, kind, input NHWC shape, options) of every op of the step, forward order. (The
# static LeNet has no batch norm: PHN's network, `LeNet.batch_norm=False`.)
OPS = {
    "lenet": [
        ("conv1 1->10 9x9", "conv", (256, 36, 36, 1), dict(cout=10, k=9, first=True)),
        ("relu+pool1", "relu_pool", (256, 28, 28, 10), {}),
        ("conv2 10->20 5x5", "conv", (256, 14, 14, 10), dict(cout=20, k=5)),
        ("relu+pool2", "relu_pool", (256, 10, 10, 20), {}),
        ("fc 500->50", "dense", (256, 500), dict(cout=50)),
        ("heads 50->2x10", "dense", (256, 50), dict(cout=20)),
    ],
    "resnet_small": [
        ("stem 3->16 3x3", "conv", (64, 32, 32, 3), dict(cout=16, k=3, first=True, pad=1)),
        ("4x conv 16->16 3x3", "conv", (64, 32, 32, 16), dict(cout=16, k=3, pad=1, count=4)),
        ("conv 16->32 3x3 s2", "conv", (64, 32, 32, 16), dict(cout=32, k=3, pad=1, stride=2)),
        ("3x conv 32->32 3x3", "conv", (64, 16, 16, 32), dict(cout=32, k=3, pad=1, count=3)),
        ("conv 32->64 3x3 s2", "conv", (64, 16, 16, 32), dict(cout=64, k=3, pad=1, stride=2)),
        ("3x conv 64->64 3x3", "conv", (64, 8, 8, 64), dict(cout=64, k=3, pad=1, count=3)),
        ("conv 64->128 3x3 s2", "conv", (64, 8, 8, 64), dict(cout=128, k=3, pad=1, stride=2)),
        ("3x conv 128->128 3x3", "conv", (64, 4, 4, 128), dict(cout=128, k=3, pad=1, count=3)),
        ("5x bn 32x32x16", "bn", (64, 32, 32, 16), dict(count=5)),
        ("4x bn 16x16x32", "bn", (64, 16, 16, 32), dict(count=4)),
        ("4x bn 8x8x64", "bn", (64, 8, 8, 64), dict(count=4)),
        ("4x bn 4x4x128", "bn", (64, 4, 4, 128), dict(count=4)),
    ],
}
# Parameter counts of the static networks (`experiments.evaluate`'s cost tables: 37.1 K and
# 0.73 M), rounded: the size of the Adam row's update.
PARAMS = {"lenet": 37_100, "resnet_small": 730_000}


def _ms_per_call(fn: Callable[[], None], iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return 1000 * (time.perf_counter() - start) / iters


def _jax_op(kind: str, shape, opts, plain: bool) -> Callable[[], None]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  if kind == "conv":
    k, cin, cout = opts["k"], shape[-1], opts["cout"]
    w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) * 0.1, jnp.float32)
    stride, pad = opts.get("stride", 1), opts.get("pad", 0)

    def f(x, w):
      return fast_ops.conv2d(x, w, strides=(stride, stride), padding=((pad, pad), (pad, pad)))
    args, argnums = (x, w), (1,) if opts.get("first") else (0, 1)
  elif kind == "bn":
    def f(x):
      return fast_ops.batch_normalize(x, 1e-5)[0]
    args, argnums = (x,), (0,)
  elif kind == "relu_pool":
    def f(x):
      return fast_ops.max_pool_2x2(jax.nn.relu(x))
    args, argnums = (x,), (0,)
  else:
    w = jnp.asarray(rng.standard_normal((shape[-1], opts["cout"])) * 0.1, jnp.float32)

    def f(x, w):
      return x @ w
    args, argnums = (x, w), (0, 1)

  def loss(*a):
    out = f(*a)
    return jnp.sum(out * out) * 0.5  # cotangent = the output itself

  with fast_ops.plain(plain):
    step = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
  count = opts.get("count", 1)

  def run():
    for _ in range(count):
      out = step(*args)
    jax.block_until_ready(out)
  run()
  return run


def _torch_op(kind: str, shape, opts) -> Callable[[], None]:
  import torch
  import torch.nn.functional as F
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
  if x.ndim == 4:
    x = x.permute(0, 3, 1, 2).contiguous()
  count = opts.get("count", 1)
  if kind == "conv":
    k, cin, cout = opts["k"], shape[-1], opts["cout"]
    w = torch.tensor(rng.standard_normal((cout, cin, k, k)) * 0.1, dtype=torch.float32,
                     requires_grad=True)
    x.requires_grad_(not opts.get("first"))

    def f():
      return F.conv2d(x, w, stride=opts.get("stride", 1), padding=opts.get("pad", 0))
    leaves = [w] + ([] if opts.get("first") else [x])
  elif kind == "bn":
    x.requires_grad_(True)

    def f():
      return F.batch_norm(x, None, None, training=True, eps=1e-5)
    leaves = [x]
  elif kind == "relu_pool":
    x.requires_grad_(True)

    def f():
      return F.max_pool2d(F.relu(x), 2)
    leaves = [x]
  else:
    w = torch.tensor(rng.standard_normal((shape[-1], opts["cout"])) * 0.1,
                     dtype=torch.float32, requires_grad=True)
    x.requires_grad_(True)

    def f():
      return x @ w
    leaves = [w, x]

  def run():
    for _ in range(count):
      for leaf in leaves:
        leaf.grad = None
      out = f()
      (0.5 * (out * out).sum()).backward()
  run()
  return run


def _adam_ops(num_params: int):
  import torch
  params = jnp.zeros((num_params,), jnp.float32)
  grads = jnp.ones((num_params,), jnp.float32) * 1e-3
  opt = optax.adam(1e-3)
  state = opt.init(params)

  @jax.jit
  def update(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  update(params, state, grads)

  def run_jax():
    jax.block_until_ready(update(params, state, grads))
  p = torch.zeros(num_params, requires_grad=True)
  p.grad = torch.ones(num_params) * 1e-3
  topt = torch.optim.Adam([p], lr=1e-3)
  topt.step()
  return run_jax, run_jax, topt.step  # no plain variant: optax's update is the same in both


def profile(model: str, repeats: int, iters: int) -> list[tuple[str, float, float, float]]:
  rows = []
  entries = [(name, kind, shape, opts) for name, kind, shape, opts in OPS[model]]
  for name, kind, shape, opts in entries + [("adam update", "adam", None, {})]:
    if kind == "adam":
      runners = _adam_ops(PARAMS[model])
    else:
      runners = (_jax_op(kind, shape, opts, plain=True), _jax_op(kind, shape, opts, plain=False),
                 _torch_op(kind, shape, opts))
    times = [[], [], []]
    for _ in range(repeats):
      for i, run in enumerate(runners):
        times[i].append(_ms_per_call(run, iters))
    rows.append((name, *(statistics.median(t) for t in times)))
  return rows


def _hlo_ops(compiled_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (shape, op_name metadata) of an optimised HLO module's text."""
  ops = {}
  for line in compiled_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      ops.setdefault(match.group(1), (match.group(2), op_name.group(1) if op_name else ""))
  return ops


def trace_step(model: str, steps: int, rows: int) -> None:
  """Per-kernel profile of the project's compiled train step (see the module doc)."""
  batches = step_speed.make_batches(model, step_speed.batch_size(model))
  run, compiled_text = step_speed.project_runner(model, batches, with_hlo=True)
  run(3)
  ops = _hlo_ops(compiled_text)
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      seconds = run(steps)
    path = next(pathlib.Path(folder).rglob("*perfetto_trace.json.gz"))
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_kernel = collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") == "X" and name in ops:
      per_kernel[name] += event["dur"] / 1000 / steps
  step_ms = 1000 * seconds / steps
  covered = sum(per_kernel.values())
  print(f"\n{model}: {step_ms:.1f} ms per step (traced), kernels {covered:.1f} ms; "
        f"per kernel, ms per step:")
  print(f"{'kernel':32s} {'ms':>6s} {'share':>6s}  {'shape':24s} op")
  for name, ms in per_kernel.most_common(rows):
    shape, op_name = ops[name]
    op_name = op_name.replace("jit(train_step)/", "")
    print(f"{name[:32]:32s} {ms:6.2f} {100 * ms / step_ms:5.0f}%  {shape[:24]:24s} "
          f"{op_name[:90]}")
  rest = covered - sum(ms for _, ms in per_kernel.most_common(rows))
  print(f"{'other kernels':32s} {rest:6.2f} {100 * rest / step_ms:5.0f}%")
  print(f"{'no kernel (pool work, waits)':32s} {step_ms - covered:6.2f} "
        f"{100 * (step_ms - covered) / step_ms:5.0f}%  (XLA convolutions and dots run here)")
  # The same time by what the kernels compute: the last part of their op name ("stack": the
  # Toeplitz patch matrices, "dot_general": GEMMs, "conv_general_dilated": XLA convolutions).
  by_kind = collections.Counter()
  for name, ms in per_kernel.items():
    by_kind[ops[name][1].rsplit("/", 1)[-1] or "(no op name)"] += ms
  print("by op kind: " + ", ".join(f"{kind} {ms:.1f} ms ({100 * ms / step_ms:.0f}%)"
                                   for kind, ms in by_kind.most_common(8)))


def main(argv):
  del argv
  if _TRACE.value:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}")
    for model in _MODELS.value:
      trace_step(model, _TRACE_STEPS.value, _TRACE_ROWS.value)
    return
  import torch
  threads = _TORCH_THREADS.value or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({threads} threads), {len(os.sched_getaffinity(0))} cores, load average "
        f"{os.getloadavg()[0]:.1f}; forward + backward per op, median ms over {_REPEATS.value} "
        f"rounds of {_ITERS.value} calls")
  for model in _MODELS.value:
    if model not in OPS:
      raise app.UsageError(f"Unknown model {model!r}; available: {', '.join(OPS)}.")
    rows = profile(model, _REPEATS.value, _ITERS.value)
    total = [sum(r[i] for r in rows) for i in (1, 2, 3)]
    print(f"\n{model}")
    print(f"{'op':24s} {'plain ms':>9s} {'jax ms':>9s} {'torch ms':>9s} {'torch/jax':>9s} "
          f"{'jax share':>9s}")
    for name, plain, fast, torch_ms in rows + [("sum", *total)]:
      print(f"{name:24s} {plain:9.2f} {fast:9.2f} {torch_ms:9.2f} {torch_ms / fast:9.2f} "
            f"{100 * fast / total[1]:8.0f}%")
  print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
