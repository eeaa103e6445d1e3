"""What the folder readers of dense multi-task datasets share (NYUD-v2, PASCAL-Context).

Reading the label files of the standard multi-task archives (JPG/PNG images, PNG/NPY/MAT label
maps) with one clear `DatasetError` for a missing, corrupt or out-of-range file; a lazily
loading source that reads only the examples of each batch, with threads; resizing to the
output size (bilinear images through PIL, nearest-neighbour labels through
`dymu_jax.data.images`); and the edge map of a label map (Laplacian, then morphological
thinning) used by PASCAL-Context.
"""

from __future__ import annotations

import os
from concurrent import futures
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import io as scipy_io

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base
from dymu_jax.data import images as images_lib

# --------------------------------------------------------------------------------------------
# Id lists and file lookup.


def find_root(data_dir: str | None, dataset: str, layout: str, marker: str,
              subfolder: str) -> str:
  """The dataset folder: `data_dir` itself when it holds `marker`, else `data_dir/subfolder`.

  Accepting the parent folder lets users point at where they unpacked the archive.
  """
  root = base.require_dir(data_dir, dataset, layout)
  if not os.path.exists(os.path.join(root, marker)):
    nested = os.path.join(root, subfolder)
    if os.path.exists(os.path.join(nested, marker)):
      return nested
  return root


def read_ids(path: str, dataset: str, layout: str) -> list[str]:
  """Example ids of a split list file, one per line (blank lines skipped)."""
  if not os.path.isfile(path):
    raise base.DatasetError(f"{dataset}: split list {path!r} is missing; expected {layout}.")
  with open(path, encoding="utf-8") as f:
    ids = [line.strip() for line in f if line.strip()]
  if not ids:
    raise base.DatasetError(f"{dataset}: split list {path!r} lists no example ids.")
  return ids


def find_file(root: str, folder: str, example_id: str, extensions: Sequence[str]) -> str | None:
  """`root/folder/<id><ext>` for the first extension that exists, else None."""
  for extension in extensions:
    path = os.path.join(root, folder, example_id + extension)
    if os.path.isfile(path):
      return path
  return None


def resolve_files(root: str, ids: Sequence[str],
                  folders: Mapping[str, Sequence[tuple[str, Sequence[str]]]], dataset: str,
                  list_file: str, layout: str) -> dict[str, list[str]]:
  """Paths of every example's files, checked to exist; stops at the first missing one.

  Args:
    root: the dataset folder.
    ids: example ids of the split.
    folders: key -> candidate (folder, extensions) pairs, tried in order (the first folder
      that holds the id wins).
    dataset, list_file, layout: for the error message.

  Returns:
    key -> one path per id.
  """
  paths = {key: [] for key in folders}
  for example_id in ids:
    for key, candidates in folders.items():
      for folder, extensions in candidates:
        path = find_file(root, folder, example_id, extensions)
        if path is not None:
          break
      else:
        expected = " or ".join(
            f"{folder}/{example_id}{'|'.join(extensions)}" for folder, extensions in candidates)
        raise base.DatasetError(
            f"{dataset}: example {example_id!r} listed in {list_file} has no file {expected} "
            f"under {root!r}; expected {layout}.")
      paths[key].append(path)
  return paths


# --------------------------------------------------------------------------------------------
# Reading files.


def _unreadable(dataset: str, path: str, kind: str, error: Exception) -> base.DatasetError:
  return base.DatasetError(f"{dataset}: cannot read {path!r} as {kind} ({type(error).__name__}:"
                           f" {error}); the file is corrupt or of another format.")


