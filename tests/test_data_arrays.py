"""Generic `.npz` multi-task data with JSON or inline task specs, and the resize helpers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dymu_jax.data import DataConfig, DatasetError, load
from dymu_jax.data import images as images_lib
from dymu_jax.data.base import split_indices

N, SIDE = 20, 8


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, 4, (N, SIDE, SIDE)).astype(np.uint8)
  mask[:, 0, 0] = 255  # "ignore" pixels do not count as a class
  normals = rng.normal(size=(N, SIDE, SIDE, 3))
  return {
      "images": rng.integers(0, 256, (N, SIDE, SIDE, 3), dtype=np.uint8),
      "digit": np.arange(N) % 7,  # classes 0..6: 7 inferred outputs
      "age": rng.uniform(1, 90, N),
      "mask": mask,
      "depth": rng.uniform(0, 5, (N, SIDE, SIDE)).astype(np.float32),
      "normals": (normals / np.linalg.norm(normals, axis=-1, keepdims=True)).astype(np.float32),
      "files": np.array([f"f{i}" for i in range(N)]),  # not a task: ignored
  }


def _write(tmp_path, name="data.npz", **overrides):
  arrays = _arrays()
  arrays.update(overrides)
  path = tmp_path / name
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def _config(path, spec, **kwargs):
  return DataConfig(name="arrays", data_dir=str(path), task_spec=spec, **kwargs)


INLINE = "digit:classification,age:regression,mask:segmentation,depth:depth,normals:normals"


def test_inline_spec_tasks_shapes_and_split(tmp_path):
  path = _write(tmp_path)
  train, test = load(_config(path, INLINE), "train"), load(_config(path, INLINE), "test")
  assert (len(train), len(test)) == (16, 4)
  assert [(t.name, t.kind, t.num_outputs) for t in train.tasks] == [
      ("digit", "classification", 7), ("age", "regression", 1), ("mask", "segmentation", 4),
      ("depth", "depth", 1), ("normals", "normals", 3)]
  batch = train.get(np.arange(5))
  assert batch["image"].shape == (5, SIDE, SIDE, 3) and batch["image"].dtype == np.float32
  assert batch["digit"].shape == (5,) and batch["digit"].dtype == np.int32
  assert batch["age"].shape == (5,) and batch["age"].dtype == np.float32
  assert batch["mask"].shape == (5, SIDE, SIDE) and batch["mask"].dtype == np.int32
  assert batch["depth"].shape == (5, SIDE, SIDE, 1)
  assert batch["normals"].shape == (5, SIDE, SIDE, 3)
  # Train and test partition the file: together they hold each digit label once per example.
  digits = np.concatenate([train.labels["digit"], test.labels["digit"]])
  assert sorted(digits.tolist()) == sorted((np.arange(N) % 7).tolist())


def test_same_seed_same_split_other_seed_other_split(tmp_path):
  path = _write(tmp_path)
  first = load(_config(path, "age:regression", seed=3), "test")
  second = load(_config(path, "age:regression", seed=3), "test")
  other = load(_config(path, "age:regression", seed=4), "test")
  np.testing.assert_array_equal(first.labels["age"], second.labels["age"])
  assert not np.array_equal(first.labels["age"], other.labels["age"])


def test_json_spec_with_image_key_outputs_and_options(tmp_path):
  data = _arrays()
  path = _write(tmp_path, images=None, x=data["images"][..., 0].astype(np.float32) / 255)
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"images": "x", "tasks": [
      {"name": "digit", "kind": "classification", "num_outputs": 10},
      {"name": "age", "kind": "regression", "label_scale": 100.0, "loss_type": "l2"},
      {"name": "depth", "kind": "edges", "pos_weight": 0.9}]}))
  source = load(_config(path, str(spec)), "train")
  digit, age, edges = source.tasks
  assert digit.num_outputs == 10
  assert (age.label_scale, age.loss_type) == (100.0, "l2")
  assert edges.pos_weight == 0.9
  assert source.image_shape == (SIDE, SIDE, 1)


def test_split_array_of_strings_and_of_ints(tmp_path):
  marks = np.where(np.arange(N) < 15, "train", "test")
  path = _write(tmp_path, split=marks)
  test = load(_config(path, "digit:classification"), "test")
  np.testing.assert_array_equal(test.labels["digit"], np.arange(15, 20) % 7)
  path = _write(tmp_path, name="ints.npz", split=(np.arange(N) % 2).astype(np.int8))
  train = load(_config(path, "digit:classification"), "train")
  np.testing.assert_array_equal(train.labels["digit"], np.arange(0, N, 2) % 7)


def test_folder_with_one_npz_and_subset(tmp_path):
  _write(tmp_path)
  source = load(_config(tmp_path, "digit:classification", num_train=5), "train")
  assert len(source) == 5


def test_image_size_resizes_images_and_dense_labels(tmp_path):
  path = _write(tmp_path)
  source = load(_config(path, INLINE, image_size=4), "train")
  batch = source.get(np.arange(3))
  assert batch["image"].shape == (3, 4, 4, 3)
  assert batch["mask"].shape == (3, 4, 4) and batch["depth"].shape == (3, 4, 4, 1)
  # Nearest keeps exact label values and unit normals.
  assert set(np.unique(batch["mask"])) <= {0, 1, 2, 3, 255}
  np.testing.assert_allclose(np.linalg.norm(batch["normals"], axis=-1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs.


def test_unknown_task_kind(tmp_path):
  with pytest.raises(DatasetError, match=r"task 'digit' has unknown kind 'classify'; allowed "
                     r"kinds are classification, regression"):
    load(_config(_write(tmp_path), "digit:classify"), "train")


def test_task_absent_from_file(tmp_path):
  with pytest.raises(DatasetError, match=r"names task 'colour' but .* has no such array; it "
                     r"holds 'images', 'digit'"):
    load(_config(_write(tmp_path), "digit:classification,colour:classification"), "train")


def test_label_shape_mismatch(tmp_path):
  with pytest.raises(DatasetError, match=r"labels 'age' in .* have shape \(20,\), but a "
                     r"segmentation task over images \(20, 8, 8, 3\) needs \(20, 8, 8\)"):
    load(_config(_write(tmp_path), "age:segmentation"), "train")
  with pytest.raises(DatasetError, match=r"labels 'mask' in .* have shape \(20, 8, 8\), but a "
                     r"classification task over images \(20, 8, 8, 3\) needs \(20,\)"):
    load(_config(_write(tmp_path), "mask:classification"), "train")


def test_labels_out_of_range(tmp_path):
  with pytest.raises(DatasetError, match=r"labels of task 'digit' range over \[0, 6\] but must "
                     r"lie in \[0, 2\]"):
    load(_config(_write(tmp_path), "digit:classification:3", test_fraction=0.05), "train")


def test_label_masks_and_task_id_mark_missing_labels(tmp_path):
  """A 0 in `<task>_mask` and the tasks an example's `task_id` does not name become the kind's
  missing value: NaN (regression), 255 (classification, segmentation), 0 (depth)."""
  keep = np.arange(N) % 4 != 1
  age = _arrays()["age"].copy()
  age[2] = np.nan  # NaN in a regression label is a missing label, not bad data
  path = _write(tmp_path, age=age, digit_mask=keep.astype(np.uint8), mask_mask=keep,
                depth_mask=keep)
  spec = "digit:classification,age:regression,mask:segmentation,depth:depth"
  source = load(_config(path, spec, test_fraction=0.05), "train")
  rows = split_indices(N, 0.05, 0)[0]
  gone = ~keep[rows]
  assert np.all(source.labels["digit"][gone] == 255)
  np.testing.assert_array_equal(source.labels["digit"][~gone], _arrays()["digit"][rows][~gone])
  np.testing.assert_array_equal(np.isnan(source.labels["age"]), rows == 2)
  assert np.all(source.labels["mask"][gone] == 255) and np.all(source.labels["depth"][gone] == 0)
  assert {t.name: t.num_outputs for t in source.tasks}["digit"] == 7
  path = _write(tmp_path, "ids.npz", task_id=np.array(["digit", "age"] * (N // 2)))
  source = load(_config(path, "digit:classification,age:regression", test_fraction=0.05),
                "train")
  np.testing.assert_array_equal(source.labels["digit"] == 255, rows % 2 == 1)
  np.testing.assert_array_equal(np.isnan(source.labels["age"]), rows % 2 == 0)


def test_missing_image_array(tmp_path):
  with pytest.raises(DatasetError, match=r"has no image array 'images' or 'image' or 'x'; it "
                     r"holds 'digit'"):
    load(_config(_write(tmp_path, images=None), "digit:classification"), "train")


def test_no_task_spec(tmp_path):
  with pytest.raises(DatasetError, match="arrays needs a task spec: pass --task_spec="):
    load(_config(_write(tmp_path), ""), "train")


def test_unparsable_inline_spec(tmp_path):
  with pytest.raises(DatasetError, match=r"cannot parse task 'digit' of the task spec; write "
                     r"name:kind"):
    load(_config(_write(tmp_path), "digit"), "train")
  with pytest.raises(DatasetError, match=r"outputs 'ten' .* must be a positive whole number"):
    load(_config(_write(tmp_path), "digit:classification:ten"), "train")


def test_bad_json_spec(tmp_path):
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"tasks": [{"name": "digit", "kind": "classification",
                                         "classes": 7}]}))
  with pytest.raises(DatasetError, match=r"task 'digit' in .* has unknown fields \['classes'\]"):
    load(_config(_write(tmp_path), str(spec)), "train")
  spec.write_text("{not json")
  with pytest.raises(DatasetError, match="cannot read the task spec .* as JSON"):
    load(_config(_write(tmp_path), str(spec)), "train")


def test_fixed_outputs_of_a_kind(tmp_path):
  with pytest.raises(DatasetError, match="task 'normals' of kind normals has 3 output"):
    load(_config(_write(tmp_path), "normals:normals:2"), "train")


def test_bad_split_values(tmp_path):
  path = _write(tmp_path, split=np.where(np.arange(N) < 15, "train", "val"))
  with pytest.raises(DatasetError, match=r"'split' in .* must hold 'train'/'test' or 0/1 .*got "
                     r"\['val'\]"):
    load(_config(path, "digit:classification"), "test")


def test_missing_path_and_ambiguous_folder(tmp_path):
  with pytest.raises(DatasetError, match="does not exist; expected one .npz file"):
    load(_config(tmp_path / "nowhere", "digit:classification"), "train")
  _write(tmp_path, name="a.npz")
  _write(tmp_path, name="b.npz")
  with pytest.raises(DatasetError, match=r"holds 2 .npz files \(a.npz, b.npz\); expected "
                     r"exactly one"):
    load(_config(tmp_path, "digit:classification"), "train")


def test_float_images_outside_0_1_are_refused(tmp_path):
  path = _write(tmp_path, images=np.full((N, SIDE, SIDE), 255.0))
  with pytest.raises(DatasetError, match=r"float images 'images' in .* range over \[255.0, "
                     r"255.0\] but must lie in \[0, 1\]"):
    load(_config(path, "digit:classification"), "train")


def test_float_class_labels_are_refused(tmp_path):
  path = _write(tmp_path, digit=np.arange(N) * 0.5)
  with pytest.raises(DatasetError, match="labels of task 'digit' must be integers, got float64"):
    load(_config(path, "digit:classification"), "train")


# --------------------------------------------------------------------------------------------
# Feature vectors (tabular data): the "inputs" array.

FEATURES = 5


def _write_vectors(tmp_path, name="table.npz", **overrides):
  rng = np.random.default_rng(1)
  arrays = {"inputs": rng.normal(size=(N, FEATURES)) * [1, 10, 100, 0.1, 1] + [0, 5, -50, 2, 1],
            "price": rng.normal(size=N).astype(np.float32),
            "kind": np.arange(N) % 3}
  arrays["inputs"][:, 4] = 7.0  # a constant feature
  arrays.update(overrides)
  path = tmp_path / name
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


VECTOR_SPEC = "price:regression,kind:classification"


def test_vectors_are_standardised_with_the_training_statistics(tmp_path):
  path = _write_vectors(tmp_path)
  raw = np.load(path)["inputs"]
  train, test = (load(_config(path, VECTOR_SPEC), s) for s in ("train", "test"))
  assert (len(train), len(test)) == (16, 4) and train.image_shape == (FEATURES,)
  batch = train.get(np.arange(3))
  assert batch["image"].shape == (3, FEATURES) and batch["image"].dtype == np.float32
  assert batch["kind"].dtype == np.int32 and batch["price"].shape == (3,)
  inputs = train.get(np.arange(len(train)))["image"]
  np.testing.assert_allclose(inputs[:, :4].mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(inputs[:, :4].std(axis=0), 1.0, atol=1e-5)
  np.testing.assert_array_equal(inputs[:, 4], 0.0)  # constant: centred, std taken as 1
  # The test split uses the training split's statistics, recorded on both sources.
  stats = train.input_stats
  assert stats["mean"].shape == stats["std"].shape == (FEATURES,) and stats["std"][4] == 1.0
  for name in stats:
    np.testing.assert_array_equal(test.input_stats[name], stats[name])
  train_rows, test_rows = split_indices(N, 0.2, 0)  # the file has no split array
  np.testing.assert_allclose(stats["mean"][:4], raw[train_rows, :4].mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(test.get(np.arange(len(test)))["image"],
                             (raw[test_rows] - stats["mean"]) / stats["std"], atol=1e-4)
  # The statistics survive task selection, and num_train changes which rows they come from.
  assert train.with_tasks("price").input_stats is train.input_stats
  fewer = load(_config(path, VECTOR_SPEC, num_train=6), "test").input_stats
  assert not np.allclose(fewer["mean"], stats["mean"])


def test_standardisation_can_be_turned_off_and_spec_can_name_the_key(tmp_path):
  path = _write_vectors(tmp_path, inputs=None, features=np.arange(N * 2).reshape(N, 2))
  spec = tmp_path / "spec.json"
  spec.write_text(json.dumps({"inputs": "features", "tasks": [
      {"name": "price", "kind": "regression"}]}))
  source = load(_config(path, str(spec), standardise_inputs=False), "train")
  assert source.input_stats is None
  batch = source.get(np.arange(2))["image"]
  assert batch.dtype == np.float32 and batch.max() > 1  # integers as they are: no /255
  assert float(batch[1, 1] - batch[1, 0]) == 1.0


def test_vector_files_that_cannot_work_stop_with_one_sentence(tmp_path):
  path = _write_vectors(tmp_path, mask=np.zeros((N, 4, 4), np.uint8))
  with pytest.raises(DatasetError, match=r"task 'mask' is segmentation, a per-pixel kind, but .* "
                     r"holds feature vectors \(20, 5\); only classification and regression"):
    load(_config(path, "mask:segmentation"), "train")
  with pytest.raises(DatasetError, match=r"image_size=8 resizes images, but .* holds feature "
                     r"vectors 'inputs'; leave image_size at 0"):
    load(_config(path, VECTOR_SPEC, image_size=8), "train")
  both = _write_vectors(tmp_path, name="both.npz", images=np.zeros((N, 4, 4), np.uint8))
  with pytest.raises(DatasetError, match=r"holds both images 'images' and feature vectors "
                     r"'inputs'; name the one to use"):
    load(_config(both, VECTOR_SPEC), "train")
  flat = _write(tmp_path, name="flat.npz", images=np.zeros((N, 12), np.float32))
  with pytest.raises(DatasetError, match=r"images 'images' in .* have shape \(20, 12\), which is "
                     r"feature vectors \(N, D\); store them under 'inputs'"):
    load(_config(flat, "digit:classification"), "train")
  for bad, message in ((np.zeros((N, 2, 2)), r"must have shape \(N, D\) with D >= 1"),
                       (np.array([["a"] * 3] * N), r"must be numbers"),
                       (np.full((N, 2), np.nan), r"2 of 40|NaN")):
    with pytest.raises(DatasetError, match=message):
      load(_config(_write_vectors(tmp_path, name="bad.npz", inputs=bad), VECTOR_SPEC), "train")
  with pytest.raises(DatasetError, match="'inputs' cannot be a task name"):
    load(_config(_write_vectors(tmp_path), "inputs:regression"), "train")


def test_augment_passes_vectors_through(tmp_path):
  from dymu_jax.data import augment as augment_lib  # pylint: disable=import-outside-toplevel
  source = load(_config(_write_vectors(tmp_path), VECTOR_SPEC), "train")
  batch = source.get(np.arange(4))
  out = augment_lib.make_augment(source.tasks)(batch, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], batch["image"])


# --------------------------------------------------------------------------------------------
# Resize helpers (dymu_jax.data.images).


def test_resize_images_by_hand():
  row = np.array([[0.0, 1.0]], np.float32)[None]  # (1, 1, 2)
  # Half-pixel centres: output pixels sample the input at -0.25, 0.25, 0.75, 1.25.
  np.testing.assert_allclose(images_lib.resize_images(row, (1, 4))[0, 0],
                             [0.0, 0.25, 0.75, 1.0])
  square = np.array([[[10, 20], [30, 40]]], np.uint8)
  assert images_lib.resize_images(square, 1).tolist() == [[[25]]]  # the mean, still uint8


def test_resize_images_matches_jax():
  x = np.random.default_rng(0).random((2, 36, 30, 3)).astype(np.float32)
  for size in [(64, 64), (16, 20), (7, 7)]:
    expected = jax.image.resize(x, (2, *size, 3), "linear")
    np.testing.assert_allclose(images_lib.resize_images(x, size), expected, atol=1e-5)


def test_resize_labels_nearest_by_hand():
  labels = np.arange(4)[None, None, :].repeat(2, 1)  # (1, 2, 4)
  assert images_lib.resize_labels(labels, (2, 2))[0, 0].tolist() == [1, 3]
  assert images_lib.resize_labels(labels, (2, 8))[0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  # 30 -> 13 samples input (6 + 0.5) * 30 / 13 = 15 exactly for output 6 (floats say 14.99..).
  assert images_lib.nearest_indices(30, 13)[6] == 15


def test_regression_targets_of_vectors_are_standardised_with_training_statistics(tmp_path):
  """With feature vectors, each regression task trains on (label - mean) / std of its labelled
  training examples: the same Task on both splits, labels untouched, a spec's own scale kept,
  and nothing changed when the option is off or the inputs are images."""
  rng = np.random.default_rng(3)
  price = rng.normal(50.0, 20.0, N).astype(np.float32)
  price[[0, 5]] = np.nan  # missing labels do not enter the statistics
  path = _write_vectors(tmp_path, price=price, size=rng.normal(size=N).astype(np.float32) * 0)
  spec = "price:regression,size:regression,kind:classification"
  train, test = (load(_config(path, spec), s) for s in ("train", "test"))
  assert train.tasks == test.tasks
  by_name = {t.name: t for t in train.tasks}
  train_rows, _ = split_indices(N, 0.2, 0)
  labelled = price[train_rows][~np.isnan(price[train_rows])].astype(np.float64)
  assert by_name["price"].label_offset == pytest.approx(labelled.mean(), rel=1e-6)
  assert by_name["price"].label_scale == pytest.approx(labelled.std(), rel=1e-6)
  assert (by_name["size"].label_offset, by_name["size"].label_scale) == (0.0, 1.0)  # constant
  assert (by_name["kind"].label_offset, by_name["kind"].label_scale) == (0.0, 1.0)
  np.testing.assert_array_equal(train.get(np.arange(len(train)))["price"], price[train_rows])
  # Off: the tasks are as the spec says; a spec's own scale is kept when on.
  off = load(_config(path, spec, standardise_targets=False), "train")
  assert all((t.label_offset, t.label_scale) == (0.0, 1.0) for t in off.tasks)
  json_spec = tmp_path / "spec.json"
  json_spec.write_text(json.dumps({"tasks": [
      {"name": "price", "kind": "regression", "label_scale": 10.0},
      {"name": "kind", "kind": "classification"}]}))
  kept = load(_config(path, str(json_spec)), "train").tasks[0]
  assert (kept.label_offset, kept.label_scale) == (0.0, 10.0)
  # Images are never standardised (targets neither).
  image_path = _write(tmp_path, name="images.npz")
  image_tasks = load(_config(image_path, "age:regression"), "train").tasks
  assert (image_tasks[0].label_offset, image_tasks[0].label_scale) == (0.0, 1.0)


def test_standardised_regression_loss_and_metric_by_hand():
  """The loss compares the prediction with (label - offset) / scale; the metric maps the
  prediction back with prediction * scale + offset (so MAE is in the label's units)."""
  import jax.numpy as jnp
  from dymu_jax import tasks as tasks_lib
  task = tasks_lib.regression("y", label_scale=4.0, label_offset=10.0)
  prediction = jnp.asarray([[0.5], [-1.0], [2.0]])
  label = jnp.asarray([14.0, np.nan, 2.0])
  # standardised labels 1.0, -, -2.0 -> |0.5 - 1| + |2 - (-2)| over 2 labelled examples
  assert float(task.loss(prediction, label)) == pytest.approx((0.5 + 4.0) / 2)
  metric = task.metric()
  # label units 12.0, 18.0 vs 14.0, 2.0 -> errors 2, 16
  result = metric.compute(metric.update(metric.init(), prediction, label))
  assert result["mae"] == pytest.approx(9.0) and result["rmse"] == pytest.approx(
      np.sqrt((4 + 256) / 2))
  np.testing.assert_allclose(task.label_units(prediction)[:, 0], [12.0, 6.0, 18.0])
  with pytest.raises(ValueError, match="finite label_scale > 0"):
    tasks_lib.regression("y", label_scale=0.0)
