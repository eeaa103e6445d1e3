"""Multi-MNIST: canvas construction, disjoint digit pools, IDX and pickle readers, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import DataConfig, DatasetError, load
from dymu_jax.data import multi_mnist


def _config(path, **kwargs):
  return DataConfig(name="multi_mnist", data_dir=str(path), **kwargs)


@pytest.fixture(scope="module")
def mnist_dir(shared_data):
  return os.path.join(shared_data, "mnist")


@pytest.fixture(scope="module")
def sample_pickle(shared_data):
  return os.path.join(shared_data, "multi_mnist_sample", "sample_data.pickle")


@pytest.fixture(scope="module")
def t10k(mnist_dir):
  digits = multi_mnist.read_idx(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"),
                                multi_mnist.IMAGES_MAGIC)
  labels = multi_mnist.read_idx(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"),
                                multi_mnist.LABELS_MAGIC)
  return digits, labels


def _idx_bytes(array, magic):
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# Construction.


def test_compose_zero_shift_places_digits_in_corners_with_max_overlap():
  left = np.full((1, 28, 28), 100, np.uint8)
  left[0, 10, 10] = 250  # inside the overlap, brighter than the right digit there
  right = np.full((1, 28, 28), 200, np.uint8)
  zero = np.zeros((1, 2), np.int64)
  canvas = multi_mnist.compose(left, right, zero, zero)[0]
  assert canvas.shape == (36, 36) and canvas.dtype == np.uint8
  expected = np.zeros((36, 36), np.uint8)
  expected[0:28, 0:28] = 100
  expected[8:36, 8:36] = 200  # max(100, 200) over the overlap [8:28, 8:28]
  expected[10, 10] = 250
  np.testing.assert_array_equal(canvas, expected)


def test_compose_shifts_move_digits_and_cut_at_the_border():
  left = np.zeros((3, 28, 28), np.uint8)
  right = np.zeros((3, 28, 28), np.uint8)
  left[0, 5, 6] = 11
  right[0, 0, 0] = 22
  left[1, 0, 0] = 33  # shifted up and left by 4: off the canvas
  right[1, 27, 27] = 44  # corner at (8 + 4, 8 + 4): pixel at 39, off the canvas
  left[2, 27, 27] = 55  # corner at (4, 4): lands on (31, 31)
  right[2, 27, 27] = 66  # corner at (8 - 4, 8 - 4): lands on (31, 31) too; max wins
  left_shifts = np.array([[2, -3], [-4, -4], [4, 4]])
  right_shifts = np.array([[-4, 4], [4, 4], [-4, -4]])
  canvas = multi_mnist.compose(left, right, left_shifts, right_shifts)
  assert canvas[0, 7, 3] == 11 and canvas[0, 4, 12] == 22 and np.count_nonzero(canvas[0]) == 2
  assert np.count_nonzero(canvas[1]) == 0
  assert canvas[2, 31, 31] == 66 and np.count_nonzero(canvas[2]) == 1


def test_compose_rejects_shifts_beyond_four_pixels():
  digits = np.zeros((1, 28, 28), np.uint8)
  with pytest.raises(ValueError, match=r"values in \[-4, 4\]"):
    multi_mnist.compose(digits, digits, np.array([[5, 0]]), np.zeros((1, 2), int))


def test_sample_pairs_differ_stay_in_pool_and_repeat_with_the_seed():
  labels = np.arange(100) % 10
  pool = np.arange(20, 60)
  pairs, shifts = multi_mnist.sample_pairs(labels, pool, 5000, [3, 0])
  assert pairs.shape == (5000, 2) and shifts.shape == (5000, 2, 2)
  assert np.all(labels[pairs[:, 0]] != labels[pairs[:, 1]])
  assert np.isin(pairs, pool).all()
  assert shifts.min() == -4 and shifts.max() == 4
  again, again_shifts = multi_mnist.sample_pairs(labels, pool, 5000, [3, 0])
  np.testing.assert_array_equal(pairs, again)
  np.testing.assert_array_equal(shifts, again_shifts)


def test_sample_pairs_needs_two_classes():
  with pytest.raises(DatasetError, match="at least two classes"):
    multi_mnist.sample_pairs(np.zeros(10, np.int64), np.arange(10), 4, 0)


# --------------------------------------------------------------------------------------------
# Built from the real MNIST t10k digits.


def test_drawn_digit_folder_gives_pairs_from_its_own_train_and_test_files(drawn_mnist):
  """Runs on a fresh clone: train pairs come from the train files, test pairs from t10k."""
  train = load(_config(drawn_mnist, num_train=300, num_test=100), "train")
  test = load(_config(drawn_mnist, num_train=300, num_test=100), "test")
  assert train.digit_file.endswith("train-images-idx3-ubyte.gz")
  assert test.digit_file.endswith("t10k-images-idx3-ubyte.gz")
  digits = multi_mnist.read_idx(train.digit_file, multi_mnist.IMAGES_MAGIC)
  labels = multi_mnist.read_idx(os.path.join(drawn_mnist, "train-labels-idx1-ubyte.gz"),
                                multi_mnist.LABELS_MAGIC)
  assert len(digits) == 400 and len(train) == 300 and len(test) == 100
  np.testing.assert_array_equal(train.labels["left"], labels[train.digit_indices[:, 0]])
  np.testing.assert_array_equal(train.labels["right"], labels[train.digit_indices[:, 1]])
  assert (train.labels["left"] != train.labels["right"]).all()
  assert train.images.shape[1:3] == (36, 36)


def test_t10k_pairs_shapes_labels_and_disjoint_pools(mnist_dir, t10k):
  digits, digit_labels = t10k
  config = _config(mnist_dir, num_train=3000, num_test=1000)
  train, test = load(config, "train"), load(config, "test")
  assert (len(train), len(test)) == (3000, 1000)
  assert [t.name for t in train.tasks] == ["left", "right"]
  assert all(t.kind == tasks_lib.CLASSIFICATION and t.num_outputs == 10 for t in train.tasks)
  batch = train.get(np.arange(8))
  assert batch["image"].shape == (8, 36, 36, 1) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  for source in (train, test):
    assert source.labels["left"].min() >= 0 and source.labels["left"].max() <= 9
    assert np.all(source.labels["left"] != source.labels["right"])
  # Train digits are the first 8000 of t10k, test digits the last 2000.
  assert train.digit_indices.max() < 8000 <= test.digit_indices.min()
  assert not set(train.digit_indices.ravel()) & set(test.digit_indices.ravel())
  # Labels and images are those of the recorded digits and shifts.
  np.testing.assert_array_equal(train.labels["left"], digit_labels[train.digit_indices[:, 0]])
  np.testing.assert_array_equal(train.labels["right"], digit_labels[train.digit_indices[:, 1]])
  rebuilt = multi_mnist.compose(digits[test.digit_indices[:, 0]],
                                digits[test.digit_indices[:, 1]],
                                test.shifts[:, 0], test.shifts[:, 1])
  np.testing.assert_array_equal(test.images[..., 0], rebuilt)


def test_default_pair_counts(mnist_dir):
  config = _config(mnist_dir)
  assert (len(load(config, "train")), len(load(config, "test"))) == (60_000, 10_000)


def test_same_seed_same_pairs_other_seed_other_pairs(mnist_dir):
  first = load(_config(mnist_dir, num_train=500, seed=4), "train")
  second = load(_config(mnist_dir, num_train=500, seed=4), "train")
  other = load(_config(mnist_dir, num_train=500, seed=5), "train")
  np.testing.assert_array_equal(first.images, second.images)
  np.testing.assert_array_equal(first.digit_indices, second.digit_indices)
  assert not np.array_equal(first.images, other.images)


def test_image_size_resizes(mnist_dir):
  source = load(_config(mnist_dir, num_test=10, image_size=28), "test")
  assert source.image_shape == (28, 28, 1)


def test_train_files_give_the_train_pool(tmp_path, mnist_dir, t10k):
  digits, labels = t10k
  # Uncompressed train files of 30 digits; the t10k files are the real (gzipped) ones.
  (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(digits[:30], 2051))
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:30], 2049))
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    os.symlink(os.path.join(mnist_dir, name), tmp_path / name)
  config = _config(tmp_path, num_train=200, num_test=200)
  train, test = load(config, "train"), load(config, "test")
  assert train.digit_file.endswith("train-images-idx3-ubyte")
  assert test.digit_file.endswith("t10k-images-idx3-ubyte.gz")
  assert train.digit_indices.max() < 30
  assert test.digit_indices.max() >= 30  # the whole t10k file is the test pool
  np.testing.assert_array_equal(train.labels["left"], labels[train.digit_indices[:, 0]])


# --------------------------------------------------------------------------------------------
# Pickles (ParetoMTL / PHN layout).


def _sample(sample_pickle):
  with open(sample_pickle, "rb") as f:
    return pickle.load(f)


def test_pickle_two_tuple_is_split_by_test_fraction(sample_pickle):
  x, y = _sample(sample_pickle)
  config = _config(sample_pickle)
  train, test = load(config, "train"), load(config, "test")
  assert (len(train), len(test)) == (26, 6)  # 32 examples, round(32 * 0.2) = 6 held out
  assert train.digit_indices is None
  both = np.concatenate([train.images[..., 0], test.images[..., 0]])
  labels = np.concatenate([train.labels["left"], test.labels["left"]])
  order = np.lexsort(both.reshape(32, -1).T)
  np.testing.assert_array_equal(both[order], x[np.lexsort(x.reshape(32, -1).T)])
  assert sorted(labels.tolist()) == sorted(y[:, 0].tolist())
  batch = test.get(np.arange(6))
  assert batch["image"].shape == (6, 36, 36, 1) and batch["right"].dtype == np.int32
  other = load(_config(sample_pickle, seed=1), "test")
  assert not np.array_equal(other.images, test.images)


def test_pickle_four_tuple(tmp_path, sample_pickle):
  x, y = _sample(sample_pickle)
  path = tmp_path / "multi_mnist.pickle"
  with open(path, "wb") as f:
    pickle.dump((x[:20], y[:20], x[20:], y[20:]), f)
  train, test = load(_config(path), "train"), load(_config(path), "test")
  np.testing.assert_array_equal(train.images[..., 0], x[:20])
  np.testing.assert_array_equal(test.labels["left"], y[20:, 0])
  np.testing.assert_array_equal(test.labels["right"], y[20:, 1])
  subset = load(_config(path, num_train=5), "train")
  assert len(subset) == 5 and np.isin(subset.labels["left"], y[:20, 0]).all()


def test_pickle_float_images_in_0_255_are_scaled(tmp_path, sample_pickle):
  x, y = _sample(sample_pickle)
  path = tmp_path / "float.pickle"
  with open(path, "wb") as f:
    pickle.dump((x.astype(np.float64), y.astype(np.float64), x[:4], y[:4]), f)
  train = load(_config(path), "train")
  np.testing.assert_allclose(train.get(np.arange(32))["image"][..., 0], x / 255, atol=1e-6)
  assert train.labels["left"].dtype.kind == "i"


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes bytes as Python 2 `str` opcodes, the way Python 2 pickled numpy arrays."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_py2_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_py2_str


def test_python2_pickle_is_read_with_latin1(tmp_path, sample_pickle):
  x, y = _sample(sample_pickle)
  path = tmp_path / "py2.pickle"
  with open(path, "wb") as f:
    _Python2Pickler(f, protocol=2).dump((x, y))
  with open(path, "rb") as f, pytest.raises(UnicodeDecodeError):
    pickle.load(f)  # the default ASCII decoding fails, as with the real Python 2 files
  train = load(_config(path), "train")
  reference = load(_config(sample_pickle), "train")
  np.testing.assert_array_equal(train.images, reference.images)


# --------------------------------------------------------------------------------------------
# Bad inputs.


def test_missing_folder(tmp_path):
  with pytest.raises(DatasetError, match=r"does not exist; expected a folder holding the MNIST"):
    load(_config(tmp_path / "nowhere"), "train")


def test_no_data_dir():
  with pytest.raises(DatasetError, match="multi_mnist needs data: pass --data_dir"):
    load(DataConfig(name="multi_mnist"), "train")


def test_unknown_split(mnist_dir):
  with pytest.raises(DatasetError, match="has no split 'val'"):
    load(_config(mnist_dir), "val")


def test_folder_without_labels_file(tmp_path, mnist_dir):
  os.symlink(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"),
             tmp_path / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(DatasetError, match=r"has no t10k-labels-idx1-ubyte\[.gz\]; expected"):
    load(_config(tmp_path), "test")


def test_train_images_without_train_labels(tmp_path, mnist_dir):
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
               "train-images-idx3-ubyte.gz"):
    os.symlink(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz" if "images" in name
                            else "t10k-labels-idx1-ubyte.gz"), tmp_path / name)
  with pytest.raises(DatasetError, match=r"has no train-labels-idx1-ubyte\[.gz\]"):
    load(_config(tmp_path), "train")


def _folder_with(tmp_path, mnist_dir, images_bytes):
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images_bytes)
  os.symlink(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"),
             tmp_path / "t10k-labels-idx1-ubyte.gz")
  return tmp_path


def test_bad_magic_number(tmp_path, mnist_dir, t10k):
  folder = _folder_with(tmp_path, mnist_dir, _idx_bytes(t10k[0], 2049))
  with pytest.raises(DatasetError, match=r"starts with magic number 2049, but an IDX file of "
                     r"MNIST images starts with 2051"):
    load(_config(folder), "train")


def test_truncated_idx(tmp_path, mnist_dir, t10k):
  folder = _folder_with(tmp_path, mnist_dir, _idx_bytes(t10k[0], 2051)[:-100])
  with pytest.raises(DatasetError, match=r"holds 7839900 bytes of data but its header announces "
                     r"7840000 for shape \(10000, 28, 28\)"):
    load(_config(folder), "train")


def test_truncated_gzip(tmp_path, mnist_dir):
  data = open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz"), "rb").read()
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data[:len(data) // 2])
  os.symlink(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz"),
             tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz', the file is corrupt or "
                     r"truncated"):
    load(_config(tmp_path), "train")


def test_labels_out_of_range(tmp_path, t10k):
  digits, labels = t10k
  labels = labels.copy()
  labels[3] = 12
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(digits, 2051))
  with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write(_idx_bytes(labels, 2049))
  with pytest.raises(DatasetError, match="has labels up to 12, but MNIST digits are 0 to 9"):
    load(_config(tmp_path), "test")


def test_too_few_t10k_digits(tmp_path, t10k):
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(t10k[0][:100], 2051))
  (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(t10k[1][:100], 2049))
  with pytest.raises(DatasetError, match="holds 100 digits but at least 8001 are needed"):
    load(_config(tmp_path), "train")


def test_pickle_with_wrong_layout(tmp_path, sample_pickle):
  x, y = _sample(sample_pickle)
  path = tmp_path / "three.pickle"
  with open(path, "wb") as f:
    pickle.dump((x, y, x), f)
  with pytest.raises(DatasetError, match=r"must hold a tuple \(trainX, trainLabel, testX, "
                     r"testLabel\) or \(X, Y\), got a tuple of 3 items"):
    load(_config(path), "train")


def test_pickle_labels_of_wrong_shape_or_range(tmp_path, sample_pickle):
  x, y = _sample(sample_pickle)
  path = tmp_path / "one_label.pickle"
  with open(path, "wb") as f:
    pickle.dump((x, y[:, 0]), f)
  with pytest.raises(DatasetError, match=r"labels in .* must have shape \(32, 2\)"):
    load(_config(path), "train")
  y = y.copy()
  y[:, 1] = 10
  with open(path, "wb") as f:
    pickle.dump((x, y), f)
  with pytest.raises(DatasetError, match=r"labels of task 'right' range over \[10, 10\] but "
                     r"must lie in \[0, 9\]"):
    load(_config(path), "train")


def test_corrupt_pickle(tmp_path):
  path = tmp_path / "broken.pickle"
  path.write_bytes(b"\x80\x04not a pickle at all")
  with pytest.raises(DatasetError, match="cannot read .* as a Multi-MNIST pickle"):
    load(_config(path), "train")


class _RunsCode:
  """A pickle payload whose unpickling would run a shell command (through `os.system`)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["payload", "inside_tuple", "object_array"])
def test_pickle_that_would_run_code_is_refused(tmp_path, layout):
  """Nothing of a hostile pickle runs: it is refused in one sentence, and no marker appears."""
  marker = tmp_path / "ran"
  payload = _RunsCode(marker)
  content = {"payload": payload,
             "inside_tuple": (np.zeros((2, 36, 36), np.uint8), payload),
             "object_array": (np.array([payload, 1], dtype=object), np.zeros((2, 2)))}[layout]
  path = tmp_path / "hostile.pickle"
  path.write_bytes(pickle.dumps(content))
  with pytest.raises(multi_mnist.PickleRefused, match="only numpy arrays|Python objects"):
    load(_config(path), "train")
  assert not marker.exists()


def test_pickle_refusal_reaches_the_cli_as_one_sentence(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "hostile.pickle"
  path.write_bytes(pickle.dumps(_RunsCode(marker)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--dataset=multi_mnist",
       f"--data_dir={path}", "--backbone=lenet", "--steps=1", f"--workdir={tmp_path / 'w'}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "system, but a Multi-MNIST pickle holds only" in errors[0], result.stderr
  assert not marker.exists()