def read_rgb(path: str, dataset: str) -> np.ndarray:
  """An image file as uint8 (H, W, 3)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as error:  # PIL's ways of saying "corrupt"
    raise _unreadable(dataset, path, "an image", error) from error


def read_png(path: str, dataset: str) -> np.ndarray:
  """A label PNG as stored: palette PNGs give their indices, not colours (like the references)."""
  try:
    with Image.open(path) as image:
      return np.asarray(image)
  except (OSError, ValueError, SyntaxError) as error:
    raise _unreadable(dataset, path, "a PNG label map", error) from error


def read_npy(path: str, dataset: str) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as error:
    raise _unreadable(dataset, path, "a numpy .npy array", error) from error


def read_mat(path: str, dataset: str) -> dict:
  try:
    return scipy_io.loadmat(path)
  except (scipy_io.matlab.MatReadError, OSError, ValueError, TypeError, EOFError,
          NotImplementedError) as error:
    raise _unreadable(dataset, path, "a MATLAB .mat file", error) from error


def mat_field(mat: Mapping, key: str, path: str, dataset: str) -> np.ndarray:
  if key not in mat:
    found = ", ".join(k for k in mat if not k.startswith("__")) or "none"
    raise base.DatasetError(f"{dataset}: {path!r} has no variable {key!r} (found: {found}).")
  return mat[key]


# --------------------------------------------------------------------------------------------
# Label checks and conversions.


def check_range(dataset: str, path: str, values: np.ndarray, low: float, high: float,
                allowed: str) -> None:
  """Stops when `values` are not finite or leave [low, high]; `allowed` says what is valid."""
  if values.size == 0:
    return
  check_finite(dataset, path, values)
  vmin, vmax = values.min(), values.max()
  if vmin < low or vmax > high:
    raise base.DatasetError(f"{dataset}: {path!r} holds values in [{vmin}, {vmax}] but "
                            f"{allowed}.")


def check_finite(dataset: str, path: str, values: np.ndarray) -> None:
  base.check_finite(dataset, path, values)


def check_map_shape(dataset: str, path: str, label: np.ndarray, channels: int | None) -> None:
  """A label map must be (H, W) (channels None) or (H, W, channels)."""
  ok = label.ndim == 2 if channels is None else (label.ndim == 3 and label.shape[2] == channels)
  if not ok:
    want = "(H, W)" if channels is None else f"(H, W, {channels})"
    raise base.DatasetError(f"{dataset}: {path!r} has shape {label.shape}, expected {want}.")


def unit_normals(normals: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
  """float32 unit vectors where the vector is non-zero (and `valid`), exactly 0 elsewhere."""
  normals = np.array(normals, np.float32)  # a copy, normalised in place
  norm = np.sqrt(np.einsum("...c,...c->...", normals, normals))
  keep = norm > 0
  if valid is not None:
    keep &= valid
  scale = np.zeros_like(norm)
  np.divide(1.0, norm, out=scale, where=keep)
  normals *= scale[..., None]
  return normals


def squeeze_map(label: np.ndarray) -> np.ndarray:
  """(H, W, 1) -> (H, W); other shapes unchanged."""
  return label[..., 0] if label.ndim == 3 and label.shape[2] == 1 else label


# --------------------------------------------------------------------------------------------
# Edges of a label map.


def _thin_tables() -> tuple[np.ndarray, np.ndarray]:
  """Deletion tables of the two sub-iterations of Guo & Hall's thinning (their A1 algorithm).

  Index n codes the 8 neighbours counter-clockwise from east (bit 0 = E, 1 = NE, 2 = N, 3 = NW,
  4 = W, 5 = SW, 6 = S, 7 = SE); the same tables as `skimage.morphology.thin`.
  """
  bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1
  x = [bits[:, i].astype(bool) for i in range(8)]
  # G1: exactly one 4-connected run of foreground neighbours.
  crossings = sum((~x[i]) & (x[i + 1] | x[(i + 2) % 8]) for i in (0, 2, 4, 6))
  g1 = crossings == 1
  # G2: 2 <= min(n1, n2) <= 3.
  n1 = sum((x[k] | x[k - 1]).astype(int) for k in (1, 3, 5, 7))
  n2 = sum((x[k] | x[(k + 1) % 8]).astype(int) for k in (1, 3, 5, 7))
  g2 = (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
  # G3 (first sub-iteration) and G3' (second).
  g3 = ~((x[1] | x[2] | ~x[7]) & x[0])
  g3p = ~((x[5] | x[6] | ~x[3]) & x[4])
  return g1 & g2 & g3, g1 & g2 & g3p


_THIN_TABLES = _thin_tables()
# (row, column) offsets of the neighbours, in the bit order of the tables.
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def thin(mask: np.ndarray) -> np.ndarray:
  """Morphological thinning of a boolean (H, W) mask to one-pixel-wide curves.

  Guo & Hall's two-sub-iteration algorithm, repeated until nothing changes, exactly as
  `skimage.morphology.thin` (which the reference code calls) does. Only the foreground pixels
  are visited, since edge masks are sparse.
  """
  height, width = np.shape(mask)
  padded = np.zeros((height + 2, width + 2), np.uint8)  # a zero border stands for "outside"
  padded[1:-1, 1:-1] = np.asarray(mask, bool)
  rows, cols = np.nonzero(padded)
  changed = True
  while changed and rows.size:
    changed = False
    for table in _THIN_TABLES:
      code = np.zeros(rows.shape, np.intp)
      for bit, (dr, dc) in enumerate(_NEIGHBOURS):
        code |= padded[rows + dr, cols + dc].astype(np.intp) << bit
      delete = table[code]  # decided for all pixels at once, then applied
      if delete.any():
        padded[rows[delete], cols[delete]] = 0
        rows, cols = rows[~delete], cols[~delete]
        changed = True
  return padded[1:-1, 1:-1].astype(bool)


def label_edges(label_map: np.ndarray) -> np.ndarray:
  """float32 {0, 1} edges of an integer label map, as the PASCAL-Context reference builds them.

  Pixels where the 4-neighbour Laplacian of the label map is non-zero (borders reflected without
  repeating the edge pixel, like OpenCV's default), thinned to one pixel width.
  """
  labels = np.asarray(label_map).astype(np.int32)  # class ids < 2**16, so 4 * id fits
  padded = np.pad(labels, 1, mode="reflect")
  laplacian = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
               - 4 * labels)
  return thin(laplacian != 0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Resizing and the lazily loading source.


def output_size(native: tuple[int, int], image_size: int) -> tuple[int, int]:
  """(height, width) of the batches: the dataset's own size, or a square when image_size > 0."""
  if image_size < 0:
    raise base.DatasetError(f"image size must be >= 0 (0 keeps the dataset's size), got "
                            f"{image_size}.")
  return (image_size, image_size) if image_size else tuple(native)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (height, width, 3) in [0, 1], bilinear.

  PIL's bilinear filter is the one of `images.resize_images` (half-pixel centres, triangle
  widened when shrinking) rounded to uint8, and about 10x faster on one image.
  """
  if image.shape[:2] != tuple(size):
    height, width = size
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
  return base.to_float_image(image)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A label map (H, W, ...) resized by nearest neighbour (classes, 255, unit normals kept)."""
  if label.shape[:2] == tuple(size):
    return label
  return images_lib.resize_labels(label[None], size)[0]


