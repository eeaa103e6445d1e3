"""PASCAL-Context reader: a tiny PASCAL_MT folder written by the test, read back through `load`."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from scipy import io as scipy_io

from dymu_jax import data as data_lib
from dymu_jax.data import base
from dymu_jax.data import dense_files
from dymu_jax.data import pascal_context as pascal

H, W = 32, 64  # batches come out at 512 x 512: 16x rows, 8x columns of nearest upsampling
TRAIN_IDS = ["2008_000002", "2008_000003", "2008_000007"]
VAL_IDS = ["2008_000009", "2008_000010"]
PERSON, AEROPLANE = 284, 2  # PASCAL-Context LabelMap ids: person has trusted normals, not plane


def _mask(rows, cols):
  mask = np.zeros((H, W), np.uint8)
  mask[rows, cols] = 1
  return mask


def _human_parts_mat(path, with_person: bool):
  """A Pascal-Part annotation: a person with head and left-foot parts, and a dog."""
  parts = np.zeros((1, 2), dtype=[("part_name", "O"), ("mask", "O")])
  parts[0, 0] = (np.array(["head"]), _mask(slice(0, 4), slice(0, 8)))
  parts[0, 1] = (np.array(["lfoot"]), _mask(slice(28, 32), slice(0, 8)))
  objects = np.zeros((1, 2), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"),
                                    ("parts", "O")])
  person_class = 15 if with_person else 8
  objects[0, 0] = (np.array(["person"]), np.array([[person_class]]),
                   _mask(slice(0, 32), slice(0, 8)), parts)
  objects[0, 1] = (np.array(["dog"]), np.array([[12]]), _mask(slice(0, 8), slice(40, 48)),
                   np.zeros((0, 0)))
  anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
  anno[0, 0] = (np.array(["x"]), objects)
  scipy_io.savemat(path, {"anno": anno})


def _example_arrays(k: int):
  rng = np.random.default_rng(k)
  image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  seg = np.zeros((H, W), np.uint8)
  seg[:, 16:32] = 15
  seg[:, 32:48] = 20
  seg[:, 48:] = 255  # void
  sal = np.zeros((H, W), np.uint8)
  sal[:, 8:16] = 127  # 0.498 -> 0
  sal[:, 16:24] = 128  # 0.502 -> 1
  sal[:, 24:] = 255
  normals = np.zeros((H, W, 3), np.uint8)
  normals[...] = (255, 0, 0)  # (1, -1, -1) before normalising
  label_map = np.full((H, W), PERSON, np.uint16)
  label_map[:, 40:] = AEROPLANE  # a vertical boundary between columns 39 and 40
  return image, seg, sal, normals, label_map


def write_pascal(root, train_ids=TRAIN_IDS, val_ids=VAL_IDS):
  folders = ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "semseg/VOC12",
             "human_parts", "sal_distill", "normals_distill", "pascal-context/trainval")
  for folder in folders:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  for k, example_id in enumerate(list(train_ids) + list(val_ids)):
    image, seg, sal, normals, label_map = _example_arrays(k)
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", example_id + ".jpg"), "PNG")
    # The first example's segmentation lives in semseg/VOC12, which the reader tries first.
    seg_folder = "semseg/VOC12" if k == 0 else "semseg/pascal-context"
    Image.fromarray(seg).save(os.path.join(root, seg_folder, example_id + ".png"))
    Image.fromarray(sal).save(os.path.join(root, "sal_distill", example_id + ".png"))
    Image.fromarray(normals).save(os.path.join(root, "normals_distill", example_id + ".png"))
    _human_parts_mat(os.path.join(root, "human_parts", example_id + ".mat"), k != 1)
    scipy_io.savemat(os.path.join(root, "pascal-context", "trainval", example_id + ".mat"),
                     {"LabelMap": label_map})
  for name, ids in (("train.txt", train_ids), ("val.txt", val_ids)):
    with open(os.path.join(root, "ImageSets", "Context", name), "w") as f:
      f.write("\n".join(ids) + "\n")
  return str(root)


@pytest.fixture
def pascal_dir(tmp_path):
  return write_pascal(tmp_path / "PASCAL_MT")


def _config(data_dir, **kwargs):
  return base.DataConfig(name="pascal_context", data_dir=data_dir, **kwargs)


def test_tasks_and_sizes(pascal_dir):
  train = data_lib.load(_config(pascal_dir), "train")
  test = data_lib.load(_config(pascal_dir), "test")
  assert (len(train), len(test)) == (3, 2)
  assert [(t.name, t.kind, t.num_outputs) for t in train.tasks] == [
      ("segmentation", "segmentation", 21), ("human_parts", "segmentation", 7),
      ("saliency", "saliency", 1), ("normals", "normals", 3), ("edges", "edges", 1)]
  batch = train.get(np.array([0, 1]))
  assert batch["image"].shape == (2, 512, 512, 3) and batch["image"].dtype == np.float32
  for key in ("segmentation", "human_parts"):
    assert batch[key].shape == (2, 512, 512) and batch[key].dtype == np.int32
  for key, channels in (("saliency", 1), ("normals", 3), ("edges", 1)):
    assert batch[key].shape == (2, 512, 512, channels) and batch[key].dtype == np.float32


def test_label_encodings(pascal_dir):
  batch = pascal.load(_config(pascal_dir), "train").get(np.array([0, 1]))
  _, seg, sal, _, _ = _example_arrays(0)
  sample = lambda x: x[::16, ::8]  # nearest upsampling: (16 r, 8 c) is source pixel (r, c)
  np.testing.assert_array_equal(sample(batch["segmentation"][0]), seg)
  expected_sal = np.zeros((H, W), np.float32)
  expected_sal[:, 16:] = 1.0
  np.testing.assert_array_equal(sample(batch["saliency"][0, ..., 0]), expected_sal)
  # Human parts: head (1) rows 0-3 and left foot (6) rows 28-31 of columns 0-7, 0 elsewhere.
  parts = sample(batch["human_parts"][0])
  expected_parts = np.zeros((H, W), np.int32)
  expected_parts[0:4, 0:8] = 1
  expected_parts[28:32, 0:8] = 6
  np.testing.assert_array_equal(parts, expected_parts)
  # Example 1 has no person: every pixel is ignored.
  assert np.all(batch["human_parts"][1] == 255)
  # Normals: (1, -1, -1) / sqrt(3) on person pixels (trusted class), 0 on the aeroplane.
  normals = sample(batch["normals"][0])
  np.testing.assert_allclose(normals[:, :40], np.broadcast_to(np.array([1, -1, -1]) / np.sqrt(3),
                                                              (H, 40, 3)), rtol=1e-5)
  assert np.all(normals[:, 40:] == 0)
  # Edges: the thinned Laplacian of the label map is the single column 39, rows 1..31.
  expected_edges = np.zeros((H, W), np.float32)
  expected_edges[1:, 39] = 1.0
  np.testing.assert_array_equal(sample(batch["edges"][0, ..., 0]), expected_edges)


def test_edges_of_a_label_map_by_hand():
  # A 2-pixel band where labels change, thinned to its west column; its top pixel goes too.
  label_map = np.ones((6, 6), np.uint16)
  label_map[:, 3:] = 2
  expected = np.zeros((6, 6), np.float32)
  expected[1:, 2] = 1.0
  np.testing.assert_array_equal(dense_files.label_edges(label_map), expected)
  assert not dense_files.label_edges(np.full((5, 5), 7)).any()
  # A 3-pixel-thick bar thins to one pixel per column, in its middle row.
  bar = np.zeros((7, 9), bool)
  bar[2:5, 1:8] = True
  thin = dense_files.thin(bar)
  assert thin[3, 2:7].all() and thin.sum(axis=0)[2:7].tolist() == [1] * 5


def test_image_size_and_determinism(pascal_dir):
  batches = []
  for _ in range(2):
    source = pascal.load(_config(pascal_dir, image_size=20), "train")
    batches.append(base.Batcher(source, 2, seed=5).batch(7))
  assert batches[0]["image"].shape == (2, 20, 20, 3)
  assert batches[0]["normals"].shape == (2, 20, 20, 3)
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])
  norms = np.linalg.norm(batches[0]["normals"], axis=-1)
  np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-6)
  assert set(np.unique(batches[0]["human_parts"])) <= {0, 1, 6, 255}


def test_with_tasks_and_parent_folder(tmp_path):
  root = write_pascal(tmp_path / "PASCAL_MT")
  os.remove(os.path.join(root, "pascal-context", "trainval", "2008_000009.mat"))
  # The split check needs every file, so write it back corrupt: only edges/normals read it.
  with open(os.path.join(root, "pascal-context", "trainval", "2008_000009.mat"), "wb") as f:
    f.write(b"garbage")
  source = pascal.load(_config(str(tmp_path), num_test=1, image_size=8), "test")
  assert source.ids == ["2008_000009"]
  batch = source.with_tasks(["saliency", "segmentation"]).get(np.array([0]))
  assert set(batch) == {"image", "saliency", "segmentation"}
  with pytest.raises(base.DatasetError, match=r"cannot read .*2008_000009.mat' as a MATLAB "
                     r".mat file"):
    source.with_tasks("edges").get(np.array([0]))


def test_missing_folder_names_the_layout(tmp_path):
  with pytest.raises(base.DatasetError, match=r"does not exist; expected a folder holding the "
                     r"PASCAL_MT archive layout: JPEGImages/<id>.jpg, ImageSets/Context/"):
    pascal.load(_config(str(tmp_path / "nowhere")), "train")


def test_missing_id_file(pascal_dir):
  os.remove(os.path.join(pascal_dir, "sal_distill", "2008_000003.png"))
  with pytest.raises(base.DatasetError, match=r"example '2008_000003' listed in "
                     r"ImageSets/Context/train.txt has no file sal_distill/2008_000003.png"):
    pascal.load(_config(pascal_dir), "train")
  os.remove(os.path.join(pascal_dir, "semseg", "pascal-context", "2008_000009.png"))
  with pytest.raises(base.DatasetError, match=r"no file semseg/VOC12/2008_000009.png or "
                     r"semseg/pascal-context/2008_000009.png"):
    pascal.load(_config(pascal_dir), "test")


def test_corrupt_image(pascal_dir):
  with open(os.path.join(pascal_dir, "JPEGImages", "2008_000010.jpg"), "wb") as f:
    f.write(b"")
  source = pascal.load(_config(pascal_dir, image_size=8), "test")
  source.get(np.array([0]))
  with pytest.raises(base.DatasetError, match=r"cannot read .*2008_000010.jpg' as an image"):
    source.get(np.array([1]))


def test_segmentation_out_of_range(pascal_dir):
  _, seg, _, _, _ = _example_arrays(1)
  seg[0, 0] = 21
  Image.fromarray(seg).save(os.path.join(pascal_dir, "semseg", "pascal-context",
                                         "2008_000003.png"))
  source = pascal.load(_config(pascal_dir, image_size=8), "train")
  with pytest.raises(base.DatasetError, match=r"values in \[0, 21\] but segmentation values "
                     r"must lie in \[0, 20\] or be 255"):
    source.get(np.array([1]))


def test_bad_annotations(pascal_dir):
  parts_path = os.path.join(pascal_dir, "human_parts", "2008_000002.mat")
  scipy_io.savemat(parts_path, {"anno": np.zeros((1, 1))})
  source = pascal.load(_config(pascal_dir, image_size=8), "train")
  with pytest.raises(base.DatasetError, match="is not a Pascal-Part annotation"):
    source.with_tasks("human_parts").get(np.array([0]))
  scipy_io.savemat(parts_path, {"other": np.zeros((1, 1))})
  with pytest.raises(base.DatasetError, match=r"2008_000002.mat' has no variable 'anno' "
                     r"\(found: other\)"):
    source.with_tasks("human_parts").get(np.array([0]))
  label_map_path = os.path.join(pascal_dir, "pascal-context", "trainval", "2008_000003.mat")
  scipy_io.savemat(label_map_path, {"LabelMap": np.zeros((H, W + 1), np.uint16)})
  with pytest.raises(base.DatasetError, match=r"LabelMap of .*2008_000003.mat' has shape "
                     r"\(32, 65\) but its image has \(32, 64\)"):
    source.with_tasks("edges").get(np.array([1]))


def test_unknown_part_name(pascal_dir):
  path = os.path.join(pascal_dir, "human_parts", "2008_000007.mat")
  mat = scipy_io.loadmat(path)
  mat["anno"][0, 0]["objects"][0, 0]["parts"][0, 0]["part_name"] = np.array(["tail"])
  scipy_io.savemat(path, {"anno": mat["anno"]})
  source = pascal.load(_config(pascal_dir, image_size=8), "train").with_tasks("human_parts")
  with pytest.raises(base.DatasetError, match="names a person part 'tail' that is not one of"):
    source.get(np.array([2]))


def test_normals_valid_classes_table():
  assert len(pascal.NORMALS_VALID_CLASSES) == 170
  assert {3, 284, 397, 427, 457} <= pascal.NORMALS_VALID_CLASSES  # air conditioner ... wire
  assert not {2, 25, 431, 459} & pascal.NORMALS_VALID_CLASSES  # aeroplane, bird, unknown, wool
  assert sorted(set(pascal.HUMAN_PART_IDS.values())) == [1, 2, 3, 4, 5, 6]
  assert len(pascal.HUMAN_PART_IDS) == 24
