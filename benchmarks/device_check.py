"""One table of what matters on the device at hand: every method's train step, its variants.

  python -m benchmarks.device_check             # ResNet-18 at 128x128 on synthetic scenes
  python -m benchmarks.device_check --quick     # about a minute on CPU (the test suite runs it)
  python -m benchmarks.device_check --image_size=256 --batch_size=256 --json_out=device.json

Whatever backend JAX finds (CPU, GPU, TPU), each row compiles and times one method's train step
as `dymu_jax.train.train` runs it (`methods.build` + `Parallel.compile_step`, state donated,
device batches):

* static, ECMT, GradSplit and PCGrad on synthetic scenes (segmentation, depth, normals, edges)
  with `--backbone` (default ResNet-18) at `--image_size` (default 128);
* DYMU's four stages (pretrain, anchor, edge, weight) with ResNet-small streams and the
  UTKFace tasks (age, gender, race) at the same image size, on random images: branched networks
  have no ResNet-18 streams and no dense decoders yet (issue "DYMU on dense prediction");
* each at the backend's default execution (`dymu_jax.execution`: on CPU the fast-op rewrites
  and unrolled per-task passes, on GPU/TPU plain XLA ops and vmap) in float32 and bfloat16
  (`compute_dtype`), and the ablations: static with the fast ops flipped, ECMT, GradSplit and
  PCGrad with the passes flipped (unrolled <-> vmap).

Columns: samples/s and step time (median of `--repeats` timings of `--steps` steps), compile
time (lowering + XLA compilation of the step), compilations while compiling and while timing
(the second must be 0: no recompilation per step), the compiled step's memory (arguments +
outputs + temporaries, from XLA's memory analysis), and the device's peak memory so far (GPU
and TPU report it; "n/a" on CPU). Under the table: the input pipeline's examples/s (one
thread, the synthetic-scenes `Batcher` at the same size and batch) next to the fastest step's
consumption.

`--quick` shrinks everything so the whole check runs in about a minute on a CPU: a two-stage
ResNet-small (8 and 16 channels) at 16 px, batch 4, 2 steps, every method on the UTKFace tasks
(random images: compiling four dense decoders dominated), one float32 row per method and
stage plus static in bfloat16, static with the fast ops flipped and PCGrad with the passes
flipped.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from dymu_jax import data as data_lib
from dymu_jax import execution
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib
from dymu_jax.data import utkface
from dymu_jax.methods import dymu
from dymu_jax.train import state as state_lib

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: about a minute on CPU.")
_BACKBONE = flags.DEFINE_string("backbone", "resnet18", "Backbone of the synthetic-scene rows.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image side in pixels.", lower_bound=16)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Global batch; 0 = 128 on an accelerator, 16 on CPU.", lower_bound=0)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timings per row (the median is shown).",
                                lower_bound=1)
_ROWS = flags.DEFINE_list("rows", [], "Only rows whose method label starts with one of these "
                          "(e.g. static,dymu); empty = all.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write the rows to this JSON file.")

DENSE_METHODS = ("static", "ecmt", "gradsplit", "pcgrad")
REPEATED_PASSES = ("ecmt", "gradsplit", "pcgrad")  # methods with unrolled/vmapped passes
DYMU_STAGES = ("pretrain", "anchor", "edge", "weight")


@dataclasses.dataclass(frozen=True)
class Setup:
  backbone: str
  backbone_kwargs: tuple[tuple[str, Any], ...]
  dymu_kwargs: tuple[tuple[str, Any], ...]
  image_size: int
  batch_size: int
  head_width: int
  steps: int
  repeats: int
  quick: bool


def setup_from_flags() -> Setup:
  accelerator = jax.default_backend() != "cpu"
  if _QUICK.value:
    small = (("stage_channels", (8, 16)), ("stage_sizes", (1, 1)))
    return Setup("resnet_small", small, small, 16, _BATCH_SIZE.value or 4, 8, 2, 1, True)
  return Setup(_BACKBONE.value, (), (), _IMAGE_SIZE.value,
               _BATCH_SIZE.value or (128 if accelerator else 16), 64, _STEPS.value,
               _REPEATS.value, False)


def flipped(choices: execution.Choices, what: str) -> str:
  """The `--execution` value that flips one choice of the backend's defaults."""
  if what == "fast_ops":
    return f"fast_ops={'off' if choices.fast_ops else 'on'}"
  return f"passes={'vmap' if choices.passes == 'unrolled' else 'unrolled'}"


