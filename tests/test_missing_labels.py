"""Missing labels for every task kind, and one task per example.

The convention (`dymu_jax.tasks`): a regression label that is NaN and a classification label
equal to 255 are missing; the arrays source turns a 0 in `<task>_mask`, and every task but an
example's own under `task_id`, into those values. Losses average over the present labels (0
loss and 0 gradient when a batch has none, never NaN), metrics pool sums and counts of the
present labels over the whole set (NaN, with `labelled` 0, for a task without any).

Models are tiny MLPs on feature vectors so that the file runs in seconds on a shared CPU.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import data, losses, methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.data import DataConfig, DatasetError, load
from dymu_jax.metrics import tasks as metrics_lib

NAN = float("nan")


def _finite_tree(tree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def _assert_trees_close(a, b, **kwargs):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kwargs), a, b)


# ---------------------------------------------------------------------------- the convention


def test_missing_values_and_label_present_per_kind():
  assert math.isnan(tasks_lib.missing_value("regression"))
  assert tasks_lib.missing_value("classification") == tasks_lib.IGNORE_LABEL == 255
  assert tasks_lib.missing_value("segmentation") == 255
  assert tasks_lib.missing_value("depth") == 0 and tasks_lib.missing_value("normals") == 0
  assert tasks_lib.missing_value("edges") is None and tasks_lib.missing_value("saliency") is None
  assert losses.IGNORE_LABEL == metrics_lib.IGNORE_LABEL == tasks_lib.IGNORE_LABEL
  present = tasks_lib.label_present
  np.testing.assert_array_equal(present(tasks_lib.regression("r"), [1.0, NAN, 0.0]),
                                [True, False, True])
  np.testing.assert_array_equal(present(tasks_lib.classification("c", 3), [2, 255, 0]),
                                [True, False, True])
  seg = np.full((2, 2, 2), 255)
  seg[1, 0, 1] = 3
  np.testing.assert_array_equal(present(tasks_lib.segmentation("s", 4), seg), [False, True])
  assert present(tasks_lib.regression("r"), np.zeros((0,))).shape == (0,)
  # The jit-friendly twin in `losses` agrees.
  np.testing.assert_array_equal(
      jax.jit(losses.example_present, static_argnums=0)(tasks_lib.segmentation("s", 4), seg),
      [False, True])
  np.testing.assert_array_equal(
      losses.example_present(tasks_lib.regression("r"), jnp.array([1.0, NAN])), [True, False])


# ---------------------------------------------------------------------------- losses by hand


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_regression_loss_skips_nan_labels_by_hand(loss_type):
  task = tasks_lib.Task("age", "regression", 1, loss_type=loss_type, label_scale=2.0)
  prediction = jnp.array([[1.0], [2.0], [3.0], [-1.0]])
  label = jnp.array([4.0, NAN, 2.0, NAN])  # targets 2.0 and 1.0 after label_scale
  errors = np.array([1.0 - 2.0, 3.0 - 1.0])
  per_example = np.abs(errors) if loss_type == "l1" else errors ** 2
  np.testing.assert_allclose(task.loss(prediction, label), per_example.mean(), rtol=1e-6)
  grad = jax.grad(lambda p: task.loss(p, label))(prediction)
  d = np.sign(errors) if loss_type == "l1" else 2 * errors
  np.testing.assert_allclose(grad[:, 0], [d[0] / 2, 0.0, d[1] / 2, 0.0], rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_regression_batch_without_labels_is_zero_with_zero_gradient(loss_type):
  task = tasks_lib.Task("age", "regression", 1, loss_type=loss_type)
  prediction = jnp.array([[1.0], [2.0], [3.0]])
  label = jnp.full((3,), NAN)
  loss, grad = jax.jit(jax.value_and_grad(lambda p: task.loss(p, label)))(prediction)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((3, 1)))


def test_classification_loss_averages_over_present_labels_by_hand():
  task = tasks_lib.classification("c", 3)
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
  label = jnp.array([0, 255, 2])
  log_softmax = np.asarray(jax.nn.log_softmax(logits))
  expected = -(log_softmax[0, 0] + log_softmax[2, 2]) / 2
  np.testing.assert_allclose(task.loss(logits, label), expected, rtol=1e-6)
  grad = jax.grad(lambda z: task.loss(z, label))(logits)
  np.testing.assert_array_equal(grad[1], np.zeros(3))  # the unlabelled example
  empty = jnp.full((3,), 255)
  loss, grad = jax.value_and_grad(lambda z: task.loss(z, empty))(logits)
  assert float(loss) == 0.0 and not np.any(np.asarray(grad))


# ---------------------------------------------------------------------------- gradients of a model

D = 4
OPTIONS = {"backbone": "mlp", "head_width": 8, "backbone_kwargs": {"hidden": (16,)}}


def _two_task_static(b_kind="regression"):
  task_b = (tasks_lib.regression("b") if b_kind == "regression"
            else tasks_lib.classification("b", 3))
  tasks = (tasks_lib.regression("a"), task_b)
  method = methods.build("static", tasks, model_options=OPTIONS)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(6, D)).astype(np.float32),
           "a": rng.normal(size=6).astype(np.float32),
           "b": (rng.normal(size=6).astype(np.float32) if b_kind == "regression"
                 else rng.integers(0, 3, 6).astype(np.int32))}
  variables = method.init(jax.random.PRNGKey(0), batch)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  return method, params, state, batch


def _grad(method, params, state, batch, term=None):
  """Gradient of the method's total loss, or of its aux scalar `term` (e.g. "loss/a")."""
  def loss(p):
    total, (aux, _) = method.loss(p, state, batch, None, 0)
    return total if term is None else aux[term]
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("b_kind", ["regression", "classification"])
def test_task_without_labels_in_the_batch_adds_no_gradient(b_kind):
  method, params, state, batch = _two_task_static(b_kind)
  missing = dict(batch, b=(np.full(6, NAN, np.float32) if b_kind == "regression"
                           else np.full(6, 255, np.int32)))
  total, (aux, _) = jax.jit(method.loss)(params, state, missing, None, 0)
  assert float(aux["loss/b"]) == 0.0
  np.testing.assert_allclose(total, aux["loss/a"], rtol=1e-6)
  both = _grad(method, params, state, missing)
  only_a = _grad(method, params, state, batch, "loss/a")  # task A alone, B's labels untouched
  assert _finite_tree(both)
  _assert_trees_close(both, only_a, rtol=1e-6, atol=1e-7)
  # Task B's loss gives no parameter (its head included) any gradient from this batch.
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(
      _grad(method, params, state, missing, "loss/b")))


