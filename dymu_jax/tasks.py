"""Task registry: what a task is, what its labels look like, its loss and its metrics.

A `Task` is a frozen, hashable value, so a tuple of tasks can be a static argument of a
jit-compiled function. Losses and metrics live with the task (one home): the train loop and the
evaluator only ever call `task.loss(...)` and `task.metric()`.

Label and prediction layouts (the batch contract, one entry per task name):

| kind           | label (per batch)                       | prediction                  |
|----------------|-----------------------------------------|-----------------------------|
| classification | int32 (B,), in [0, num_outputs); 255 = no label | logits (B, num_outputs) |
| regression     | float32 (B,); NaN = no label            | (B, 1), standardised units  |
| segmentation   | int32 (B, H, W), 255 = ignore           | logits (B, H, W, classes)   |
| depth          | float32 (B, H, W, 1), 0 = no depth      | (B, H, W, 1)                |
| normals        | float32 (B, H, W, 3), unit or 0 = none  | (B, H, W, 3), normalised in the loss |
| edges          | float32 (B, H, W, 1) in {0, 1}          | logits (B, H, W, 1)         |
| saliency       | float32 (B, H, W, 1) in [0, 1]          | logits (B, H, W, 1)         |

Images are float32 (B, H, W, C) in [0, 1].

Missing labels (not every example needs every label). A label that is missing is marked in the
label itself, so a batch needs no separate mask:

* regression: NaN (infinity is never allowed);
* classification: `IGNORE_LABEL` (255), the same value that segmentation ignores;
* dense kinds keep their pixel conventions: segmentation 255, depth 0, normals the zero vector
  (a whole example without that label is a map of those values); edges and saliency have no
  missing value, so every example must carry them.

`missing_value(kind)` gives that value and `label_present(task, labels)` marks the examples
that carry a label. Losses average over the present labels only (a batch in which a task has
no label at all contributes a loss of 0 and a zero gradient, and a NaN label never reaches a
gradient); metrics pool their sums and counts over the present labels of the whole set and
report NaN for a task with no present label at all (`TaskMetric.labelled` gives the count, so a
report can say so). Loaders translate their own ways of marking a missing label (for the
arrays source: a `<task>_mask` array or a `task_id` per example) into these values.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from dymu_jax import losses
from dymu_jax.metrics import tasks as task_metrics

CLASSIFICATION = "classification"
REGRESSION = "regression"
SEGMENTATION = "segmentation"
DEPTH = "depth"
NORMALS = "normals"
EDGES = "edges"
SALIENCY = "saliency"

KINDS = (CLASSIFICATION, REGRESSION, SEGMENTATION, DEPTH, NORMALS, EDGES, SALIENCY)
# Kinds whose labels are per-pixel maps (decoded by a dense head).
DENSE_KINDS = frozenset({SEGMENTATION, DEPTH, NORMALS, EDGES, SALIENCY})
IGNORE_LABEL = losses.IGNORE_LABEL  # a class or pixel without a label (255)


class UnknownTaskError(ValueError):
  """A task name that the dataset does not provide."""


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of a multi-task dataset.

  Attributes:
    name: the key of its labels in a batch and of its output in a prediction dict.
    kind: one of `KINDS`.
    num_outputs: output channels of its head (classes for classification and segmentation,
      1 for regression, depth, edges and saliency, 3 for surface normals).
    loss_type: variant of the kind's loss; "" takes the default (see `losses.task_loss`).
    pos_weight: for edges and saliency, a fixed weight of positive pixels in the balanced BCE;
      None balances each batch by its own label frequencies.
    label_scale, label_offset: used by regression only. The loss compares the prediction with
      (label - label_offset) / label_scale, so the network predicts in those units; metrics
      (and `label_units`) map a prediction back with prediction * label_scale + label_offset.
      A scale alone keeps ages in years from dwarfing other losses (UTKFace: 10); both together
      standardise a target (the arrays source sets them to the training split's mean and std
      when feature vectors come with `standardise_targets`).
  """

  name: str
  kind: str
  num_outputs: int
  loss_type: str = ""
  pos_weight: float | None = None
  label_scale: float = 1.0
  label_offset: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"Task {self.name!r} has unknown kind {self.kind!r}; allowed kinds are "
          f"{', '.join(KINDS)}.")
    if self.num_outputs < 1:
      raise ValueError(f"Task {self.name!r} needs num_outputs >= 1, got {self.num_outputs}.")
    if self.kind == NORMALS and self.num_outputs != 3:
      raise ValueError(f"Normals task {self.name!r} must have 3 outputs, got {self.num_outputs}.")
    if not (np.isfinite(self.label_scale) and self.label_scale > 0
            and np.isfinite(self.label_offset)):
      raise ValueError(f"Task {self.name!r} needs a finite label_scale > 0 and a finite "
                       f"label_offset, got {self.label_scale!r} and {self.label_offset!r}.")

  @property
  def is_dense(self) -> bool:
    return self.kind in DENSE_KINDS

  def loss(self, prediction, label):
    """Scalar loss of one batch (mean over valid samples or pixels)."""
    return losses.task_loss(self, prediction, label)

  def label_units(self, prediction):
    """A regression prediction (..., 1) of the network in the label's own units
    (prediction * label_scale + label_offset); any other kind's prediction as given."""
    if self.kind != REGRESSION:
      return prediction
    return prediction * self.label_scale + self.label_offset

  def metric(self) -> task_metrics.TaskMetric:
    """A fresh accumulating metric for this task (see `dymu_jax.metrics.tasks`)."""
    return task_metrics.metric_for(self)

  @property
  def metric_directions(self) -> dict[str, bool]:
    """Metric name -> True when higher is better."""
    return dict(task_metrics.metric_for(self).higher_is_better)

  @property
  def primary_metric(self) -> str:
    """The metric reported in tables and used for Delta_m."""
    return task_metrics.metric_for(self).primary


