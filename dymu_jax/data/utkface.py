"""UTKFace: faces with three tasks, `age` (regression), `gender` (2-way), `race` (5-way).

`config.data_dir` is the folder holding `utkface_32x32.npz` (or that file itself), with keys
`images` uint8 (N, 32, 32, 3), `age` (years, 0..150), `gender` (0 male, 1 female) and `race`
(0 White, 1 Black, 2 Asian, 3 Indian, 4 Others); other keys (such as `files`) are ignored.

UTKFace has no official split: this uses the fixed, seeded split
`split_indices(N, config.test_fraction, config.seed)`. With the defaults (test_fraction 0.2,
seed 0) the 9,778 faces of "crop_part1" (`../shared/data/utkface`) give 7,822 train and 1,956
test faces. `config.num_train` / `config.num_test` keep a seeded random subset of a split
(the file is sorted by age, so never its first rows); `config.image_size` > 0 resizes
(bilinear).

The age task has `label_scale` AGE_LABEL_SCALE = 10 [ours]: its L1 loss sees age / 10, about
2 at the start of training, the size of the two cross-entropies, so years do not dwarf them;
predictions are multiplied back to years.
"""

from __future__ import annotations

import os

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import arrays
from dymu_jax.data import images as images_lib
from dymu_jax.data.base import (ArraySource, DataConfig, DatasetError, check_finite,
                                check_split, split_indices)

NAME = "utkface"
FILE_NAME = "utkface_32x32.npz"
AGE_LABEL_SCALE = 10.0
MAX_AGE = 150
TASKS = (tasks_lib.regression("age", label_scale=AGE_LABEL_SCALE),
         tasks_lib.classification("gender", 2),
         tasks_lib.classification("race", 5))
KEYS = ("images", "age", "gender", "race")
LAYOUT = (f"{FILE_NAME} with arrays images uint8 (N, 32, 32, 3), age, gender (0/1) and race "
          f"(0..4)")


def load(config: DataConfig, split: str) -> ArraySource:
  """The `split` of UTKFace (fixed seeded split, see the module docstring)."""
  check_split(NAME, split)
  path = _find_file(config.data_dir)
  data = arrays.read_npz(path, NAME)
  missing = [key for key in KEYS if key not in data]
  if missing:
    raise DatasetError(f"{NAME}: {path!r} lacks {', '.join(missing)}; expected the keys "
                       f"{', '.join(KEYS)}, found {', '.join(data) or 'none'}.")
  images = data["images"]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise DatasetError(f"{NAME}: images in {path!r} must be uint8 (N, H, W, 3), got "
                       f"{images.dtype} {images.shape}.")
  labels = {key: data[key] for key in KEYS[1:]}
  for key, label in labels.items():
    if label.shape != (len(images),):
      raise DatasetError(f"{NAME}: {key!r} in {path!r} has shape {label.shape}, expected "
                         f"({len(images)},), one label per image.")
  age = labels["age"]
  check_finite(NAME, path, age, "ages")
  if age.size and not (age.min() >= 0 and age.max() <= MAX_AGE):
    raise DatasetError(f"{NAME}: ages in {path!r} range over [{age.min()}, {age.max()}] but "
                       f"must lie in [0, {MAX_AGE}] years.")
  train, test = split_indices(len(images), config.test_fraction, config.seed)
  keep = train if split == "train" else test
  keep = arrays.subsample(keep, config.num_train if split == "train" else config.num_test,
                          config.seed)
  images = images[keep]
  if config.image_size > 0:
    images = images_lib.resize_images(images, config.image_size)
  # ArraySource checks that gender and race lie in [0, num_classes).
  return ArraySource(NAME, split, images, {k: v[keep] for k, v in labels.items()}, TASKS)


def _find_file(data_dir: str | None) -> str:
  if not data_dir:
    raise DatasetError(f"{NAME} needs data: pass --data_dir=/path/to/folder holding {LAYOUT}.")
  path = os.path.expanduser(os.fspath(data_dir))
  if os.path.isdir(path):
    path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path):
      raise DatasetError(f"{NAME}: missing file {path!r}; expected a folder holding {LAYOUT}.")
  elif not os.path.isfile(path):
    raise DatasetError(f"{NAME} data path {path!r} does not exist; expected a folder holding "
                       f"{LAYOUT}.")
  return path