def test_missing_labels_change_no_gradient_of_other_examples_or_tasks():
  """With B labelled on some examples only, the gradient is A's on the whole batch plus B's on
  the sub-batch of its labelled examples (no batch norm: examples are independent), and what a
  missing label held (NaN, or any value hidden by the loader's mask) makes no difference."""
  method, params, state, batch = _two_task_static("regression")
  present = np.array([True, False, True, True, False, False])
  nan_b = dict(batch, b=np.where(present, batch["b"], NAN).astype(np.float32))
  got = _grad(method, params, state, nan_b)
  assert _finite_tree(got)
  grad_a = _grad(method, params, state, batch, "loss/a")
  sub = {k: v[present] for k, v in batch.items()}
  grad_b = _grad(method, params, state, sub, "loss/b")
  _assert_trees_close(got, jax.tree_util.tree_map(jnp.add, grad_a, grad_b), rtol=1e-5,
                      atol=1e-6)
  # Task A's own gradient does not see B's missing labels at all.
  _assert_trees_close(_grad(method, params, state, nan_b, "loss/a"), grad_a, rtol=0, atol=0)


# ---------------------------------------------------------------------------- metrics


def _run(task, *batches):
  metric = task.metric()
  state = metric.init()
  for batch in batches:
    state = metric.update(state, *batch)
  return metric.compute(state), metric.labelled(state)


