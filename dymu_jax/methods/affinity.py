"""Task affinity by representation similarity analysis (RSA) on the frozen DYMU anchor.

METHODS.md section 1, "Task affinity" [known: RSA on the frozen anchor; ours: K, the
similarity and the normalisation]:

1. Run the K images (K = 128 [ours]) through every stream of the anchor (the separate tree) and
   keep each block's output. On the "mlp" stack the examples are feature vectors (K, D) and the
   block outputs (K, units) vectors; everything below is the same.
2. For stream i and layer l, the K x K representation similarity matrix S^l_i is the Pearson
   correlation between the flattened features of every pair of images [ours].
3. D^l(i, j) = ||S^l_i - S^l_j||_F; each row of D^l is divided by its maximum, so it lies in
   [0, 1] (the diagonal is 0) [ours]; A^l = 1 - D^l normalised.
4. A = mean over layers of A^l. Row normalisation makes A asymmetric in general; A(i, i) = 1.

With N = 2 the row normalisation is degenerate: each row's maximum is its only off-diagonal
entry, so A = I whatever the streams (unless they are identical), and L_active (weighted by
A(i, j), i != j) vanishes. `normalisation="pair"` [ours option] instead divides each distance
by its own bound, `D(i, j) / (||S_i||_F + ||S_j||_F)` (in [0, 1] by the triangle inequality),
which keeps a graded affinity for two tasks (Multi-MNIST).

A row of D^l that is all zero (stream i's similarities equal every other stream's) gives
affinity 1 to every stream. An image whose features are constant has no defined correlation; it
gets correlation 0 with every image (itself included).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.models import backbones
from dymu_jax.models.branched import BranchedNet

PyTree = Any
NUM_IMAGES = 128  # K [ours]
# The record of a run's affinity (A, the task weights, what they were measured on) and its
# heat map, next to its checkpoints.
RECORD_FILE = "dymu_affinity.json"
RECORD_PLOT = "dymu_affinity.png"
NORMALISATIONS = ("row", "pair")
_EPS = 1e-12


def similarity_matrices(features: jax.Array) -> jax.Array:
  """Pearson correlation between images, per stream: (N, K, ...) -> (N, K, K)."""
  flat = features.reshape(features.shape[0], features.shape[1], -1).astype(jnp.float32)
  centred = flat - jnp.mean(flat, axis=-1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(jnp.square(centred), axis=-1, keepdims=True))
  unit = jnp.where(norm > _EPS, centred / jnp.maximum(norm, _EPS), 0.0)
  return jnp.einsum("nkf,nmf->nkm", unit, unit, precision=jax.lax.Precision.HIGHEST)


def rsa_distances(similarities: jax.Array) -> jax.Array:
  """Frobenius distance between the similarity matrices of every pair of streams: (N, N)."""
  diff = similarities[:, None] - similarities[None, :]
  return jnp.sqrt(jnp.sum(jnp.square(diff), axis=(-2, -1)))


def normalise_rows(distances: jax.Array) -> jax.Array:
  """Each row divided by its maximum (rows of zeros stay zero), so rows lie in [0, 1]."""
  top = jnp.max(distances, axis=-1, keepdims=True)
  return jnp.where(top > _EPS, distances / jnp.maximum(top, _EPS), 0.0)


def normalise_pairs(distances: jax.Array, similarities: jax.Array) -> jax.Array:
  """D(i, j) / (||S_i||_F + ||S_j||_F), in [0, 1] (zero where both matrices are zero)."""
  norms = jnp.sqrt(jnp.sum(jnp.square(similarities), axis=(-2, -1)))
  bound = norms[:, None] + norms[None, :]
  return jnp.where(bound > _EPS, distances / jnp.maximum(bound, _EPS), 0.0)


def layer_affinity(features: jax.Array, normalisation: str = "row") -> jax.Array:
  """A^l = 1 - normalised RSA distances, from one layer's features (N, K, ...)."""
  similarities = similarity_matrices(features)
  distances = rsa_distances(similarities)
  if normalisation == "row":
    return 1.0 - normalise_rows(distances)
  return 1.0 - normalise_pairs(distances, similarities)


def _check_normalisation(normalisation: str):
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"Unknown affinity normalisation {normalisation!r}; allowed: "
                     f"{', '.join(NORMALISATIONS)}.")


def rsa_affinity(layer_features: Sequence[jax.Array], normalisation: str = "row"
                 ) -> np.ndarray:
  """The task affinity A (N, N): the mean over layers of `layer_affinity`.

  Args:
    layer_features: one (N, K, ...) array per layer (stream axis first, K images).
    normalisation: "row" (each row of D^l divided by its maximum, the default) or "pair"
      (module docstring).
  """
  _check_normalisation(normalisation)
  if not layer_features:
    raise ValueError("RSA affinity needs the features of at least one layer.")
  shapes = {tuple(f.shape[:2]) for f in layer_features}
  if len(shapes) != 1:
    raise ValueError(f"Every layer's features must have the same (streams, images) leading "
                     f"shape, got {sorted(shapes)}.")
  (num_streams, num_images), = shapes
  if num_images < 2:
    raise ValueError(f"RSA needs at least 2 images, got {num_images}.")
  run = jax.jit(layer_affinity, static_argnums=1)
  per_layer = [np.asarray(run(f, normalisation)) for f in layer_features]
  return np.mean(np.stack(per_layer), axis=0)


