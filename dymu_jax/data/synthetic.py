"""Synthetic scenes: the embedded default dataset, drawn procedurally, no download.

Each example is a small 3-D scene seen by an orthographic camera looking along +z: a slanted
background plane (a ground/back wall) and 1 to 4 shapes in front of it. Every label comes from
the same geometry, so the four tasks are consistent with each other and learnable from the
image:

* `segmentation` int32 (H, W): 0 background, then one class per shape type (`CLASS_NAMES`):
  1 circle (a sphere), 2 rectangle (a tilted flat plate), 3 triangle and 4 diamond (pyramids,
  slightly tilted).
* `depth` float32 (H, W, 1): z distance in metres, about 1 to 13, positive everywhere.
* `normals` float32 (H, W, 3): unit surface normals in camera coordinates (x right, y down,
  z away from the camera, the OpenCV convention), pointing at the camera, so n_z < 0. They are
  analytic per surface: a surface of depth D(x, y) has normal ~ (dD/dx, dD/dy, -1), so the sign
  of n_x and n_y is the sign of the depth gradient (x and y in metres: the image spans
  `SCENE_WIDTH` metres).
* `edges` float32 (H, W, 1) in {0, 1}: 1 where a 4-neighbour shows a different object (the
  visible object id changes; both sides of a boundary are marked).

Occlusion is resolved per pixel by a z-buffer (the nearest surface wins) before any label is
read off, so labels always describe the visible surface. The image is float32 (H, W, 3) in
[0, 1]: a textured background (random colour; stripes, checker or smooth noise), objects in a
colour per class with texture noise, Lambertian shading from the normals under a random light,
and a depth haze.

Determinism: example i of a split comes from `np.random.default_rng([seed, split_id, i])`
(train 0, test 1), so any subset can be drawn in any order and two runs agree bit for bit.

Cache: generated examples are kept in memory (filled lazily, on first use) when the whole
split takes at most `CACHE_LIMIT_BYTES`; larger splits are drawn again on every `get` (about
1,500 to 2,000 64x64 examples per second of one core, see `benchmarks/data_throughput.py`).

(Over 500 lines: the scene generator and its four per-pixel label renderers are one procedure;
splitting it would separate the geometry from the labels drawn from it.)
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base

NAME = "synthetic"
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 16
DEFAULT_NUM_TRAIN = 4096
DEFAULT_NUM_TEST = 512
SPLIT_IDS = {"train": 0, "test": 1}
CLASS_NAMES = ("background", "circle", "rectangle", "triangle", "diamond")
NUM_CLASSES = len(CLASS_NAMES)
SCENE_WIDTH = 4.0  # metres spanned by the image's width (orthographic camera)
MIN_DEPTH = 1.0  # metres; every surface is at least this far
MAX_OBJECTS = 4
# Splits up to this size are cached in memory (36 bytes per pixel).
CACHE_LIMIT_BYTES = 1024 * 2**20
_BYTES_PER_PIXEL = 4 * (3 + 1 + 3 + 1) + 4

# Mean albedo of each shape class; each object jitters it.
_PALETTE = np.array([[0.85, 0.25, 0.20],   # circle: red
                     [0.20, 0.70, 0.30],   # rectangle: green
                     [0.25, 0.35, 0.85],   # triangle: blue
                     [0.90, 0.80, 0.20]],  # diamond: yellow
                    np.float32)
# (3, classes): the palette with black for the background, channel first.
_PALETTE_BY_CLASS = np.concatenate([np.zeros((1, 3), np.float32), _PALETTE]).T.copy()
_CIRCLE, _RECTANGLE, _TRIANGLE, _DIAMOND = range(4)
_NOISE_GRID = 6  # cells of the smooth background noise per side


def tasks() -> tuple[tasks_lib.Task, ...]:
  """The four tasks of the dataset, in batch order."""
  return (tasks_lib.segmentation("segmentation", NUM_CLASSES), tasks_lib.depth("depth"),
          tasks_lib.normals("normals"), tasks_lib.edges("edges"))


def load(config: base.DataConfig, split: str) -> "SyntheticScenes":
  """The `split` of the synthetic scenes described by `config` (see the module docstring).

  Uses `config.seed`, `config.image_size` (0 = 64), `config.num_train` (0 = 4096) and
  `config.num_test` (0 = 512); `config.data_dir` is ignored.
  """
  base.check_split(NAME, split)
  size = config.image_size
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
      size != 0 and size < MIN_IMAGE_SIZE):
    raise base.DatasetError(
        f"synthetic image_size must be 0 (default {DEFAULT_IMAGE_SIZE}) or an integer >= "
        f"{MIN_IMAGE_SIZE}, got {size!r}.")
  count = config.num_train if split == "train" else config.num_test
  flag = "num_train" if split == "train" else "num_test"
  if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
    raise base.DatasetError(
        f"synthetic {flag} must be 0 (the default) or a positive integer, got {count!r}.")
  default = DEFAULT_NUM_TRAIN if split == "train" else DEFAULT_NUM_TEST
  return SyntheticScenes(split, num_examples=int(count) or default,
                         image_size=int(size) or DEFAULT_IMAGE_SIZE, seed=config.seed)


class SyntheticScenes(base.DataSource):
  """One split of procedurally drawn scenes with segmentation, depth, normals and edges.

  Args:
    split: "train" or "test" (they draw from different random streams).
    num_examples: examples in the split.
    image_size: side length in pixels (>= 16).
    seed: the dataset seed.
    cache: keep generated examples in memory; None caches when the split takes at most
      `CACHE_LIMIT_BYTES`.
  """

  name = NAME

  def __init__(self, split: str, num_examples: int = DEFAULT_NUM_TRAIN,
               image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0, cache: bool | None = None):
    base.check_split(NAME, split)
    if image_size < MIN_IMAGE_SIZE:
      raise base.DatasetError(
          f"synthetic image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}.")
    if num_examples < 1:
      raise base.DatasetError(
          f"synthetic {split} needs at least 1 example, got {num_examples}.")
    self.split, self.tasks = split, tasks()
    self.num_examples, self.image_size, self.seed = num_examples, image_size, seed
    self._split_id = SPLIT_IDS[split]
    if cache is None:
      cache = num_examples * image_size**2 * _BYTES_PER_PIXEL <= CACHE_LIMIT_BYTES
    self.cached = bool(cache)
    self._cache = _Cache(num_examples, image_size) if cache else None

  def __len__(self) -> int:
    return self.num_examples

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, 3)

  def get(self, indices: np.ndarray) -> base.Batch:
    """Examples at `indices` as {"image", "segmentation", "depth", "normals", "edges"}."""
    indices = self._check_indices(indices)
    if self._cache is not None:
      return self._cache.get(indices, self._render_batch)
    return self._render_batch(indices)

  def object_ids(self, indices: np.ndarray) -> np.ndarray:
    """int32 (B, H, W) id of the visible object per pixel (0 = background), for inspection."""
    indices = self._check_indices(indices)
    return draw_scenes(self.seed, self.split, indices, self.image_size)[1]

  def _check_indices(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise IndexError(f"synthetic get() needs a 1-D integer index array, got shape "
                       f"{indices.shape} of {indices.dtype}.")
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"synthetic {self.split} indices must lie in [0, "
                       f"{self.num_examples}), got [{indices.min()}, {indices.max()}].")
    return indices

  def _render_batch(self, indices: np.ndarray) -> base.Batch:
    return draw_scenes(self.seed, self.split, indices, self.image_size)[0]


class _Cache:
  """Lazily filled, preallocated arrays of a whole split (untouched pages cost no memory)."""

  def __init__(self, num_examples: int, size: int):
    self.filled = np.zeros(num_examples, bool)
    self.arrays = {"image": np.empty((num_examples, size, size, 3), np.float32),
                   "segmentation": np.empty((num_examples, size, size), np.int32),
                   "depth": np.empty((num_examples, size, size, 1), np.float32),
                   "normals": np.empty((num_examples, size, size, 3), np.float32),
                   "edges": np.empty((num_examples, size, size, 1), np.float32)}

  def get(self, indices: np.ndarray, render) -> base.Batch:
    missing = np.unique(indices[~self.filled[indices]])
    if missing.size:
      fresh = render(missing)
      for key, array in self.arrays.items():
        array[missing] = fresh[key]
      self.filled[missing] = True
    return {key: array[indices] for key, array in self.arrays.items()}


# --------------------------------------------------------------------------------------------
# Drawing. Each scene is rasterised on its own (objects only touch their bounding boxes); the
# per-pixel work that follows (normals, edges, albedo, shading) runs on chunks of scenes at once,
# channel-first, so numpy's per-call overhead is shared. Random scalars come in blocks of
# uniforms turned into Python floats, which keeps float32 maps float32.

_CHUNK_PIXELS = 2**17  # pixels per chunk of scenes shaded together (a working set of a few MB)
_SLOTS = MAX_OBJECTS + 1  # object ids per scene, 0 being the background


def draw_scenes(seed: int, split: str, indices: np.ndarray, size: int
                ) -> tuple[base.Batch, np.ndarray]:
  """Scenes `indices` of `split`: (batch, object ids int32 (B, H, W), 0 = background)."""
  n = len(indices)
  batch = {"image": np.empty((n, size, size, 3), np.float32),
           "segmentation": np.empty((n, size, size), np.int32),
           "depth": np.empty((n, size, size, 1), np.float32),
           "normals": np.empty((n, size, size, 3), np.float32),
           "edges": np.empty((n, size, size, 1), np.float32)}
  ids = np.empty((n, size, size), np.int32)
  chunk = max(1, _CHUNK_PIXELS // (size * size))
  for start in range(0, n, chunk):
    part = slice(start, min(start + chunk, n))
    scenes = _scenes_buffers(part.stop - part.start, size)
    rngs = [np.random.default_rng([seed, SPLIT_IDS[split], int(index)])
            for index in indices[part]]
    uniforms = np.empty((len(rngs), _NUM_UNIFORMS))
    for row, rng in enumerate(rngs):
      rng.random(out=uniforms[row])  # one call for every scalar of the scene
    uniforms = uniforms.tolist()
    _fill_background(uniforms, scenes)
    for row, rng in enumerate(rngs):
      _rasterise(uniforms[row], scenes, row)
      _draw_shading_params(rng, uniforms[row], scenes, row)
    _finish(scenes, batch, part)
    ids[part] = scenes.ids
  return batch, ids


class _Scenes:
  """Buffers of a chunk of scenes between rasterisation and shading, reused chunk after chunk
  (`_scenes_buffers`): fresh large arrays would cost page faults on every chunk."""

  def __init__(self, n: int, size: int):
    self.size = size
    # Scratch of `_finish`.
    self.work = np.empty((3, n, size, size), np.float32)
    self.plane = np.empty((n, size, size), np.float32)
    self.other = np.empty((n, size, size), np.float32)
    self.flat_ids = np.empty((n, size, size), np.int32)
    self.edges = np.empty((n, size, size), bool)
    self.depth = np.empty((n, size, size), np.float32)
    # Unnormalised normals (dD/dx, dD/dy, -1) per surface, channel first: (3, n, H, W).
    self.grad = np.empty((3, n, size, size), np.float32)
    self.ids = np.zeros((n, size, size), np.int32)
    self.classes = np.zeros((n, _SLOTS), np.int32)
    self.jitter = np.zeros((3, n, _SLOTS), np.float32)  # of each object's colour
    self.texture = np.empty((n, size, size), np.float32)  # background pattern in [0, 1]
    self.grain = np.empty((n, size, size), np.float32)  # texture noise in [0, 1)
    # Per scene: background colour and its dark tone, light direction, ambient, haze, fog.
    self.colour = np.empty((3, n), np.float32)
    self.dark = np.empty((3, n), np.float32)
    self.light = np.empty((3, n), np.float32)
    self.ambient, self.haze, self.fog = (np.empty(n, np.float32) for _ in range(3))

  def reset(self) -> "_Scenes":
    """Clears what drawing only partly overwrites (every other buffer is filled in full)."""
    self.ids[...] = 0
    self.classes[...] = 0
    self.jitter[...] = 0
    return self


_BUFFERS = threading.local()


def _scenes_buffers(n: int, size: int) -> _Scenes:
  """This thread's reusable buffers for a chunk of n scenes of `size` pixels, cleared."""
  cache = getattr(_BUFFERS, "scenes", None)
  if cache is None:
    cache = _BUFFERS.scenes = {}
  if (n, size) not in cache:
    if len(cache) >= 4:
      cache.clear()
    cache[(n, size)] = _Scenes(n, size)
  return cache[(n, size)].reset()