def test_regression_metrics_pool_present_labels_over_batches_by_hand():
  task = tasks_lib.regression("age", label_scale=10.0)
  # Predictions are in the scaled space: value = prediction * 10.
  first = (np.array([[1.0], [2.0], [3.0]], np.float32), np.array([12.0, NAN, 27.0], np.float32))
  second = (np.array([[0.0], [5.0], [1.0], [4.0]], np.float32),
            np.array([NAN, NAN, NAN, 44.0], np.float32))
  errors = np.array([10.0 - 12.0, 30.0 - 27.0, 40.0 - 44.0])  # 3 present labels
  values, labelled = _run(task, first, second)
  assert labelled == 3
  np.testing.assert_allclose(values["mae"], np.abs(errors).sum() / 3, rtol=1e-6)
  np.testing.assert_allclose(values["rmse"], np.sqrt(np.square(errors).sum() / 3), rtol=1e-6)
  # Not the mean of the batch means.
  assert not np.isclose(values["mae"], (np.mean([2.0, 3.0]) + 4.0) / 2)
  # Padding (valid False) is left out as well.
  padded = (second[0], second[1], np.array([True, True, True, False]))
  values, labelled = _run(task, first, padded)
  assert labelled == 2
  np.testing.assert_allclose(values["mae"], 5.0 / 2, rtol=1e-6)


def test_accuracy_pools_present_labels_over_batches_by_hand():
  task = tasks_lib.classification("c", 3)
  eye = np.eye(3, dtype=np.float32)
  first = (eye[[0, 1, 2]], np.array([0, 255, 1]))  # 1 of 2 right
  second = (eye[[2, 2, 0, 1]], np.array([2, 255, 255, 255]))  # 1 of 1 right
  values, labelled = _run(task, first, second)
  assert labelled == 3 and values == {"accuracy": 2 / 3}


