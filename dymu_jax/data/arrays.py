"""Bring your own multi-task data: images or feature vectors, and named label arrays, in one `.npz`.

`config.data_dir` is an `.npz` file, or a folder holding exactly one. It holds

* the images under the key `images` (or `image`, or `x`; the JSON spec may name another key):
  uint8 (0..255) or float (0..1) of shape (N, H, W) or (N, H, W, C);
* or, instead, feature vectors (tabular data) under the key `inputs` (the JSON spec may name
  another key with "inputs"): numbers of shape (N, D). They reach the models under the same
  batch key "image" as images, as float32 (B, D), for a vector backbone (`--backbone=mlp`);
  only classification and regression tasks fit them, and `config.image_size` must stay 0.
  With `config.standardise_inputs` (the default) every feature is standardised with the mean
  and standard deviation of the training split (after `num_train`), the same statistics for
  both splits (a constant feature keeps std 1); the source's `input_stats` holds them. With
  `config.standardise_targets` (the default) each regression task is also trained on its
  labels standardised with the training split's mean and std (over its labelled examples):
  they become the task's `label_offset` and `label_scale`, so losses are in standardised units
  while metrics, exports (`Task.label_units`) and the labels themselves stay in the label's
  units. A task whose spec sets "label_scale" or "label_offset" keeps those instead;
* one label array per task, under the task's name, laid out as in `dymu_jax.tasks`:
  classification (N,) integers, regression (N,) or (N, 1), segmentation (N, H, W) integers
  (255 = ignore), depth / edges / saliency (N, H, W) or (N, H, W, 1), normals (N, H, W, 3);
* optionally `split`: (N,) of "train"/"test" (or 0 = train, 1 = test) choosing each example's
  split; without it the split is `split_indices(N, config.test_fraction, config.seed)`.

Missing labels (not every example needs every label; the convention of `dymu_jax.tasks`):

* in the label arrays themselves: NaN in a regression label, 255 in a classification label
  (and the dense kinds' own conventions: 255 in segmentation, 0 in depth, zero normals). NaN is
  refused everywhere else (images, feature vectors, classification and dense labels), and
  infinity everywhere;
* optionally `<task>_mask`: (N,) bool or 0/1, 1 where the example carries that task's label;
  a 0 turns the label into the kind's missing value (NaN for regression, 255 for
  classification and segmentation, 0 for depth and normals), whatever the array held there;
* optionally `task_id`: (N,) integers in [0, T), T being the number of tasks of the spec in
  spec order, or strings naming a task of the spec: one task per example (the layout of
  multi-task regression with one group per row). Each example keeps only the label of its
  task; every other task's label becomes missing. It combines with the masks (a label is kept
  only where both keep it). The ids always refer to the whole spec, also when a run selects
  some of its tasks.

Edges and saliency have no missing value, so a mask or `task_id` that would take their label
away is refused. A task with no label at all in the training split is refused with one
sentence when that split is loaded (a test split may lack a task: its metrics are then NaN).
Classification with a mask or `task_id` needs fewer than 256 classes (255 marks "no label").

Other keys are ignored. `config.task_spec` says which label arrays are tasks and of what kind:

* a JSON file `{"tasks": [{"name": "digit", "kind": "classification", "num_outputs": 10}, ...],
  "images": "x"}` ("num_outputs" may be left out: classification and segmentation take the
  largest label + 1, 255 not counted, over the whole file; other kinds take 1, normals 3;
  "loss_type", "label_scale", "label_offset" and "pos_weight" pass through to `tasks.Task`;
  "images", or
  "inputs" for feature vectors, is optional);
* or inline: `"digit:classification:10,age:regression,mask:segmentation"`.

`config.num_train` / `config.num_test` keep a seeded random subset (0 keeps all);
`config.image_size` > 0 resizes images (bilinear) and dense labels (nearest, so class ids,
"no label" zeros and unit normals are never blended) to image_size x image_size.

(Over 500 lines: reading a user's own `.npz` means checking every way it can be wrong, each with
its own sentence; the checks sit next to the reader they guard.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import images as images_lib
from dymu_jax.data.base import (ArraySource, DataConfig, DatasetError, check_finite,
                                check_split, split_indices)

NAME = "arrays"
IMAGE_KEYS = ("images", "image", "x")
INPUTS_KEY = "inputs"
SPLIT_KEY = "split"
TASK_ID_KEY = "task_id"
MASK_SUFFIX = "_mask"
LAYOUT = ("one .npz file with an image array (key 'images', 'image' or 'x') or feature "
          "vectors (key 'inputs') and one label array per task")
SPEC_HELP = ("a JSON file {\"tasks\": [{\"name\": ..., \"kind\": ...}, ...]} or "
             "\"name:kind[:outputs],...\"")
_TASK_FIELDS = {"name", "kind", "num_outputs", "loss_type", "label_scale", "label_offset",
                "pos_weight"}
# Kinds whose num_outputs is fixed by the kind.
_FIXED_OUTPUTS = {tasks_lib.REGRESSION: 1, tasks_lib.DEPTH: 1, tasks_lib.EDGES: 1,
                  tasks_lib.SALIENCY: 1, tasks_lib.NORMALS: 3}


def load(config: DataConfig, split: str) -> ArraySource:
  """The `split` of the user's `.npz` file, with the tasks of `config.task_spec`."""
  check_split(NAME, split)
  path = find_npz(config.data_dir)
  spec, image_key, inputs_key = parse_task_spec(config.task_spec)
  data = read_npz(path)
  key, vectors = _input_key(path, data, image_key, inputs_key)
  if vectors:
    if config.image_size > 0:
      raise DatasetError(f"{NAME}: image_size={config.image_size} resizes images, but {path!r} "
                         f"holds feature vectors {key!r}; leave image_size at 0.")
    images = _check_inputs(path, key, data[key])
  else:
    images = _check_images(path, key, data[key])
  labels = {}
  for entry in spec:
    if entry["name"] not in data:
      raise DatasetError(f"{NAME}: the task spec names task {entry['name']!r} but {path!r} has "
                         f"no such array; it holds {_keys(data)}.")
    label = _check_label_shape(path, entry, data[entry["name"]], images.shape, vectors)
    _check_label_values(path, entry, label)
    labels[entry["name"]] = label
  labels, marked = _apply_missing(path, data, spec, labels, len(images))
  tasks = [_make_task(entry, labels[entry["name"]]) for entry in spec]
  for task in tasks:
    if (task.name in marked and task.kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION)
        and task.num_outputs > tasks_lib.IGNORE_LABEL):
      raise DatasetError(f"{NAME}: task {task.name!r} has {task.num_outputs} classes, so "
                         f"{tasks_lib.IGNORE_LABEL} is one of them and cannot mark the labels "
                         f"that {task.name + MASK_SUFFIX!r} or {TASK_ID_KEY!r} leave out.")
  keep = _kept(path, data, len(images), config, split)
  if split == "train":
    _check_every_task_labelled(path, tasks, labels, keep)
  stats = None
  train_keep = keep if split == "train" else _kept(path, data, len(images), config, "train")
  if vectors and config.standardise_inputs:
    stats = input_statistics(images[train_keep])
  if vectors and config.standardise_targets:
    fixed = {e["name"] for e in spec if "label_scale" in e or "label_offset" in e}
    tasks = [standardised_target(task, labels[task.name][train_keep])
             if task.kind == tasks_lib.REGRESSION and task.name not in fixed else task
             for task in tasks]
  images = images[keep]
  labels = {name: label[keep] for name, label in labels.items()}
  if stats is not None:
    images = standardise(images, stats)
  if config.image_size > 0:
    images = images_lib.resize_images(images, config.image_size)
    for task in tasks:
      if task.is_dense:
        labels[task.name] = images_lib.resize_labels(labels[task.name], config.image_size)
  return ArraySource(NAME, split, images, labels, tasks, input_stats=stats)


