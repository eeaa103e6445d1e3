"""Accumulating per-task metrics, functional and CLU style.

A `TaskMetric` (one per task, from `metric_for(task)`) owns no data. Its state is a dict of
fixed-shape arrays:

    metric = metric_for(task)                            # or task.metric()
    state = metric.init()                                # numpy zeros
    for batch in batches:                                # jnp; compiled, fine inside jax.jit
      state = metric.update(state, predictions[task.name], batch[task.name], batch["_valid"])
    values = metric.compute(state)                       # {"miou": 0.41, ...} on host

`init_all`, `update_all`, `merge_all` and `compute_all` do the same for a tuple of tasks.

`update` only adds sufficient statistics of one batch (counts, sums, confusion matrices,
histograms), so states of different batches or hosts `merge` by summation and the result does
not depend on how the set was cut into batches. Counts are int32 (exact up to 2**31 pixels);
sums of errors are float32 inside jit.

Every `compute` returns NaN for a metric that has no valid data at all (for example a set in
which every pixel is ignored), and never divides by zero.

Missing labels (the convention of `dymu_jax.tasks`: NaN for regression, 255 for
classification) are left out: accuracy, mae and rmse are sums over the present labels of the
whole set divided by their count (not a mean of batch means). A task with no present label in
the whole evaluation keeps its metric names, with the value NaN; `labelled(state)` (and
`labelled_all`) give the number of labelled examples (pixels for segmentation, depth and
normals; images for edges and saliency) that each metric was computed over, so a report can
say "no labels" instead of showing a bare NaN.

Metrics per task kind (METHODS.md section 4; the primary metric first):

| kind           | metrics                                                                    |
|----------------|----------------------------------------------------------------------------|
| classification | accuracy (labels 255 = missing, not counted)                               |
| regression     | mae, rmse, in the label's units (prediction * label_scale + label_offset   |
|                | vs label), over the labels that are not NaN (NaN = missing)                |
| segmentation   | miou (pooled confusion matrix, ignore 255), pixel_accuracy                 |
| depth          | rmse, mae over pixels with depth > 0, pooled over the set                  |
| normals        | mean_angle, median_angle, rmse_angle (degrees), within_11_25/22_5/30 (%)   |
| edges          | odsf (best fixed threshold over the set), loss (per-image balanced BCE)    |
| saliency       | maxf (F_beta, beta^2 = 0.3, of image-averaged precision and recall)        |

Documented approximations:
- normals `median_angle` is read from a histogram of 0.1-degree bins: the centre of the bin
  that holds the lower median, so it is within 0.05 degrees of the exact lower median.
- edges `odsf` counts pixels without the boundary-matching tolerance of the MATLAB benchmark
  (a pixel is a true positive only where the label is an edge).
- edges and saliency thresholds are 0.01, ..., 0.99 on sigmoid(prediction); a pixel is
  predicted positive at threshold t when its probability is > t (as the reference evaluation
  code). Probabilities are binned into 100 bins so the state stays small.

This module never imports `dymu_jax.tasks` (which imports it); it dispatches on `task.kind`.

(Over 500 lines: one accumulating metric per task kind, each with its state, update and
result; they share the masking and merging rules defined at the top.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import losses

State = dict[str, Any]

IGNORE_LABEL = losses.IGNORE_LABEL  # 255: a class or pixel without a label
NUM_THRESHOLDS = 99  # thresholds 0.01 ... 0.99 for edges and saliency
_NUM_PROB_BINS = NUM_THRESHOLDS + 1
ANGLE_BIN_DEGREES = 0.1
_NUM_ANGLE_BINS = int(round(180 / ANGLE_BIN_DEGREES))
SALIENCY_BETA_SQUARED = 0.3


def _example_mask(valid, batch_size: int):
  """(B,) bool mask of real examples; all True when `valid` is None."""
  if valid is None:
    return jnp.ones((batch_size,), bool)
  return jnp.asarray(valid).astype(bool).reshape((batch_size,))


def _broadcast_examples(mask, like):
  """A (B,) mask broadcast against an array of shape (B, ...)."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _ratio(numerator, denominator) -> float:
  """numerator / denominator as a float, NaN when the denominator is 0."""
  numerator, denominator = float(numerator), float(denominator)
  return numerator / denominator if denominator > 0 else float("nan")