def test_task_without_any_label_reports_nan_and_zero_labelled_without_warnings():
  reg, cls = tasks_lib.regression("r"), tasks_lib.classification("c", 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    values, labelled = _run(reg, (np.ones((2, 1), np.float32), np.full(2, NAN, np.float32)))
    assert labelled == 0 and set(values) == {"mae", "rmse"}
    assert all(math.isnan(v) for v in values.values())
    values, labelled = _run(cls, (np.eye(3, dtype=np.float32)[:2], np.full(2, 255)))
    assert labelled == 0 and math.isnan(values["accuracy"])
  states = metrics_lib.init_all((reg, cls))
  batch = {"r": np.array([1.0, NAN], np.float32), "c": np.array([255, 1])}
  predictions = {"r": np.zeros((2, 1), np.float32), "c": np.eye(3, dtype=np.float32)[:2]}
  states = jax.jit(metrics_lib.update_all, static_argnums=3)(states, predictions, batch,
                                                             (reg, cls))
  assert metrics_lib.labelled_all(states, (reg, cls)) == {"r": 1, "c": 1}
  assert metrics_lib.compute_all(states, (reg, cls)) == {"r": {"mae": 1.0, "rmse": 1.0},
                                                         "c": {"accuracy": 1.0}}


# ---------------------------------------------------------------------------- the arrays source


N = 12


def _table(tmp_path, **overrides):
  rng = np.random.default_rng(3)
  arrays = {"inputs": rng.normal(size=(N, D)),
            "a": rng.normal(size=N),
            "b": rng.normal(size=N).astype(np.float32),
            "c": np.arange(N) % 3,
            "split": np.array(["train"] * 8 + ["test"] * 4)}
  arrays.update(overrides)
  path = tmp_path / "table.npz"
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path, arrays


SPEC = "a:regression,b:regression,c:classification"


def _both(path, spec=SPEC, **kwargs):
  config = DataConfig(name="arrays", data_dir=str(path), task_spec=spec, **kwargs)
  return load(config, "train"), load(config, "test")


def _missing(source, name):
  return ~tasks_lib.label_present(tasks_lib.by_name(source.tasks)[name], source.labels[name])


def test_nan_regression_labels_load_and_batch_as_nan(tmp_path):
  a = np.random.default_rng(0).normal(size=N)
  a[[1, 9]] = NAN
  path, _ = _table(tmp_path, a=a)
  train, test = _both(path)
  np.testing.assert_array_equal(_missing(train, "a"), np.isin(np.arange(8), [1]))
  np.testing.assert_array_equal(_missing(test, "a"), np.isin(np.arange(4), [1]))
  batch = train.get(np.arange(3))
  assert batch["a"].dtype == np.float32 and np.isnan(batch["a"][1])


@pytest.mark.parametrize("mask_dtype", [bool, np.int64, np.float32])
def test_task_masks_turn_labels_missing(tmp_path, mask_dtype):
  mask_a = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1]).astype(mask_dtype)
  mask_c = np.array([0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1]).astype(mask_dtype)
  path, arrays = _table(tmp_path, a_mask=mask_a, c_mask=mask_c)
  train, test = _both(path)
  full = np.ones(N, bool)
  for source, rows in ((train, slice(0, 8)), (test, slice(8, 12))):
    np.testing.assert_array_equal(_missing(source, "a"), ~mask_a.astype(bool)[rows])
    np.testing.assert_array_equal(_missing(source, "b"), ~full[rows])
    np.testing.assert_array_equal(_missing(source, "c"), ~mask_c.astype(bool)[rows])
    kept = mask_a.astype(bool)[rows]
    np.testing.assert_allclose(source.labels["a"][kept], arrays["a"][rows][kept])
  assert np.all(np.isnan(train.labels["a"][~mask_a.astype(bool)[:8]]))
  assert np.all(train.labels["c"][~mask_c.astype(bool)[:8]] == 255)
  assert tasks_lib.by_name(train.tasks)["c"].num_outputs == 3


@pytest.mark.parametrize("as_strings", [False, True])
def test_task_id_keeps_one_label_per_example(tmp_path, as_strings):
  ids = np.array([0, 1, 2, 0, 0, 1, 2, 2, 0, 1, 2, 1])
  task_id = np.array(["a", "b", "c"])[ids] if as_strings else ids
  path, arrays = _table(tmp_path, task_id=task_id)
  train, test = _both(path)
  for source, rows in ((train, slice(0, 8)), (test, slice(8, 12))):
    for index, name in enumerate("abc"):
      np.testing.assert_array_equal(_missing(source, name), ids[rows] != index)
    own = ids[rows] == 0
    np.testing.assert_allclose(source.labels["a"][own], arrays["a"][rows][own])
    own = ids[rows] == 2
    np.testing.assert_array_equal(source.labels["c"][own], arrays["c"][rows][own])


def test_task_id_and_masks_combine(tmp_path):
  ids = np.array([0, 1, 2, 0, 0, 1, 2, 2, 0, 1, 2, 1])
  mask_a = np.ones(N, bool)
  mask_a[3] = False
  path, _ = _table(tmp_path, task_id=ids, a_mask=mask_a)
  train, _ = _both(path)
  np.testing.assert_array_equal(~_missing(train, "a"), (ids[:8] == 0) & mask_a[:8])