# Uniforms per scene: the scene's own, then a fixed block per object slot, then the shading's.
_SCENE_UNIFORMS, _OBJECT_UNIFORMS, _SHADING_UNIFORMS = 4, 17, 13 + 3 * MAX_OBJECTS
_SHADING_START = _SCENE_UNIFORMS + MAX_OBJECTS * _OBJECT_UNIFORMS
_NUM_UNIFORMS = _SHADING_START + _SHADING_UNIFORMS


class _Uniforms:
  """Scalars read in turn from `values[start:start + count]`, uniforms in [0, 1)."""

  def __init__(self, values: list[float], start: int, count: int):
    self._values, self._next, self._stop = values, start, start + count

  def __call__(self, lo: float, hi: float) -> float:
    if self._next >= self._stop:
      raise RuntimeError("synthetic scene drew more uniforms than its block holds.")
    value = self._values[self._next]
    self._next += 1
    return lo + (hi - lo) * value


@functools.lru_cache(maxsize=16)
def _grid(size: int):
  """Pixel-centre coordinates in metres (centred on the image) and noise upsampling weights."""
  coords = ((np.arange(size) + 0.5) / size - 0.5) * SCENE_WIDTH
  # Linear interpolation from a _NOISE_GRID^2 grid of random values to size^2 pixels.
  sample = (np.arange(size) + 0.5) / size * (_NOISE_GRID - 1)
  weights = np.maximum(0.0, 1.0 - np.abs(sample[:, None] - np.arange(_NOISE_GRID)[None, :]))
  return coords.astype(np.float32), weights.astype(np.float32)