# read_example(index, task names) -> {"image": float32 (H, W, 3), "<task>": label map}.
ReadExample = Callable[[int, Sequence[str]], dict]


class LazySource(base.DataSource):
  """A split read file by file: `get` reads only the examples it is asked for.

  The examples of a batch are read by `num_threads` threads (decoding and numpy release the
  GIL); each example is read independently, so the batch does not depend on the thread count.
  Restricting the tasks (`with_tasks`) also restricts what is read, so a single-task run does
  not pay for decoding the other tasks' files.
  """

  def __init__(self, name: str, split: str, tasks: Sequence[tasks_lib.Task], ids: Sequence[str],
               read_example: ReadExample, num_threads: int | None = None):
    self.name, self.split, self.tasks = name, split, tuple(tasks)
    self.ids, self.read_example = list(ids), read_example
    self.num_threads = num_threads or min(8, os.cpu_count() or 1)
    self._pool = None

  def __len__(self) -> int:
    return len(self.ids)

  def _map(self, fn, items):
    if self.num_threads <= 1 or len(items) <= 1:
      return [fn(item) for item in items]
    if self._pool is None:
      self._pool = futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix=self.name)
    return list(self._pool.map(fn, items))

  def get(self, indices: np.ndarray) -> base.Batch:
    names = [task.name for task in self.tasks]
    examples = self._map(lambda i: self.read_example(int(i), names),
                         list(np.asarray(indices).reshape(-1)))
    batch = {"image": np.stack([example["image"] for example in examples])}
    for task in self.tasks:
      batch[task.name] = base.cast_label(task, np.stack([e[task.name] for e in examples]))
    return batch

  def with_tasks(self, names: Sequence[str] | str | None) -> "LazySource":
    selected = tasks_lib.select(self.tasks, names)
    return LazySource(self.name, self.split, selected, self.ids, self.read_example,
                      self.num_threads)