def test_missing_label_files_that_cannot_work_stop_with_one_sentence(tmp_path):
  def refused(match, spec=SPEC, split="train", **overrides):
    path, _ = _table(tmp_path, **overrides)
    with pytest.raises(DatasetError, match=match):
      load(DataConfig(name="arrays", data_dir=str(path), task_spec=spec), split)

  a = np.random.default_rng(0).normal(size=N)
  a[:8] = NAN  # every training label of "a" missing
  refused(r"task 'a' has no label in the 8 training examples", a=a)
  refused(r"task 'b' has no label in the 8 training", b_mask=np.arange(N) >= 8)
  refused(r"task 'a' has no label in the 8 training", task_id=np.zeros(N, int),
          spec="c:classification,a:regression")  # id 0 is "c", the first task of the spec
  load(DataConfig(name="arrays", data_dir=str(_table(tmp_path, a=a)[0]), task_spec=SPEC),
       "test")  # a test split may lack a task: its metrics are NaN
  a[:] = 1.0
  a[4] = np.inf
  refused(r"labels 'a' .* has 1 infinite value\(s\) out of 12 \(NaN marks a missing label",
          a=a)
  refused(r"labels 'c' .* hold NaN; classification labels must be integers, with 255",
          c=np.where(np.arange(N) == 2, NAN, np.arange(N) % 3))
  refused(r"inputs' .* has 1 NaN or infinite", inputs=np.where(
      np.arange(N * D).reshape(N, D) == 5, NAN, 1.0))
  refused(r"'a_mask' .* must hold booleans or 0/1", a_mask=np.full(N, 2))
  refused(r"'a_mask' .* has shape \(5,\), expected \(12,\)", a_mask=np.ones(5, bool))
  refused(r"'task_id' .* names tasks \['z'\] that the task spec does not have; it has a, b, c",
          task_id=np.array(["a", "z"] * 6))
  refused(r"'task_id' .* ranges over \[0, 3\] but must lie in \[0, 2\]",
          task_id=np.arange(N) % 4)
  refused(r"'task_id' .* must hold integers .* or task names, got float",
          task_id=np.zeros(N, np.float32))
  refused(r"'task_id' cannot be a task name", spec="a:regression,task_id:regression")
  refused(r"'a_mask' cannot be a task name; it is the label mask of task 'a'",
          spec="a:regression,a_mask:regression", a_mask=np.ones(N))
  refused(r"task 'c' has 300 classes, so 255 is one of them",
          spec="a:regression,c:classification:300", task_id=np.arange(N) % 2)


