"""Tests of the dense augmentation: flips, scales, crops and padding keep labels aligned."""

from __future__ import annotations

import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import augment
from dymu_jax.data import base
from dymu_jax.data import synthetic

SIZE = 32


@pytest.fixture(scope="module")
def source():
  return synthetic.SyntheticScenes("train", num_examples=32, image_size=SIZE, seed=0)


@pytest.fixture(scope="module")
def batch(source):
  return source.get(np.arange(16))


def _all_tasks():
  return (tasks_lib.segmentation("seg", 5), tasks_lib.depth("depth"),
          tasks_lib.normals("normals"), tasks_lib.edges("edges"), tasks_lib.saliency("sal"),
          tasks_lib.classification("digit", 10), tasks_lib.regression("age"))


def _hand_batch(n=3, height=4, width=4):
  """Small batch with every kind of label; each pixel value is distinct and known."""
  rng = np.random.default_rng(0)
  normals = rng.normal(size=(n, height, width, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  return {
      "image": rng.random((n, height, width, 3), dtype=np.float32),
      "seg": rng.integers(0, 5, (n, height, width)).astype(np.int32),
      "depth": rng.uniform(1, 10, (n, height, width, 1)).astype(np.float32),
      "normals": normals,
      "edges": rng.integers(0, 2, (n, height, width, 1)).astype(np.float32),
      "sal": rng.random((n, height, width, 1), dtype=np.float32),
      "digit": np.arange(n, dtype=np.int32),
      "age": np.linspace(10, 30, n).astype(np.float32),
      "_valid": np.array([True, True, False][:n]),
  }


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_scale_one_without_flip_is_identity():
  batch = _hand_batch()
  out = augment.make_augment(_all_tasks(), flip=False, scale_range=(1.0, 1.0))(
      batch, np.random.default_rng(0))
  _assert_batches_equal(out, batch)
  out = augment.make_augment(_all_tasks(), flip=False, scale_range=None, crop=False)(
      batch, np.random.default_rng(1))
  _assert_batches_equal(out, batch)


def test_flip_mirrors_every_map_and_negates_normals_x():
  batch = _hand_batch()
  always = augment.make_augment(_all_tasks(), flip=1.0, scale_range=None)
  out = always(batch, np.random.default_rng(0))
  for key in ("image", "seg", "depth", "edges", "sal"):
    np.testing.assert_array_equal(out[key], batch[key][:, :, ::-1], err_msg=key)
  np.testing.assert_array_equal(out["normals"][..., 0], -batch["normals"][:, :, ::-1, 0])
  np.testing.assert_array_equal(out["normals"][..., 1:], batch["normals"][:, :, ::-1, 1:])
  for key in ("digit", "age", "_valid"):
    np.testing.assert_array_equal(out[key], batch[key])
  # Twice is the identity, normals included.
  _assert_batches_equal(always(out, np.random.default_rng(1)), batch)


def test_random_flip_flips_about_half(batch, source):
  flips = augment.make_augment(source.tasks, scale_range=None)(batch, np.random.default_rng(0))
  flipped = [np.array_equal(flips["image"][i], batch["image"][i, :, ::-1])
             for i in range(len(batch["image"]))]
  kept = [np.array_equal(flips["image"][i], batch["image"][i]) for i in range(16)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert 3 <= sum(flipped) <= 13


def test_downscale_golden_values_and_padding():
  # 4x4 -> scale 0.5 -> 2x2, centred in a 4x4 window (rows and columns 1..2); the rest is
  # padding. Nearest takes source pixels floor((2p + 1) * 4 / 4) = 1 and 3; bilinear samples
  # source coordinate 2p + 0.5, the mean of pixels 2p and 2p + 1.
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  seg = np.arange(16, dtype=np.int32).reshape(1, 4, 4)
  tasks = (tasks_lib.segmentation("seg", 16), tasks_lib.depth("depth"))
  batch = {"image": image, "seg": seg, "depth": image + 1}
  out = augment.make_augment(tasks, flip=False, scale_range=(0.5, 0.5), crop=False)(
      batch, np.random.default_rng(0))
  expected_image = np.zeros((4, 4), np.float32)
  expected_image[1:3, 1:3] = [[2.5, 4.5], [10.5, 12.5]]
  np.testing.assert_allclose(out["image"][0, ..., 0], expected_image, atol=1e-6)
  expected_seg = np.full((4, 4), 255)
  expected_seg[1:3, 1:3] = [[5, 7], [13, 15]]
  np.testing.assert_array_equal(out["seg"][0], expected_seg)
  expected_depth = np.where(expected_seg == 255, 0, expected_seg + 1)
  np.testing.assert_array_equal(out["depth"][0, ..., 0], expected_depth)
  assert out["seg"].dtype == np.int32 and out["depth"].dtype == np.float32


def test_upscale_golden_values():
  # 4x4 -> scale 2 -> 8x8, centre window = positions 2..5. Nearest: source floor((2p + 1) / 4)
  # = 1, 1, 2, 2; bilinear: source coordinate p / 2 - 0.25 = 0.75, 1.25, 1.75, 2.25, where a
  # linear ramp 4 * column + 16 * row is interpolated exactly.
  ramp = 4 * np.arange(4.0)[None, :] + 16 * np.arange(4.0)[:, None]
  tasks = (tasks_lib.segmentation("seg", 16),)
  batch = {"image": ramp.astype(np.float32).reshape(1, 4, 4, 1),
           "seg": np.arange(16, dtype=np.int32).reshape(1, 4, 4)}
  out = augment.make_augment(tasks, flip=False, scale_range=(2.0, 2.0), crop=False)(
      batch, np.random.default_rng(0))
  source = np.array([0.75, 1.25, 1.75, 2.25])
  np.testing.assert_allclose(out["image"][0, ..., 0],
                             4 * source[None, :] + 16 * source[:, None], atol=1e-5)
  nearest = np.array([1, 1, 2, 2])
  np.testing.assert_array_equal(out["seg"][0], 4 * nearest[:, None] + nearest[None, :])


def test_random_crop_windows_are_shifted_copies():
  # Scale 2 of a 4x4 map gives an 8x8 map of 2x2 blocks; any 4x4 window of it is a crop.
  seg = np.arange(16, dtype=np.int32).reshape(1, 4, 4).repeat(8, 0)
  batch = {"image": np.zeros((8, 4, 4, 1), np.float32), "seg": seg}
  fn = augment.make_augment((tasks_lib.segmentation("seg", 16),), flip=False,
                            scale_range=(2.0, 2.0))
  out = fn(batch, np.random.default_rng(0))["seg"]
  big = seg[0].repeat(2, 0).repeat(2, 1)
  windows = {(i, j) for i in range(5) for j in range(5)}
  found = [next((i, j) for i, j in windows if np.array_equal(o, big[i:i + 4, j:j + 4]))
           for o in out]
  assert len(set(found)) > 1  # different examples get different windows


def test_nearest_keeps_label_values(batch, source):
  out = augment.make_augment(source.tasks)(batch, np.random.default_rng(0))
  assert set(np.unique(out["edges"])) <= {0.0, 1.0}
  for i in range(len(batch["image"])):
    for key, pad in (("segmentation", 255), ("depth", 0.0)):
      allowed = np.append(np.unique(batch[key][i]), pad)
      assert np.all(np.isin(out[key][i], allowed)), key
    # Each output normal is an input normal (x negated when flipped) or padding.
    inputs = {tuple(v) for v in np.abs(batch["normals"][i].reshape(-1, 3))}
    outputs = {tuple(v) for v in np.abs(out["normals"][i].reshape(-1, 3))}
    assert outputs <= inputs | {(0.0, 0.0, 0.0)}
  padded = out["segmentation"] == 255
  assert padded.any()  # scales below 1 pad
  assert np.all(out["depth"][..., 0][padded] == 0) and np.all(out["image"][padded] == 0)
  assert np.all(out["normals"][padded] == 0) and np.all(out["edges"][..., 0][padded] == 0)
  np.testing.assert_allclose(np.linalg.norm(out["normals"][~padded], axis=-1), 1, atol=1e-5)


def test_edges_stay_on_segmentation_changes(batch, source):
  # Upscaling with nearest neighbours maps 4-neighbours to the same or adjacent source
  # pixels, so a class change between output neighbours is still an edge on both sides.
  fn = augment.make_augment(source.tasks, scale_range=(1.0, 1.5))
  for seed in range(3):
    out = fn(batch, np.random.default_rng(seed))
    seg, edges = out["segmentation"], out["edges"][..., 0]
    for axis in (1, 2):
      a = [slice(None)] * 3
      b = [slice(None)] * 3
      a[axis], b[axis] = slice(1, None), slice(None, -1)
      change = seg[tuple(a)] != seg[tuple(b)]
      assert change.any()
      assert np.all(edges[tuple(a)][change] == 1) and np.all(edges[tuple(b)][change] == 1)


def test_image_and_segmentation_stay_aligned():
  # The image encodes the class (value = class / 4): away from class boundaries, the
  # bilinear image and the nearest-neighbour segmentation agree after any flip, scale, crop.
  # "Away" is a 5x5 neighbourhood: when shrinking by up to 1/0.75, nearest neighbours skip
  # source pixels that bilinear weights still touch, so 3x3 is not enough.
  source = synthetic.SyntheticScenes("train", num_examples=16, image_size=SIZE, seed=1)
  seg = source.get(np.arange(16))["segmentation"]
  batch = {"image": np.repeat((seg / 4.0).astype(np.float32)[..., None], 3, -1),
           "segmentation": seg}
  fn = augment.make_augment((tasks_lib.segmentation("segmentation", 5),))
  out = fn(batch, np.random.default_rng(0))
  out = {k: np.concatenate([v, fn(batch, np.random.default_rng(1))[k]]) for k, v in out.items()}
  seg_out, image_out = out["segmentation"], out["image"][..., 0]
  centre = seg_out[:, 2:-2, 2:-2]
  interior = centre != 255
  for di in range(-2, 3):
    for dj in range(-2, 3):
      interior &= seg_out[:, 2 + di:SIZE - 2 + di, 2 + dj:SIZE - 2 + dj] == centre
  assert interior.sum() > 10000
  np.testing.assert_allclose(image_out[:, 2:-2, 2:-2][interior] * 4, centre[interior],
                             atol=1e-5)


def test_deterministic_given_the_generator(batch, source):
  fn = augment.make_augment(source.tasks)
  _assert_batches_equal(fn(batch, np.random.default_rng(5)), fn(batch, np.random.default_rng(5)))
  other = fn(batch, np.random.default_rng(6))
  assert not np.array_equal(other["image"], fn(batch, np.random.default_rng(5))["image"])
  # Inputs are left untouched.
  np.testing.assert_array_equal(batch["segmentation"], source.get(np.arange(16))["segmentation"])


def test_works_inside_batcher(source):
  batcher = base.Batcher(source, 8, seed=2, augment=augment.make_augment(source.tasks))
  first = batcher.batch(1)
  again = base.Batcher(source, 8, seed=2, augment=augment.make_augment(source.tasks)).batch(1)
  _assert_batches_equal(first, again)
  assert first["image"].shape == (8, SIZE, SIZE, 3)
  # A task subset batch with a full task list is fine: missing maps are skipped.
  subset = source.with_tasks("depth").get(np.arange(4))
  out = augment.make_augment(source.tasks)(subset, np.random.default_rng(0))
  assert out.keys() == {"image", "depth"}


@pytest.mark.parametrize("kwargs, message", [
    ({"flip": "yes"}, r"flip must be True, False or a probability in \[0, 1\], got 'yes'"),
    ({"flip": 1.5}, r"flip must be True, False or a probability"),
    ({"scale_range": (0.0, 1.0)}, r"scale_range must satisfy 0 < low <= high"),
    ({"scale_range": (1.2, 0.8)}, r"scale_range must satisfy 0 < low <= high"),
    ({"scale_range": (1.0, float("inf"))}, r"scale_range must satisfy"),
    ({"scale_range": 1.0}, r"scale_range must be a pair \(low, high\) of numbers, got 1.0"),
    ({"scale_range": (1.0, 2.0, 3.0)}, r"scale_range must be a pair"),
    ({"crop": 1}, r"crop must be True or False, got 1"),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    augment.make_augment(_all_tasks(), **kwargs)


def test_bad_tasks_and_batches():
  with pytest.raises(ValueError, match=r"make_augment needs Task values"):
    augment.make_augment(["depth"])
  fn = augment.make_augment((tasks_lib.depth("depth"),))
  batch = _hand_batch()
  with pytest.raises(ValueError, match=r"batch key 'seg' is not one of the tasks given to "
                     r"make_augment \(depth\)"):
    fn(batch, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"label map 'depth' has shape \(3, 2, 4, 1\), but the "
                     r"images are \(3, 4, 4\)"):
    fn({"image": batch["image"], "depth": batch["depth"][:, :2]}, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"augment needs images of shape \(B, H, W, C\)"):
    fn({"image": batch["image"][0]}, np.random.default_rng(0))
