"""PASCAL-Context for multi-task learning (4998 train / 5105 test images): segmentation, human
parts, saliency, normals, edges, read lazily from the standard archive `PASCAL_MT/`.

The layout and encodings are those of the dense multi-task reference code (ASTMT, Maninis et
al. 2019; "Multi-Task Learning for Dense Prediction Tasks: A Survey", Vandenhende et al.;
`data/pascal_context.py` of github.com/SimonVandenhende/Multi-Task-Learning-PyTorch):

  PASCAL_MT/JPEGImages/<id>.jpg                 RGB image (about 500 x 375)
  PASCAL_MT/ImageSets/Context/train.txt, val.txt   one id per line ("test" reads val.txt)
  PASCAL_MT/semseg/VOC12/<id>.png, else semseg/pascal-context/<id>.png
                                                21 classes 0..20 (0 = background), 255 = void
  PASCAL_MT/human_parts/<id>.mat                Pascal-Part annotation `anno.objects(i)` with
                                                `class_ind`, `mask`, `parts(j).part_name/mask`
  PASCAL_MT/sal_distill/<id>.png                distilled saliency, 0..255
  PASCAL_MT/normals_distill/<id>.png            distilled normals, (n + 1) / 2 * 255
  PASCAL_MT/pascal-context/trainval/<id>.mat    `LabelMap` of the 459 PASCAL-Context classes

Encodings, as the reference builds them:
- segmentation: the PNG values as they are (21 classes; 255 = ignore).
- human_parts: the 24 Pascal-Part person parts of every person (class 15) merged into 6 parts
  (head, torso, upper arms, lower arms and hands, upper legs, lower legs and feet), 0 = rest of
  the image, so 7 classes; an image without annotated human parts is all 255 (ignored), as the
  reference's AddIgnoreRegions does.
- saliency: PNG / 255 > 0.5, so {0, 1}.
- normals: the distilled PNG mapped to [-1, 1] and kept only on pixels whose LabelMap class is
  one NYUD also has (`NORMALS_VALID_CLASSES`), unit vectors there, 0 elsewhere.
- edges: where the 4-neighbour Laplacian of LabelMap is non-zero, thinned to one pixel
  (`dense_files.label_edges`, identical to OpenCV's Laplacian then skimage's thin).
Labels are built at the image's own size, then images and labels are resized to 512 x 512 (the
reference's FixedResize; bilinear images, nearest-neighbour labels), or to image_size x
image_size when `DataConfig.image_size` > 0.
"""

from __future__ import annotations

import os

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base
from dymu_jax.data import dense_files

NAME = "pascal_context"
LAYOUT = ("the PASCAL_MT archive layout: JPEGImages/<id>.jpg, ImageSets/Context/train.txt and "
          "val.txt, semseg/pascal-context/<id>.png (or semseg/VOC12/<id>.png), "
          "human_parts/<id>.mat, sal_distill/<id>.png, normals_distill/<id>.png and "
          "pascal-context/trainval/<id>.mat")
OUTPUT_SIZE = (512, 512)  # the reference's FixedResize
NUM_CLASSES = 21
NUM_HUMAN_PARTS = 7  # background + 6 parts
SPLIT_FILES = {"train": "train.txt", "test": "val.txt"}
EDGE_POS_WEIGHT = 0.95  # the reference's edge_w for its balanced BCE
PERSON_CLASS = 15  # Pascal-Part / VOC class index of "person"

# The reference's 6-part grouping (HUMAN_PART[6]) of the Pascal-Part person parts.
HUMAN_PART_IDS = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1, "rear": 1,
    "rebrow": 1, "reye": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5,
    "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}

# PASCAL-Context class ids (db_info/context_classes.json) whose names are also NYUD classes
# (db_info/nyu_classes.json), "unknown" excluded, plus tvmonitor (427): where the distilled
# normals are trusted, exactly the reference's `normals_valid_classes`.
NORMALS_VALID_CLASSES = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
})

_NORMALS_VALID_ARRAY = np.array(sorted(NORMALS_VALID_CLASSES))

TASKS = (
    tasks_lib.segmentation("segmentation", NUM_CLASSES),
    tasks_lib.segmentation("human_parts", NUM_HUMAN_PARTS),
    tasks_lib.saliency("saliency"),
    tasks_lib.normals("normals"),
    tasks_lib.edges("edges", pos_weight=EDGE_POS_WEIGHT),
)

FOLDERS = {
    "image": [("JPEGImages", (".jpg", ".jpeg", ".png"))],
    "segmentation": [(os.path.join("semseg", "VOC12"), (".png",)),
                     (os.path.join("semseg", "pascal-context"), (".png",))],
    "human_parts": [("human_parts", (".mat",))],
    "saliency": [("sal_distill", (".png",))],
    "normals": [("normals_distill", (".png",))],
    "label_map": [(os.path.join("pascal-context", "trainval"), (".mat",))],
}


def segmentation_label(raw: np.ndarray, path: str) -> np.ndarray:
  dense_files.check_map_shape(NAME, path, raw, None)
  values = raw[raw != tasks_lib.IGNORE_LABEL]
  dense_files.check_range(NAME, path, values, 0, NUM_CLASSES - 1,
                          f"segmentation values must lie in [0, {NUM_CLASSES - 1}] or be 255")
  return raw.astype(np.int32)


