"""Multi-MNIST: two overlapping digits per image, one 10-way task per digit.

Tasks: `left` (the top-left digit) and `right` (the bottom-right digit).

`config.data_dir` is one of:

* a folder of MNIST IDX files (each gzipped or not): `t10k-images-idx3-ubyte[.gz]` and
  `t10k-labels-idx1-ubyte[.gz]`, plus optionally `train-images-idx3-ubyte[.gz]` and
  `train-labels-idx1-ubyte[.gz]`. The pairs are then built here (see below);
* a Multi-MNIST pickle file in the ParetoMTL / Pareto HyperNetworks layout: a 4-tuple
  `(trainX, trainLabel, testX, testLabel)`, or a 2-tuple `(X, Y)` that is split here with
  `split_indices(N, config.test_fraction, config.seed)`. X is (N, 36, 36) uint8 or float
  (floats above 1 are read as 0..255), Y is (N, 2) integers (top-left digit, bottom-right digit).
  The pickle is read by an unpickler that builds only numpy arrays and plain containers: a
  pickle that names anything else (which `pickle.load` would call, running code) is refused
  with `PickleRefused` before anything of it runs.

Construction from MNIST digits, as described for the Multi-MNIST of Pareto MTL and Pareto
HyperNetworks: a 36x36 canvas (28 + 2 * 4), one digit in the top-left and one in the bottom-right
corner, each shifted by up to 4 pixels in every direction, two digits of different classes, the
pixel-wise maximum where they overlap. The exact placement is [ours]: the top-left digit's
corner at (dy, dx) and the bottom-right digit's at (8 + dy, 8 + dx), with independent shifts
dy, dx uniform in [-4, 4]; pixels pushed off the canvas are cut (mostly MNIST's blank margin).
Pairs are drawn uniformly from the pool with `np.random.default_rng([config.seed, s])` (s = 0
for train, 1 for test) and the right digit is re-drawn while both share a class, so the same
seed always builds the same images.

Train and test pairs come from disjoint digit pools, so no test digit is seen in training:
with the MNIST train files present, train pairs use the 60,000 train digits and test pairs the
10,000 t10k digits; with only the t10k files (like `../shared/data/mnist`), train pairs use the
first 8,000 t10k digits and test pairs the last 2,000. `config.num_train` / `config.num_test`
set how many pairs to build (0: 60,000 train and 10,000 test pairs; with a pickle they keep a
seeded subset instead, 0 keeping all). `config.image_size` > 0 resizes the 36x36 images
(bilinear). The source built from IDX files exposes `digit_indices` (N, 2), the indices of its
two digits in `digit_file`, and `shifts` (N, 2, 2), the (dy, dx) of each digit.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import zlib

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import arrays
from dymu_jax.data import images as images_lib
from dymu_jax.data.base import (ArraySource, DataConfig, DatasetError, check_finite,
                                check_split, split_indices)

NAME = "multi_mnist"
TASKS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))

DIGIT_SIZE = 28
MAX_SHIFT = 4
CANVAS_SIZE = DIGIT_SIZE + 2 * MAX_SHIFT  # 36
DEFAULT_NUM_PAIRS = {"train": 60_000, "test": 10_000}
# Disjoint pools of the t10k digits when the folder has no MNIST train files.
T10K_TRAIN_DIGITS = 8_000

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
LAYOUT = ("the MNIST IDX files t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
          "(optionally also train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]), "
          "or a Multi-MNIST pickle file")

_SPLIT_CODE = {"train": 0, "test": 1}
_CHUNK = 4096  # pairs composed at a time, so the padded frames stay small


class MultiMnistSource(ArraySource):
  """An `ArraySource` that also records how each image was built (None for pickles).

  Attributes:
    digit_indices: int (N, 2), indices of the top-left and bottom-right digit in `digit_file`.
    digit_file: the IDX image file the digits come from.
    shifts: int (N, 2, 2), the (dy, dx) shift of the top-left and of the bottom-right digit.
  """

  def __init__(self, split, images, labels, *, digit_indices=None, digit_file=None,
               shifts=None):
    super().__init__(NAME, split, images, {"left": labels[:, 0], "right": labels[:, 1]}, TASKS)
    self.digit_indices, self.digit_file, self.shifts = digit_indices, digit_file, shifts


def load(config: DataConfig, split: str) -> MultiMnistSource:
  """The `split` of Multi-MNIST, built from MNIST IDX files or read from a pickle."""
  check_split(NAME, split)
  path = config.data_dir
  if not path:
    raise DatasetError(f"{NAME} needs data: pass --data_dir=/path/to/a folder holding {LAYOUT}.")
  path = os.path.expanduser(os.fspath(path))
  if os.path.isfile(path):
    return _from_pickle(path, config, split)
  if os.path.isdir(path):
    return _from_idx(path, config, split)
  raise DatasetError(f"{NAME} data path {path!r} does not exist; expected a folder holding "
                     f"{LAYOUT}.")


# --------------------------------------------------------------------------------------------
# Building pairs from MNIST digits.


def sample_pairs(labels: np.ndarray, pool: np.ndarray, num_pairs: int, seed) -> tuple[
    np.ndarray, np.ndarray]:
  """Draws `num_pairs` pairs of digits of different classes from `pool` and their shifts.

  Args:
    labels: class of every digit of the file.
    pool: indices of the digits that may be used.
    num_pairs: pairs to draw.
    seed: anything `np.random.default_rng` accepts.

  Returns:
    digit_indices int64 (num_pairs, 2) into `labels`, and shifts int64 (num_pairs, 2, 2): the
    (dy, dx) of the top-left and of the bottom-right digit, each in [-MAX_SHIFT, MAX_SHIFT].
  """
  pool = np.asarray(pool)
  if np.unique(labels[pool]).size < 2:
    raise DatasetError(f"{NAME}: the digit pool needs at least two classes to pair different "
                       f"digits, got {np.unique(labels[pool]).tolist()}.")
  rng = np.random.default_rng(seed)
  pairs = pool[rng.integers(0, len(pool), size=(num_pairs, 2))]
  same = np.flatnonzero(labels[pairs[:, 0]] == labels[pairs[:, 1]])
  while same.size:  # re-draw the right digit of same-class pairs (about 1 in 10 each round)
    pairs[same, 1] = pool[rng.integers(0, len(pool), size=same.size)]
    same = same[labels[pairs[same, 0]] == labels[pairs[same, 1]]]
  shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(num_pairs, 2, 2))
  return pairs, shifts


def compose(left: np.ndarray, right: np.ndarray, left_shifts: np.ndarray,
            right_shifts: np.ndarray) -> np.ndarray:
  """Places digit pairs on 36x36 canvases (vectorised).

  Args:
    left, right: uint8 (N, 28, 28) digits for the top-left and bottom-right corner.
    left_shifts, right_shifts: int (N, 2), (dy, dx) of each digit in [-MAX_SHIFT, MAX_SHIFT].

  Returns:
    uint8 (N, 36, 36): the top-left digit with its corner at (dy, dx), the bottom-right one at
    (8 + dy, 8 + dx), pixels off the canvas cut, the maximum where the two overlap.
  """
  left, right = np.asarray(left, np.uint8), np.asarray(right, np.uint8)
  left_shifts, right_shifts = np.asarray(left_shifts), np.asarray(right_shifts)
  if left.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or right.shape != left.shape:
    raise ValueError(f"digits must both have shape (N, 28, 28), got {left.shape} and "
                     f"{right.shape}.")
  for shifts in (left_shifts, right_shifts):
    if shifts.shape != (len(left), 2) or np.abs(shifts).max(initial=0) > MAX_SHIFT:
      raise ValueError(f"shifts must have shape ({len(left)}, 2) with values in "
                       f"[-{MAX_SHIFT}, {MAX_SHIFT}], got shape {shifts.shape}.")
  out = np.empty((len(left), CANVAS_SIZE, CANVAS_SIZE), np.uint8)
  for start in range(0, len(left), _CHUNK):
    stop = min(start + _CHUNK, len(left))
    # Each digit sits in a zero-padded frame from which the 36x36 window at (4 - dy, 4 - dx)
    # is read: one vectorised gather per digit instead of a scatter of every pixel.
    placed = [_window(left[start:stop], left_shifts[start:stop], corner=0),
              _window(right[start:stop], right_shifts[start:stop], corner=2 * MAX_SHIFT)]
    np.maximum(placed[0], placed[1], out=out[start:stop])
  return out


def _window(digits: np.ndarray, shifts: np.ndarray, corner: int) -> np.ndarray:
  """Canvases with each digit's top-left corner at (corner + dy, corner + dx), pixels cut."""
  frame = CANVAS_SIZE + 2 * MAX_SHIFT
  padded = np.zeros((len(digits), frame, frame), np.uint8)
  at = corner + MAX_SHIFT  # canvas (0, 0) is frame (MAX_SHIFT - dy, MAX_SHIFT - dx)
  padded[:, at:at + DIGIT_SIZE, at:at + DIGIT_SIZE] = digits
  windows = np.lib.stride_tricks.sliding_window_view(padded, (CANVAS_SIZE, CANVAS_SIZE),
                                                     axis=(1, 2))
  return windows[np.arange(len(digits)), MAX_SHIFT - shifts[:, 0], MAX_SHIFT - shifts[:, 1]]