def test_edges_cannot_lose_their_labels(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "maps.npz"
  np.savez(path, images=rng.integers(0, 256, (N, 4, 4), dtype=np.uint8),
           e=rng.integers(0, 2, (N, 4, 4)).astype(np.float32),
           d=rng.uniform(0.5, 2, (N, 4, 4)).astype(np.float32), task_id=np.arange(N) % 2)
  with pytest.raises(DatasetError, match=r"task 'e' is edges, which has no missing-label value"):
    load(DataConfig(name="arrays", data_dir=str(path), task_spec="d:depth,e:edges"), "train")
  np.savez(path, images=rng.integers(0, 256, (N, 4, 4), dtype=np.uint8),
           s=rng.integers(0, 4, (N, 4, 4)), d=rng.uniform(0.5, 2, (N, 4, 4)).astype(np.float32),
           task_id=np.arange(N) % 2)
  source = load(DataConfig(name="arrays", data_dir=str(path), task_spec="d:depth,s:segmentation",
                           test_fraction=0.25), "train")
  for name in ("d", "s"):
    kept = tasks_lib.label_present(tasks_lib.by_name(source.tasks)[name], source.labels[name])
    assert 0 < kept.sum() < len(source)
  assert set(np.unique(source.labels["s"][~kept])) == {255}


# ---------------------------------------------------------------------------- training

GROUPS = 100


def write_groups(path, n=1600, seed=0):
  """The classic multi-task regression layout: each row belongs to one of 100 groups and only
  that group's target is observed; y = w_g . x + b_g + noise."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, D))
  group = rng.integers(0, GROUPS, n)
  shared = rng.normal(size=D)
  w = shared + 0.3 * rng.normal(size=(GROUPS, D))
  bias = rng.normal(size=GROUPS)
  y = np.einsum("nd,nd->n", x, w[group]) + bias[group] + 0.05 * rng.normal(size=n)
  names = [f"g{g:03d}" for g in range(GROUPS)]
  # Every task column holds the row's target; `task_id` keeps only the row's own group.
  arrays = {name: y.astype(np.float32) for name in names}
  np.savez(path, inputs=x.astype(np.float32), task_id=np.array(names)[group], **arrays)
  return path, names


def test_static_training_on_one_task_per_example_lowers_the_loss(tmp_path):
  path, names = write_groups(tmp_path / "groups.npz")
  config = DataConfig(name="arrays", data_dir=str(path),
                      task_spec=",".join(f"{n}:regression" for n in names))
  source = load(config, "train")
  assert len(source.tasks) == GROUPS
  missing = np.stack([np.isnan(source.labels[n]) for n in names], axis=1)
  np.testing.assert_array_equal(missing.sum(axis=1), GROUPS - 1)  # one label per example
  method = methods.build("static", source.tasks, model_options={
      "backbone": "mlp", "head_width": 8, "head_hidden_layers": 0,
      "backbone_kwargs": {"hidden": (32,)}})
  batches = data.Batcher(source, 64, seed=0)
  variables = method.init(jax.random.PRNGKey(0), batches.batch(0))
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  optimizer = optax.scale_by_adam()
  opt_state = optimizer.init(params)

  # One compiled program (compiling 100 heads dominates the time): a step with learning rate 0
  # measures the loss of a fixed batch without changing the parameters.
  @jax.jit
  def step(params, opt_state, batch, learning_rate):
    loss, grads = jax.value_and_grad(lambda p: method.loss(p, state, batch, None, 0)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  held = [batches.batch(s) for s in range(batches.steps_per_epoch)]  # one epoch, fixed

  def evaluate(params):
    return float(np.mean([step(params, opt_state, b, 0.0)[2] for b in held]))

  before = evaluate(params)
  for s in range(60):
    params, opt_state, loss, grads = step(params, opt_state, batches.batch(s), 1e-2)
    assert np.isfinite(float(loss)) and _finite_tree(grads), s
  after = evaluate(params)
  print(f"sum of {GROUPS} task losses {before:.2f} -> {after:.2f}")
  assert np.isfinite(after) and after < 0.6 * before, (before, after)


def test_many_tasks_are_summarised_in_one_log_line():
  from dymu_jax.train import loop
  tasks = ([tasks_lib.regression(f"s{i:03d}") for i in range(9)]
           + [tasks_lib.classification("kind", 3)])
  per_task = {f"s{i:03d}": {"mae": float(i), "rmse": float(i) + 1} for i in range(9)}
  per_task["s004"] = {"mae": float("nan"), "rmse": float("nan")}  # no labelled test example
  per_task["kind"] = {"accuracy": 0.75}
  line = loop.describe_eval(per_task, tasks)
  # mae over s000..s008 without s004: mean 4.0 (0+1+2+3+5+6+7+8 = 32, / 8), median 4.0,
  # worst (highest) 8 at s008.
  assert line == ("10 tasks; mae over 8 tasks: mean=4, median=4, worst=8 (s008); accuracy "
                  "over 1 tasks: mean=0.75, median=0.75, worst=0.75 (kind); 1 task(s) without "
                  "a labelled example (s004); every task in metrics.jsonl"), line
  few = {name: per_task[name] for name in ("s001", "kind")}
  assert loop.describe_eval(few, tasks) == "s001: mae=1, rmse=2  kind: accuracy=0.75"


# ---------------------------------------------------------------------------- no labelled test example


def test_evaluator_counts_labelled_examples_and_reports_a_task_without_any(tmp_path):
  """A task whose test labels are all missing: its metrics are NaN, `Evaluator.labelled` says
  0, and the log line, the report and per_task.csv say so instead of a bare NaN."""
  from dymu_jax.train import loop, parallel as parallel_lib
  from dymu_jax.evaluation import report as report_lib
  a = np.random.default_rng(0).normal(size=N)
  a[8:] = NAN  # the 4 test rows
  c = np.arange(N) % 3
  c[10] = 255  # one test row without a class
  path, _ = _table(tmp_path, a=a, c=c)
  train, test = _both(path)
  method = methods.build("static", train.tasks, model_options=OPTIONS)
  variables = method.init(jax.random.PRNGKey(0), train.get(np.arange(2)))
  evaluator = loop.Evaluator(method, parallel_lib.Parallel("mesh"), test, 4)
  results = evaluator(variables)
  per_task = results["default"]
  assert evaluator.labelled == {"default": {"a": 0, "b": 4, "c": 3}}
  assert all(math.isnan(v) for v in per_task["a"].values())
  assert all(math.isfinite(v) for v in per_task["b"].values())
  line = loop.describe_eval(per_task, method.tasks, evaluator.labelled["default"])
  assert line.startswith("a: no labelled example  b: mae="), line
  assert "nan" not in line

  run = {"method": "static", "workdir": "w", "step": 1, "tasks": ["a", "b", "c"],
         "kinds": {t.name: t.kind for t in method.tasks}, "eval": results,
         "labelled": evaluator.labelled,
         "summary": {"default": loop.summarise_eval(per_task, method.tasks,
                                                    evaluator.labelled["default"])}}
  report = report_lib.markdown(run, [])
  assert "| controls | task | labelled test examples | metrics |" in report
  assert "| default | a | 0 | no labelled test examples |" in report
  assert "| default | b | 4 | mae=" in report and "| default | c | 3 | accuracy=" in report
  assert "nan" not in report.lower()
  report_lib.write_per_task_csv(run, tmp_path)
  lines = (tmp_path / report_lib.PER_TASK_FILE).read_text().splitlines()
  assert lines[0] == "task,kind,labelled,mae,rmse,accuracy,note"
  assert lines[1] == "a,regression,0,,,,no labelled test examples"
  b = lines[2].split(",")
  assert b[:3] == ["b", "regression", "4"] and float(b[3]) == per_task["b"]["mae"]
  assert b[5:] == ["", ""]
  assert lines[3] == f"c,classification,3,,,{per_task['c']['accuracy']!r},"


def test_summaries_tell_unlabelled_from_non_finite_tasks():
  from dymu_jax.train import loop
  tasks = [tasks_lib.regression(f"t{i}") for i in range(10)]
  per_task = {t.name: {"mae": float(i), "rmse": float(i)} for i, t in enumerate(tasks)}
  per_task["t3"] = {"mae": NAN, "rmse": NAN}  # no labelled example
  per_task["t7"] = {"mae": float("inf"), "rmse": float("inf")}  # labelled, diverged
  labelled = {t.name: 5 for t in tasks}
  labelled["t3"] = 0
  summary = loop.summarise_eval(per_task, tasks, labelled)
  assert summary["unlabelled"] == ["t3"] and summary["not_finite"] == ["t7"]
  assert summary["labelled"] == {"total": 45, "min": 0, "median": 5.0, "max": 5}
  (mae,) = summary["primary_metrics"]
  # 0, 1, 2, 4, 5, 6, 8, 9: mean 35 / 8, median (4 + 5) / 2, worst (highest) 9.
  assert mae == {"metric": "mae", "higher_is_better": False, "tasks": 8, "mean": 4.375,
                 "median": 4.5, "worst": 9.0, "worst_task": "t9"}
  line = loop.describe_eval(per_task, tasks, labelled)
  assert line == ("10 tasks; mae over 8 tasks: mean=4.375, median=4.5, worst=9 (t9); 1 task(s) with "
                  "a non-finite metric (t7); 1 task(s) without a labelled example (t3); every "
                  "task in metrics.jsonl"), line
  # Without counts, both are taken for tasks without a labelled example (the former line).
  assert loop.summarise_eval(per_task, tasks)["unlabelled"] == ["t3", "t7"]
