"""How the library executes on the backend at hand: op lowerings and repeated (per-task) passes.

Two choices were measured on a 2-core CPU and are wrong elsewhere:

* `fast_ops`: the CPU rewrites of `models/fast_ops.py` (Toeplitz/dense convolution lowerings,
  a custom max-pool gradient, a closed-form batch-norm gradient). On CPU they make the LeNet
  step about 26 % and the ResNet-small step about 5 % faster (figures in `fast_ops`); the
  Toeplitz lowering does more multiply-adds than a direct convolution, which a GPU's or TPU's
  native convolution does not need.
* `passes`: how repeated passes over one batch run, "unrolled" (one copy per pass in the
  program) or "vmap" (one batched pass): the T per-task backward passes of PCGrad and
  GradSplit, and ECMT's K - 2 sampled SubNets. On CPU a `vmap` batches the convolution
  gradients, which ran the PCGrad step about 1.8x and the ECMT step about 1.25x slower
  (`benchmarks/method_speed.py`); on accelerators one batched program is the usual winner.

Defaults, per `jax.default_backend()`: on "cpu" fast ops on and unrolled; on any other backend
(gpu, tpu, ...) plain XLA ops and vmap. One switch overrides them: the flag `--execution`
of the experiment commands, or the environment variable `DYMU_JAX_EXECUTION` (read at import),
with a value of

* "auto" (default): the backend's defaults above;
* "cpu" or "accelerator": that backend's defaults whatever the backend;
* comma-separated overrides on top of "auto", e.g. "fast_ops=off" or
  "fast_ops=on,passes=vmap".

Choices are read while tracing: a function jitted before a change keeps what it compiled.
`DYMU_JAX_PLAIN_OPS=1` (older switch) and `fast_ops.plain()` still turn the rewrites off.
"""

from __future__ import annotations

import dataclasses
import os

import jax

ENV_VAR = "DYMU_JAX_EXECUTION"
PASSES = ("unrolled", "vmap")
_ON_OFF = {"on": True, "off": False}


@dataclasses.dataclass(frozen=True)
class Choices:
  """What runs: the CPU op rewrites or plain XLA ops, and whether repeated passes batch."""
  fast_ops: bool
  passes: str  # one of PASSES

  def describe(self) -> str:
    return (f"fast_ops={'on' if self.fast_ops else 'off'},"
            f"passes={self.passes}")


CPU = Choices(fast_ops=True, passes="unrolled")
ACCELERATOR = Choices(fast_ops=False, passes="vmap")


def backend_defaults(backend: str | None = None) -> Choices:
  """The measured defaults for `backend` (default: `jax.default_backend()`)."""
  backend = jax.default_backend() if backend is None else backend
  return CPU if backend == "cpu" else ACCELERATOR


def parse(spec: str) -> dict[str, object]:
  """The overrides a switch value names ("auto" -> none); ValueError naming what is allowed."""
  spec = (spec or "auto").strip().lower()
  if spec == "auto":
    return {}
  if spec in ("cpu", "accelerator"):
    return dataclasses.asdict(CPU if spec == "cpu" else ACCELERATOR)
  allowed = ("'auto', 'cpu', 'accelerator', or comma-separated fast_ops=on|off and "
             "passes=unrolled|vmap")
  overrides: dict[str, object] = {}
  for item in spec.split(","):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or key not in ("fast_ops", "passes"):
      raise ValueError(f"Execution choice {item.strip()!r} in {spec!r} is not one of "
                       f"{allowed}.")
    if key == "fast_ops":
      if value not in _ON_OFF:
        raise ValueError(f"fast_ops={value!r} must be 'on' or 'off'.")
      overrides[key] = _ON_OFF[value]
    else:
      if value not in PASSES:
        raise ValueError(f"passes={value!r} must be one of {', '.join(PASSES)}.")
      overrides[key] = value
  return overrides


_spec = os.environ.get(ENV_VAR, "auto")
_overrides = parse(_spec)


def configure(spec: str) -> Choices:
  """Sets the switch (as `--execution` does) and returns the choices now in force."""
  global _spec, _overrides
  _overrides = parse(spec)
  _spec = spec
  return choices()


def spec() -> str:
  """The switch's current value."""
  return _spec


def choices() -> Choices:
  """The choices in force: the backend's defaults with the switch's overrides."""
  return dataclasses.replace(backend_defaults(), **_overrides)


def map_stacked(fn, *args):
  """`[fn(*args[i]) for i]` stacked on a new leading axis, unrolled or vmapped (`passes`).

  Every argument (a pytree) carries the pass index on its leading axis; `fn` returns a pytree.
  """
  if choices().passes == "vmap":
    return jax.vmap(fn)(*args)
  count = len(jax.tree.leaves(args)[0])
  outputs = [fn(*jax.tree.map(lambda a, t=t: a[t], args)) for t in range(count)]
  return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *outputs)
