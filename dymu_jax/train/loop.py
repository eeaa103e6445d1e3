"""The training loop: data in, compiled steps, evaluation, metric logs, checkpoints, resume.

    result = train(method, train_source, eval_source, TrainConfig(steps=2000), workdir,
                   run_metadata={"flags": ...})

Sections, in the order a run meets them: devices and mesh; input pipeline (a deterministic
`Batcher`, a background thread that reads and places batches `prefetch` steps ahead);
optimizer and state (fresh, or resumed from the newest checkpoint: same step, same key, so the
same batches and the same randomness follow); the compiled step; the loop, which touches the
host only at log, evaluation and checkpoint boundaries; the final evaluation and checkpoint.

Outputs under `workdir`: `metrics.jsonl` (one JSON object per line, `"split"` "train" or
"eval"), TensorBoard event files (`tensorboardX`, a dependency; `torch.utils.tensorboard`
also works), and `checkpoints/`. The run's first lines name these paths. The workdir may be
on any filesystem `etils.epath` knows (`gs://bucket/run`); everything goes through
`dymu_jax.files`, and event files through an epath writer registered with tensorboardX.

(Over 500 lines: the loop owns resume, evaluation, logging and checkpoints around one compiled
step; each is short, and keeping them together keeps "what happens at step k" in one place.)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import chex
import jax
import numpy as np

from dymu_jax import execution
from dymu_jax import files as files_lib
from dymu_jax.data import base as data_lib
from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import optim
from dymu_jax.train import parallel as parallel_lib
from dymu_jax.train import state as state_lib
from dymu_jax.train import step as step_lib

PyTree = Any
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train (the method's own settings live in the method).

  Attributes:
    steps: total optimizer steps of the run (a resumed run continues up to it).
    batch_size: global batch size (over all devices and processes).
    seed: shuffling, initialisation and per-step randomness.
    optimizer, learning_rate, schedule, decay_steps, decay_factor, warmup_steps,
      weight_decay, grad_clip, momentum: see `optim.make_optimizer`.
    eval_every: evaluate every this many steps (0: only at the end; the end always evaluates).
    eval_batch_size: global evaluation batch size (0: `batch_size`).
    checkpoint_every: checkpoint every this many steps (0: only at the end).
    keep_checkpoints: how many of the newest checkpoints to keep.
    async_checkpoints: write checkpoints in the background.
    log_every: read and log the train metrics of every this many-th step.
    parallel: "mesh" (jit over a device mesh) or "pmap".
    prefetch: batches read and placed on the devices ahead of the step (0: none).
    progress: show a tqdm progress bar (process 0 only).
    compute_dtype: "float32", or "bfloat16" for mixed precision (bfloat16 activations in the
      train step; parameters, optimizer state, batch-norm statistics, losses and evaluation
      in float32; see `step.make_train_step`).
  """

  steps: int = 1000
  batch_size: int = 64
  seed: int = 0
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  decay_steps: int = 0
  decay_factor: float = 0.1
  warmup_steps: int | None = None
  weight_decay: float = 0.0
  grad_clip: float = 0.0
  momentum: float = 0.9
  eval_every: int = 0
  eval_batch_size: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  log_every: int = 50
  parallel: str = "mesh"
  prefetch: int = 2
  progress: bool = True
  compute_dtype: str = "float32"

  def __post_init__(self):
    for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}.")
    for name in ("eval_every", "eval_batch_size", "checkpoint_every", "prefetch"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0 (0 = default), got "
                         f"{getattr(self, name)}.")
    parallel_lib.check_mode(self.parallel)
    step_lib.check_compute_dtype(self.compute_dtype)

  def make_optimizer(self):
    return optim.make_optimizer(
        self.optimizer, self.learning_rate, schedule=self.schedule, total_steps=self.steps,
        weight_decay=self.weight_decay, grad_clip=self.grad_clip, momentum=self.momentum,
        decay_steps=self.decay_steps, decay_factor=self.decay_factor,
        warmup_steps=self.warmup_steps)

  def make_schedule(self):
    return optim.make_schedule(self.schedule, self.learning_rate, self.steps,
                               decay_steps=self.decay_steps, decay_factor=self.decay_factor,
                               warmup_steps=self.warmup_steps)


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    state: the final canonical state (replicated on the mesh).
    train_metrics: the last logged train metrics.
    eval_metrics: the final evaluation, control label -> task -> metric -> value.
    resumed_from: the checkpoint step the run resumed from, or None.
    step_compiles: XLA compilations triggered by train-step calls of this run (1 when the
      step compiled once; 0 when nothing was left to run or the program came from JAX's
      persistent compilation cache).
    seconds: training wall time of the run: this call's, plus that of the processes before it up
      to the checkpoint it resumed from (`train_seconds` in the checkpoint metadata).
    eval_labelled: labelled examples per task of the final evaluation, control label -> task
      -> count (`Evaluator.labelled`; 0: no labelled example, its metrics NaN).
  """

  state: state_lib.TrainState
  train_metrics: dict
  eval_metrics: dict
  resumed_from: int | None
  step_compiles: int
  seconds: float
  eval_labelled: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Metric writers.


def _finite_or_none(value):
  value = float(value)
  return value if math.isfinite(value) else None


class _EpathRecordWriter:
  """A tensorboardX record file on any epath filesystem: buffered, and written whole at each
  flush (as tensorboardX's own gs:// and s3:// writers do: objects cannot be appended to)."""

  def __init__(self, path: str):
    self.path = files_lib.run_path(path)
    self.buffer = io.BytesIO()
    self.written = -1

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    if self.buffer.tell() != self.written:
      self.path.write_bytes(self.buffer.getvalue())
      self.written = self.buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:

  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    files_lib.makedirs(files_lib.run_path(path))


class _NoTensorBoard(Exception):
  """Why a non-local workdir gets no event files (shown in the run's first lines)."""


_NO_BACKEND = "not written (no tensorboardX or torch; pip install tensorboardX)"


def _tensorboard_writer(logdir: str):
  """A TensorBoard SummaryWriter when a backend is importable, else None.

  Raises:
    _NoTensorBoard: `logdir` is not local, and no writer can go there.
  """
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not files_lib.is_local(logdir):
      raise _NoTensorBoard("not written (a non-local workdir needs tensorboardX; pip install "
                           "tensorboardX)") from None
    try:
      from torch.utils.tensorboard import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    return SummaryWriter(logdir)
  scheme = files_lib.scheme(logdir)
  if scheme is None:
    return SummaryWriter(logdir)
  # Event files of a URI workdir go through epath, like every other run file.
  record_writer.register_writer_factory(scheme, _EpathRecordWriterFactory())
  try:
    return SummaryWriter(logdir)
  except Exception as error:  # pylint: disable=broad-except
    raise _NoTensorBoard(f"not written ({logdir} refused them: {type(error).__name__}: "
                         f"{error})") from None


class MetricWriter:
  """Appends metric records to `metrics.jsonl` and, when possible, to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = files_lib.run_path(workdir) / METRICS_FILE
    self._tb, self._tb_note = None, _NO_BACKEND
    if enabled:
      try:
        self._tb = _tensorboard_writer(os.fspath(self.path.parent))
      except _NoTensorBoard as why:  # a remote workdir: one line in `describe`, no crash
        self._tb_note = str(why)

  def describe(self, checkpoint_dir: str, start: int, steps: int) -> str:
    """The run's first lines: where metrics, event files and checkpoints go."""
    events = (f"{self.path.parent} (tensorboard --logdir there)" if self._tb is not None
              else self._tb_note)
    begin = (f"resuming at step {start} of {steps}" if start else f"training {steps} steps")
    return (f"{begin}\n  metrics: {self.path}\n  TensorBoard event files: {events}\n"
            f"  checkpoints: {checkpoint_dir}")

  def truncate_after(self, step: int) -> int:
    """Drops unreadable lines (a partial last line after a kill) and the records of steps after
    `step` (written after the checkpoint a resumed run continues from: those steps run again,
    so the file keeps one record per step). Returns how many lines were dropped."""
    if not self.enabled or not files_lib.exists(self.path):
      return 0
    kept, dropped = [], 0
    for line in io.StringIO(files_lib.read_text(self.path)):
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if (not line.endswith("\n") or not isinstance(record, dict)
          or record.get("step", 0) > step):
        dropped += 1
        continue
      kept.append(line)
    if dropped:
      files_lib.atomic_write(self.path, "".join(kept))
    return dropped

  def write(self, step: int, split: str, scalars: Mapping[str, float], **extra) -> None:
    if not self.enabled:
      return
    record = {"step": step, "split": split, **extra,
              **{k: _finite_or_none(v) for k, v in scalars.items()}}
    files_lib.append_text(self.path, json.dumps(record) + "\n")
    if self._tb is not None:
      prefix = split if "label" not in extra else f"{split}/{extra['label']}"
      try:
        for k, v in scalars.items():
          if math.isfinite(float(v)):  # NaN (a task without labels) stays a gap, as in jsonl
            self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
        self._tb.flush()
      except Exception as error:  # pylint: disable=broad-except
        self._tensorboard_failed(error)

  def _tensorboard_failed(self, error: Exception) -> None:
    """A remote filesystem that refuses event files: one line, and metrics.jsonl goes on."""
    if files_lib.is_local(self.path):
      raise error
    print(f"TensorBoard event files in {self.path.parent} stopped ({type(error).__name__}: "
          f"{error}); metrics go on to {METRICS_FILE}", flush=True)
    self._tb = None

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.close()
      except Exception as error:  # pylint: disable=broad-except
        self._tensorboard_failed(error)


# ----------------------------------------------------------------------------------------------
# Evaluation.


def _freeze(value):
  """A hashable copy of controls (dicts and lists become sorted tuples) for a static argument."""
  if value is None:
    return None
  if isinstance(value, Mapping):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "tolist"):
    value = np.asarray(value).tolist()
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value
  return value