def _probability_bins(logits):
  """Bin k in [0, 99] of sigmoid(logits): p in (k/100, (k+1)/100] lands in bin k (p = 0 in 0).

  So p > t_j for the threshold t_j = (j + 1) / 100 exactly when its bin k > j: the count of
  positives at threshold j is the sum of bins j+1 .. 99 (see `_positives_above`).
  """
  prob = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
  return jnp.clip(jnp.ceil(prob * _NUM_PROB_BINS).astype(jnp.int32) - 1, 0, _NUM_PROB_BINS - 1)


def _positives_above(histogram):
  """Counts strictly above each threshold: out[..., j] = sum(histogram[..., j+1:])."""
  suffix = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
  return suffix[..., 1:]


class TaskMetric:
  """Accumulating metrics of one task; stateless, the state is an explicit dict of arrays.

  Attributes:
    task: the `dymu_jax.tasks.Task` it measures.
    higher_is_better: ((metric name, True when higher is better), ...), in report order.
    primary: the metric reported in tables and used for Delta_m.
  """

  higher_is_better: tuple[tuple[str, bool], ...] = ()
  primary: str = ""

  def __init__(self, task):
    self.task = task

  def __repr__(self):
    return f"{type(self).__name__}({self.task.name!r})"

  # Equal metrics of equal tasks share one compiled `update` (the metric is a static argument).
  def __eq__(self, other):
    return type(self) is type(other) and self.task == other.task

  def __hash__(self):
    return hash((type(self), self.task))

  def _spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """State layout: name -> (shape, numpy dtype)."""
    raise NotImplementedError

  def _batch_stats(self, prediction, label, mask) -> State:
    """Sufficient statistics of one batch, `mask` being the (B,) real-example mask."""
    raise NotImplementedError

  def _compute(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
    raise NotImplementedError

  def init(self) -> State:
    """Zero state: a dict of fixed-shape float64 / int64 numpy arrays."""
    return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._spec().items()}

  def update(self, state: State, prediction, label, valid=None) -> State:
    """The state plus the statistics of one batch; pure jax.numpy, fine inside `jax.jit`.

    Args:
      state: from `init`, `update` or `merge`.
      prediction: the task's head output (layouts in `dymu_jax.tasks`).
      label: the task's labels.
      valid: optional (B,) bool mask of real examples (False for the padding of the last
        evaluation batch).
    """
    label = jnp.asarray(label)
    mask = _example_mask(valid, label.shape[0])
    return _update(self, state, jnp.asarray(prediction), label, mask)

  def merge(self, a: State, b: State) -> State:
    """Statistics of the union of two disjoint sets of examples."""
    return {name: a[name] + b[name] for name in a}

  def compute(self, state: State) -> dict[str, float]:
    """Metric name -> value on host (numpy, float64); NaN where there is no valid data."""
    host = {name: np.asarray(value, np.float64) for name, value in state.items()}
    return self._compute(host)

  _COUNT_KEY = "count"

  def labelled(self, state: State) -> int:
    """How many labelled items the metrics of `state` pool: examples for classification and
    regression (missing labels and padding not counted), pixels for segmentation, depth and
    normals, images for edges and saliency. 0 means every metric of `compute` is NaN."""
    return int(np.sum(np.asarray(state[self._COUNT_KEY], np.int64)))


# One compiled program per (metric, shapes) also outside jit: op-by-op dispatch of the many
# small reductions is far slower. Inside an outer jit this simply inlines.
@functools.partial(jax.jit, static_argnums=0)
def _update(metric: TaskMetric, state: State, prediction, label, mask) -> State:
  stats = metric._batch_stats(prediction, label, mask)  # pylint: disable=protected-access
  return {name: jnp.asarray(state[name], stats[name].dtype) + stats[name] for name in state}


