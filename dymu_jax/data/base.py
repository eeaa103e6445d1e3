"""What every data source shares: the source interface, deterministic batching, sharding, prefetch.

A source is a random-access collection of examples (`len`, `get(indices)`); batching is a pure
function of (seed, step), so a resumed run only needs its step to continue with the very batch
it would have seen, and every process of a multi-host run can compute its own shard without
talking to the others.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from dymu_jax import tasks as tasks_lib

# {"image": float32 (B, H, W, C) in [0, 1], or (B, D) feature vectors, "<task>": labels, ...}.
# Feature vectors (from the arrays source's "inputs") travel under the same key, so every
# method reads them as it reads images; the backbone decides which it takes.
Batch = dict
# Batch keys starting with "_" carry metadata (for example "_valid", the padding mask of an
# evaluation batch); they are never labels.
VALID_KEY = "_valid"


class DatasetError(ValueError):
  """A dataset that cannot be read: missing folder, corrupt file, labels out of range..."""


SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything needed to build a dataset's sources; filled from flags by the experiments.

  Attributes:
    name: a dataset name registered in `dymu_jax.data.DATASETS`.
    data_dir: the folder (or file) holding the data; unused by "synthetic".
    seed: seed of how the dataset is built and split (not of the shuffling, which is the
      training seed).
    image_size: resize/crop images to this side length; 0 keeps the dataset's own size.
    num_train, num_test: examples to build (synthetic, multi_mnist) or keep (others);
      0 takes the dataset's default (all, for read datasets).
    test_fraction: held-out fraction where the dataset has no official split.
    task_spec: for "arrays": a JSON file or "name:kind[:outputs],..." giving each task's kind.
    standardise_inputs: for "arrays" with feature vectors: subtract each feature's mean and
      divide by its standard deviation, both over the training split (on by default; images
      are never standardised here).
    standardise_targets: for "arrays" with feature vectors: train each regression task on its
      labels standardised with the training split's mean and std (the task's label_offset and
      label_scale; losses in those units, metrics and `Task.label_units` in the label's own),
      on by default; a task whose spec sets label_scale or label_offset keeps them.
  """

  name: str = "synthetic"
  data_dir: str | None = None
  seed: int = 0
  image_size: int = 0
  num_train: int = 0
  num_test: int = 0
  test_fraction: float = 0.2
  task_spec: str = ""
  standardise_inputs: bool = True
  standardise_targets: bool = True


def check_split(dataset: str, split: str) -> None:
  if split not in SPLITS:
    raise DatasetError(f"{dataset} has no split {split!r}; allowed splits are "
                       f"{', '.join(SPLITS)}.")


def limit(source_len: int, wanted: int) -> int:
  """How many examples to keep: `wanted` (0 = all), never more than there are."""
  return source_len if wanted <= 0 else min(wanted, source_len)


class DataSource:
  """Random-access examples of one split with their task specs.

  Subclasses set `name`, `split`, `tasks` and implement `__len__` and `get`. Sources of feature
  vectors that were standardised set `input_stats` to {"mean": (D,), "std": (D,)} float32 (the
  training split's), so that a run can save them with its model; None otherwise.
  """

  name: str = ""
  split: str = ""
  tasks: tuple[tasks_lib.Task, ...] = ()
  input_stats: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def get(self, indices: np.ndarray) -> Batch:
    """The examples at `indices` (int array) as one batch, un-augmented."""
    raise NotImplementedError

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.get(np.zeros((1,), np.int64))["image"].shape[1:])

  def with_tasks(self, names: Sequence[str] | str | None) -> "DataSource":
    """This source restricted to the named tasks (see `tasks.select`)."""
    selected = tasks_lib.select(self.tasks, names)
    return TaskSubset(self, selected)

  def __repr__(self):
    return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"tasks={[t.name for t in self.tasks]})")


class TaskSubset(DataSource):
  """A source whose batches keep only some of the parent's tasks."""

  def __init__(self, parent: DataSource, tasks: tuple[tasks_lib.Task, ...]):
    self.parent, self.tasks = parent, tasks
    self.name, self.split = parent.name, parent.split
    self.input_stats = parent.input_stats

  def __len__(self):
    return len(self.parent)

  def get(self, indices):
    batch = self.parent.get(indices)
    keep = {"image"} | {t.name for t in self.tasks}
    return {k: v for k, v in batch.items() if k in keep or k.startswith("_")}


class IndexSubset(DataSource):
  """The examples of `parent` at `indices` (in that order), e.g. a held-out validation split."""

  def __init__(self, parent: DataSource, indices: np.ndarray):
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or (indices.size and (indices.min() < 0
                                               or indices.max() >= len(parent))):
      raise ValueError(f"Subset indices must be a 1-D array within [0, {len(parent)}).")
    self.parent, self.indices = parent, indices
    self.name, self.split, self.tasks = parent.name, parent.split, parent.tasks
    self.input_stats = parent.input_stats

  def __len__(self):
    return int(self.indices.shape[0])

  def get(self, indices):
    return self.parent.get(self.indices[np.asarray(indices, np.int64)])


