"""NYUD-v2 reader: a tiny NYUD_MT folder written by the test, read back through `load`."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dymu_jax import data as data_lib
from dymu_jax.data import base
from dymu_jax.data import dense_files
from dymu_jax.data import nyud

H, W = 24, 32  # fixture size; batches come out at 480 x 640, i.e. 20x nearest upsampling
UP = 20
TRAIN_IDS = ["0003", "0007", "0010"]
VAL_IDS = ["0001", "0002"]


def _example_arrays(k: int):
  """Known labels of example k: a 24 x 32 map with hand-chosen values."""
  rng = np.random.default_rng(k)
  image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  seg = np.zeros((H, W), np.uint8)  # 0 = void
  seg[:, 8:16] = 1
  seg[:, 16:24] = 40
  seg[:, 24:] = 7 + k
  depth = np.full((H, W), 2.5 + k, np.float32)
  depth[:4] = 0.0  # no measurement
  normals = np.zeros((H, W, 3), np.float32)  # zero = invalid
  normals[:, :16] = (0.0, 0.0, 2.0)
  normals[:, 16:] = (3.0, 0.0, 4.0)
  edge = np.zeros((H, W), np.float32)
  edge[5] = 1.0
  return image, seg, depth, normals, edge


def write_nyud(root, train_ids=TRAIN_IDS, val_ids=VAL_IDS):
  for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  for k, example_id in enumerate(list(train_ids) + list(val_ids)):
    image, seg, depth, normals, edge = _example_arrays(k)
    # PNG, not JPG, for the image, so that pixel values are exact (the reader accepts both).
    Image.fromarray(image).save(os.path.join(root, "images", example_id + ".jpg"), "PNG")
    Image.fromarray(seg).save(os.path.join(root, "segmentation", example_id + ".png"))
    np.save(os.path.join(root, "depth", example_id + ".npy"), depth)
    np.save(os.path.join(root, "normals", example_id + ".npy"), normals)
    np.save(os.path.join(root, "edge", example_id + ".npy"), edge)
  for name, ids in (("train.txt", train_ids), ("val.txt", val_ids)):
    with open(os.path.join(root, "gt_sets", name), "w") as f:
      f.write("\n".join(ids) + "\n")
  return str(root)


@pytest.fixture
def nyud_dir(tmp_path):
  return write_nyud(tmp_path / "NYUD_MT")


def _config(data_dir, **kwargs):
  return base.DataConfig(name="nyud", data_dir=data_dir, **kwargs)


def test_tasks_and_sizes(nyud_dir):
  train = data_lib.load(_config(nyud_dir), "train")
  test = data_lib.load(_config(nyud_dir), "test")
  assert (len(train), len(test)) == (3, 2)
  assert [t.name for t in train.tasks] == ["segmentation", "depth", "normals", "edges"]
  assert [t.kind for t in train.tasks] == ["segmentation", "depth", "normals", "edges"]
  assert train.tasks[0].num_outputs == 40
  batch = train.get(np.array([0, 2]))
  assert batch["image"].shape == (2, 480, 640, 3) and batch["image"].dtype == np.float32
  assert batch["segmentation"].shape == (2, 480, 640) and batch["segmentation"].dtype == np.int32
  assert batch["depth"].shape == (2, 480, 640, 1) and batch["depth"].dtype == np.float32
  assert batch["normals"].shape == (2, 480, 640, 3) and batch["normals"].dtype == np.float32
  assert batch["edges"].shape == (2, 480, 640, 1) and batch["edges"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_label_encodings(nyud_dir):
  source = nyud.load(_config(nyud_dir), "train")
  batch = source.get(np.array([1]))
  image, seg, depth, normals, edge = _example_arrays(1)
  # Nearest upsampling by 20: output pixel (20 r, 20 c) is source pixel (r, c).
  # Images are resized bilinearly (half-pixel centres): block centres are 97.5% their pixel.
  np.testing.assert_allclose(batch["image"][0, UP // 2::UP, UP // 2::UP], image / 255.0,
                             atol=0.05)
  np.testing.assert_allclose(batch["image"][0, 0, 0], image[0, 0] / 255.0, rtol=1e-6)
  got_seg = batch["segmentation"][0, ::UP, ::UP]
  assert np.all(got_seg[:, :8] == 255)  # void
  assert np.all(got_seg[:, 8:16] == 0)  # class 1 -> 0
  assert np.all(got_seg[:, 16:24] == 39)  # class 40 -> 39
  assert np.all(got_seg[:, 24:] == 7)  # 8 - 1
  got_depth = batch["depth"][0, ::UP, ::UP, 0]
  assert np.all(got_depth[:4] == 0.0) and np.all(got_depth[4:] == 3.5)
  got_normals = batch["normals"][0, ::UP, ::UP]
  np.testing.assert_allclose(got_normals[:, :16], np.broadcast_to([0, 0, 1], (H, 16, 3)))
  np.testing.assert_allclose(got_normals[:, 16:], np.broadcast_to([0.6, 0, 0.8], (H, 16, 3)),
                             rtol=1e-6)
  np.testing.assert_array_equal(batch["edges"][0, ::UP, ::UP, 0], edge)


def test_zero_normals_stay_zero_and_png_normals(tmp_path):
  root = write_nyud(tmp_path / "NYUD_MT")
  normals = np.zeros((H, W, 3), np.float32)
  normals[0, 0] = (0.0, 0.0, 0.5)
  np.save(os.path.join(root, "normals", "0003.npy"), normals)
  # A PNG normal map holds (n + 1) / 2 * 255: (255, 0, 0) is (1, -1, -1) before normalising.
  os.remove(os.path.join(root, "normals", "0007.npy"))
  png = np.full((H, W, 3), (255, 0, 0), np.uint8)
  Image.fromarray(png).save(os.path.join(root, "normals", "0007.png"))
  batch = nyud.load(_config(root, image_size=H), "train").get(np.array([0, 1]))
  first = batch["normals"][0]
  np.testing.assert_array_equal(first[0, 0], [0, 0, 1])
  assert np.count_nonzero(np.linalg.norm(first, axis=-1)) == 1
  np.testing.assert_allclose(batch["normals"][1], np.broadcast_to(
      np.array([1, -1, -1]) / np.sqrt(3), (H, H, 3)), rtol=1e-5)


def test_image_size_gives_squares(tmp_path):
  root = write_nyud(tmp_path / "NYUD_MT")
  batch = nyud.load(_config(root, image_size=16), "test").get(np.array([0, 1]))
  for key, shape in (("image", (2, 16, 16, 3)), ("segmentation", (2, 16, 16)),
                     ("depth", (2, 16, 16, 1)), ("normals", (2, 16, 16, 3)),
                     ("edges", (2, 16, 16, 1))):
    assert batch[key].shape == shape, key
  # Nearest resizing only picks existing values (test examples are k = 3, 4: class 7 + k).
  assert set(np.unique(batch["segmentation"])) == {255, 0, 39, 9, 10}
  assert set(np.unique(batch["depth"])) == {0.0, 5.5, 6.5}
  norms = np.linalg.norm(batch["normals"], axis=-1)
  np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-6)
  assert set(np.unique(batch["edges"])) <= {0.0, 1.0}


def test_deterministic_batches(nyud_dir):
  batches = []
  for _ in range(2):
    source = nyud.load(_config(nyud_dir, image_size=24), "train")
    batches.append(base.Batcher(source, 2, seed=3).batch(4))
  assert batches[0].keys() == batches[1].keys()
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])


def test_threads_do_not_change_batches_and_jpeg_images(nyud_dir):
  # A smooth image (JPEG is lossy on noise): red rises along rows, green along columns.
  rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  image = np.stack([rows * 10, cols * 8, np.full((H, W), 128)], -1).astype(np.uint8)
  Image.fromarray(image).save(os.path.join(nyud_dir, "images", "0003.jpg"), quality=95)
  one = nyud.load(_config(nyud_dir), "train")
  one.num_threads = 1
  four = nyud.load(_config(nyud_dir), "train")
  four.num_threads = 4
  b1, b4 = one.get(np.array([2, 0, 1])), four.get(np.array([2, 0, 1]))
  for key in b1:
    np.testing.assert_array_equal(b1[key], b4[key])
  # A real (lossy) JPEG decodes close to the pixels it was saved from.
  assert np.abs(b1["image"][1, UP // 2::UP, UP // 2::UP] - image / 255.0).max() < 0.05


def test_num_train_keeps_first_ids_and_parent_folder(tmp_path):
  write_nyud(tmp_path / "NYUD_MT")
  source = nyud.load(_config(str(tmp_path), num_train=2), "train")  # the parent folder
  assert source.ids == TRAIN_IDS[:2]


def test_with_tasks_reads_only_those_tasks(nyud_dir):
  # A corrupt segmentation file does not matter to a depth-only source.
  with open(os.path.join(nyud_dir, "segmentation", "0003.png"), "wb") as f:
    f.write(b"not a png")
  source = nyud.load(_config(nyud_dir, image_size=8), "train").with_tasks("depth")
  batch = source.get(np.array([0]))
  assert set(batch) == {"image", "depth"}
  with pytest.raises(base.DatasetError, match="cannot read .*0003.png.* as a PNG label map"):
    nyud.load(_config(nyud_dir, image_size=8), "train").get(np.array([0]))


def test_missing_folder_names_the_layout(tmp_path):
  with pytest.raises(base.DatasetError, match="does not exist; expected a folder holding the "
                     "NYUD_MT archive layout: images/<id>.jpg, segmentation/<id>.png"):
    nyud.load(_config(str(tmp_path / "nowhere")), "train")
  with pytest.raises(base.DatasetError, match="nyud needs a data folder"):
    nyud.load(_config(None), "train")


def test_missing_split_list(nyud_dir):
  os.remove(os.path.join(nyud_dir, "gt_sets", "val.txt"))
  with pytest.raises(base.DatasetError, match=r"split list .*val.txt' is missing; expected "
                     r"the NYUD_MT archive layout"):
    nyud.load(_config(nyud_dir), "test")


def test_missing_id_file_reports_the_first(nyud_dir):
  os.remove(os.path.join(nyud_dir, "depth", "0007.npy"))
  os.remove(os.path.join(nyud_dir, "edge", "0010.npy"))
  with pytest.raises(base.DatasetError, match=r"example '0007' listed in gt_sets/train.txt has "
                     r"no file depth/0007.npy"):
    nyud.load(_config(nyud_dir), "train")


def test_corrupt_files(nyud_dir):
  with open(os.path.join(nyud_dir, "images", "0001.jpg"), "wb") as f:
    f.write(b"\xff\xd8garbage")
  source = nyud.load(_config(nyud_dir, image_size=8), "test")
  with pytest.raises(base.DatasetError, match=r"cannot read .*0001.jpg' as an image"):
    source.get(np.array([0]))
  with open(os.path.join(nyud_dir, "depth", "0002.npy"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(base.DatasetError, match=r"cannot read .*0002.npy' as a numpy .npy array"):
    source.get(np.array([1]))


@pytest.mark.parametrize("folder, value, message", [
    ("segmentation", 41, r"values in \[0, 41\] but segmentation values must lie in \[0, 40\]"),
    ("depth", -1.0, r"values in \[-1.0, .*\] but depth must be >= 0"),
    ("edge", 2.0, r"values in \[0.0, 2.0\] but edge maps must lie in \[0, 1\]"),
    ("normals", np.nan, r"0003.npy. has 3 NaN or infinite value\(s\) out of"),
])
def test_labels_out_of_range(nyud_dir, folder, value, message):
  _, seg, depth, normals, edge = _example_arrays(0)
  if folder == "segmentation":
    seg[3, 3] = value
    Image.fromarray(seg).save(os.path.join(nyud_dir, folder, "0003.png"))
  else:
    array = {"depth": depth, "edge": edge, "normals": normals}[folder]
    array[3, 3] = value
    np.save(os.path.join(nyud_dir, folder, "0003.npy"), array)
  source = nyud.load(_config(nyud_dir, image_size=8), "train")
  source.get(np.array([1, 2]))  # the other examples are fine
  with pytest.raises(base.DatasetError, match=message):
    source.get(np.array([0]))


def test_wrong_shape_and_split(nyud_dir):
  np.save(os.path.join(nyud_dir, "normals", "0003.npy"), np.zeros((H, W), np.float32))
  with pytest.raises(base.DatasetError, match=r"0003.npy' has shape \(24, 32\), expected "
                     r"\(H, W, 3\)"):
    nyud.load(_config(nyud_dir, image_size=8), "train").get(np.array([0]))
  with pytest.raises(base.DatasetError, match="nyud has no split 'val'; allowed splits are "
                     "train, test"):
    nyud.load(_config(nyud_dir), "val")


def test_resize_helpers_keep_labels_exact():
  label = np.arange(12, dtype=np.int32).reshape(3, 4)
  up = dense_files.resize_label(label, (6, 8))
  np.testing.assert_array_equal(up[::2, ::2], label)
  image = np.full((3, 4, 3), 255, np.uint8)
  np.testing.assert_allclose(dense_files.resize_image(image, (5, 7)), 1.0, rtol=1e-6)