class ClassificationMetric(TaskMetric):
  """accuracy over examples whose label is not 255 (255 = no label)."""

  higher_is_better = (("accuracy", True),)
  primary = "accuracy"

  def _spec(self):
    return {"correct": ((), np.int64), "count": ((), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    label = label.astype(jnp.int32)
    counted = mask & (label != IGNORE_LABEL)
    correct = counted & (jnp.argmax(prediction, axis=-1) == label)
    return {"correct": jnp.sum(correct, dtype=jnp.int32),
            "count": jnp.sum(counted, dtype=jnp.int32)}

  def _compute(self, state):
    return {"accuracy": _ratio(state["correct"], state["count"])}


class RegressionMetric(TaskMetric):
  """mae and rmse in the label's units: prediction[..., 0] * label_scale + label_offset vs
  label, over the examples whose label is not NaN (NaN = no label)."""

  higher_is_better = (("mae", False), ("rmse", False))
  primary = "mae"

  def _spec(self):
    return {"abs_error": ((), np.float64), "squared_error": ((), np.float64),
            "count": ((), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    value = self.task.label_units(prediction.astype(jnp.float32)[..., 0])
    label = label.astype(jnp.float32)
    counted = mask & ~jnp.isnan(label)
    error = jnp.where(counted, value - jnp.where(counted, label, 0.0), 0.0)
    return {"abs_error": jnp.sum(jnp.abs(error)),
            "squared_error": jnp.sum(jnp.square(error)),
            "count": jnp.sum(counted, dtype=jnp.int32)}

  def _compute(self, state):
    mse = _ratio(state["squared_error"], state["count"])
    return {"mae": _ratio(state["abs_error"], state["count"]), "rmse": float(np.sqrt(mse))}


class SegmentationMetric(TaskMetric):
  """miou and pixel_accuracy from a confusion matrix pooled over the whole set.

  Pixels labelled 255 (and, defensively, any label outside [0, classes)) are ignored. The mean
  IoU runs over the classes whose union (ground truth or prediction) is non-empty over the set,
  so a class that never appears and is never predicted does not count.
  """

  higher_is_better = (("miou", True), ("pixel_accuracy", True))
  primary = "miou"
  _COUNT_KEY = "confusion"

  def _spec(self):
    classes = self.task.num_outputs
    return {"confusion": ((classes, classes), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    classes = self.task.num_outputs
    label = label.astype(jnp.int32)
    predicted = jnp.argmax(prediction, axis=-1).astype(jnp.int32)
    counted = _broadcast_examples(mask, label) & (label >= 0) & (label < classes)
    # Row = ground truth, column = prediction.
    index = jnp.where(counted, label, 0) * classes + predicted
    flat = jnp.bincount(index.reshape(-1), weights=counted.reshape(-1).astype(jnp.int32),
                        length=classes * classes)
    return {"confusion": flat.reshape(classes, classes)}

  def _compute(self, state):
    confusion = state["confusion"]
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    miou = (float(np.mean(true_positive[present] / union[present])) if present.any()
            else float("nan"))
    return {"miou": miou, "pixel_accuracy": _ratio(true_positive.sum(), confusion.sum())}


class DepthMetric(TaskMetric):
  """rmse = sqrt(total squared error / total valid pixels) and mae, over pixels with depth > 0."""

  higher_is_better = (("rmse", False), ("mae", False))
  primary = "rmse"

  def _spec(self):
    return {"abs_error": ((), np.float64), "squared_error": ((), np.float64),
            "count": ((), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    label = label.astype(jnp.float32)
    counted = _broadcast_examples(mask, label) & (label > 0)
    error = jnp.where(counted, prediction.astype(jnp.float32) - label, 0.0)
    return {"abs_error": jnp.sum(jnp.abs(error)),
            "squared_error": jnp.sum(jnp.square(error)),
            "count": jnp.sum(counted, dtype=jnp.int32)}

  def _compute(self, state):
    mse = _ratio(state["squared_error"], state["count"])
    return {"rmse": float(np.sqrt(mse)), "mae": _ratio(state["abs_error"], state["count"])}


class NormalsMetric(TaskMetric):
  """Angular error in degrees between normalised prediction and label, over non-zero labels.

  The angle is atan2(|p x g|, p . g), accurate for small angles where arccos is not.
  `median_angle` is the centre of the 0.1-degree histogram bin holding the lower median.
  """

  higher_is_better = (("mean_angle", False), ("median_angle", False), ("rmse_angle", False),
                      ("within_11_25", True), ("within_22_5", True), ("within_30", True))
  primary = "mean_angle"
  _WITHIN = (("within_11_25", 11.25), ("within_22_5", 22.5), ("within_30", 30.0))

  def _spec(self):
    spec = {"angle": ((), np.float64), "squared_angle": ((), np.float64),
            "count": ((), np.int64), "histogram": ((_NUM_ANGLE_BINS,), np.int64)}
    spec.update({name: ((), np.int64) for name, _ in self._WITHIN})
    return spec

  def _batch_stats(self, prediction, label, mask):
    pred = losses.normalize(prediction)
    label = label.astype(jnp.float32)
    counted = mask.reshape(mask.shape + (1,) * (label.ndim - 2)) & jnp.any(label != 0, axis=-1)
    gt = losses.normalize(label)
    cross = jnp.linalg.norm(jnp.cross(pred, gt), axis=-1)
    angle = jnp.degrees(jnp.arctan2(cross, jnp.sum(pred * gt, axis=-1)))
    angle = jnp.where(counted, angle, 0.0)
    bins = jnp.clip((angle / ANGLE_BIN_DEGREES).astype(jnp.int32), 0, _NUM_ANGLE_BINS - 1)
    stats = {
        "angle": jnp.sum(angle),
        "squared_angle": jnp.sum(jnp.square(angle)),
        "count": jnp.sum(counted, dtype=jnp.int32),
        "histogram": jnp.bincount(bins.reshape(-1), weights=counted.reshape(-1).astype(jnp.int32),
                                  length=_NUM_ANGLE_BINS),
    }
    for name, limit in self._WITHIN:
      stats[name] = jnp.sum(counted & (angle < limit), dtype=jnp.int32)
    return stats

  def _compute(self, state):
    count = state["count"]
    values = {
        "mean_angle": _ratio(state["angle"], count),
        "median_angle": float("nan"),
        "rmse_angle": float(np.sqrt(_ratio(state["squared_angle"], count))),
    }
    if count > 0:
      rank = np.ceil(count / 2)  # 1-based rank of the lower median
      index = int(np.searchsorted(np.cumsum(state["histogram"]), rank))
      values["median_angle"] = (index + 0.5) * ANGLE_BIN_DEGREES
    for name, _ in self._WITHIN:
      values[name] = 100.0 * _ratio(state[name], count)
    return values


class EdgesMetric(TaskMetric):
  """odsf: F-measure at the best fixed threshold over the set; loss: mean balanced BCE.

  TP, FP and FN are pooled over the set at each threshold (no matching tolerance, a documented
  approximation of the MATLAB benchmark); F = 2 TP / (2 TP + FP + FN). Labels are binarised at
  0.5. `loss` is the balanced BCE of each image (weights from that image's labels, or the task's
  pos_weight) averaged over images, so it does not depend on the batch size.
  """

  higher_is_better = (("odsf", True), ("loss", False))
  primary = "odsf"
  _COUNT_KEY = "images"

  def _spec(self):
    return {"positive_hist": ((_NUM_PROB_BINS,), np.int64),
            "negative_hist": ((_NUM_PROB_BINS,), np.int64),
            "loss": ((), np.float64), "images": ((), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    label = label.astype(jnp.float32)
    pixel_mask = _broadcast_examples(mask, label)
    positive = label >= 0.5
    bins = _probability_bins(prediction).reshape(-1)

    def histogram(selected):
      return jnp.bincount(bins, weights=selected.reshape(-1).astype(jnp.int32),
                          length=_NUM_PROB_BINS)

    per_image = losses.balanced_bce(prediction, label, self.task.pos_weight,
                                    axis=tuple(range(1, label.ndim)))
    return {"positive_hist": histogram(pixel_mask & positive),
            "negative_hist": histogram(pixel_mask & ~positive),
            "loss": jnp.sum(jnp.where(mask, per_image, 0.0)),
            "images": jnp.sum(mask, dtype=jnp.int32)}

  def _compute(self, state):
    true_positive = _positives_above(state["positive_hist"])
    false_positive = _positives_above(state["negative_hist"])
    actual = state["positive_hist"].sum()
    odsf = float("nan")
    if actual > 0:
      # 2 TP + FP + FN = TP + FP + actual > 0 whenever the set has an edge pixel.
      odsf = float(np.max(2 * true_positive / (true_positive + false_positive + actual)))
    return {"odsf": odsf, "loss": _ratio(state["loss"], state["images"])}


class SaliencyMetric(TaskMetric):
  """maxf: max over thresholds of F_beta (beta^2 = 0.3) of image-averaged precision and recall.

  Per image and threshold, precision = TP / (TP + FP) and recall = TP / (TP + FN), each 0 when
  its denominator is 0 (as the reference code's 1e-12 guard); labels are binarised at 0.5.
  """

  higher_is_better = (("maxf", True),)
  primary = "maxf"
  _COUNT_KEY = "images"

  def _spec(self):
    return {"precision": ((NUM_THRESHOLDS,), np.float64),
            "recall": ((NUM_THRESHOLDS,), np.float64), "images": ((), np.int64)}

  def _batch_stats(self, prediction, label, mask):
    label = label.astype(jnp.float32)
    batch = label.shape[0]
    positive = (label >= 0.5).reshape(batch, -1)
    bins = _probability_bins(prediction).reshape(batch, -1)
    index = (jnp.arange(batch, dtype=jnp.int32)[:, None] * _NUM_PROB_BINS + bins).reshape(-1)

    def histogram(selected):
      flat = jnp.bincount(index, weights=selected.reshape(-1).astype(jnp.int32),
                          length=batch * _NUM_PROB_BINS)
      return flat.reshape(batch, _NUM_PROB_BINS)

    pos_hist, neg_hist = histogram(positive), histogram(~positive)
    # Counts strictly above threshold j: sum of bins j+1 .. 99.
    true_positive = jnp.cumsum(pos_hist[:, ::-1], axis=-1)[:, ::-1][:, 1:]
    false_positive = jnp.cumsum(neg_hist[:, ::-1], axis=-1)[:, ::-1][:, 1:]
    actual = jnp.sum(pos_hist, axis=-1, keepdims=True)
    true_positive = true_positive.astype(jnp.float32)
    precision = true_positive / jnp.maximum(true_positive + false_positive, 1)
    recall = true_positive / jnp.maximum(actual, 1)
    weight = mask.astype(jnp.float32)[:, None]
    return {"precision": jnp.sum(precision * weight, axis=0),
            "recall": jnp.sum(recall * weight, axis=0),
            "images": jnp.sum(mask, dtype=jnp.int32)}

  def _compute(self, state):
    images = state["images"]
    if images <= 0:
      return {"maxf": float("nan")}
    precision, recall = state["precision"] / images, state["recall"] / images
    beta2 = SALIENCY_BETA_SQUARED
    denominator = beta2 * precision + recall
    f_beta = np.where(denominator > 0,
                      (1 + beta2) * precision * recall / np.where(denominator > 0, denominator, 1),
                      0.0)
    return {"maxf": float(np.max(f_beta))}


_BY_KIND = {
    "classification": ClassificationMetric,
    "regression": RegressionMetric,
    "segmentation": SegmentationMetric,
    "depth": DepthMetric,
    "normals": NormalsMetric,
    "edges": EdgesMetric,
    "saliency": SaliencyMetric,
}


@functools.lru_cache(maxsize=None)
def metric_for(task) -> TaskMetric:
  """The (cached, stateless) `TaskMetric` of a task, chosen by its kind."""
  if task.kind not in _BY_KIND:
    raise ValueError(f"Task {task.name!r} has kind {task.kind!r}, which has no metrics; "
                     f"allowed kinds are {', '.join(_BY_KIND)}.")
  return _BY_KIND[task.kind](task)


def init_all(tasks: Sequence) -> dict[str, State]:
  """Zero states of every task, keyed by task name."""
  return {task.name: metric_for(task).init() for task in tasks}


def update_all(states: Mapping[str, State], predictions: Mapping[str, Any],
               batch: Mapping[str, Any], tasks: Sequence) -> dict[str, State]:
  """Every task's state updated with one batch; `batch["_valid"]` (if present) masks padding.

  Pure jax.numpy: `tasks` is a tuple of hashable Task values, so wrap it as
  `jax.jit(update_all, static_argnums=3)`.
  """
  valid = batch.get("_valid")
  return {task.name: metric_for(task).update(states[task.name], predictions[task.name],
                                             batch[task.name], valid)
          for task in tasks}


def merge_all(a: Mapping[str, State], b: Mapping[str, State],
              tasks: Sequence) -> dict[str, State]:
  """Task-wise `merge` of two state dicts."""
  return {task.name: metric_for(task).merge(a[task.name], b[task.name]) for task in tasks}


def compute_all(states: Mapping[str, State], tasks: Sequence) -> dict[str, dict[str, float]]:
  """{task name: {metric name: value}} on host."""
  return {task.name: metric_for(task).compute(states[task.name]) for task in tasks}


def labelled_all(states: Mapping[str, State], tasks: Sequence) -> dict[str, int]:
  """{task name: number of labelled items its metrics pool} (see `TaskMetric.labelled`); a 0
  marks a task whose metrics are NaN because the set holds none of its labels."""
  return {task.name: metric_for(task).labelled(states[task.name]) for task in tasks}


# ----------------------------------------------------------------------------------------------
# Primary metrics: the one home of "which metric, which way is better" (from the task's kind).


def primary(task) -> tuple[str, bool]:
  """(the task's primary metric name, whether higher is better)."""
  metric = metric_for(task)
  return metric.primary, dict(metric.higher_is_better)[metric.primary]


def normalised_metric(value: float, reference: float, higher_is_better: bool) -> float:
  """A metric relative to a reference, above 1 when better: v / ref, or ref / v when lower is
  better (errors). NaN when either is not finite or the divisor is 0."""
  value, reference = float(value), float(reference)
  numerator, denominator = (value, reference) if higher_is_better else (reference, value)
  if not (math.isfinite(value) and math.isfinite(reference)) or denominator == 0:
    return float("nan")
  return numerator / denominator


def primary_metrics(method_tasks: Sequence, per_task: Mapping[str, Mapping[str, float]]
                    ) -> dict[str, tuple[float, bool]]:
  """{task: (primary metric value, higher is better)} from {task: {metric: value}}."""
  out = {}
  for task in method_tasks:
    metric = metric_for(task)
    out[task.name] = (float(per_task[task.name][metric.primary]),
                      dict(metric.higher_is_better)[metric.primary])
  return out


def mean_normalised_metric(method_tasks, per_task, reference_per_task) -> float:
  """Mean over tasks of `normalised_metric` of the primary metrics against a reference."""
  values = primary_metrics(method_tasks, per_task)
  reference = primary_metrics(method_tasks, reference_per_task)
  return float(np.mean([normalised_metric(values[n][0], reference[n][0], values[n][1])
                        for n in values]))