def _window(lo: float, hi: float, size: int) -> slice:
  """Pixels whose centres may fall in [lo, hi] metres."""
  start = math.floor((lo / SCENE_WIDTH + 0.5) * size - 0.5)
  stop = math.ceil((hi / SCENE_WIDTH + 0.5) * size - 0.5) + 1
  return slice(max(start, 0), min(stop, size))


def _polygon(uniform: _Uniforms, kind: int, radius: float) -> list[tuple[float, float]]:
  """Vertices of a convex shape centred on the origin, in metres."""
  if kind == _RECTANGLE:
    half_x, half_y = radius * uniform(0.6, 1.0), radius * uniform(0.6, 1.0)
    corners = [(-half_x, -half_y), (half_x, -half_y), (half_x, half_y), (-half_x, half_y)]
    angle = uniform(-0.35, 0.35)  # near upright, so rectangles do not look like diamonds
  else:
    sides = 3 if kind == _TRIANGLE else 4
    jitter = 0.3 if kind == _TRIANGLE else 0.1
    corners = []
    for k in range(sides):
      theta = k * 2 * math.pi / sides + uniform(-jitter, jitter)
      r = radius * uniform(0.75, 1.1)
      corners.append((r * math.cos(theta), r * math.sin(theta)))
    angle = uniform(0, 2 * math.pi) if kind == _TRIANGLE else uniform(-0.15, 0.15)
  cos, sin = math.cos(angle), math.sin(angle)
  return [(cos * x - sin * y, sin * x + cos * y) for x, y in corners]