def missing_value(kind: str):
  """The label value that marks a missing label of `kind` (see the module docstring): NaN for
  regression, 255 for classification and segmentation, 0 for depth and normals, None for edges
  and saliency (which have none)."""
  if kind == REGRESSION:
    return float("nan")
  if kind in (CLASSIFICATION, SEGMENTATION):
    return IGNORE_LABEL
  if kind in (DEPTH, NORMALS):
    return 0
  return None


def label_present(task: Task, labels) -> np.ndarray:
  """(N,) bool: which examples of the labels (N, ...) of `task` carry a label (for a dense
  task: at least one labelled pixel). Host-side numpy, for loaders and reports."""
  labels = np.asarray(labels)
  n = labels.shape[0]
  flat = labels.reshape(n, int(np.prod(labels.shape[1:], dtype=np.int64)))
  if task.kind == REGRESSION:
    return ~np.isnan(flat).any(axis=1)
  if task.kind in (CLASSIFICATION, SEGMENTATION):
    return (flat != IGNORE_LABEL).any(axis=1)
  if task.kind == DEPTH:
    return (flat > 0).any(axis=1)
  if task.kind == NORMALS:
    return (flat != 0).any(axis=1)
  return np.ones((n,), bool)


def classification(name: str, num_classes: int) -> Task:
  return Task(name, CLASSIFICATION, num_classes)


def regression(name: str, label_scale: float = 1.0, label_offset: float = 0.0) -> Task:
  return Task(name, REGRESSION, 1, label_scale=label_scale, label_offset=label_offset)


def segmentation(name: str, num_classes: int) -> Task:
  return Task(name, SEGMENTATION, num_classes)


def depth(name: str = "depth") -> Task:
  return Task(name, DEPTH, 1)


def normals(name: str = "normals") -> Task:
  return Task(name, NORMALS, 3)


def edges(name: str = "edges", pos_weight: float | None = None) -> Task:
  return Task(name, EDGES, 1, pos_weight=pos_weight)


def saliency(name: str = "saliency") -> Task:
  return Task(name, SALIENCY, 1)


def select(tasks: Sequence[Task], names: Sequence[str] | str | None) -> tuple[Task, ...]:
  """The tasks named in `names` (a list or a comma-separated string), in that order.

  None or an empty selection keeps every task. An unknown name stops with one sentence that
  lists the allowed names.
  """
  if names is None:
    return tuple(tasks)
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    return tuple(tasks)
  by_name = {t.name: t for t in tasks}
  selected = []
  for name in names:
    if name not in by_name:
      raise UnknownTaskError(
          f"Unknown task {name!r}; this dataset provides: {', '.join(by_name)}.")
    if by_name[name] in selected:
      raise UnknownTaskError(f"Task {name!r} is selected twice.")
    selected.append(by_name[name])
  return tuple(selected)


def by_name(tasks: Sequence[Task]) -> Mapping[str, Task]:
  return {t.name: t for t in tasks}
