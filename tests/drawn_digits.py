"""A small MNIST-format fixture of digits drawn with Pillow's bundled font, for a fresh clone.

The real MNIST files live in `../shared/data/mnist` (CI and this project's machines). A fresh
clone has no such folder, so the Multi-MNIST loader and a short end-to-end training test run
on this fixture instead: `write_mnist_folder` writes the four IDX files (`train-*` and
`t10k-*`, gzipped, MNIST's magic numbers and layout) of digits 0-9 rendered with Pillow's
default font at random sizes, stroke widths, rotations and offsets, centred in 28x28 like
MNIST's digits. Deterministic in `seed`. The fixture is written by the tests, never stored in
the repository (the real data's terms and this project's rule: data is read, not copied).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def draw_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(digits uint8 (count, 28, 28), labels uint8 (count,)): every class equally often."""
  rng = np.random.default_rng(seed)
  labels = np.arange(count, dtype=np.uint8) % 10
  rng.shuffle(labels)
  digits = np.zeros((count, 28, 28), np.uint8)
  for i, label in enumerate(labels):
    font = ImageFont.load_default(size=int(rng.integers(18, 25)))
    canvas = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(canvas).text((20, 20), str(label), fill=255, font=font, anchor="mm")
    if rng.random() < 0.5:  # thicker strokes, as MNIST's pen widths vary
      canvas = canvas.filter(ImageFilter.MaxFilter(3))
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(0.6))
    array = np.asarray(canvas)
    rows, cols = np.nonzero(array > 30)
    centre = np.array([rows.mean(), cols.mean()]).round().astype(int)  # centre of the ink
    top, left = centre - 14 + rng.integers(-1, 2, 2)
    padded = np.pad(array, 14)
    digits[i] = padded[top + 14:top + 42, left + 14:left + 42]
  return digits, labels


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_mnist_folder(folder, num_train: int = 400, num_test: int = 200, seed: int = 0) -> str:
  """Writes train-/t10k- images and labels (gzipped IDX) into `folder`; returns its path."""
  os.makedirs(folder, exist_ok=True)
  for part, count, part_seed in (("train", num_train, seed), ("t10k", num_test, seed + 1)):
    digits, labels = draw_digits(count, part_seed)
    for kind, array, magic in (("images-idx3", digits, IMAGES_MAGIC),
                               ("labels-idx1", labels, LABELS_MAGIC)):
      with gzip.open(os.path.join(folder, f"{part}-{kind}-ubyte.gz"), "wb") as f:
        f.write(_idx_bytes(array, magic))
  return str(folder)