def _thaw(frozen):
  return None if frozen is None else dict(frozen)


def control_label(controls) -> str:
  """A short, stable name of a control setting: "default" or "preference=0.7,0.3;budget=0.5"."""
  if not controls:
    return "default"

  def fmt(v):
    if isinstance(v, (tuple, list)):
      return ",".join(fmt(x) for x in v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  return ";".join(f"{k}={fmt(v)}" for k, v in _freeze(controls))


class Evaluator:
  """Task metrics of `method.predict` over a whole split, for each control setting.

  Prediction and metric update are one jit-compiled function per control setting (controls
  are static: they may choose a network's shape), run on the mesh with the batch sharded.
  Inside, `predict` sees the controls as a dict whose lists and arrays became tuples.

  After each call, `labelled` holds {control label: {task: count}}: how many labelled items
  (examples for classification and regression, pixels for segmentation, depth and normals,
  images for edges and saliency; `TaskMetric.labelled`) each task's metrics pooled. A 0 is a
  task without any labelled example in the split, whose metrics are NaN.
  """

  def __init__(self, method, parallel: parallel_lib.Parallel, source: data_lib.DataSource,
               batch_size: int, tasks: Sequence[Any] | None = None):
    self.method, self.parallel, self.source, self.batch_size = method, parallel, source, batch_size
    self.tasks = tuple(method.tasks if tasks is None else tasks)
    missing = [t.name for t in self.tasks if t.name not in {s.name for s in source.tasks}]
    if missing:
      raise ValueError(f"The evaluation data {source.name} {source.split} has no labels for "
                       f"task(s) {', '.join(missing)}.")
    parallel.check_batch_size(batch_size, "evaluation batch size")
    self.metrics = {t.name: t.metric() for t in self.tasks}
    # control label -> task name -> labelled items of the last call (`TaskMetric.labelled`).
    self.labelled: dict[str, dict[str, int]] = {}
    rep = parallel.replicated
    self._update = jax.jit(self._update_fn, static_argnums=0,
                           in_shardings=(rep, rep, parallel.batch_sharding), out_shardings=rep)

  def _update_fn(self, frozen_controls, variables, metric_states, batch):
    predictions = self.method.predict(variables, batch["image"], _thaw(frozen_controls))
    # One prediction per example for every task (trace time, no cost in the compiled step).
    chex.assert_equal_shape_prefix([batch["image"], *predictions.values()], 1,
                                   custom_message=f"{type(self.method).__name__}.predict")
    valid = batch[data_lib.VALID_KEY]
    return {name: metric.update(metric_states[name], predictions[name], batch[name], valid)
            for name, metric in self.metrics.items()}

  def _init_states(self):
    canonical = lambda x: np.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
    states = {name: jax.tree.map(canonical, m.init()) for name, m in self.metrics.items()}
    return jax.device_put(states, self.parallel.replicated)

  def __call__(self, variables: PyTree, controls_list: Sequence[Any] | None = None) -> dict:
    """control label -> task name -> metric name -> value."""
    controls_list = list(self.method.eval_controls() if controls_list is None else
                         controls_list)
    keep = {"image", data_lib.VALID_KEY, *self.metrics}
    results, labelled = {}, {}
    for controls in controls_list:
      frozen = _freeze(controls)
      states = self._init_states()
      batches = data_lib.eval_batches(self.source, self.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
      batches = (self.parallel.shard_global_batch({k: b[k] for k in keep}) for b in batches)
      for batch in data_lib.prefetch(batches, 2):
        states = self._update(frozen, variables, states, batch)
      host = parallel_lib.to_host(states)
      label = control_label(controls)
      results[label] = {name: metric.compute(host[name]) for name, metric in self.metrics.items()}
      labelled[label] = {name: metric.labelled(host[name])
                         for name, metric in self.metrics.items()}
    self.labelled = labelled
    return results


# With more tasks than this, an evaluation's log line summarises instead of listing every task.
MAX_TASKS_LISTED = 8


def summarise_eval(per_task: Mapping[str, Mapping[str, float]], tasks: Sequence[Any],
                   labelled: Mapping[str, int] | None = None) -> dict:
  """The summary of an evaluation over many tasks, as plain (JSON-able) values.

  Args:
    per_task: {task: {metric: value}} of one control setting.
    tasks: the tasks (their metric names which is primary, and which way is better); tasks
      missing from `per_task` are skipped.
    labelled: {task: labelled items} (`Evaluator.labelled`); None infers "no labelled example"
      from a non-finite primary metric.

  Returns:
    {"tasks": number of tasks, "primary_metrics": [{"metric", "higher_is_better", "tasks",
    "mean", "median", "worst", "worst_task"}, ...] (one entry per primary metric, over the tasks
    where it is finite, in task order of first appearance), "unlabelled": [tasks without a
    labelled example], "not_finite": [labelled tasks whose primary metric is NaN or infinite],
    "labelled": {"total", "min", "median", "max"} over the tasks (None without `labelled`)}.
  """
  groups: dict[tuple[str, bool], list[tuple[float, str]]] = {}
  unlabelled, not_finite, counts = [], [], []
  for task in tasks:
    if task.name not in per_task:
      continue
    metric = task.metric()
    value = per_task[task.name].get(metric.primary)
    count = None if labelled is None else labelled.get(task.name)
    if count is not None:
      counts.append(int(count))
    if count == 0 or (count is None and (value is None or not math.isfinite(value))):
      unlabelled.append(task.name)
      continue
    if value is None or not math.isfinite(value):
      not_finite.append(task.name)
      continue
    higher = dict(metric.higher_is_better)[metric.primary]
    groups.setdefault((metric.primary, higher), []).append((float(value), task.name))
  primary = []
  for (name, higher), values in groups.items():
    numbers = np.array([v for v, _ in values])
    worst = min(values) if higher else max(values)
    primary.append({"metric": name, "higher_is_better": higher, "tasks": len(values),
                    "mean": float(numbers.mean()), "median": float(np.median(numbers)),
                    "worst": worst[0], "worst_task": worst[1]})
  totals = None
  if counts:
    totals = {"total": int(np.sum(counts)), "min": int(np.min(counts)),
              "median": float(np.median(counts)), "max": int(np.max(counts))}
  return {"tasks": len(per_task), "primary_metrics": primary, "unlabelled": unlabelled,
          "not_finite": not_finite, "labelled": totals}


def _some(names: Sequence[str], shown: int = 5) -> str:
  return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def describe_eval(per_task: Mapping[str, Mapping[str, float]], tasks: Sequence[Any],
                  labelled: Mapping[str, int] | None = None) -> str:
  """One log line of an evaluation: every task's metrics ("no labelled example" for a task
  whose `labelled` count is 0), or, for more than `MAX_TASKS_LISTED` tasks (a hundred-task
  regression set would print a page), each primary metric's mean, median and worst task, and
  the tasks without a labelled example (`summarise_eval`). Every value still goes to
  metrics.jsonl and the event files."""
  if len(per_task) <= MAX_TASKS_LISTED:
    def shown(task, values):
      if labelled is not None and labelled.get(task) == 0:
        return "no labelled example"
      return ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    return "  ".join(f"{task}: {shown(task, values)}" for task, values in per_task.items())
  summary = summarise_eval(per_task, tasks, labelled)
  parts = [f"{g['metric']} over {g['tasks']} tasks: mean={g['mean']:.4g}, "
           f"median={g['median']:.4g}, worst={g['worst']:.4g} ({g['worst_task']})"
           for g in summary["primary_metrics"]]
  if summary["not_finite"]:
    parts.append(f"{len(summary['not_finite'])} task(s) with a non-finite metric "
                 f"({_some(summary['not_finite'])})")
  if summary["unlabelled"]:
    parts.append(f"{len(summary['unlabelled'])} task(s) without a labelled example "
                 f"({_some(summary['unlabelled'])})")
  return f"{len(per_task)} tasks; " + "; ".join(parts) + "; every task in metrics.jsonl"


def flatten_eval(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """{task: {metric: v}} -> {"task/metric": v}."""
  return {f"{task}/{name}": value for task, values in per_task.items()
          for name, value in values.items()}


# ----------------------------------------------------------------------------------------------
# The loop.


def _nonfinite_error(method_tasks, step: int, task_index: int, last_checkpoint) -> str:
  if 0 <= task_index < len(method_tasks):
    what = f"the loss of task {method_tasks[task_index].name!r}"
  else:
    what = "the total loss or its gradient"
  kept = (f"the newest checkpoint (step {last_checkpoint}) is intact"
          if last_checkpoint is not None else "no checkpoint was written")
  return (f"Training stopped because {what} became non-finite (NaN or infinity) at step "
          f"{step}; nothing after it was saved and {kept}.")


def train(method, train_source: data_lib.DataSource, eval_source: data_lib.DataSource | None,
          config: TrainConfig, workdir: str | os.PathLike, *,
          run_metadata: Mapping[str, Any] | None = None, optimizer=None,
          augment: Callable | None = None, devices: Sequence[jax.Device] | None = None,
          initial_variables: Mapping[str, Any] | None = None,
          pretrained: str | os.PathLike | None = None) -> TrainResult:
  """Trains `method` on `train_source`, resuming from `workdir`'s newest checkpoint if any.

  Args:
    method: a `dymu_jax.methods.base.Method` (in mode "pmap" built with
      `axis_name=parallel.method_axis_name("pmap")`).
    train_source: the training examples.
    eval_source: the examples evaluated every `config.eval_every` steps and at the end; None
      skips evaluation.
    config: see `TrainConfig`.
    workdir: folder of metrics, event files and checkpoints (created if needed).
    run_metadata: JSON-able record of the run (flags, dataset config...) stored with every
      checkpoint next to the config, seed and step.
    optimizer: an optax transformation replacing `config.make_optimizer()` (e.g. one that
      freezes part of the parameters).
    augment: `fn(batch, np_rng) -> batch` applied to training batches (see `Batcher`).
    devices: the devices to run on (default all).
    initial_variables: variable collections that replace the initialised ones at a fresh start
      (an earlier stage's variables restored from its checkpoint: DYMU's frozen anchor and
      edge hypernetwork, or the trunk its anchor starts from); a resumed run restores its own.
      Every collection in `method.required_variables()` must be given.
    pretrained: a torchvision checkpoint the initial variables pass through at a fresh start
      (`method.load_pretrained(variables, pretrained)`: the backbone's ImageNet weights), on
      the host before they are placed, so every process starts from the same values; the
      collections of `initial_variables` are kept as given, and a resumed run restores its own.

  Returns:
    A `TrainResult`.

  Raises:
    FloatingPointError: a loss became non-finite; the message names the step and the task.
  """
  started = time.time()
  workdir = os.fspath(files_lib.makedirs(files_lib.run_path(workdir)))
  is_chief = jax.process_index() == 0

  # -- devices -------------------------------------------------------------------------------
  par = parallel_lib.Parallel(config.parallel, devices)
  par.check_method(method)
  par.check_batch_size(config.batch_size)
  tasks = tuple(method.tasks)

  # -- input pipeline ------------------------------------------------------------------------
  batcher = data_lib.Batcher(train_source, config.batch_size, config.seed, augment=augment,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  # Only shapes matter to init, and zeros are the same on every process.
  sample = {k: np.zeros_like(v) for k, v in batcher.batch(0).items()}

  # -- optimizer and state -------------------------------------------------------------------
  schedule = config.make_schedule() if optimizer is None else None
  optimizer = config.make_optimizer() if optimizer is None else optimizer
  init = state_lib.init_fn(method, optimizer)
  seed_key = jax.random.PRNGKey(config.seed)
  metadata = {"config": dataclasses.asdict(config), "seed": config.seed,
              "run": dict(run_metadata or {})}
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, max_to_keep=config.keep_checkpoints,
      save_interval_steps=config.checkpoint_every or config.steps,
      async_save=config.async_checkpoints)
  writer, progress = None, None
  try:
    restored = None
    if checkpointer.all_steps():  # the newest intact checkpoint; damaged newer ones are skipped
      restored = checkpointer.restore_intact(
          par.abstract_state(init, seed_key, sample),
          accept=functools.partial(_check_seed, checkpointer.directory, config.seed),
          move_damaged=is_chief)
    earlier_seconds = 0.0  # training time of the processes before this resume
    if restored is None:
      missing = [c for c in method.required_variables() if c not in (initial_variables or {})]
      if missing:
        raise ValueError(f"The {method.name} method starts from collection(s) "
                         f"{', '.join(missing)} of an earlier stage; pass them as "
                         f"train(..., initial_variables={{name: variables}}).")
      resumed_from = None
      if pretrained:
        initial_variables = _with_pretrained(method, pretrained, seed_key, sample,
                                             initial_variables)
      canonical = par.init_state(init, seed_key, sample, initial_variables)
    else:
      resumed_from, canonical, restored_metadata = restored
      earlier_seconds = float(restored_metadata.get("train_seconds", 0.0) or 0.0)
    start = int(parallel_lib.to_host(canonical.step))
    state = par.place_state(canonical)
    del canonical  # the step donates its input state

    # -- compiled step, evaluation, writers --------------------------------------------------
    train_step = par.compile_step(method, optimizer, tasks, compute_dtype=config.compute_dtype)
    evaluator = None
    if eval_source is not None:
      evaluator = Evaluator(method, par, eval_source,
                            config.eval_batch_size or config.batch_size, tasks)
    writer = MetricWriter(workdir, enabled=is_chief)
    if is_chief:
      print(writer.describe(checkpointer.directory, start, config.steps), flush=True)
      print(f"  execution: {jax.default_backend()}, {execution.choices().describe()}, "
            f"{config.compute_dtype}", flush=True)
      dropped = writer.truncate_after(start)
      if dropped:
        print(f"  {METRICS_FILE}: dropped {dropped} line(s) written after step {start} or cut "
              f"off by a kill; those steps run again from the checkpoint", flush=True)
    train_metrics, eval_metrics = {}, {}

    def evaluate(step, canonical):
      results = evaluator(canonical.variables)
      for label, per_task in results.items():
        writer.write(step, "eval", flatten_eval(per_task), label=label)
        if is_chief:
          line = describe_eval(per_task, tasks, evaluator.labelled.get(label))
          _print_above_progress(f"eval @ step {step} [{label}] {line}")
      return results

    def check_guard(state):
      bad_step, bad_task = (int(v) for v in par.read((state.nonfinite_step,
                                                       state.nonfinite_task)))
      if state_lib.guard_tripped(bad_step):
        checkpointer.wait()
        raise FloatingPointError(_nonfinite_error(tasks, bad_step, bad_task,
                                                  checkpointer.latest_step()))

    # -- the loop ----------------------------------------------------------------------------
    batches = data_lib.prefetch(par.shard_batches(batcher(start, config.steps - start)),
                                config.prefetch)
    progress = _progress_bar(config, start, is_chief)
    last_time, last_step = time.time(), start
    compiles = parallel_lib.CompileCounter()
    for step in range(start, config.steps):
      batch = next(batches)
      with compiles:
        state, metrics = train_step(state, batch)
      done = step + 1
      progress.update(1)
      final = done == config.steps
      log = done % config.log_every == 0 or final
      do_eval = evaluator is not None and (
          final or (config.eval_every and done % config.eval_every == 0))
      do_checkpoint = final or (config.checkpoint_every and done % config.checkpoint_every == 0)
      if not (log or do_eval or do_checkpoint):
        continue
      check_guard(state)  # the only host reads: at these boundaries
      if log:
        now = time.time()
        train_metrics = {k: float(v) for k, v in par.read(metrics).items()}
        train_metrics["steps_per_second"] = (done - last_step) / max(now - last_time, 1e-9)
        if schedule is not None:
          train_metrics["learning_rate"] = float(schedule(step))
        last_time, last_step = now, done
        writer.write(done, "train", train_metrics)
        progress.set_postfix(loss=f"{train_metrics['loss']:.4g}", refresh=False)
      if do_eval or do_checkpoint:
        canonical = par.canonical_state(state)
        if do_checkpoint:
          metadata["train_seconds"] = earlier_seconds + time.time() - started
          checkpointer.save(canonical, metadata, force=final)
        if do_eval:
          eval_metrics = evaluate(done, canonical)
    canonical = par.canonical_state(state)
    if start >= config.steps:  # nothing left to train: evaluate what was restored
      check_guard(state)
      if evaluator is not None:
        eval_metrics = evaluate(start, canonical)
  finally:
    if progress is not None:
      progress.close()
    checkpointer.wait()
    checkpointer.close()
    if writer is not None:
      writer.close()
  return TrainResult(state=canonical, train_metrics=train_metrics, eval_metrics=eval_metrics,
                     resumed_from=resumed_from, step_compiles=compiles.count,
                     seconds=earlier_seconds + time.time() - started,
                     eval_labelled=dict(evaluator.labelled) if evaluator is not None else {})


def _with_pretrained(method, path, seed_key, sample, initial) -> dict:
  """Every collection a fresh run starts from: `method.init`'s draw for `seed_key` (as
  `state.init_fn` draws it) through `method.load_pretrained(variables, path)`, as host numpy,
  with the collections of `initial` in place."""
  variables = jax.jit(functools.partial(state_lib.init_variables, method))(seed_key,
                                                                           dict(sample))
  variables = parallel_lib.to_host(method.load_pretrained(parallel_lib.to_host(variables),
                                                          os.fspath(path)))
  return {**variables, **dict(initial or {})}


def _check_seed(directory: str, seed: int, step: int, metadata: Mapping[str, Any]) -> None:
  """Refuses to resume checkpoint `step` of another seed's run."""
  saved_seed = metadata.get("seed")
  if saved_seed != seed:
    raise ValueError(f"{files_lib.run_path(directory).parent} holds a run with seed "
                     f"{saved_seed}, not {seed}; resume with the same seed or use a new "
                     f"workdir.")


def _print_above_progress(line: str) -> None:
  """Prints a line without breaking an active tqdm progress bar."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  tqdm.tqdm.write(line)


def _progress_bar(config: TrainConfig, start: int, enabled: bool):
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (enabled and config.progress))