def _inward_edges(vertices) -> list[tuple[float, float, float]]:
  """(n_x, n_y, offset) per edge, n the unit inward normal: inside means n . p - offset > 0."""
  cx = sum(v[0] for v in vertices) / len(vertices)
  cy = sum(v[1] for v in vertices) / len(vertices)
  edges = []
  for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = (y0 - y1) / length, (x1 - x0) / length
    if nx * (cx - x0) + ny * (cy - y0) < 0:  # the centroid of a convex shape is inside
      nx, ny = -nx, -ny
    edges.append((nx, ny, nx * x0 + ny * y0))
  return edges


def _scene_params(uniforms: list[float]) -> tuple[int, float, float, float]:
  """(number of objects, background depth at the centre, its slopes dD/dx and dD/dy)."""
  uniform = _Uniforms(uniforms, 0, _SCENE_UNIFORMS)
  num_objects = 1 + min(int(uniform(0, MAX_OBJECTS)), MAX_OBJECTS - 1)
  # Background plane: farther at the top (a ground plane rising into a back wall).
  return num_objects, uniform(8.0, 11.0), uniform(-0.4, 0.4), uniform(-1.0, -0.3)


def _fill_background(uniforms: list[list[float]], scenes: _Scenes) -> None:
  """Depth and gradients of every scene's background plane (objects are drawn over it)."""
  coords, _ = _grid(scenes.size)
  params = np.array([_scene_params(values)[1:] for values in uniforms], np.float32)
  bg_depth, bg_gx, bg_gy = (params[:, k, None, None] for k in range(3))
  np.add(bg_depth + bg_gx * coords[None, :], bg_gy * coords[:, None], out=scenes.depth)
  scenes.grad[0], scenes.grad[1], scenes.grad[2] = bg_gx, bg_gy, -1.0


