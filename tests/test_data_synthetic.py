"""Tests of the synthetic scenes: layout, determinism, and labels consistent with the geometry."""

from __future__ import annotations

import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax import data
from dymu_jax.data import base
from dymu_jax.data import synthetic

SIZE = 32


@pytest.fixture(scope="module")
def scenes():
  """64 training scenes at 32 px, with their object ids."""
  source = synthetic.SyntheticScenes("train", num_examples=64, image_size=SIZE, seed=0)
  indices = np.arange(64)
  return source.get(indices), source.object_ids(indices)


def _interior(ids: np.ndarray) -> np.ndarray:
  """(B, H-2, W-2): pixels whose 3x3 neighbourhood shows one object only."""
  centre = ids[:, 1:-1, 1:-1]
  same = np.ones(centre.shape, bool)
  h, w = ids.shape[1:]
  for di in (-1, 0, 1):
    for dj in (-1, 0, 1):
      same &= ids[:, 1 + di:h - 1 + di, 1 + dj:w - 1 + dj] == centre
  return same


def _depth_differences(depth: np.ndarray):
  """Forward and backward differences dD/dx, dD/dy (metres per metre) at interior pixels."""
  d = depth[..., 0].astype(np.float64)
  pitch = synthetic.SCENE_WIDTH / d.shape[-1]
  c = d[:, 1:-1, 1:-1]
  fx, bx = (d[:, 1:-1, 2:] - c) / pitch, (c - d[:, 1:-1, :-2]) / pitch
  fy, by = (d[:, 2:, 1:-1] - c) / pitch, (c - d[:, :-2, 1:-1]) / pitch
  return fx, bx, fy, by


def _angle_degrees(gx, gy, normals):
  """Angle between the normal (gx, gy, -1)/|.| of a depth gradient and the labelled normals."""
  fd = np.stack([gx, gy, -np.ones_like(gx)], -1)
  fd /= np.linalg.norm(fd, axis=-1, keepdims=True)
  return np.degrees(np.arccos(np.clip(np.sum(fd * normals, -1), -1, 1)))


