"""NYUD-v2 for multi-task learning (795 train / 654 test images): segmentation, depth, normals,
edges, read lazily from the standard multi-task archive `NYUD_MT/` on the user's disk.

The layout and encodings are those of the dense multi-task reference code (ASTMT, Maninis et
al. 2019; "Multi-Task Learning for Dense Prediction Tasks: A Survey", Vandenhende et al.;
`data/nyud.py` of github.com/SimonVandenhende/Multi-Task-Learning-PyTorch):

  NYUD_MT/images/<id>.jpg          RGB image, 480 x 640
  NYUD_MT/segmentation/<id>.png    40 classes stored as 1..40, 0 = void
  NYUD_MT/depth/<id>.npy           float depth in metres, 0 = no measurement
  NYUD_MT/normals/<id>.npy         float (H, W, 3) surface normals, zero vector = no normal
                                   (a PNG holding (n + 1) / 2 * 255 is also accepted)
  NYUD_MT/edge/<id>.npy            float {0, 1} edge map
  NYUD_MT/gt_sets/train.txt, val.txt   one id per line ("test" reads val.txt)

Batches follow the contract of `dymu_jax.tasks`: segmentation void (0) -> 255 and classes
1..40 -> 0..39 (the reference's `_semseg[_semseg == 0] = 256; _semseg - 1`); depth 0 stays "no
depth"; normals become unit vectors, 0 where invalid; edges are binarised at 0.5. Images keep
their native 480 x 640 (other sizes are resized to it, as the reference's FixedResize to
(480, 640)), or become image_size x image_size when `DataConfig.image_size` > 0; images are
resized bilinearly and labels by nearest neighbour.
"""

from __future__ import annotations

import os

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base
from dymu_jax.data import dense_files

NAME = "nyud"
LAYOUT = ("the NYUD_MT archive layout: images/<id>.jpg, segmentation/<id>.png, depth/<id>.npy, "
          "normals/<id>.npy (or .png), edge/<id>.npy and gt_sets/train.txt, gt_sets/val.txt")
NATIVE_SIZE = (480, 640)
NUM_CLASSES = 40
SPLIT_FILES = {"train": "train.txt", "test": "val.txt"}
# The reference trains edges with a balanced BCE whose positive weight is 0.95 (edge_w).
EDGE_POS_WEIGHT = 0.95

TASKS = (
    tasks_lib.segmentation("segmentation", NUM_CLASSES),
    tasks_lib.depth("depth"),
    tasks_lib.normals("normals"),
    tasks_lib.edges("edges", pos_weight=EDGE_POS_WEIGHT),
)

# file key -> candidate (folder, extensions); the keys of the labels are the task names.
FOLDERS = {
    "image": [("images", (".jpg", ".jpeg", ".png"))],
    "segmentation": [("segmentation", (".png",))],
    "depth": [("depth", (".npy",))],
    "normals": [("normals", (".npy", ".png"))],
    "edges": [("edge", (".npy",))],
}


def segmentation_label(raw: np.ndarray, path: str) -> np.ndarray:
  """Stored 0..40 (0 = void) -> int32 0..39 with 255 for void."""
  dense_files.check_map_shape(NAME, path, raw, None)
  dense_files.check_range(NAME, path, raw, 0, NUM_CLASSES,
                          f"segmentation values must lie in [0, {NUM_CLASSES}] (0 = void)")
  raw = raw.astype(np.int32)
  return np.where(raw == 0, tasks_lib.IGNORE_LABEL, raw - 1).astype(np.int32)


def depth_label(raw: np.ndarray, path: str) -> np.ndarray:
  depth = dense_files.squeeze_map(raw).astype(np.float32)
  dense_files.check_map_shape(NAME, path, depth, None)
  dense_files.check_range(NAME, path, depth, 0.0, np.inf,
                          "depth must be >= 0 (0 = no measurement)")
  return depth


def normals_label(raw: np.ndarray, path: str) -> np.ndarray:
  dense_files.check_map_shape(NAME, path, raw, 3)
  if raw.dtype == np.uint8:  # PNG: (n + 1) / 2 * 255
    normals = raw.astype(np.float32) * np.float32(2 / 255) - 1
  else:
    normals = raw.astype(np.float32)
    dense_files.check_finite(NAME, path, normals)
  return dense_files.unit_normals(normals)


def edges_label(raw: np.ndarray, path: str) -> np.ndarray:
  edges = dense_files.squeeze_map(raw).astype(np.float32)
  dense_files.check_map_shape(NAME, path, edges, None)
  dense_files.check_range(NAME, path, edges, 0.0, 1.0, "edge maps must lie in [0, 1]")
  return (edges >= 0.5).astype(np.float32)


def _reader(paths: dict[str, list[str]], size: tuple[int, int]):
  """read_example(index, task names) for `dense_files.LazySource`."""

  def read(index: int, names) -> dict:
    image_path = paths["image"][index]
    example = {"image": dense_files.resize_image(dense_files.read_rgb(image_path, NAME), size)}
    for name in names:
      path = paths[name][index]
      if name == "segmentation":
        label = segmentation_label(dense_files.read_png(path, NAME), path)
      elif name == "depth":
        label = depth_label(dense_files.read_npy(path, NAME), path)
      elif name == "normals":
        raw = (dense_files.read_png(path, NAME) if path.endswith(".png")
               else dense_files.read_npy(path, NAME))
        label = normals_label(raw, path)
      else:
        label = edges_label(dense_files.read_npy(path, NAME), path)
      example[name] = dense_files.resize_label(label, size)
    return example

  return read


def load(config: base.DataConfig, split: str) -> dense_files.LazySource:
  """The train (gt_sets/train.txt) or test (gt_sets/val.txt) split of NYUD-v2.

  `config.data_dir` is the NYUD_MT folder (or the folder holding it); `config.num_train` /
  `num_test` keep the first examples of the list (0 = all). Every listed id is checked to have
  all its files; the files themselves are read batch by batch.
  """
  base.check_split(NAME, split)
  root = dense_files.find_root(config.data_dir, NAME, LAYOUT, "gt_sets", "NYUD_MT")
  list_file = os.path.join("gt_sets", SPLIT_FILES[split])
  ids = dense_files.read_ids(os.path.join(root, list_file), NAME, LAYOUT)
  wanted = config.num_train if split == "train" else config.num_test
  ids = ids[:base.limit(len(ids), wanted)]
  paths = dense_files.resolve_files(root, ids, FOLDERS, NAME, list_file, LAYOUT)
  size = dense_files.output_size(NATIVE_SIZE, config.image_size)
  return dense_files.LazySource(NAME, split, TASKS, ids, _reader(paths, size))