def holdout_split(source: DataSource, count: int, seed: int
                  ) -> tuple[DataSource, DataSource | None]:
  """(the rest, `count` held-out examples) of `source`, drawn with `seed`; (source, None) for
  count 0. One sentence when `count` leaves nothing to train on."""
  count = int(count)
  if count <= 0:
    return source, None
  if count >= len(source):
    raise ValueError(f"Holding out {count} examples leaves none of the {len(source)} training "
                     f"examples to train on; hold out fewer.")
  order = np.random.default_rng([int(seed), 7]).permutation(len(source))
  return IndexSubset(source, np.sort(order[count:])), IndexSubset(source, np.sort(order[:count]))


class ArraySource(DataSource):
  """Examples held in memory: images (uint8 or float) or feature vectors (N, D), plus one label
  array per task.

  Feature vectors are stored as float32 and batched as they are (no [0, 1] scaling);
  `input_stats` records how they were standardised, if they were.
  """

  def __init__(self, name: str, split: str, images: np.ndarray,
               labels: Mapping[str, np.ndarray], tasks: Sequence[tasks_lib.Task], *,
               input_stats: Mapping[str, np.ndarray] | None = None):
    self.name, self.split, self.tasks = name, split, tuple(tasks)
    if images.ndim == 3:  # grey images without a channel axis
      images = images[..., None]
    if images.ndim == 2:  # feature vectors
      images = np.asarray(images, np.float32)
    elif images.ndim != 4:
      raise DatasetError(
          f"{name} {split}: images must have shape (N, H, W, C) or (N, H, W), or feature "
          f"vectors (N, D), got {images.shape}.")
    self.images = images
    self.input_stats = dict(input_stats) if input_stats is not None else None
    self.labels = {}
    for task in self.tasks:
      if task.name not in labels:
        raise DatasetError(f"{name} {split}: no labels for task {task.name!r}; found "
                           f"{', '.join(labels) or 'none'}.")
      label = np.asarray(labels[task.name])
      if len(label) != len(images):
        raise DatasetError(
            f"{name} {split}: task {task.name!r} has {len(label)} labels for {len(images)} "
            f"images.")
      check_labels(name, task, label)
      self.labels[task.name] = label

  def __len__(self):
    return len(self.images)

  def get(self, indices):
    indices = np.asarray(indices)
    batch = {"image": to_float_image(self.images[indices])}
    for task in self.tasks:
      batch[task.name] = cast_label(task, self.labels[task.name][indices])
    return batch


def to_float_image(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] or float images -> float32 in [0, 1]."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) * np.float32(1 / 255)
  return images.astype(np.float32, copy=False)


def cast_label(task: tasks_lib.Task, label: np.ndarray) -> np.ndarray:
  """Labels in the dtype of the batch contract (see `dymu_jax.tasks`)."""
  if task.kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION):
    return label.astype(np.int32, copy=False)
  label = label.astype(np.float32, copy=False)
  if task.kind in (tasks_lib.DEPTH, tasks_lib.EDGES, tasks_lib.SALIENCY) and label.ndim == 3:
    label = label[..., None]
  return label


def check_finite(dataset: str, path: str, values: np.ndarray, what: str = "", *,
                 allow_nan: bool = False) -> None:
  """Stops with one sentence naming the file (and `what` in it) when float `values` hold NaN or
  infinity: bad data, which training would otherwise report as a divergence. One vectorised
  pass; integer arrays cannot hold either.

  `allow_nan=True` (regression labels, where NaN marks a missing label) refuses infinities
  only.
  """
  values = np.asarray(values)
  if values.dtype.kind not in "fc" or not values.size:
    return
  if allow_nan:
    bad = int(np.count_nonzero(np.isinf(values)))
    what_bad, hint = "infinite", " (NaN marks a missing label; infinity is not allowed)"
  else:
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    what_bad, hint = "NaN or infinite", ""
  if bad:
    where = f"{what} in {path!r}" if what else repr(path)
    raise DatasetError(f"{dataset}: {where} has {bad:,} {what_bad} value(s) out of "
                       f"{values.size:,}{hint}; fix or remove those examples.")


def check_labels(dataset: str, task: tasks_lib.Task, label: np.ndarray) -> None:
  """Stops with one sentence when labels fall outside what the task allows."""
  if task.kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION):
    if not np.issubdtype(label.dtype, np.integer):
      raise DatasetError(f"{dataset}: labels of task {task.name!r} must be integers, got "
                         f"{label.dtype}.")
    values = label[label != tasks_lib.IGNORE_LABEL]
    if values.size and (values.min() < 0 or values.max() >= task.num_outputs):
      raise DatasetError(
          f"{dataset}: labels of task {task.name!r} range over [{values.min()}, {values.max()}]"
          f" but must lie in [0, {task.num_outputs - 1}] (or {tasks_lib.IGNORE_LABEL} for "
          f"'no label').")
  elif task.kind == tasks_lib.REGRESSION:
    # NaN marks a missing regression label (see `dymu_jax.tasks`); infinity is bad data.
    if label.size and np.issubdtype(label.dtype, np.inexact) and np.isinf(label).any():
      raise DatasetError(f"{dataset}: labels of task {task.name!r} contain infinity (only NaN "
                         f"may mark a missing regression label).")
  elif label.size and not np.all(np.isfinite(label)):
    raise DatasetError(f"{dataset}: labels of task {task.name!r} contain NaN or infinity.")