def _rasterise(uniforms: list[float], scenes: _Scenes, row: int) -> None:
  """The objects of one scene over its background: depth, gradients, ids (z-buffered)."""
  size = scenes.size
  coords, _ = _grid(size)
  xs, ys = coords[None, :], coords[:, None]
  num_objects, bg_depth, bg_gx, bg_gy = _scene_params(uniforms)
  depth, ids = scenes.depth[row], scenes.ids[row]
  grad_x, grad_y, grad_z = scenes.grad[0, row], scenes.grad[1, row], scenes.grad[2, row]

  half_width = SCENE_WIDTH / 2
  for obj in range(1, num_objects + 1):
    uniform = _Uniforms(uniforms, _SCENE_UNIFORMS + (obj - 1) * _OBJECT_UNIFORMS,
                       _OBJECT_UNIFORMS)
    kind = min(int(uniform(0, 4)), 3)
    radius = uniform(0.5, 1.1)
    cx, cy = uniform(-0.8, 0.8) * half_width, uniform(-0.8, 0.8) * half_width
    # Nearest background depth under the object's box: the object is drawn in front of it.
    bg_near = bg_depth + bg_gx * cx + bg_gy * cy - (abs(bg_gx) + abs(bg_gy)) * radius * 1.4
    if kind == _CIRCLE:
      rows = _window(cy - radius, cy + radius, size)
      cols = _window(cx - radius, cx + radius, size)
      dx, dy = xs[:, cols] - cx, ys[rows] - cy
      under = radius**2 - dx * dx - dy * dy
      inside = under > 0
      height = np.sqrt(np.maximum(under, 0.0))
      rim = uniform(MIN_DEPTH + radius, max(MIN_DEPTH + radius, bg_near - 0.3))
      obj_depth = rim - height  # a sphere around depth `rim`: its rim is its farthest point
      obj_gx, obj_gy, obj_gz = dx, dy, -height  # the sphere's normal, of length `radius`
    else:
      vertices = _polygon(uniform, kind, radius)
      if kind == _RECTANGLE:  # a flat plate, tilted
        tilt_x, tilt_y, slope = uniform(-0.7, 0.7), uniform(-0.7, 0.7), 0.0
      else:  # a pyramid, slightly tilted
        tilt_x, tilt_y, slope = uniform(-0.25, 0.25), uniform(-0.25, 0.25), uniform(0.6, 1.5)
      spread = (abs(tilt_x) * max(abs(v[0]) for v in vertices)
                + abs(tilt_y) * max(abs(v[1]) for v in vertices))
      lo = MIN_DEPTH + spread + slope * radius + 0.1
      base_depth = uniform(lo, max(lo, bg_near - spread - 0.3))
      vertices = [(x + cx, y + cy) for x, y in vertices]
      rows = _window(min(v[1] for v in vertices), max(v[1] for v in vertices), size)
      cols = _window(min(v[0] for v in vertices), max(v[0] for v in vertices), size)
      x, y = xs[:, cols], ys[rows]
      nearest, obj_gx, obj_gy, obj_gz = None, tilt_x, tilt_y, -1.0
      for nx, ny, offset in _inward_edges(vertices):
        dist = (nx * x - offset) + ny * y  # signed distance to this edge, positive inside
        if nearest is None:
          nearest = dist
          if slope:
            obj_gx = np.full(dist.shape, tilt_x - slope * nx, np.float32)
            obj_gy = np.full(dist.shape, tilt_y - slope * ny, np.float32)
          continue
        if slope:  # the face of the nearest edge is the visible one
          closer = dist < nearest
          np.copyto(obj_gx, tilt_x - slope * nx, where=closer)
          np.copyto(obj_gy, tilt_y - slope * ny, where=closer)
        nearest = np.minimum(nearest, dist)
      inside = nearest > 0
      # Pyramid: depth falls with the distance to the outline, so its faces lean outwards.
      obj_depth = (base_depth + tilt_x * (x - cx) + tilt_y * (y - cy)) - slope * nearest
    if rows.start >= rows.stop or cols.start >= cols.stop:
      continue  # entirely outside the image
    visible = inside & (obj_depth < depth[rows, cols])  # the z-buffer test
    np.copyto(depth[rows, cols], obj_depth, where=visible)
    np.copyto(grad_x[rows, cols], obj_gx, where=visible)
    np.copyto(grad_y[rows, cols], obj_gy, where=visible)
    np.copyto(grad_z[rows, cols], obj_gz, where=visible)
    np.copyto(ids[rows, cols], obj, where=visible)
    scenes.classes[row, obj] = kind + 1


