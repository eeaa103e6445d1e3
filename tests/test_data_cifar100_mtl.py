"""CIFAR-100-MTL: the fine -> superclass tables, and loading through TFDS mock data (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dymu_jax import data as data_lib
from dymu_jax.data import base
from dymu_jax.data import cifar100_mtl as cifar

# The standard CIFAR-100 fine -> coarse label table, as published with the dataset's meta file.
STANDARD_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15,
    3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4,
    2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


def test_fine_to_coarse_table():
  assert len(cifar.FINE_NAMES) == len(set(cifar.FINE_NAMES)) == 100
  assert list(cifar.FINE_NAMES) == sorted(cifar.FINE_NAMES)  # CIFAR's alphabetical order
  assert len(cifar.COARSE_NAMES) == 20 and list(cifar.COARSE_NAMES) == sorted(cifar.COARSE_NAMES)
  np.testing.assert_array_equal(cifar.FINE_TO_COARSE, STANDARD_COARSE)
  assert np.bincount(cifar.FINE_TO_COARSE, minlength=20).tolist() == [5] * 20
  members = sorted(name for _, names in cifar.SUPERCLASSES for name in names)
  assert members == sorted(cifar.FINE_NAMES)  # every fine class in exactly one superclass
  for coarse in range(20):
    fine = np.flatnonzero(cifar.FINE_TO_COARSE == coarse)
    assert cifar.FINE_TO_WITHIN[fine].tolist() == [0, 1, 2, 3, 4]  # ascending fine labels


def test_task_labels_by_hand():
  # beaver (4) and whale (95): aquatic_mammals 0 and 4; trout (91): fish 4; worm (99):
  # non-insect_invertebrates 4; apple (0): fruit_and_vegetables 0.
  labels = cifar.task_labels(np.array([4, 95, 91, 99, 0]))
  assert labels["aquatic_mammals"].tolist() == [0, 4, 255, 255, 255]
  assert labels["fish"].tolist() == [255, 255, 4, 255, 255]
  assert labels["non-insect_invertebrates"].tolist() == [255, 255, 255, 4, 255]
  assert labels["fruit_and_vegetables"].tolist() == [255, 255, 255, 255, 0]
  assert labels["people"].tolist() == [255] * 5
  assert all(v.dtype == np.int32 for v in labels.values())


def _load(tmp_path, split="train", num_examples=24, **kwargs):
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path / "meta")):
    return data_lib.load(base.DataConfig(name="cifar100_mtl", data_dir=str(tmp_path / "tfds"),
                                         **kwargs), split)


def test_load_mock_data(tmp_path):
  source = _load(tmp_path)
  assert len(source) == 24
  assert [t.name for t in source.tasks] == list(cifar.COARSE_NAMES)
  assert all(t.kind == "classification" and t.num_outputs == 5 for t in source.tasks)
  batch = source.get(np.arange(24))
  assert batch["image"].shape == (24, 32, 32, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  labels = np.stack([batch[name] for name in cifar.COARSE_NAMES], axis=1)  # (24, 20)
  assert labels.dtype == np.int32
  has_label = labels != 255
  assert has_label.sum(axis=1).tolist() == [1] * 24  # exactly one task per example
  assert np.all((labels[has_label] >= 0) & (labels[has_label] < 5))
  # The labelled task is the fine label's superclass, with its within-superclass index.
  np.testing.assert_array_equal(np.argmax(has_label, axis=1),
                                cifar.FINE_TO_COARSE[source.fine_labels])
  np.testing.assert_array_equal(labels[has_label], cifar.FINE_TO_WITHIN[source.fine_labels])


def test_deterministic_and_test_split(tmp_path):
  first, second = _load(tmp_path), _load(tmp_path)
  np.testing.assert_array_equal(first.fine_labels, second.fine_labels)
  b1, b2 = base.Batcher(first, 8, seed=1).batch(5), base.Batcher(second, 8, seed=1).batch(5)
  for key in b1:
    np.testing.assert_array_equal(b1[key], b2[key])
  test = _load(tmp_path, "test", num_examples=12)
  assert test.split == "test" and len(test) == 12


def test_num_train_and_image_size(tmp_path):
  source = _load(tmp_path, num_train=10, image_size=16)
  assert len(source) == 10
  batch = source.get(np.arange(3))
  assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.float32
  assert source.with_tasks("fish,trees").get(np.arange(2)).keys() == {"image", "fish", "trees"}


def test_not_prepared_says_how_to_prepare(tmp_path):
  config = base.DataConfig(name="cifar100_mtl", data_dir=str(tmp_path))
  with pytest.raises(base.DatasetError, match=r"no prepared TFDS 'cifar100' dataset in "
                     r"array_record format found in .*; prepare it on a machine with internet "
                     r"with `tfds build cifar100 --file_format=array_record"):
    cifar.load(config, "train")


def test_bad_split_and_image_size(tmp_path):
  with pytest.raises(base.DatasetError, match="cifar100_mtl has no split 'validation'"):
    cifar.load(base.DataConfig(name="cifar100_mtl", data_dir=str(tmp_path)), "validation")
  with pytest.raises(base.DatasetError, match="image size must be >= 0"):
    cifar.load(base.DataConfig(name="cifar100_mtl", data_dir=str(tmp_path), image_size=-1),
               "train")
