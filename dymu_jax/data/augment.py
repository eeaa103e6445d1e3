"""Batch augmentation that keeps dense labels aligned with the image.

`make_augment(tasks)` returns `fn(batch, rng) -> batch` for `Batcher(augment=...)`. Per example
it draws a horizontal flip, a scale factor s and a window position, and resamples the image and
every per-pixel label map through the same geometry:

  flip -> resize by s (to round(s*H) x round(s*W)) -> crop or pad back to H x W.

The image is resampled bilinearly, label maps by nearest neighbour (class ids, "no label" values
and unit normals are never blended); both use half-pixel centres like `dymu_jax.data.images`,
so a label pixel is the source pixel nearest to where the image pixel samples. Where the scaled
example is smaller than H x W the rest is padding: 0 in the image and each label map's "no
label" value (255 for segmentation, 0 for depth, normals, edges and saliency), so padded pixels
are ignored by the losses and metrics. Flipping negates the x component of surface normals.
Classification and regression labels and metadata keys ("_valid"...) pass through unchanged,
and so do batches of feature vectors (B, D) (the arrays source's "inputs"): they have no pixels
to move, so the whole batch comes back as it is.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Sequence

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base

Augment = Callable[[base.Batch, np.random.Generator], base.Batch]

# Value of padded pixels per dense kind: what that kind's loss reads as "no label".
PAD_VALUES = {tasks_lib.SEGMENTATION: tasks_lib.IGNORE_LABEL, tasks_lib.DEPTH: 0.0,
              tasks_lib.NORMALS: 0.0, tasks_lib.EDGES: 0.0, tasks_lib.SALIENCY: 0.0}
IMAGE_PAD = 0.0


def make_augment(tasks: Sequence[tasks_lib.Task], *, flip: bool | float = True,
                 scale_range: tuple[float, float] | None = (0.75, 1.25),
                 crop: bool = True) -> Augment:
  """An augmentation `fn(batch, rng) -> batch` for batches of `tasks`.

  Args:
    tasks: the tasks whose labels the batches carry; dense ones are resampled with the image.
    flip: True flips each example horizontally with probability 0.5, False never; a float in
      [0, 1] is the flip probability.
    scale_range: (low, high): each example is resized by a factor drawn uniformly from it
      (0 < low <= high); None or (1, 1) keeps the size.
    crop: True places the H x W window at a random position of the resized example (a random
      crop when larger, random padding when smaller); False centres it.

  Returns:
    A pure function of (batch, rng): the same generator state gives the same batch.
  """
  tasks = tuple(tasks)
  for task in tasks:
    if not isinstance(task, tasks_lib.Task):
      raise ValueError(f"make_augment needs Task values (see dymu_jax.tasks), got {task!r}.")
  if isinstance(flip, (bool, np.bool_)):
    flip_prob = 0.5 if flip else 0.0
  elif isinstance(flip, (int, float)) and 0.0 <= flip <= 1.0:
    flip_prob = float(flip)
  else:
    raise ValueError(f"flip must be True, False or a probability in [0, 1], got {flip!r}.")
  if scale_range is None:
    scale_range = (1.0, 1.0)
  try:
    low, high = (float(v) for v in scale_range)
  except (TypeError, ValueError):
    raise ValueError(f"scale_range must be a pair (low, high) of numbers, got "
                     f"{scale_range!r}.") from None
  if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
    raise ValueError(f"scale_range must satisfy 0 < low <= high (finite), got {scale_range!r}.")
  if not isinstance(crop, (bool, np.bool_)):
    raise ValueError(f"crop must be True or False, got {crop!r}.")
  dense = {t.name: t for t in tasks if t.is_dense}
  other = {t.name for t in tasks if not t.is_dense}
  workspace = _Workspace()

  def augment(batch: base.Batch, rng: np.random.Generator) -> base.Batch:
    image = np.asarray(batch["image"])
    if image.ndim == 2:  # feature vectors: no geometry to augment
      return batch
    if image.ndim != 4:
      raise ValueError(f"augment needs images of shape (B, H, W, C), got {image.shape}.")
    n, height, width = image.shape[:3]
    for key, value in batch.items():
      if key == "image" or key in other or key.startswith("_"):
        continue
      if key not in dense:
        raise ValueError(f"batch key {key!r} is not one of the tasks given to make_augment "
                         f"({', '.join(t.name for t in tasks) or 'none'}); pass its Task so "
                         f"its labels are transformed with the image.")
      if np.shape(value)[:3] != (n, height, width):
        raise ValueError(f"label map {key!r} has shape {np.shape(value)}, but the images are "
                         f"{(n, height, width)} (B, H, W).")
    flips = rng.random(n) < flip_prob if flip_prob > 0 else np.zeros(n, bool)
    scales = rng.uniform(low, high, n) if high > low else np.full(n, low)
    rows = _Axis(rng, height, scales, crop, reverse=None)
    cols = _Axis(rng, width, scales, crop, reverse=flips)

    out = dict(batch)
    out["image"] = _bilinear(image.astype(np.float32, copy=False), rows, cols, workspace)
    # Nearest neighbour: one gather per map, through flat indices into (B*H*W, ...).
    example = np.arange(n)[:, None]
    flat = workspace.get("index", (n, height, width), np.intp)
    np.add(((example * height + rows.nearest) * width)[:, :, None], cols.nearest[:, None, :],
           out=flat)
    for key, task in dense.items():
      if key not in batch:
        continue
      label = np.asarray(batch[key])
      source = label.reshape((n * height * width,) + label.shape[3:])
      resampled = np.take(source, flat, axis=0, mode="clip")  # indices are in range
      _pad(resampled, rows, cols, PAD_VALUES[task.kind])
      if task.kind == tasks_lib.NORMALS:
        for i in np.flatnonzero(flips):
          resampled[i, ..., 0] *= -1  # a mirrored surface faces the mirrored way
      out[key] = resampled
    return out

  return augment


class _Axis:
  """Where each output pixel along one axis samples its example (B, size), for both methods.

  Output pixel o sits at position p = o + offset of the resized example of length m; it samples
  source coordinate (p + 0.5) * size / m - 0.5 (half-pixel centres), and is padding when p lies
  outside [0, m).
  """

  def __init__(self, rng: np.random.Generator, size: int, scales: np.ndarray, crop: bool,
               reverse: np.ndarray | None):
    n = len(scales)
    resized = np.maximum(1, np.rint(scales * size)).astype(np.int64)
    slack = resized - size  # > 0: crop away, < 0: pad
    if crop:
      offset = rng.integers(np.minimum(slack, 0), np.maximum(slack, 0) + 1, size=n)
    else:
      offset = slack // 2
    position = np.arange(size)[None, :] + offset[:, None]
    # Output pixels [start, stop) fall inside the resized example; the rest is padding.
    self.start = np.clip(-offset, 0, size)
    self.stop = np.clip(resized - offset, 0, size)
    # Nearest: floor((p + 0.5) * size / m) in exact integers, as `images.nearest_indices`.
    nearest = (2 * position + 1) * size // (2 * resized[:, None])
    self.nearest = np.clip(nearest, 0, size - 1)
    source = ((position + 0.5) * (size / resized[:, None]) - 0.5).clip(0, size - 1)
    low = np.floor(source).astype(np.int64)
    self.low, self.high = low, np.minimum(low + 1, size - 1)
    self.weight = (source - low).astype(np.float32)
    if reverse is not None and reverse.any():  # sample the mirrored source
      mirror = reverse[:, None]
      self.nearest = np.where(mirror, size - 1 - self.nearest, self.nearest)
      self.low = np.where(mirror, size - 1 - self.low, self.low)
      self.high = np.where(mirror, size - 1 - self.high, self.high)


class _Workspace(threading.local):
  """Scratch arrays reused across calls (one set per thread): fresh large arrays cost page
  faults that take longer than the arithmetic. Only intermediates live here, never outputs."""

  def __init__(self):
    super().__init__()
    self.buffers = {}

  def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    buffer = self.buffers.get(name)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
      buffer = self.buffers[name] = np.empty(shape, dtype)
    return buffer


def _pad(maps: np.ndarray, rows: _Axis, cols: _Axis, value) -> None:
  """Sets the padding pixels of (B, H, W, ...) maps to `value`, in place.

  The valid pixels of an example form one rectangle, so padding is four slices per example.
  """
  height, width = maps.shape[1:3]
  for i in np.flatnonzero((rows.start > 0) | (rows.stop < height) | (cols.start > 0)
                          | (cols.stop < width)):
    maps[i, :rows.start[i]] = value
    maps[i, rows.stop[i]:] = value
    maps[i, :, :cols.start[i]] = value
    maps[i, :, cols.stop[i]:] = value


def _bilinear(image: np.ndarray, rows: _Axis, cols: _Axis, workspace: _Workspace
              ) -> np.ndarray:
  """Separable bilinear resampling of (B, H, W, C) images; padding pixels are IMAGE_PAD."""
  # Blends run in place on (B, H, W*C) views with weights repeated over channels, so that
  # numpy's inner loops are long and contiguous.
  n, height, width, channels = image.shape
  example = np.arange(n)[:, None]
  # Rows: whole image rows gathered, then top += (bottom - top) * weight.
  source = image.reshape(n * height, width * channels)
  top = workspace.get("top", (n, height, width * channels), np.float32)
  bottom = workspace.get("bottom", (n, height, width * channels), np.float32)
  np.take(source, example * height + rows.low, axis=0, out=top, mode="clip")
  np.take(source, example * height + rows.high, axis=0, out=bottom, mode="clip")
  bottom -= top
  bottom *= rows.weight[:, :, None]
  top += bottom
  # Columns: pixels gathered through flat indices into (B*H*W, C), then blended.
  source = top.reshape(n * height * width, channels)
  pixel_base = ((example * height + np.arange(height)[None, :]) * width)[:, :, None]
  index = workspace.get("index", (n, height, width), np.intp)
  out = np.empty((n, height, width, channels), np.float32)
  np.add(pixel_base, cols.low[:, None, :], out=index)
  np.take(source, index, axis=0, out=out, mode="clip")
  right = workspace.get("right", (n, height, width, channels), np.float32)
  np.add(pixel_base, cols.high[:, None, :], out=index)
  np.take(source, index, axis=0, out=right, mode="clip")
  right -= out
  right.reshape(n, height, width * channels)[...] *= np.repeat(
      cols.weight, channels, axis=1)[:, None, :]
  out += right
  _pad(out, rows, cols, IMAGE_PAD)
  return out