def _kept(path: str, data, n: int, config: DataConfig, split: str) -> np.ndarray:
  """Indices of the examples of `split`, after its `num_train` / `num_test` subset."""
  keep = _split(path, data, n, config, split)
  wanted = config.num_train if split == "train" else config.num_test
  return subsample(keep, wanted, config.seed)


def input_statistics(inputs: np.ndarray) -> dict[str, np.ndarray]:
  """Per-feature mean and standard deviation (float32, (D,)) of feature vectors (N, D).

  Computed in float64. A feature that does not vary (std 0, or a single example) gets std 1,
  so it becomes 0 instead of NaN.
  """
  values = np.asarray(inputs, np.float64)
  if not len(values):
    raise DatasetError(f"{NAME}: the training split is empty, so there are no examples to "
                       f"standardise the feature vectors with.")
  mean = values.mean(axis=0)
  std = values.std(axis=0)
  std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def standardised_target(task: tasks_lib.Task, train_labels: np.ndarray) -> tasks_lib.Task:
  """`task` (regression) with label_offset and label_scale the mean and standard deviation of
  its labelled training examples (NaN = no label), rounded to float32 so both splits and a
  reloaded run agree exactly; a constant target keeps scale 1."""
  values = np.asarray(train_labels, np.float64).reshape(len(train_labels), -1)[:, 0]
  values = values[~np.isnan(values)]
  mean = float(np.float32(values.mean())) if len(values) else 0.0
  std = float(values.std()) if len(values) else 0.0
  scale = float(np.float32(std)) if std > 1e-12 * max(1.0, abs(mean)) else 1.0
  return dataclasses.replace(task, label_offset=mean, label_scale=scale)