def plan(setup: Setup) -> list[tuple[str, str, str]]:
  """(method label, `--execution` value, compute dtype) of every row."""
  defaults = execution.backend_defaults()
  rows = []
  for name in DENSE_METHODS:
    rows.append((name, "auto", "float32"))
    if not setup.quick or name == "static":
      rows.append((name, "auto", "bfloat16"))
    if name == "static":
      rows.append((name, flipped(defaults, "fast_ops"), "float32"))
    elif not setup.quick or name == "pcgrad":
      rows.append((name, flipped(defaults, "passes"), "float32"))
  for stage in DYMU_STAGES:
    rows.append((f"dymu {stage}", "auto", "float32"))
    if not setup.quick:
      rows.append((f"dymu {stage}", "auto", "bfloat16"))
  if _ROWS.value:
    rows = [r for r in rows if any(r[0].startswith(p) for p in _ROWS.value)]
  return rows


# -- methods and batches ---------------------------------------------------------------------


def scene_source(setup: Setup):
  config = data_lib.DataConfig(name="synthetic", image_size=setup.image_size,
                               num_train=max(4 * setup.batch_size, 64), num_test=16)
  return data_lib.load(config, "train")


def scene_batches(setup: Setup, source) -> list[dict]:
  batcher = data_lib.Batcher(source, setup.batch_size, seed=0)
  return [batcher.batch(i) for i in range(2)]


def face_batches(setup: Setup) -> list[dict]:
  """Random UTKFace-shaped batches (images in [0, 1], age in years, gender, race)."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    batch = {"image": rng.random((setup.batch_size, setup.image_size, setup.image_size, 3),
                                 dtype=np.float32)}
    for task in utkface.TASKS:
      batch[task.name] = (rng.integers(0, task.num_outputs, setup.batch_size).astype(np.int32)
                          if task.kind == "classification"
                          else rng.uniform(1, 90, setup.batch_size).astype(np.float32))
    batches.append(batch)
  return batches


def dense_method(setup: Setup, name: str, tasks):
  options = {"num_subnets": 4} if name == "ecmt" else {}
  return methods_lib.build(
      name, tasks, method_options=options,
      model_options={"backbone": setup.backbone, "head_width": setup.head_width,
                     "backbone_kwargs": dict(setup.backbone_kwargs)})


class DymuStages:
  """DYMU's stage methods. A stage's frozen earlier stages (the anchor, the edge hypernetwork)
  are collections of its variables, drawn at random with the rest by `random_variables` (the
  step's speed does not depend on their values)."""

  def __init__(self, setup: Setup):
    self.model = {"backbone": "resnet_small", "head_width": setup.head_width,
                  "backbone_kwargs": dict(setup.dymu_kwargs)}

  def method(self, stage: str):
    tasks = utkface.TASKS
    options = {}
    if stage == "anchor":
      options["anchor_init"] = "shared"
    if stage == "edge":
      options["affinity"] = tuple(tuple(1.0 if i == j else 0.5 for j in range(len(tasks)))
                                  for i in range(len(tasks)))
    return dymu.build(tasks, model_options=self.model, stage=stage, **options)


# -- timing ----------------------------------------------------------------------------------


def _program_mib(compiled) -> float | None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if analysis is None:
    return None
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return total / 2**20


def _peak_mib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


OPTIMIZER = optax.adam(1e-3)


def random_variables(method, sample_batch: dict) -> dict:
  """Variables with `method.init`'s shapes, drawn in numpy (compiling every method's init
  would cost as much as its step): kernels He-scaled, batch-norm scales and variances 1."""
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                          {k: v[:1] for k, v in sample_batch.items()})
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" and len(leaf.shape) > 1 else 100
    return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def initial_state(method, batches: list[dict]):
  """The method's train state on the host (each row places a copy: its steps donate it)."""
  return jax.device_get(state_lib.create(random_variables(method, batches[0]), OPTIMIZER,
                                         np.asarray(jax.random.PRNGKey(0))))


def time_step(method, host_state, batches: list[dict], execution_spec: str,
              compute_dtype: str, setup: Setup) -> dict:
  """One row: the step compiled under `execution_spec` and `compute_dtype`, then timed."""
  previous = execution.spec()
  execution.configure(execution_spec)
  try:
    par = train_lib.Parallel("mesh")
    optimizer = OPTIMIZER
    device_batches = [par.shard_batch(b) for b in batches]
    state = par.place_state(host_state)
    with train_lib.CompileCounter() as compiling:
      step_fn = par.compile_step(method, optimizer, method.tasks, compute_dtype=compute_dtype)
      start = time.perf_counter()
      # Traced here, under this row's execution choices (they are read while tracing).
      compiled = step_fn.lower(state, device_batches[0]).compile()
      compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, device_batches[0])  # warm-up
    jax.block_until_ready(metrics)
    timings = []
    with train_lib.CompileCounter() as timing:
      for _ in range(setup.repeats):
        start = time.perf_counter()
        for i in range(setup.steps):
          state, metrics = compiled(state, device_batches[i % len(device_batches)])
        jax.block_until_ready((state, metrics))
        timings.append((time.perf_counter() - start) / setup.steps)
    step_seconds = statistics.median(timings)
    return {"execution": execution.choices().describe(), "dtype": compute_dtype,
            "samples_per_s": setup.batch_size / step_seconds, "step_ms": 1e3 * step_seconds,
            "compile_s": compile_seconds, "compiles": compiling.count,
            "compiles_timed": timing.count, "program_mib": _program_mib(compiled),
            "peak_mib": _peak_mib(), "loss": float(metrics["loss"])}
  finally:
    execution.configure(previous)


