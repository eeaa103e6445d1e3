"""A tiny two-task `Method` and data for the training-engine tests.

The model is flatten -> dense -> batch norm -> relu -> two heads (3-way classification of which
image third is brightest, and regression of the mean brightness). Batch norm makes the loss
depend on batch statistics, pooled over `axis_name` under pmap, so one device and eight agree
only when the pooling is right. Each step draws task weights from the step's key (like a
preference drawn per batch), so a resumed run matches only if it continues the same keys.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base as data_lib

IMAGE_SHAPE = (6, 6, 1)
TASKS = (tasks_lib.classification("third", 3), tasks_lib.regression("brightness",
                                                                     label_scale=10.0))


class ToyNet(nn.Module):
  """Shared trunk with batch norm, one head per task."""

  axis_name: str | None = None
  hidden: int = 16

  @nn.compact
  def __call__(self, images, train: bool):
    x = images.reshape((images.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=False)(x)  # a bias before batch norm has no gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
    x = nn.relu(x)
    return {"third": nn.Dense(3)(x), "brightness": nn.Dense(1)(x)}


class ToyMethod:
  """Weighted sum of the two task losses, weights drawn per step from the step's key.

  Args:
    axis_name: the pmap axis that batch statistics are pooled over (None under "mesh").
    nan_at_step: make the loss of task `nan_task` NaN at this step (guard tests).
    nan_task: index into `TASKS`.
    controls: what `eval_controls` returns (default `[None]`).
  """

  name = "toy"
  tasks = TASKS

  def __init__(self, axis_name: str | None = None, nan_at_step: int | None = None,
               nan_task: int = 1, controls=(None,)):
    self.axis_name = axis_name
    self.nan_at_step, self.nan_task = nan_at_step, nan_task
    self.controls = list(controls)
    self.net = ToyNet(axis_name=axis_name)

  def init(self, rng, batch):
    return self.net.init(rng, batch["image"], train=False)

  def loss(self, params, model_state, batch, rng, step):
    outputs, updates = self.net.apply({"params": params, **model_state}, batch["image"],
                                      train=True, mutable=["batch_stats"])
    weights = jax.nn.softmax(jax.random.normal(rng, (len(self.tasks),)))
    aux, total = {}, 0.0
    for i, task in enumerate(self.tasks):
      task_loss = task.loss(outputs[task.name], batch[task.name])
      if self.nan_at_step is not None and i == self.nan_task:
        task_loss = jnp.where(step == self.nan_at_step, jnp.nan, task_loss)
      aux[f"loss/{task.name}"] = task_loss
      total = total + len(self.tasks) * weights[i] * task_loss
    return total, (aux, {**model_state, **updates})

  def predict(self, variables, images, controls=None):
    outputs = self.net.apply(variables, images, train=False)
    if controls is not None:  # a control that changes the output, to tell settings apart
      outputs = {**outputs, "third": outputs["third"] * controls["temperature"]}
    return outputs

  def eval_controls(self):
    return self.controls

  def required_variables(self):
    return ()


def make_arrays(n: int, seed: int):
  """Images in [0, 1] and their labels: brightest third (0..2) and 10 * mean brightness."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(n,) + IMAGE_SHAPE).astype(np.float32)
  images *= rng.uniform(0.2, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
  thirds = images.reshape(n, 3, -1).mean(-1)
  labels = {"third": thirds.argmax(-1).astype(np.int32),
            "brightness": (10.0 * images.mean(axis=(1, 2, 3))).astype(np.float32)}
  return images, labels


def make_source(split: str = "train", n: int = 256, seed: int = 0) -> data_lib.ArraySource:
  images, labels = make_arrays(n, seed if split == "train" else seed + 1)
  return data_lib.ArraySource("toy", split, images, labels, TASKS)


class SlowSource(data_lib.DataSource):
  """A source whose reads take `delay` seconds (so a test can kill a run mid-training)."""

  def __init__(self, parent: data_lib.DataSource, delay: float):
    self.parent, self.delay = parent, delay
    self.name, self.split, self.tasks = parent.name, parent.split, parent.tasks

  def __len__(self):
    return len(self.parent)

  def get(self, indices):
    time.sleep(self.delay)
    return self.parent.get(indices)