def _draw_shading_params(rng: np.random.Generator, uniforms: list[float], scenes: _Scenes,
                         row: int) -> None:
  """Background texture, object colours, light and haze of one scene."""
  size = scenes.size
  coords, noise_weights = _grid(size)
  xs, ys = coords[None, :], coords[:, None]
  uniform = _Uniforms(uniforms, _SHADING_START, _SHADING_UNIFORMS)
  pattern = min(int(uniform(0, 3)), 2)
  texture = scenes.texture[row]
  if pattern == 0:  # stripes
    angle, freq, phase = uniform(0, math.pi), uniform(1.0, 3.0), uniform(0, 2 * math.pi)
    wave_x, wave_y = 2 * math.pi * freq * math.cos(angle), 2 * math.pi * freq * math.sin(angle)
    np.sin((wave_x * xs + phase) + wave_y * ys, out=texture)
    texture *= 0.5
    texture += 0.5
  elif pattern == 1:  # checker
    cell = 1 / uniform(0.3, 0.8)
    np.abs(np.floor(xs * cell) % 2 - np.floor(ys * cell) % 2, out=texture)  # parity: 0 or 1
  else:  # smooth noise
    grid = rng.random((_NOISE_GRID, _NOISE_GRID), dtype=np.float32)
    np.matmul(noise_weights @ grid, noise_weights.T, out=texture)
  rng.random(dtype=np.float32, out=scenes.grain[row])
  colour = [uniform(0.25, 0.9) for _ in range(3)]
  dark = uniform(0.4, 0.75)
  scenes.colour[:, row] = colour
  scenes.dark[:, row] = [c * dark for c in colour]
  scenes.jitter[:, row, 1:] = np.reshape(
      [uniform(-0.1, 0.1) for _ in range(3 * MAX_OBJECTS)], (3, MAX_OBJECTS))
  # The light sits on the camera's side (negative z).
  light = [uniform(-0.7, 0.7), uniform(-0.7, 0.7), -1.0]
  norm = math.sqrt(sum(v * v for v in light))
  scenes.light[:, row] = [v / norm for v in light]
  scenes.ambient[row] = uniform(0.25, 0.4)
  scenes.haze[row] = uniform(0.5, 0.8)
  scenes.fog[row] = uniform(0.15, 0.4) / 12.0  # haze fraction per metre