def standardise(inputs: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
  """Feature vectors standardised with `stats` (from `input_statistics`), as float32."""
  values = (np.asarray(inputs, np.float64) - stats["mean"]) / stats["std"]
  return values.astype(np.float32)


def _input_key(path: str, data, image_key: str | None, inputs_key: str | None
               ) -> tuple[str, bool]:
  """(key of the input array, whether it holds feature vectors) of the file and its spec."""
  if image_key and inputs_key:
    raise DatasetError(f"{NAME}: the task spec names both images {image_key!r} and feature "
                       f"vectors {inputs_key!r}; name one of them.")
  if inputs_key or image_key:
    key = inputs_key or image_key
    if key not in data:
      what = "feature vectors" if inputs_key else "image array"
      raise DatasetError(f"{NAME}: {path!r} has no {what} {key!r}; it holds {_keys(data)}.")
    return key, bool(inputs_key)
  found_image = next((k for k in IMAGE_KEYS if k in data), None)
  if found_image and INPUTS_KEY in data:
    raise DatasetError(f"{NAME}: {path!r} holds both images {found_image!r} and feature "
                       f"vectors {INPUTS_KEY!r}; name the one to use with \"images\" or "
                       f"\"inputs\" in a JSON task spec.")
  if INPUTS_KEY in data:
    return INPUTS_KEY, True
  if found_image is None:
    wanted = " or ".join(repr(k) for k in IMAGE_KEYS)
    raise DatasetError(f"{NAME}: {path!r} has no image array {wanted}; it holds {_keys(data)} "
                       f"(feature vectors (N, D) would be {INPUTS_KEY!r}).")
  return found_image, False


def subsample(indices: np.ndarray, wanted: int, seed: int) -> np.ndarray:
  """A seeded random subset of `wanted` of `indices` (in their order); 0 or more keeps all.

  Random rather than the first ones, because files are often sorted by a label.
  """
  indices = np.asarray(indices)
  if wanted <= 0 or wanted >= len(indices):
    return indices
  chosen = np.random.default_rng([seed, len(indices), wanted]).choice(
      len(indices), wanted, replace=False)
  return indices[np.sort(chosen)]


# --------------------------------------------------------------------------------------------
# Files.


def find_npz(data_dir: str | None, dataset: str = NAME, layout: str = LAYOUT) -> str:
  """`data_dir` when it is an .npz file, else the one .npz file in the folder `data_dir`."""
  if not data_dir:
    raise DatasetError(f"{dataset} needs data: pass --data_dir=/path/to/{layout}.")
  path = os.path.expanduser(os.fspath(data_dir))
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise DatasetError(f"{dataset} data path {path!r} does not exist; expected {layout}, or a "
                       f"folder holding it.")
  found = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
  if len(found) != 1:
    raise DatasetError(f"{dataset}: folder {path!r} holds {len(found)} .npz files "
                       f"({', '.join(found) or 'none'}); expected exactly one: {layout}.")
  return os.path.join(path, found[0])


def read_npz(path: str, dataset: str = NAME) -> dict[str, np.ndarray]:
  """All arrays of an .npz file, read now; an unreadable file stops with one sentence."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {key: npz[key] for key in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise DatasetError(f"{dataset}: cannot read {path!r} as an .npz file of plain arrays "
                       f"({error}).") from None


def _keys(data) -> str:
  return ", ".join(repr(k) for k in data) or "no arrays"


# --------------------------------------------------------------------------------------------
# Task spec.


def parse_task_spec(task_spec: str) -> tuple[list[dict], str | None, str | None]:
  """Task entries (dicts with at least name and kind), and the image key and the feature-vector
  key of a task spec (None where it names none)."""
  task_spec = (task_spec or "").strip()
  if not task_spec:
    raise DatasetError(f"{NAME} needs a task spec: pass --task_spec= with {SPEC_HELP}.")
  if task_spec.endswith(".json") or os.path.isfile(task_spec):
    entries, image_key, inputs_key = _read_json_spec(task_spec)
  else:
    entries, image_key, inputs_key = _parse_inline_spec(task_spec), None, None
  if not entries:
    raise DatasetError(f"{NAME}: the task spec {task_spec!r} names no task; give {SPEC_HELP}.")
  names = [e["name"] for e in entries]
  for entry in entries:
    if entry["kind"] not in tasks_lib.KINDS:
      raise DatasetError(f"{NAME}: task {entry['name']!r} has unknown kind {entry['kind']!r}; "
                         f"allowed kinds are {', '.join(tasks_lib.KINDS)}.")
    if names.count(entry["name"]) > 1:
      raise DatasetError(f"{NAME}: task {entry['name']!r} appears twice in the task spec.")
    if (entry["name"] in (SPLIT_KEY, TASK_ID_KEY, image_key, inputs_key, INPUTS_KEY,
                          *IMAGE_KEYS) or entry["name"].startswith("_")):
      raise DatasetError(f"{NAME}: {entry['name']!r} cannot be a task name; it is reserved "
                         f"for images, feature vectors, the split, task ids or batch metadata.")
    if (entry["name"].endswith(MASK_SUFFIX)
        and entry["name"][:-len(MASK_SUFFIX)] in names):
      raise DatasetError(f"{NAME}: {entry['name']!r} cannot be a task name; it is the "
                         f"label mask of task {entry['name'][:-len(MASK_SUFFIX)]!r}.")
  return entries, image_key, inputs_key


def _read_json_spec(path: str) -> tuple[list[dict], str | None, str | None]:
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, ValueError) as error:
    raise DatasetError(f"{NAME}: cannot read the task spec {path!r} as JSON ({error}).") from None
  if not isinstance(spec, dict) or not isinstance(spec.get("tasks"), list):
    raise DatasetError(f"{NAME}: the task spec {path!r} must be a JSON object with a list "
                       f"\"tasks\" of {{\"name\": ..., \"kind\": ...}} entries.")
  entries = []
  for entry in spec["tasks"]:
    if not isinstance(entry, dict) or not {"name", "kind"} <= set(entry):
      raise DatasetError(f"{NAME}: every task in {path!r} needs a \"name\" and a \"kind\", got "
                         f"{entry!r}.")
    unknown = set(entry) - _TASK_FIELDS
    if unknown:
      raise DatasetError(f"{NAME}: task {entry['name']!r} in {path!r} has unknown fields "
                         f"{sorted(unknown)}; allowed fields are {sorted(_TASK_FIELDS)}.")
    entries.append(dict(entry))
  keys = []
  for field, what in (("images", "the image array"), ("inputs", "the feature vectors")):
    key = spec.get(field)
    if key is not None and not isinstance(key, str):
      raise DatasetError(f"{NAME}: \"{field}\" in {path!r} must be the key of {what}, got "
                         f"{key!r}.")
    keys.append(key)
  return entries, keys[0], keys[1]


def _parse_inline_spec(task_spec: str) -> list[dict]:
  entries = []
  for item in filter(None, (part.strip() for part in task_spec.split(","))):
    fields = [field.strip() for field in item.split(":")]
    if len(fields) not in (2, 3) or not all(fields):
      raise DatasetError(f"{NAME}: cannot parse task {item!r} of the task spec; write "
                         f"name:kind or name:kind:outputs.")
    entry = {"name": fields[0], "kind": fields[1]}
    if len(fields) == 3:
      if not fields[2].isdigit():
        raise DatasetError(f"{NAME}: task {fields[0]!r} has outputs {fields[2]!r} in the task "
                           f"spec; outputs must be a positive whole number.")
      entry["num_outputs"] = int(fields[2])
    entries.append(entry)
  return entries


def _make_task(entry: dict, label: np.ndarray) -> tasks_lib.Task:
  kind = entry["kind"]
  outputs = entry.get("num_outputs")
  if outputs is None:
    outputs = _FIXED_OUTPUTS.get(kind) or _infer_classes(entry["name"], label)
  if kind in _FIXED_OUTPUTS and outputs != _FIXED_OUTPUTS[kind]:
    raise DatasetError(f"{NAME}: task {entry['name']!r} of kind {kind} has "
                       f"{_FIXED_OUTPUTS[kind]} output(s), not {outputs}.")
  try:
    return tasks_lib.Task(entry["name"], kind, int(outputs),
                          loss_type=entry.get("loss_type", ""),
                          pos_weight=entry.get("pos_weight"),
                          label_scale=float(entry.get("label_scale", 1.0)),
                          label_offset=float(entry.get("label_offset", 0.0)))
  except (TypeError, ValueError) as error:
    raise DatasetError(f"{NAME}: bad task spec entry {entry!r} ({error}).") from None


def _infer_classes(name: str, label: np.ndarray) -> int:
  if not np.issubdtype(label.dtype, np.integer):
    raise DatasetError(f"{NAME}: labels of task {name!r} must be integers, got {label.dtype}.")
  values = label[label != tasks_lib.IGNORE_LABEL]
  if not values.size:
    raise DatasetError(f"{NAME}: task {name!r} has no label other than "
                       f"{tasks_lib.IGNORE_LABEL} ('no label'); give its num_outputs in the spec.")
  return int(values.max()) + 1


# --------------------------------------------------------------------------------------------
# Arrays.


def _check_images(path: str, key: str, images: np.ndarray) -> np.ndarray:
  if images.ndim == 2:
    raise DatasetError(f"{NAME}: images {key!r} in {path!r} have shape {images.shape}, which is "
                       f"feature vectors (N, D); store them under {INPUTS_KEY!r} (or name them "
                       f"with \"inputs\" in a JSON task spec).")
  if images.ndim not in (3, 4):
    raise DatasetError(f"{NAME}: images {key!r} in {path!r} must have shape (N, H, W) or "
                       f"(N, H, W, C), got {images.shape}.")
  if images.dtype == np.bool_:
    images = images.astype(np.uint8) * np.uint8(255)
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise DatasetError(f"{NAME}: images {key!r} in {path!r} must be uint8 (0..255) or float "
                       f"(0..1), got {images.dtype}.")
  check_finite(NAME, path, images, f"images {key!r}")
  if np.issubdtype(images.dtype, np.floating) and images.size and not (
      images.min() >= 0.0 and images.max() <= 1.0):
    raise DatasetError(f"{NAME}: float images {key!r} in {path!r} range over "
                       f"[{images.min()}, {images.max()}] but must lie in [0, 1] (store "
                       f"0..255 images as uint8).")
  return images


def _check_inputs(path: str, key: str, inputs: np.ndarray) -> np.ndarray:
  """Feature vectors (N, D) as float32, or one sentence on what was expected."""
  if inputs.ndim != 2 or not inputs.shape[1]:
    raise DatasetError(f"{NAME}: feature vectors {key!r} in {path!r} must have shape (N, D) "
                       f"with D >= 1, got {inputs.shape}; store images under 'images' instead.")
  if inputs.dtype.kind not in "biuf":
    raise DatasetError(f"{NAME}: feature vectors {key!r} in {path!r} must be numbers (bool, "
                       f"integer or float), got {inputs.dtype}; encode text columns first.")
  check_finite(NAME, path, inputs, f"feature vectors {key!r}")
  return inputs.astype(np.float32)


def _check_label_shape(path: str, entry: dict, label: np.ndarray, image_shape,
                       vectors: bool = False) -> np.ndarray:
  """The label array in its batch layout, or one sentence on what shape was expected."""
  name, kind = entry["name"], entry["kind"]
  if vectors and kind not in (tasks_lib.CLASSIFICATION, tasks_lib.REGRESSION):
    raise DatasetError(f"{NAME}: task {name!r} is {kind}, a per-pixel kind, but {path!r} holds "
                       f"feature vectors {tuple(image_shape)}; only classification and "
                       f"regression tasks fit them.")
  n = image_shape[0]
  if kind in (tasks_lib.CLASSIFICATION, tasks_lib.REGRESSION):
    if kind == tasks_lib.REGRESSION and label.ndim == 2 and label.shape[1] == 1:
      label = label[:, 0]
    expected = (n,)
  elif kind == tasks_lib.SEGMENTATION:
    expected = (n, *image_shape[1:3])
  elif kind == tasks_lib.NORMALS:
    expected = (n, *image_shape[1:3], 3)
  else:  # depth, edges, saliency: one channel, stored with or without its axis
    if label.ndim == 3:
      label = label[..., None]
    expected = (n, *image_shape[1:3], 1)
  if label.shape != expected:
    over = "feature vectors" if vectors else "images"
    raise DatasetError(f"{NAME}: labels {name!r} in {path!r} have shape {label.shape}, but a "
                       f"{kind} task over {over} {tuple(image_shape)} needs {expected}.")
  return label


# --------------------------------------------------------------------------------------------
# Missing labels: NaN / 255 in the labels, `<task>_mask` arrays and `task_id`.


def _check_label_values(path: str, entry: dict, label: np.ndarray) -> None:
  """NaN only in regression labels (a missing label); infinity nowhere."""
  what = f"labels {entry['name']!r}"
  if entry["kind"] == tasks_lib.REGRESSION:
    check_finite(NAME, path, label, what, allow_nan=True)
  elif (entry["kind"] == tasks_lib.CLASSIFICATION and label.dtype.kind in "fc"
        and np.isnan(label).any()):
    raise DatasetError(f"{NAME}: {what} in {path!r} hold NaN; classification labels must be "
                       f"integers, with {tasks_lib.IGNORE_LABEL} (or a 0 in "
                       f"{entry['name'] + MASK_SUFFIX!r}) marking a missing label.")
  else:
    check_finite(NAME, path, label, what)


def _apply_missing(path: str, data, spec: list[dict], labels: dict[str, np.ndarray], n: int
                   ) -> tuple[dict[str, np.ndarray], set[str]]:
  """The labels with what `<task>_mask` and `task_id` leave out set to the kind's missing
  value, and the names of the tasks that lost a label that way."""
  present = {}
  for entry in spec:
    key = entry["name"] + MASK_SUFFIX
    if key in data:
      present[entry["name"]] = _read_mask(path, key, data[key], n)
  if TASK_ID_KEY in data:
    ids = _read_task_ids(path, data[TASK_ID_KEY], [e["name"] for e in spec], n)
    for index, entry in enumerate(spec):
      own = ids == index
      present[entry["name"]] = own & present.get(entry["name"], True)
  out, marked = dict(labels), set()
  for entry in spec:
    keep = present.get(entry["name"])
    if keep is None or keep.all():
      continue
    out[entry["name"]] = _mark_missing(path, entry, labels[entry["name"]], ~keep)
    marked.add(entry["name"])
  return out, marked


def _column(path: str, key: str, values: np.ndarray, n: int) -> np.ndarray:
  """A per-example array of shape (N,) (or (N, 1), flattened), or one sentence."""
  values = np.asarray(values)
  if values.ndim == 2 and values.shape[1] == 1:
    values = values[:, 0]
  if values.shape != (n,):
    raise DatasetError(f"{NAME}: {key!r} in {path!r} has shape {values.shape}, expected ({n},) "
                       f"to match the examples.")
  return values


def _read_mask(path: str, key: str, mask: np.ndarray, n: int) -> np.ndarray:
  """(N,) bool from a `<task>_mask` array of bools or 0/1, or one sentence."""
  mask = _column(path, key, mask, n)
  if mask.dtype == np.bool_:
    return mask
  if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
    raise DatasetError(f"{NAME}: {key!r} in {path!r} must hold booleans or 0/1 (1 = the example "
                       f"carries that label).")
  return mask == 1


def _read_task_ids(path: str, ids: np.ndarray, names: list[str], n: int) -> np.ndarray:
  """(N,) int task index in [0, T) from `task_id` (ints in spec order or task names)."""
  ids = _column(path, TASK_ID_KEY, ids, n)
  if ids.dtype.kind in "US":
    ids = ids.astype(str)
    known = np.isin(ids, names)
    if not known.all():
      raise DatasetError(f"{NAME}: {TASK_ID_KEY!r} in {path!r} names tasks "
                         f"{np.unique(ids[~known])[:5].tolist()} that the task spec does not "
                         f"have; it has {', '.join(names)}.")
    order = np.argsort(names)
    return order[np.searchsorted(np.asarray(names)[order], ids)]
  if ids.dtype.kind not in "iu":
    raise DatasetError(f"{NAME}: {TASK_ID_KEY!r} in {path!r} must hold integers in "
                       f"[0, {len(names)}) (the tasks of the spec in order) or task names, got "
                       f"{ids.dtype}.")
  if ids.size and (ids.min() < 0 or ids.max() >= len(names)):
    raise DatasetError(f"{NAME}: {TASK_ID_KEY!r} in {path!r} ranges over [{ids.min()}, "
                       f"{ids.max()}] but must lie in [0, {len(names) - 1}]: the index of a task "
                       f"of the spec ({', '.join(names)}).")
  return ids.astype(np.int64)


def _mark_missing(path: str, entry: dict, label: np.ndarray, missing: np.ndarray
                  ) -> np.ndarray:
  """A copy of `label` with the examples `missing` set to the kind's missing value."""
  name, kind = entry["name"], entry["kind"]
  value = tasks_lib.missing_value(kind)
  if value is None:
    raise DatasetError(f"{NAME}: task {name!r} is {kind}, which has no missing-label value, "
                       f"but {name + MASK_SUFFIX!r} or {TASK_ID_KEY!r} leaves "
                       f"{int(missing.sum())} example(s) without it; every example needs it.")
  if kind == tasks_lib.REGRESSION:
    label = label.astype(np.promote_types(label.dtype, np.float32))
  elif kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION):
    if not np.issubdtype(label.dtype, np.integer):
      raise DatasetError(f"{NAME}: labels of task {name!r} must be integers, got "
                         f"{label.dtype}.")
    if np.iinfo(label.dtype).max < value:
      label = label.astype(np.int32)
    else:
      label = label.copy()
  else:
    label = label.copy()
  label[missing] = value
  return label


