"""UTKFace: the real 32x32 faces, the fixed seeded split, label ranges and bad files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import DataConfig, DatasetError, load
from dymu_jax.data.base import split_indices


def _config(path, **kwargs):
  return DataConfig(name="utkface", data_dir=str(path), **kwargs)


@pytest.fixture(scope="module")
def utkface_dir(shared_data):
  return os.path.join(shared_data, "utkface")


@pytest.fixture(scope="module")
def raw(utkface_dir):
  with np.load(os.path.join(utkface_dir, "utkface_32x32.npz")) as npz:
    return {key: npz[key] for key in ("images", "age", "gender", "race")}


@pytest.fixture(scope="module")
def splits(utkface_dir):
  config = _config(utkface_dir)
  return load(config, "train"), load(config, "test")


def test_split_sizes_and_tasks(splits):
  train, test = splits
  assert (len(train), len(test)) == (7822, 1956)  # 9778 faces, round(0.2 * 9778) = 1956 test
  assert [(t.name, t.kind, t.num_outputs) for t in train.tasks] == [
      ("age", tasks_lib.REGRESSION, 1), ("gender", tasks_lib.CLASSIFICATION, 2),
      ("race", tasks_lib.CLASSIFICATION, 5)]
  assert train.tasks[0].label_scale == 10.0


def test_batch_shapes_dtypes_and_label_ranges(splits):
  train, _ = splits
  batch = train.get(np.arange(64))
  assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["age"].shape == (64,) and batch["age"].dtype == np.float32
  assert batch["gender"].dtype == np.int32 and batch["race"].dtype == np.int32
  labels = train.labels
  assert 1 <= labels["age"].min() and labels["age"].max() <= 110
  assert set(np.unique(labels["gender"])) == {0, 1}
  assert set(np.unique(labels["race"])) == {0, 1, 2, 3, 4}


def test_split_is_the_seeded_split_of_the_file(splits, raw):
  train, test = splits
  train_idx, test_idx = split_indices(9778, 0.2, 0)
  np.testing.assert_array_equal(test.images, raw["images"][test_idx])
  np.testing.assert_array_equal(train.labels["age"], raw["age"][train_idx])
  np.testing.assert_array_equal(train.labels["race"], raw["race"][train_idx])
  assert not set(train_idx) & set(test_idx)


def test_same_seed_same_split_other_seed_other_split(utkface_dir, splits):
  _, test = splits
  again = load(_config(utkface_dir), "test")
  np.testing.assert_array_equal(again.images, test.images)
  other = load(_config(utkface_dir, seed=1), "test")
  assert len(other) == 1956 and not np.array_equal(other.images, test.images)


def test_file_path_subset_and_resize(utkface_dir, raw):
  path = os.path.join(utkface_dir, "utkface_32x32.npz")
  source = load(_config(path, num_test=100, image_size=16), "test")
  assert len(source) == 100 and source.image_shape == (16, 16, 3)
  assert source.images.dtype == np.uint8
  # A random subset of the test split, not its first rows (the file is sorted by name, that is
  # by age as text, so the first 100 test faces hold only a handful of ages).
  _, test_idx = split_indices(9778, 0.2, 0)
  assert np.isin(source.labels["age"], raw["age"][test_idx]).all()
  assert len(np.unique(raw["age"][test_idx[:100]])) < 10
  assert len(np.unique(source.labels["age"])) > 30


def _write(path, n=12, **overrides):
  arrays = {"images": np.zeros((n, 32, 32, 3), np.uint8), "age": np.full(n, 30, np.int16),
            "gender": np.zeros(n, np.int8), "race": np.arange(n, dtype=np.int8) % 5}
  arrays.update(overrides)
  np.savez(path / "utkface_32x32.npz", **{k: v for k, v in arrays.items() if v is not None})
  return path


def test_small_file_is_read(tmp_path):
  source = load(_config(_write(tmp_path, n=10)), "test")
  assert len(source) == 2 and source.get(np.arange(2))["age"].tolist() == [30.0, 30.0]


def test_missing_folder(tmp_path):
  with pytest.raises(DatasetError, match="does not exist; expected a folder holding "
                     "utkface_32x32.npz"):
    load(_config(tmp_path / "nowhere"), "train")


def test_folder_without_file(tmp_path):
  with pytest.raises(DatasetError, match=r"missing file .*utkface_32x32.npz'; expected a folder"):
    load(_config(tmp_path), "train")


def test_missing_keys(tmp_path):
  folder = _write(tmp_path, race=None)
  with pytest.raises(DatasetError, match=r"lacks race; expected the keys images, age, gender, "
                     r"race, found images, age, gender"):
    load(_config(folder), "train")


def test_race_out_of_range(tmp_path):
  folder = _write(tmp_path, race=np.full(12, 7, np.int8))
  with pytest.raises(DatasetError, match=r"labels of task 'race' range over \[7, 7\] but must "
                     r"lie in \[0, 4\]"):
    load(_config(folder), "train")


def test_age_out_of_range(tmp_path):
  folder = _write(tmp_path, age=np.full(12, -3, np.int16))
  with pytest.raises(DatasetError, match=r"ages in .* range over \[-3, -3\] but must lie in "
                     r"\[0, 150\] years"):
    load(_config(folder), "train")


def test_wrong_image_shape(tmp_path):
  folder = _write(tmp_path, images=np.zeros((12, 32, 32), np.uint8))
  with pytest.raises(DatasetError, match=r"images in .* must be uint8 \(N, H, W, 3\)"):
    load(_config(folder), "train")


def test_label_count_mismatch(tmp_path):
  folder = _write(tmp_path, gender=np.zeros(5, np.int8))
  with pytest.raises(DatasetError, match=r"'gender' in .* has shape \(5,\), expected \(12,\)"):
    load(_config(folder), "train")


def test_corrupt_file(tmp_path):
  (tmp_path / "utkface_32x32.npz").write_bytes(b"PK\x03\x04 this is no zip archive")
  with pytest.raises(DatasetError, match=r"cannot read .* as an .npz file"):
    load(_config(tmp_path), "train")