def _from_idx(folder: str, config: DataConfig, split: str) -> MultiMnistSource:
  train_files = _find_pair(folder, "train", required=False)
  test_files = _find_pair(folder, "test", required=True)
  digit_file, label_file = train_files if train_files and split == "train" else test_files
  digits = read_idx(digit_file, IMAGES_MAGIC)
  labels = read_idx(label_file, LABELS_MAGIC)
  _check_mnist(digits, labels, digit_file, label_file)
  n = len(digits)
  if train_files:  # train and test pairs from their own files
    pool = np.arange(n)
  elif n <= T10K_TRAIN_DIGITS:
    raise DatasetError(f"{NAME}: {digit_file!r} holds {n} digits but at least "
                       f"{T10K_TRAIN_DIGITS + 1} are needed to keep the first "
                       f"{T10K_TRAIN_DIGITS} for train pairs and the rest for test pairs.")
  elif split == "train":
    pool = np.arange(T10K_TRAIN_DIGITS)
  else:
    pool = np.arange(T10K_TRAIN_DIGITS, n)
  wanted = config.num_train if split == "train" else config.num_test
  num_pairs = wanted if wanted > 0 else DEFAULT_NUM_PAIRS[split]
  pairs, shifts = sample_pairs(labels, pool, num_pairs, [config.seed, _SPLIT_CODE[split]])
  images = compose(digits[pairs[:, 0]], digits[pairs[:, 1]], shifts[:, 0], shifts[:, 1])
  if config.image_size > 0:
    images = images_lib.resize_images(images, config.image_size)
  return MultiMnistSource(split, images, labels[pairs], digit_indices=pairs,
                          digit_file=digit_file, shifts=shifts)