def pipeline_examples_per_s(source, setup: Setup, seconds: float = 1.0) -> float:
  """Examples/s of the synthetic-scenes `Batcher` in one thread, no prefetch."""
  batcher = data_lib.Batcher(source, setup.batch_size, seed=1)
  batcher.batch(0)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or count < 2:
    batcher.batch(count + 1)
    count += 1
  return count * setup.batch_size / (time.perf_counter() - start)


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def report(rows: list[dict], setup: Setup, pipeline: float | None) -> str:
  device = jax.devices()[0]
  data = ("all rows: UTKFace tasks on random images (--quick)" if setup.quick else
          "synthetic scenes (4 dense tasks); DYMU: ResNet-small streams, UTKFace tasks")
  lines = [f"device: {device.platform} ({getattr(device, 'device_kind', '?')}), "
           f"{jax.device_count()} device(s), jax {jax.__version__}; defaults here: "
           f"{execution.backend_defaults().describe()}",
           f"{setup.backbone} at {setup.image_size}x{setup.image_size}, {data}; batch "
           f"{setup.batch_size}, {setup.steps} steps x {setup.repeats} repeats",
           f"{'method':<15}{'execution':<33}{'dtype':<10}{'samples/s':>10}{'step ms':>9}"
           f"{'compile s':>10}{'compiles':>9}{'program MiB':>12}{'peak MiB':>9}"]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['method']:<15}{r['execution']:<33}{r['dtype']:<10} failed: {r['error']}")
      continue
    compiles = f"{r['compiles']}+{r['compiles_timed']}"
    lines.append(f"{r['method']:<15}{r['execution']:<33}{r['dtype']:<10}"
                 f"{r['samples_per_s']:>10.1f}{r['step_ms']:>9.1f}{r['compile_s']:>10.1f}"
                 f"{compiles:>9}{_fmt(r['program_mib'], '.1f'):>12}"
                 f"{_fmt(r['peak_mib'], '.0f'):>9}")
  timed = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
  if pipeline is not None and timed:
    verdict = ("keeps ahead of" if pipeline >= max(timed)
               else "is SLOWER than (prefetch threads or a faster loader needed for)")
    lines.append(f"input pipeline (synthetic scenes, one thread, no prefetch): "
                 f"{pipeline:,.0f} examples/s; it {verdict} the fastest step "
                 f"({max(timed):,.0f} samples/s)")
  lines.append("compiles: while compiling + while timing (must be 0); program MiB: the "
               "compiled step's arguments + outputs + temporaries")
  return "\n".join(lines)


def run(setup: Setup, log: Callable[[str], None] = print) -> tuple[list[dict], float | None]:
  """Every planned row (a failure is reported in its row), and the pipeline's examples/s."""
  rows = []
  source = scene_source(setup)
  scenes = scene_batches(setup, source)
  faces = face_batches(setup)
  stages = DymuStages(setup)
  built: dict[str, tuple] = {}  # label -> (method, host state, batches), shared by its rows
  start = time.perf_counter()
  for label, spec, dtype in plan(setup):
    row = {"method": label}
    try:
      if label not in built:
        if label.startswith("dymu "):
          method, batches = stages.method(label.split()[1]), faces
        elif setup.quick:
          method, batches = dense_method(setup, label, utkface.TASKS), faces
        else:
          method, batches = dense_method(setup, label, source.tasks), scenes
        built[label] = (method, initial_state(method, batches), batches)
      method, host_state, batches = built[label]
      row.update(time_step(method, host_state, batches, spec, dtype, setup))
    except Exception as error:  # pylint: disable=broad-except  # one row fails, not the table
      row.update(execution=spec, dtype=dtype, error=f"{type(error).__name__}: {error}"[:200])
    rows.append(row)
    log(f"[{time.perf_counter() - start:6.1f} s] " + report([row], setup, None).splitlines()[3])
  pipeline = pipeline_examples_per_s(source, setup)
  return rows, pipeline


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  setup = setup_from_flags()
  rows, pipeline = run(setup)
  print()
  print(report(rows, setup, pipeline))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"setup": dataclasses.asdict(setup), "rows": rows,
                 "pipeline_examples_per_s": pipeline,
                 "device": str(jax.devices()[0])}, f, indent=1)
  if any("error" in r for r in rows):
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