def _check_every_task_labelled(path: str, tasks: list[tasks_lib.Task],
                               labels: dict[str, np.ndarray], keep: np.ndarray) -> None:
  """One sentence when a task has no label at all among the training examples `keep`."""
  for task in tasks:
    if not tasks_lib.label_present(task, labels[task.name][keep]).any():
      raise DatasetError(f"{NAME}: task {task.name!r} has no label in the {len(keep)} training "
                         f"examples of {path!r} (every one is missing), so it cannot be "
                         f"trained; give it labels or leave it out of the task spec.")


def _split(path: str, data, n: int, config: DataConfig, split: str) -> np.ndarray:
  if SPLIT_KEY not in data:
    train, test = split_indices(n, config.test_fraction, config.seed)
    return train if split == "train" else test
  marks = data[SPLIT_KEY]
  if marks.shape != (n,):
    raise DatasetError(f"{NAME}: {SPLIT_KEY!r} in {path!r} has shape {marks.shape}, expected "
                       f"({n},) to match the images.")
  if marks.dtype.kind in "US":
    marks = marks.astype(str)
    is_test, known = marks == "test", np.isin(marks, ["train", "test"])
  elif marks.dtype.kind in "biu":
    is_test, known = marks == 1, np.isin(marks, [0, 1])
  else:
    known = np.zeros(n, bool)
  if not known.all():
    raise DatasetError(f"{NAME}: {SPLIT_KEY!r} in {path!r} must hold 'train'/'test' or 0/1 "
                       f"(1 = test), got {np.unique(marks[~known])[:5].tolist()}.")
  keep = np.flatnonzero(is_test == (split == "test"))
  if not keep.size:
    raise DatasetError(f"{NAME}: {SPLIT_KEY!r} in {path!r} marks no example for {split}.")
  return keep