# --------------------------------------------------------------------------------------------
# IDX files.


def _find_pair(folder: str, part: str, required: bool) -> tuple[str, str] | None:
  """Paths of the (images, labels) IDX files of `part`; None when neither is there."""
  found = []
  for stem in FILES[part]:
    candidates = [os.path.join(folder, stem + ext) for ext in ("", ".gz")]
    found.append(next((c for c in candidates if os.path.isfile(c)), None))
  if all(found):
    return found[0], found[1]
  if not required and not any(found):
    return None
  missing = FILES[part][found.index(None)]
  raise DatasetError(f"{NAME}: {folder!r} has no {missing}[.gz]; expected a folder holding "
                     f"{LAYOUT}.")


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """The uint8 array stored in an IDX file (gzipped when its name ends in .gz).

  The magic number, the dimensions and the data length are checked; a file that fails a
  check stops with one sentence naming it. The result is read-only and cached per file.
  """
  stat = os.stat(path)
  return _read_idx_cached(path, stat.st_mtime_ns, stat.st_size, expected_magic)


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, mtime_ns: int, size: int, expected_magic: int) -> np.ndarray:
  del mtime_ns, size  # only part of the cache key: a rewritten file is read again
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (OSError, EOFError, zlib.error) as error:
    raise DatasetError(f"{NAME}: cannot read {path!r}, the file is corrupt or truncated "
                       f"({error}).") from None
  magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
  if magic != expected_magic:
    kind = "images" if expected_magic == IMAGES_MAGIC else "labels"
    raise DatasetError(f"{NAME}: {path!r} starts with magic number {magic}, but an IDX file "
                       f"of MNIST {kind} starts with {expected_magic}.")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DatasetError(f"{NAME}: {path!r} is truncated inside its header.")
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if len(data) - header != int(np.prod(dims)):
    raise DatasetError(f"{NAME}: {path!r} holds {len(data) - header} bytes of data but its "
                       f"header announces {int(np.prod(dims))} for shape {dims}; the file is "
                       f"truncated or corrupt.")
  array = np.frombuffer(data, np.uint8, offset=header).reshape(dims)
  array.flags.writeable = False
  return array


def _check_mnist(digits, labels, digit_file, label_file):
  if digits.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
    raise DatasetError(f"{NAME}: {digit_file!r} holds images of shape {digits.shape[1:]}, "
                       f"expected MNIST's ({DIGIT_SIZE}, {DIGIT_SIZE}).")
  if len(labels) != len(digits):
    raise DatasetError(f"{NAME}: {label_file!r} has {len(labels)} labels for the "
                       f"{len(digits)} images of {digit_file!r}.")
  if labels.size and labels.max() > 9:
    raise DatasetError(f"{NAME}: {label_file!r} has labels up to {labels.max()}, but MNIST "
                       f"digits are 0 to 9.")