def test_tasks_and_batch_layout(scenes):
  batch, _ = scenes
  source = synthetic.SyntheticScenes("train", num_examples=64, image_size=SIZE)
  assert [(t.name, t.kind, t.num_outputs) for t in source.tasks] == [
      ("segmentation", tasks_lib.SEGMENTATION, 5), ("depth", tasks_lib.DEPTH, 1),
      ("normals", tasks_lib.NORMALS, 3), ("edges", tasks_lib.EDGES, 1)]
  assert source.image_shape == (SIZE, SIZE, 3)
  assert set(batch) == {"image", "segmentation", "depth", "normals", "edges"}
  shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes == {"image": ((64, SIZE, SIZE, 3), np.float32),
                    "segmentation": ((64, SIZE, SIZE), np.int32),
                    "depth": ((64, SIZE, SIZE, 1), np.float32),
                    "normals": ((64, SIZE, SIZE, 3), np.float32),
                    "edges": ((64, SIZE, SIZE, 1), np.float32)}
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["image"].std() > 0.1  # not a blank canvas
  # Every class appears, and only the 5 classes.
  assert set(np.unique(batch["segmentation"])) == {0, 1, 2, 3, 4}
  depth = batch["depth"]
  assert np.all(np.isfinite(depth)) and depth.min() >= synthetic.MIN_DEPTH
  assert depth.max() < 20.0
  norms = np.linalg.norm(batch["normals"], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  assert np.all(batch["normals"][..., 2] < 0)  # every visible surface faces the camera
  assert set(np.unique(batch["edges"])) == {0.0, 1.0}
  # The labels pass the shared checks of the batch contract.
  for task in source.tasks:
    base.check_labels("synthetic", task, batch[task.name])


def test_deterministic_and_order_free():
  first = synthetic.SyntheticScenes("train", 32, SIZE, seed=3, cache=False)
  second = synthetic.SyntheticScenes("train", 32, SIZE, seed=3, cache=True)
  a, b = first.get(np.arange(8)), second.get(np.arange(8))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  # One example alone, or picked in any order and repeated, is the same example.
  single = first.get(np.array([5]))
  picked = second.get(np.array([7, 5, 5, 2]))
  for key in a:
    np.testing.assert_array_equal(single[key][0], a[key][5])
    np.testing.assert_array_equal(picked[key], a[key][[7, 5, 5, 2]])
  other_seed = synthetic.SyntheticScenes("train", 32, SIZE, seed=4).get(np.arange(8))
  assert not np.array_equal(other_seed["image"], a["image"])
  assert not np.array_equal(other_seed["depth"], a["depth"])


def test_train_and_test_streams_differ():
  train = data.load(base.DataConfig(name="synthetic", image_size=SIZE, num_train=16,
                                    num_test=16), "train")
  test = data.load(base.DataConfig(name="synthetic", image_size=SIZE, num_train=16,
                                   num_test=16), "test")
  a, b = train.get(np.arange(16)), test.get(np.arange(16))
  for key in ("image", "segmentation", "depth"):
    assert not any(np.array_equal(a[key][i], b[key][j]) for i in range(16) for j in range(16))


def test_config_defaults_and_sizes():
  train = data.load(base.DataConfig(), "train")
  test = data.load(base.DataConfig(), "test")
  assert (len(train), len(test)) == (synthetic.DEFAULT_NUM_TRAIN, synthetic.DEFAULT_NUM_TEST)
  assert train.image_shape == (64, 64, 3) and train.name == "synthetic"
  assert train.split == "train" and test.split == "test"
  # Both default splits fit the cache limit; a split larger than the limit is drawn anew.
  assert train.cached and test.cached
  huge = data.load(base.DataConfig(num_train=100_000, image_size=128), "train")
  assert not huge.cached
  odd = data.load(base.DataConfig(image_size=20, num_test=3), "test")
  assert len(odd) == 3
  assert odd.get(np.arange(3))["normals"].shape == (3, 20, 20, 3)


@pytest.mark.parametrize("config, split, message", [
    (base.DataConfig(image_size=8), "train", r"image_size must be 0 \(default 64\) or an "
     r"integer >= 16, got 8"),
    (base.DataConfig(image_size=-1), "test", r"image_size must be 0"),
    (base.DataConfig(image_size=32.0), "test", r"image_size must be 0"),
    (base.DataConfig(num_train=-5), "train", r"num_train must be 0 \(the default\) or a "
     r"positive integer, got -5"),
    (base.DataConfig(num_test=-1), "test", r"num_test must be 0"),
    (base.DataConfig(), "val", r"synthetic has no split 'val'; allowed splits are train, test"),
])
def test_bad_config_errors(config, split, message):
  with pytest.raises(base.DatasetError, match=message):
    synthetic.load(config, split)


def test_bad_indices_error():
  source = synthetic.SyntheticScenes("test", 10, SIZE)
  with pytest.raises(IndexError, match=r"indices must lie in \[0, 10\), got \[0, 10\]"):
    source.get(np.arange(11))
  with pytest.raises(IndexError, match=r"1-D integer index array"):
    source.get(np.zeros((2, 2), np.int64))


def test_edges_are_exactly_where_the_visible_object_changes(scenes):
  batch, ids = scenes
  expected = np.zeros(ids.shape, bool)
  horizontal = np.diff(ids, axis=2) != 0
  vertical = np.diff(ids, axis=1) != 0
  expected[:, :, 1:] |= horizontal
  expected[:, :, :-1] |= horizontal
  expected[:, 1:] |= vertical
  expected[:, :-1] |= vertical
  np.testing.assert_array_equal(batch["edges"][..., 0], expected.astype(np.float32))
  # Every change of class between neighbours is an edge on both sides.
  seg, edges = batch["segmentation"], batch["edges"][..., 0]
  change = seg[:, :, 1:] != seg[:, :, :-1]
  assert np.all(edges[:, :, 1:][change] == 1) and np.all(edges[:, :, :-1][change] == 1)
  change = seg[:, 1:] != seg[:, :-1]
  assert np.all(edges[:, 1:][change] == 1) and np.all(edges[:, :-1][change] == 1)
  # Object ids and classes agree: the background is id 0, class 0.
  np.testing.assert_array_equal(ids == 0, seg == 0)


def test_normals_of_planes_match_the_depth_gradient(scenes):
  # The background and rectangles are planes: central differences of the depth are exact, so
  # the labelled normal must be (dD/dx, dD/dy, -1) normalised.
  batch, ids = scenes
  fx, bx, fy, by = _depth_differences(batch["depth"])
  angle = _angle_degrees((fx + bx) / 2, (fy + by) / 2, batch["normals"][:, 1:-1, 1:-1])
  seg = batch["segmentation"][:, 1:-1, 1:-1]
  planar = _interior(ids) & np.isin(seg, [0, 2])
  assert planar.sum() > 1000
  assert angle[planar].max() < 0.1
  # Pyramids: on a face (away from ridges) forward and backward differences agree.
  on_face = (_interior(ids) & np.isin(seg, [3, 4]) & (np.abs(fx - bx) < 1e-3)
             & (np.abs(fy - by) < 1e-3))
  assert on_face.sum() > 50
  assert angle[on_face].max() < 0.1
  # Spheres are curved: central differences approximate the analytic normal.
  sphere = _interior(ids) & (seg == 1)
  assert sphere.sum() > 100
  assert np.median(angle[sphere]) < 1.5 and angle[sphere].max() < 10


def test_normal_signs_follow_the_depth_gradient(scenes):
  # Where the depth is monotone across a pixel, n_x (n_y) has the sign of dD/dx (dD/dy): a
  # surface receding to the right faces right.
  batch, ids = scenes
  fx, bx, fy, by = _depth_differences(batch["depth"])
  normals = batch["normals"][:, 1:-1, 1:-1]
  interior = _interior(ids)
  for forward, backward, axis in ((fx, bx, 0), (fy, by, 1)):
    monotone = interior & (forward * backward > 0) & (np.abs(forward + backward) > 2e-3)
    assert monotone.sum() > 1000
    np.testing.assert_array_equal(np.sign(normals[..., axis][monotone]),
                                  np.sign(forward[monotone]))


def test_objects_stand_in_front_of_the_background_plane(scenes):
  # Fit the background plane of each scene from its visible background pixels: it is a plane,
  # and every object pixel is nearer than the plane behind it (the z-buffer kept the nearest).
  batch, ids = scenes
  coords = ((np.arange(SIZE) + 0.5) / SIZE - 0.5) * synthetic.SCENE_WIDTH
  x, y = np.meshgrid(coords, coords)
  design = np.stack([np.ones_like(x), x, y], -1)
  for depth, obj in zip(batch["depth"][..., 0], ids):
    bg = obj == 0
    plane, *_ = np.linalg.lstsq(design[bg], depth[bg].astype(np.float64), rcond=None)
    behind = design @ plane
    np.testing.assert_allclose(depth[bg], behind[bg], atol=1e-4)
    assert np.all(depth[~bg] < behind[~bg])
    assert plane[2] < 0  # the ground comes nearer towards the bottom of the image


def test_image_carries_class_colour_and_shading(scenes):
  batch, _ = scenes
  image, seg = batch["image"], batch["segmentation"]
  mean = {k: image[seg == k].mean(0) for k in range(1, 5)}
  assert mean[1][0] > mean[1][2] + 0.1  # circles are red
  assert mean[2][1] > mean[2][0] + 0.1  # rectangles are green
  assert mean[3][2] > mean[3][0] + 0.1  # triangles are blue
  assert mean[4][0] > mean[4][2] + 0.1  # diamonds are yellow
  # Shading follows the normals: within spheres, brightness varies with the surface.
  sphere_pixels = image[seg == 1].mean(-1)
  assert sphere_pixels.std() > 0.05


def test_batcher_over_synthetic_is_deterministic():
  source = data.load(base.DataConfig(image_size=SIZE, num_train=40), "train")
  batcher = base.Batcher(source, 8, seed=1)
  first, again = batcher.batch(3), base.Batcher(source, 8, seed=1).batch(3)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert source.with_tasks("depth,edges").get(np.arange(2)).keys() == {"image", "depth",
                                                                         "edges"}
