"""Task registry: what a task is, what its labels look like, its loss and its metrics.

A `Task` is a frozen, hashable value, so a tuple of tasks can be a static argument of a
jit-compiled function. Losses and metrics live with the task (one home): the train loop and the
evaluator only ever call `task.loss(...)` and `task.metric()`.

Label and prediction layouts (the batch contract, one entry per task name):

| kind           | label (per batch)                       | prediction                  |
|----------------|-----------------------------------------|-----------------------------|
| classification | int32 (B,), in [0, num_outputs); 255 = no label | logits (B, num_outputs) |
| regression     | float32 (B,)                            | (B, 1)                      |
| segmentation   | int32 (B, H, W), 255 = ignore           | logits (B, H, W, classes)   |
| depth          | float32 (B, H, W, 1), 0 = no depth      | (B, H, W, 1)                |
| normals        | float32 (B, H, W, 3), unit or 0 = none  | (B, H, W, 3), normalised in the loss |
| edges          | float32 (B, H, W, 1) in {0, 1}          | logits (B, H, W, 1)         |
| saliency       | float32 (B, H, W, 1) in [0, 1]          | logits (B, H, W, 1)         |

Images are float32 (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

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
IGNORE_LABEL = 255


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
    label_scale: regression targets are divided by this inside the loss (predictions live in
      the scaled space; `predict` multiplies back), so ages in years do not dwarf other losses.
  """

  name: str
  kind: str
  num_outputs: int
  loss_type: str = ""
  pos_weight: float | None = None
  label_scale: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
          f"Task {self.name!r} has unknown kind {self.kind!r}; allowed kinds are "
          f"{', '.join(KINDS)}.")
    if self.num_outputs < 1:
      raise ValueError(f"Task {self.name!r} needs num_outputs >= 1, got {self.num_outputs}.")
    if self.kind == NORMALS and self.num_outputs != 3:
      raise ValueError(f"Normals task {self.name!r} must have 3 outputs, got {self.num_outputs}.")

  @property
  def is_dense(self) -> bool:
    return self.kind in DENSE_KINDS

  def loss(self, prediction, label):
    """Scalar loss of one batch (mean over valid samples or pixels)."""
    return losses.task_loss(self, prediction, label)

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


def classification(name: str, num_classes: int) -> Task:
  return Task(name, CLASSIFICATION, num_classes)


def regression(name: str, label_scale: float = 1.0) -> Task:
  return Task(name, REGRESSION, 1, label_scale=label_scale)


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