def _finish(scenes: _Scenes, batch: base.Batch, part: slice) -> None:
  """Per-pixel labels and the shaded image of a chunk of scenes, written into `batch[part]`.

  Works in place on the chunk's buffers: fresh large temporaries cost more in page faults than
  the arithmetic itself.
  """
  ids, depth, grad, work = scenes.ids, scenes.depth, scenes.grad, scenes.work
  plane, other = scenes.plane, scenes.other
  n = len(ids)

  def per_scene(values):  # (..., n) -> (..., n, 1, 1), to broadcast over pixels
    return values[..., None, None]

  flat_ids = scenes.flat_ids
  np.add(ids, per_scene(np.arange(n, dtype=np.int32) * _SLOTS), out=flat_ids)
  np.take(scenes.classes.reshape(-1), flat_ids, out=batch["segmentation"][part], mode="clip")
  batch["depth"][part, ..., 0] = depth
  np.multiply(grad[0], grad[0], out=plane)
  plane += np.square(grad[1], out=other)
  plane += np.square(grad[2], out=other)
  np.sqrt(plane, out=plane)
  np.divide(1.0, plane, out=plane)
  normals = grad
  normals *= plane
  batch["normals"][part] = normals.transpose(1, 2, 3, 0)
  edges = scenes.edges
  edges[...] = False
  change = ids[:, :, 1:] != ids[:, :, :-1]
  edges[:, :, 1:] |= change
  edges[:, :, :-1] |= change
  change = ids[:, 1:] != ids[:, :-1]
  edges[:, 1:] |= change
  edges[:, :-1] |= change
  batch["edges"][part, ..., 0] = edges

  # Albedo: each object's colour (its class's palette entry, jittered), or the background's
  # two tones blended by its texture; then texture noise on every surface.
  colours = np.take(_PALETTE_BY_CLASS, scenes.classes, axis=1)
  colours += scenes.jitter * (scenes.classes > 0)
  albedo = work
  np.take(colours.reshape(3, -1), flat_ids, axis=1, out=albedo, mode="clip")
  is_background = ids == 0
  for channel in range(3):
    colour = per_scene(scenes.colour[channel])
    np.multiply(scenes.texture, per_scene(scenes.dark[channel]) - colour, out=plane)
    plane += colour
    np.copyto(albedo[channel], plane, where=is_background)
  grain = scenes.grain
  grain *= 0.3
  grain += 0.85
  albedo *= grain
  # Lambertian shading from the normals: ambient + (1 - ambient) * max(n . light, 0).
  light, ambient = per_scene(scenes.light), per_scene(scenes.ambient)
  np.multiply(normals[0], light[0], out=plane)
  plane += np.multiply(normals[1], light[1], out=other)
  plane += np.multiply(normals[2], light[2], out=other)
  np.maximum(plane, 0.0, out=plane)
  plane *= 1 - ambient
  plane += ambient
  image = albedo
  image *= plane
  # Haze grows with depth (a second depth cue): image = image * (1 - fog) + haze * fog.
  fog = np.multiply(depth - MIN_DEPTH, per_scene(scenes.fog), out=plane)
  np.multiply(fog, per_scene(scenes.haze), out=other)
  np.subtract(1.0, fog, out=fog)
  image *= fog
  image += other
  np.clip(image, 0.0, 1.0, out=image)
  batch["image"][part] = image.transpose(1, 2, 3, 0)