# --------------------------------------------------------------------------------------------
# ParetoMTL / PHN pickles.


def _from_pickle(path: str, config: DataConfig, split: str) -> MultiMnistSource:
  content = _read_pickle(path)
  if not isinstance(content, (tuple, list)) or len(content) not in (2, 4):
    raise DatasetError(f"{NAME}: {path!r} must hold a tuple (trainX, trainLabel, testX, "
                       f"testLabel) or (X, Y), got {_describe(content)}.")
  if len(content) == 4:
    x, y = (content[0], content[1]) if split == "train" else (content[2], content[3])
    x, y = _check_pickle_arrays(path, x, y)
    keep = np.arange(len(x))
  else:
    x, y = _check_pickle_arrays(path, *content)
    train, test = split_indices(len(x), config.test_fraction, config.seed)
    keep = train if split == "train" else test
  wanted = config.num_train if split == "train" else config.num_test
  keep = arrays.subsample(keep, wanted, config.seed)
  x, y = x[keep], y[keep]
  if config.image_size > 0:
    x = images_lib.resize_images(x, config.image_size)
  return MultiMnistSource(split, x, y)


# The only globals a pickle of numpy arrays in tuples/lists refers to (numpy 1 and 2 names).
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
    ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
}


class PickleRefused(DatasetError):
  """A pickle asked for something other than numpy arrays: it was not loaded."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Builds numpy arrays and plain containers only: a pickle cannot run code through it
  (`pickle.load` would call whatever a `__reduce__` names, e.g. `os.system`)."""

  def __init__(self, file, path: str, **kwargs):
    super().__init__(file, **kwargs)
    self._path = path

  def find_class(self, module, name):
    try:
      return _PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise PickleRefused(
          f"{NAME}: {self._path!r} refers to {module}.{name}, but a Multi-MNIST pickle holds "
          f"only numpy arrays in tuples or lists; it was not loaded (a pickle can run code). "
          f"Convert trusted data to .npz and use --dataset=arrays.") from None


def _read_pickle(path: str):
  for kwargs in ({}, {"encoding": "latin1"}):  # latin1: numpy arrays pickled by Python 2
    try:
      with open(path, "rb") as f:
        content = _ArraysOnlyUnpickler(f, path, **kwargs).load()
      if any(isinstance(a, np.ndarray) and a.dtype.hasobject
             for a in (content if isinstance(content, (tuple, list)) else [content])):
        raise PickleRefused(f"{NAME}: {path!r} holds an array of Python objects; images and "
                            f"labels must be numeric arrays.")
      return content
    except UnicodeDecodeError:
      continue
    except DatasetError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      raise DatasetError(f"{NAME}: cannot read {path!r} as a Multi-MNIST pickle "
                         f"({type(error).__name__}: {error}).") from None
  raise DatasetError(f"{NAME}: cannot decode the pickle {path!r}, neither as Python 3 nor as "
                     f"Python 2 (latin1) data.")


def _check_pickle_arrays(path, x, y):
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim == 4 and x.shape[1] == 1:  # (N, 1, H, W) as stored for PyTorch
    x = x[:, 0]
  if x.ndim != 3 or not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
    raise DatasetError(f"{NAME}: images in {path!r} must be uint8 or float of shape (N, 36, 36),"
                       f" got {x.dtype} {x.shape}.")
  if y.shape != (len(x), 2):
    raise DatasetError(f"{NAME}: labels in {path!r} must have shape ({len(x)}, 2) (top-left "
                       f"digit, bottom-right digit), got {y.shape}.")
  check_finite(NAME, path, x, "images")
  check_finite(NAME, path, y, "labels")
  if not np.issubdtype(y.dtype, np.integer):
    if np.any(y != np.round(y)):
      raise DatasetError(f"{NAME}: labels in {path!r} must be whole numbers 0 to 9, got "
                         f"{y.dtype} values that are not.")
    y = y.astype(np.int64)
  if np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    if x.size and x.max() > 1.0:  # stored as 0..255 floats
      x *= np.float32(1 / 255)
  return x, y


def _describe(value) -> str:
  if isinstance(value, (tuple, list)):
    return f"a {type(value).__name__} of {len(value)} items"
  return f"a {type(value).__name__}"