# --------------------------------------------------------------------------------------------
# Batching: a pure function of (seed, step).


class Batcher:
  """Deterministic, per-epoch shuffled batches of a source, sharded by process.

  Batch `step` of a run is fully determined by (seed, step): epoch = step // steps_per_epoch
  and the epoch's permutation comes from `np.random.default_rng([seed, epoch])`. Each process
  takes its contiguous slice of the global batch, so `process_count` processes together see
  exactly the batches one process would.

  Args:
    source: the examples.
    global_batch_size: examples per step over all processes.
    seed: shuffling (and augmentation) seed.
    shuffle: False iterates in order (evaluation).
    augment: optional `fn(batch, rng) -> batch` applied per process shard.
    process_index, process_count: this process's shard; default `jax.process_index()`
      and `jax.process_count()` are passed in by the caller (the data layer never imports jax).
  """

  def __init__(self, source: DataSource, global_batch_size: int, seed: int = 0, *,
               shuffle: bool = True, augment: Callable[[Batch, np.random.Generator], Batch]
               | None = None, process_index: int = 0, process_count: int = 1):
    if global_batch_size < 1:
      raise ValueError(f"batch size must be >= 1, got {global_batch_size}.")
    if global_batch_size % process_count:
      raise ValueError(f"batch size {global_batch_size} must divide evenly over "
                       f"{process_count} processes.")
    if len(source) < global_batch_size:
      raise DatasetError(
          f"{source.name} {source.split} has {len(source)} examples, fewer than one batch of "
          f"{global_batch_size}; lower the batch size or use more data.")
    self.source, self.global_batch_size, self.seed = source, global_batch_size, seed
    self.shuffle, self.augment = shuffle, augment
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = len(source) // global_batch_size  # the remainder is dropped
    self._perm_epoch, self._perm = None, None

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def indices(self, step: int) -> np.ndarray:
    """Global-batch indices of `step` into the source."""
    epoch, within = divmod(step, self.steps_per_epoch)
    if self.shuffle:
      if self._perm_epoch != epoch:
        self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        self._perm_epoch = epoch
      order = self._perm
    else:
      order = np.arange(len(self.source))
    start = within * self.global_batch_size
    return order[start:start + self.global_batch_size]

  def batch(self, step: int) -> Batch:
    """This process's shard of global batch `step`."""
    idx = self.indices(step)
    lo = self.process_index * self.local_batch_size
    batch = self.source.get(idx[lo:lo + self.local_batch_size])
    if self.augment is not None:
      rng = np.random.default_rng([self.seed, step, self.process_index, 1])
      batch = self.augment(batch, rng)
    return batch

  def __call__(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[Batch]:
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1


def eval_batches(source: DataSource, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """The whole split once, in order, in batches of one fixed shape.

  The last batch is padded (by repeating example 0) so that every batch has the same shape and
  a compiled evaluation step is reused; `batch["_valid"]` marks the real examples. Each process
  gets the same number of batches.
  """
  if batch_size % process_count:
    raise ValueError(f"batch size {batch_size} must divide evenly over {process_count} "
                     f"processes.")
  local = batch_size // process_count
  n = len(source)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    idx = idx[process_index * local:(process_index + 1) * local]
    valid = idx < n
    batch = source.get(np.where(valid, idx, 0))
    batch[VALID_KEY] = valid
    yield batch


def prefetch(iterator: Iterator[Batch], size: int = 2) -> Iterator[Batch]:
  """Runs `iterator` in a background thread, `size` batches ahead of the consumer."""
  if size <= 0:
    yield from iterator
    return
  buffer: queue.Queue = queue.Queue(maxsize=size)
  end = object()

  def produce():
    try:
      for item in iterator:
        buffer.put(item)
      buffer.put(end)
    except BaseException as error:  # pylint: disable=broad-except
      buffer.put(error)

  threading.Thread(target=produce, daemon=True).start()
  while True:
    item = buffer.get()
    if item is end:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


# --------------------------------------------------------------------------------------------
# Folders and files.


def require_dir(path: str | os.PathLike | None, dataset: str, layout: str, flag: str = "--data_dir"
                ) -> str:
  """`path` as a string when it is an existing folder, else one sentence naming the layout."""
  if not path:
    raise DatasetError(f"{dataset} needs a data folder: pass {flag}=/path/to/folder holding "
                       f"{layout}.")
  path = os.fspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise DatasetError(f"{dataset} data folder {path!r} does not exist; expected a folder "
                       f"holding {layout}.")
  return path


def require_file(path: str, dataset: str, what: str) -> str:
  if not os.path.isfile(path):
    raise DatasetError(f"{dataset}: missing file {path!r} ({what}).")
  return path


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, seeded train/test split of n examples: (train indices, test indices), sorted."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test fraction must lie in (0, 1), got {test_fraction}.")
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(round(n * test_fraction))
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])