def human_parts_label(mat: dict, path: str, shape: tuple[int, int]) -> np.ndarray:
  """int32 (H, W): 0 background, 1..6 parts of persons; all 255 without annotated parts."""
  not_pascal_part = base.DatasetError(
      f"{NAME}: {path!r} is not a Pascal-Part annotation (a struct anno.objects with fields "
      f"class_ind, mask and parts).")
  anno = dense_files.mat_field(mat, "anno", path, NAME)
  try:
    objects = np.ravel(anno[0, 0]["objects"])
  except (IndexError, KeyError, ValueError) as error:
    raise not_pascal_part from error
  target = np.zeros(shape, np.int32)
  has_parts = False
  for obj in objects:
    try:
      is_person = int(np.ravel(obj["class_ind"])[0]) == PERSON_CLASS
      parts = np.ravel(obj["parts"])
    except (IndexError, KeyError, ValueError, TypeError) as error:
      raise not_pascal_part from error
    if not is_person or parts.size == 0 or parts.dtype.names is None:
      continue
    for part in parts:
      try:
        part_name = str(np.ravel(part["part_name"])[0])
        mask = np.asarray(part["mask"]).astype(bool)
      except (IndexError, KeyError, ValueError, TypeError) as error:
        raise not_pascal_part from error
      if part_name not in HUMAN_PART_IDS:
        raise base.DatasetError(
            f"{NAME}: {path!r} names a person part {part_name!r} that is not one of the "
            f"Pascal-Part person parts ({', '.join(sorted(HUMAN_PART_IDS))}).")
      if mask.shape != tuple(shape):
        raise base.DatasetError(f"{NAME}: {path!r} has a part mask of shape {mask.shape} for "
                                f"an image of shape {tuple(shape)}.")
      target[mask] = HUMAN_PART_IDS[part_name]
      has_parts = True
  if not has_parts or not target.any():
    return np.full(shape, tasks_lib.IGNORE_LABEL, np.int32)
  return target


def saliency_label(raw: np.ndarray, path: str) -> np.ndarray:
  if raw.ndim == 3:  # a grey map saved as RGB: the channels are equal
    raw = raw[..., 0]
  dense_files.check_map_shape(NAME, path, raw, None)
  return (raw.astype(np.float32) / 255.0 > 0.5).astype(np.float32)


def normals_label(raw: np.ndarray, label_map: np.ndarray, path: str) -> np.ndarray:
  dense_files.check_map_shape(NAME, path, raw, 3)
  if raw.shape[:2] != label_map.shape:
    raise base.DatasetError(f"{NAME}: {path!r} has shape {raw.shape[:2]} but its LabelMap has "
                            f"{label_map.shape}.")
  normals = raw.astype(np.float32) * np.float32(2 / 255) - 1
  valid = np.isin(label_map, _NORMALS_VALID_ARRAY)
  return dense_files.unit_normals(normals, valid)


def read_label_map(path: str) -> np.ndarray:
  label_map = np.asarray(dense_files.mat_field(dense_files.read_mat(path, NAME), "LabelMap",
                                               path, NAME))
  if label_map.ndim != 2 or not np.issubdtype(label_map.dtype, np.number):
    raise base.DatasetError(f"{NAME}: LabelMap of {path!r} must be a 2-d numeric array, got "
                            f"shape {label_map.shape} and dtype {label_map.dtype}.")
  return label_map


def _reader(paths: dict[str, list[str]], size: tuple[int, int]):
  """read_example(index, task names) for `dense_files.LazySource`."""

  def read(index: int, names) -> dict:
    image = dense_files.read_rgb(paths["image"][index], NAME)
    shape = image.shape[:2]
    example = {"image": dense_files.resize_image(image, size)}
    label_map = None
    if "edges" in names or "normals" in names:
      label_map = read_label_map(paths["label_map"][index])
      if label_map.shape != shape:
        raise base.DatasetError(
            f"{NAME}: LabelMap of {paths['label_map'][index]!r} has shape {label_map.shape} "
            f"but its image has {shape}.")
    for name in names:
      path = paths["label_map" if name == "edges" else name][index]
      if name == "segmentation":
        label = segmentation_label(dense_files.read_png(path, NAME), path)
      elif name == "human_parts":
        label = human_parts_label(dense_files.read_mat(path, NAME), path, shape)
      elif name == "saliency":
        label = saliency_label(dense_files.read_png(path, NAME), path)
      elif name == "normals":
        label = normals_label(dense_files.read_png(path, NAME), label_map, path)
      else:
        label = dense_files.label_edges(label_map)
      example[name] = dense_files.resize_label(label, size)
    return example

  return read


def load(config: base.DataConfig, split: str) -> dense_files.LazySource:
  """The train (ImageSets/Context/train.txt) or test (val.txt) split of PASCAL-Context.

  `config.data_dir` is the PASCAL_MT folder (or the folder holding it); `config.num_train` /
  `num_test` keep the first examples of the list (0 = all). Every listed id is checked to have
  all its files; the files themselves are read batch by batch.
  """
  base.check_split(NAME, split)
  root = dense_files.find_root(config.data_dir, NAME, LAYOUT, "ImageSets", "PASCAL_MT")
  list_file = os.path.join("ImageSets", "Context", SPLIT_FILES[split])
  ids = dense_files.read_ids(os.path.join(root, list_file), NAME, LAYOUT)
  wanted = config.num_train if split == "train" else config.num_test
  ids = ids[:base.limit(len(ids), wanted)]
  paths = dense_files.resolve_files(root, ids, FOLDERS, NAME, list_file, LAYOUT)
  size = dense_files.output_size(OUTPUT_SIZE, config.image_size)
  return dense_files.LazySource(NAME, split, TASKS, ids, _reader(paths, size))
