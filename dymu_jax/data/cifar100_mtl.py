"""CIFAR-100-MTL: CIFAR-100 as 20 five-way classification tasks, one per superclass.

Each of the 20 CIFAR-100 superclasses is a task named after it (`aquatic_mammals`, `fish`, ...)
that tells apart its 5 fine classes. An image has a label (0..4) only for its own superclass's
task: its fine class's position among the superclass's fine classes in ascending fine-label
order; every other task gets 255, "no label", which classification losses and metrics ignore.
The superclass of an image is taken from its fine label through the standard CIFAR-100
fine -> coarse table below, never from the stored coarse label.

The data come from TensorFlow Datasets' "cifar100" through `tfds.data_source` (random access,
no TensorFlow needed), prepared beforehand in `DataConfig.data_dir` in array_record format:
nothing is downloaded at run time. Each `load` reads its split into memory once (CIFAR is
small); `DataConfig.image_size` > 0 resizes the 32 x 32 images bilinearly, batch by batch.
"""

from __future__ import annotations

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base
from dymu_jax.data import images as images_lib

NAME = "cifar100_mtl"
TFDS_NAME = "cifar100"
CLASSES_PER_TASK = 5

# The 100 fine classes in CIFAR-100's label order (0..99, alphabetical).
FINE_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# The 20 superclasses in CIFAR-100's coarse label order, each with its 5 fine classes.
SUPERCLASSES = (
    ("aquatic_mammals", ("beaver", "dolphin", "otter", "seal", "whale")),
    ("fish", ("aquarium_fish", "flatfish", "ray", "shark", "trout")),
    ("flowers", ("orchid", "poppy", "rose", "sunflower", "tulip")),
    ("food_containers", ("bottle", "bowl", "can", "cup", "plate")),
    ("fruit_and_vegetables", ("apple", "mushroom", "orange", "pear", "sweet_pepper")),
    ("household_electrical_devices", ("clock", "keyboard", "lamp", "telephone", "television")),
    ("household_furniture", ("bed", "chair", "couch", "table", "wardrobe")),
    ("insects", ("bee", "beetle", "butterfly", "caterpillar", "cockroach")),
    ("large_carnivores", ("bear", "leopard", "lion", "tiger", "wolf")),
    ("large_man-made_outdoor_things", ("bridge", "castle", "house", "road", "skyscraper")),
    ("large_natural_outdoor_scenes", ("cloud", "forest", "mountain", "plain", "sea")),
    ("large_omnivores_and_herbivores",
     ("camel", "cattle", "chimpanzee", "elephant", "kangaroo")),
    ("medium_mammals", ("fox", "porcupine", "possum", "raccoon", "skunk")),
    ("non-insect_invertebrates", ("crab", "lobster", "snail", "spider", "worm")),
    ("people", ("baby", "boy", "girl", "man", "woman")),
    ("reptiles", ("crocodile", "dinosaur", "lizard", "snake", "turtle")),
    ("small_mammals", ("hamster", "mouse", "rabbit", "shrew", "squirrel")),
    ("trees", ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree")),
    ("vehicles_1", ("bicycle", "bus", "motorcycle", "pickup_truck", "train")),
    ("vehicles_2", ("lawn_mower", "rocket", "streetcar", "tank", "tractor")),
)
COARSE_NAMES = tuple(name for name, _ in SUPERCLASSES)


def _tables() -> tuple[np.ndarray, np.ndarray]:
  """fine label -> coarse label, and fine label -> index within its superclass (0..4)."""
  fine_ids = {name: i for i, name in enumerate(FINE_NAMES)}
  coarse_of = np.full(len(FINE_NAMES), -1, np.int64)
  within = np.full(len(FINE_NAMES), -1, np.int64)
  for coarse, (_, members) in enumerate(SUPERCLASSES):
    for position, fine in enumerate(sorted(fine_ids[name] for name in members)):
      coarse_of[fine], within[fine] = coarse, position
  return coarse_of, within


FINE_TO_COARSE, FINE_TO_WITHIN = _tables()

TASKS = tuple(tasks_lib.classification(name, CLASSES_PER_TASK) for name in COARSE_NAMES)


def task_labels(fine_labels: np.ndarray) -> dict[str, np.ndarray]:
  """Fine labels (N,) -> {superclass task: int32 (N,) in 0..4, or 255 for other superclasses}."""
  fine_labels = np.asarray(fine_labels)
  coarse, within = FINE_TO_COARSE[fine_labels], FINE_TO_WITHIN[fine_labels]
  return {name: np.where(coarse == c, within, tasks_lib.IGNORE_LABEL).astype(np.int32)
          for c, name in enumerate(COARSE_NAMES)}


class CifarSource(base.ArraySource):
  """The split in memory as uint8; images resized per batch when `image_size` > 0."""

  def __init__(self, split: str, images: np.ndarray, fine_labels: np.ndarray, image_size: int):
    super().__init__(NAME, split, images, task_labels(fine_labels), TASKS)
    self.fine_labels = fine_labels
    self.image_size = image_size

  def get(self, indices):
    batch = super().get(indices)
    if self.image_size:
      batch["image"] = images_lib.resize_images(batch["image"], self.image_size)
    return batch


def _data_source(data_dir: str | None, split: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy, optional)
  where = data_dir or "the default TFDS folder (~/tensorflow_datasets)"
  try:
    # download=False: never fetch at run time; a missing dataset must stop here.
    return tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir, download=False)
  except Exception as error:  # tfds signals "not prepared" with many exception types
    raise base.DatasetError(
        f"{NAME}: no prepared TFDS '{TFDS_NAME}' dataset in array_record format found in "
        f"{where} (expected {TFDS_NAME}/<version>/ with *.array_record files); prepare it on a "
        f"machine with internet with `tfds build {TFDS_NAME} --file_format=array_record "
        f"--data_dir=DIR` and copy DIR/{TFDS_NAME} into the data folder.") from error


def load(config: base.DataConfig, split: str) -> CifarSource:
  """The train or test split of CIFAR-100-MTL (50000 / 10000 images of 32 x 32 x 3).

  `config.num_train` / `num_test` keep the first examples (0 = all); `config.image_size` > 0
  resizes the images to that square side.
  """
  base.check_split(NAME, split)
  if config.image_size < 0:
    raise base.DatasetError(f"image size must be >= 0 (0 keeps 32 x 32), got "
                            f"{config.image_size}.")
  source = _data_source(config.data_dir, split)
  wanted = config.num_train if split == "train" else config.num_test
  n = base.limit(len(source), wanted)
  images = np.empty((n, 32, 32, 3), np.uint8)
  fine = np.empty((n,), np.int64)
  for i in range(n):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != (32, 32, 3):
      raise base.DatasetError(f"{NAME}: example {i} of the {split} split has an image of shape "
                              f"{image.shape}, expected (32, 32, 3).")
    images[i], fine[i] = image, int(example["label"])
  if n and (fine.min() < 0 or fine.max() >= len(FINE_NAMES)):
    raise base.DatasetError(f"{NAME}: fine labels of the {split} split range over "
                            f"[{fine.min()}, {fine.max()}] but must lie in [0, 99].")
  return CifarSource(split, images, fine, config.image_size)
