"""Resizing of image batches and label maps in numpy, shared by the data loaders.

Both functions use half-pixel centres, like `jax.image.resize`: `resize_images` is bilinear
and, when shrinking, widens its triangle kernel by the shrink factor (antialiasing), which is
what `jax.image.resize(..., method="linear")` does; `resize_labels` takes the nearest source
pixel, so class ids, "no label" values and unit normals are never blended.
"""

from __future__ import annotations

import numpy as np

# Images resized per chunk, so that the float32 working copy of a large array stays small.
_CHUNK = 2048


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
  height, width = (size, size) if np.isscalar(size) else tuple(size)
  if int(height) < 1 or int(width) < 1:
    raise ValueError(f"resize target must be positive, got {size!r}.")
  return int(height), int(width)


def linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of bilinear weights with half-pixel centres and antialiasing.

  Row o holds the weights of the input pixels that make output pixel o; each row sums to 1.
  """
  scale = out_size / in_size
  kernel_scale = max(1.0 / scale, 1.0)  # shrinking: a wider kernel averages, not aliases
  sample = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
  distance = np.abs(sample[:, None] - np.arange(in_size, dtype=np.float64)[None, :])
  weights = np.maximum(0.0, 1.0 - distance / kernel_scale)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a batch (N, H, W) or (N, H, W, C) to (size, size) or (height, width).

  uint8 images stay uint8 (rounded); other dtypes come back as float32. Same size is a no-op.
  """
  images = np.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {images.shape}.")
  out_h, out_w = _size_pair(size)
  in_h, in_w = images.shape[1:3]
  if (in_h, in_w) == (out_h, out_w):
    return images if images.dtype == np.uint8 else images.astype(np.float32, copy=False)
  rows, cols = linear_weights(in_h, out_h), linear_weights(in_w, out_w)
  grey = images.ndim == 3
  if grey:
    images = images[..., None]
  out_dtype = np.uint8 if images.dtype == np.uint8 else np.float32
  out = np.empty((len(images), out_h, out_w, images.shape[-1]), out_dtype)
  for start in range(0, len(images), _CHUNK):
    chunk = images[start:start + _CHUNK].astype(np.float32)
    # Separable: contract H, then W (tensordot runs as one BLAS matmul each, unlike einsum).
    chunk = np.tensordot(chunk, rows, axes=([1], [1]))  # (n, W, C, out_h)
    chunk = np.tensordot(chunk, cols, axes=([1], [1])).transpose(0, 2, 3, 1)  # (n, ., ., C)
    if out_dtype == np.uint8:
      chunk = np.clip(np.rint(chunk), 0, 255)
    out[start:start + _CHUNK] = chunk
  return out[..., 0] if grey else out


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel under nearest-neighbour resizing (half-pixel centres)."""
  # floor((o + 0.5) * in / out) in exact integer arithmetic (floats misround exact halves).
  return (2 * np.arange(out_size, dtype=np.int64) + 1) * in_size // (2 * out_size)


def resize_labels(labels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of label maps (N, H, W, ...) to (size, size) or (height, width).

  The dtype and any trailing axes (channels, normal vectors) are kept.
  """
  labels = np.asarray(labels)
  if labels.ndim < 3:
    raise ValueError(f"label maps must have shape (N, H, W, ...), got {labels.shape}.")
  out_h, out_w = _size_pair(size)
  in_h, in_w = labels.shape[1:3]
  if (in_h, in_w) == (out_h, out_w):
    return labels
  return labels[:, nearest_indices(in_h, out_h)][:, :, nearest_indices(in_w, out_w)]