def task_affinity(net: BranchedNet, anchor_variables: PyTree, images,
                  num_images: int = NUM_IMAGES, batch_size: int = 64,
                  normalisation: str = "row") -> np.ndarray:
  """RSA affinity of the anchor's streams on the first `num_images` of `images`.

  Args:
    net: the branched network.
    anchor_variables: its trained (frozen) variables.
    images: float images (>= num_images, H, W, C) in [0, 1], e.g. training images; for the
      "mlp" stack, feature vectors (>= num_images, D).
    num_images: K.
    batch_size: images per forward pass.
    normalisation: "row" or "pair" (see `rsa_affinity`).

  Returns:
    A (N, N) numpy array, A[i, i] = 1.
  """
  _check_normalisation(normalisation)
  images = np.asarray(images)
  vectors = net.input_kind == backbones.VECTORS
  rank_ok = images.ndim >= 2 and images.ndim != 4 if vectors else images.ndim == 4
  if not rank_ok or images.shape[0] < num_images:
    what = "feature vectors of shape (D,)" if vectors else "images of shape (H, W, C)"
    raise ValueError(f"task_affinity needs at least num_images={num_images} {what}, got an "
                     f"array of shape {images.shape}.")
  images = images[:num_images].astype(np.float32)
  tree = net.separate_tree()
  run = jax.jit(lambda v, x: net.apply_tree(v, x, tree, return_features=True)[1])
  chunks = [run(anchor_variables, images[k:k + batch_size])
            for k in range(0, num_images, batch_size)]
  layer_features = [jnp.concatenate([c[l] for c in chunks], axis=1)
                    for l in range(net.num_layers)]
  return rsa_affinity(layer_features, normalisation)


# ----------------------------------------------------------------------------------------------
# The saved record.


def read_record(folder: str) -> dict | None:
  """The affinity record (RECORD_FILE) next to a run in `folder` (DYMU's edge and weight
  stages), or None."""
  path = files_lib.run_path(folder) / RECORD_FILE
  if not files_lib.is_file(path):
    return None
  return files_lib.read_json(path)


def write_artefact(directory: str, tasks: Sequence[str], affinity, task_weights=None, *,
                   plot: bool = True) -> dict:
  """The affinity record of a run as `Method.artefacts` returns it, kept in `directory`.

  A record the folder already holds with a "signature" (the one the edge stage's hook wrote,
  or the weight stage's copy of it) is kept byte for byte: the stage hooks and
  `restored_options` read it. Without one, or with an unsigned record of other values (an
  earlier evaluation's output of another run), the record of (`tasks`, `affinity`,
  `task_weights`) is written; its normalisation and K are not known here and left out. The
  heat map (RECORD_PLOT) is drawn with `plot` where missing or stale.

  Args:
    directory: a run's folder or an evaluation's output folder (local or a URI).
    tasks: the task names, in stream order.
    affinity: A (N, N).
    task_weights: w_i, or None (1 each).
    plot: whether to draw the heat map.

  Returns:
    The record with "file" (its JSON in `directory`) and "heatmap" (RECORD_PLOT, None without
    `plot`).
  """
  tasks = [str(t) for t in tasks]
  matrix = np.asarray(affinity, float)
  if matrix.shape != (len(tasks), len(tasks)):
    raise ValueError(f"The task affinity of {len(tasks)} tasks must be a ({len(tasks)}, "
                     f"{len(tasks)}) matrix, got shape {matrix.shape}.")
  fresh = {"tasks": tasks, "affinity": matrix.tolist(),
           "task_weights": None if task_weights is None else [float(w) for w in task_weights]}
  folder = files_lib.makedirs(files_lib.run_path(directory))
  record = read_record(directory)
  if record is not None and "signature" in record and list(record["tasks"]) != tasks:
    raise ValueError(f"The affinity record in {directory} is for the tasks "
                     f"{', '.join(record['tasks'])}, not {', '.join(tasks)}.")
  # JSON keeps Python floats exactly, so a record this wrote compares equal.
  same = record is not None and all(record.get(k) == v for k, v in fresh.items())
  written = record is None or ("signature" not in record and not same)
  if written:
    record = fresh
    files_lib.write_json(folder / RECORD_FILE, record, indent=1)
  if plot and (written or not files_lib.is_file(folder / RECORD_PLOT)):
    plot_record(record, folder / RECORD_PLOT)
  return dict(record, file=os.path.join(os.fspath(directory), RECORD_FILE),
              heatmap=RECORD_PLOT if plot else None)


def plot_record(record: Mapping[str, Any], path: str) -> None:
  """A heat map of the task affinity A as a PNG (its title names the normalisation and K
  where the record has them)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = record["tasks"]
  values = np.asarray(record["affinity"], float)
  size = 1.6 + 0.6 * len(names)
  fig, ax = plt.subplots(figsize=(size + 0.8, size))
  image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
            color="black" if v > 0.5 else "white")
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  # A record written from a method (`write_artefact`) does not know what A was measured on.
  about = ["RSA"]
  if record.get("normalisation"):
    about.append(f"{record['normalisation']} normalisation")
  if record.get("num_images") is not None:
    about.append(f"K={record['num_images']}")
  ax.set_title(f"task affinity A ({', '.join(about)})", fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  files_lib.save_figure(fig, path, dpi=110)
  plt.close(fig)
