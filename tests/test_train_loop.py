"""The training loop on the toy method: learning, logs, evaluation, compile count, guard."""

import dataclasses
import json

import chex
import jax
import numpy as np
import pytest

from dymu_jax import train as train_lib
from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import loop
from dymu_jax.train import parallel as parallel_lib
import toy_method

STEPS = 40
CONTROLS = (None, {"temperature": -1.0})  # -1 flips the class ranking: a different accuracy


def _config(**overrides):
  base = dict(steps=STEPS, batch_size=16, seed=1, learning_rate=1e-2, log_every=1,
              eval_every=20, checkpoint_every=20, eval_batch_size=32, progress=False)
  return train_lib.TrainConfig(**{**base, **overrides})


def _records(workdir):
  with open(workdir / loop.METRICS_FILE, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("loop")
  result = train_lib.train(toy_method.ToyMethod(controls=CONTROLS), toy_method.make_source(),
                           toy_method.make_source("test", n=70), _config(), workdir,
                           run_metadata={"flags": {"dataset": "toy"}})
  return workdir, result


def test_short_run_lowers_the_loss(short_run):
  workdir, result = short_run
  train = [r for r in _records(workdir) if r["split"] == "train"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  # Task losses without the per-step random weights, first 5 steps against the last 5.
  task_sum = np.array([r["loss/third"] + r["loss/brightness"] for r in train])
  assert task_sum[-5:].mean() < 0.7 * task_sum[:5].mean()
  assert set(train[0]) >= {"loss", "loss/third", "loss/brightness", "grad_norm",
                           "learning_rate", "steps_per_second"}
  assert int(result.state.step) == STEPS and int(result.state.nonfinite_step) == -1


def test_evaluations_per_control_in_metrics_jsonl(short_run):
  workdir, result = short_run
  evals = [r for r in _records(workdir) if r["split"] == "eval"]
  assert [(r["step"], r["label"]) for r in evals] == [
      (20, "default"), (20, "temperature=-1"), (40, "default"), (40, "temperature=-1")]
  for record in evals:
    assert set(record) == {"step", "split", "label", "third/accuracy", "brightness/mae",
                           "brightness/rmse"}
  final = result.eval_metrics
  assert set(final) == {"default", "temperature=-1"}
  assert final["default"]["third"]["accuracy"] > 0.5  # chance is 1/3
  assert final["temperature=-1"]["third"]["accuracy"] < 1 / 3
  assert final["default"]["brightness"] == final["temperature=-1"]["brightness"]
  assert evals[-2]["third/accuracy"] == pytest.approx(final["default"]["third"]["accuracy"])
  # 70 test examples in batches of 32: the padded third batch must not count twice.
  assert round(final["default"]["third"]["accuracy"] * 70) == pytest.approx(
      final["default"]["third"]["accuracy"] * 70, abs=1e-6)
  # Every test example carries both labels (`Evaluator.labelled`; padding not counted).
  assert result.eval_labelled == {label: {"third": 70, "brightness": 70} for label in final}


def test_train_step_compiled_once(short_run):
  _, result = short_run
  assert result.step_compiles == 1


def test_checkpoints_hold_state_and_run_record(short_run):
  workdir, result = short_run
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    assert ckpt.all_steps() == [20, 40]
    metadata = ckpt.metadata()
  assert metadata["step"] == STEPS and metadata["seed"] == 1
  assert metadata["run"] == {"flags": {"dataset": "toy"}}
  assert 0 < metadata["train_seconds"] <= result.seconds  # the time up to the last checkpoint
  assert metadata["config"]["parallel"] == "mesh" and metadata["config"]["steps"] == STEPS
  state, _ = checkpoint_lib.restore_latest(workdir, checkpoint_lib.abstract_like(result.state))
  chex.assert_trees_all_equal(parallel_lib.to_host(state.params),
               parallel_lib.to_host(result.state.params))


def test_finished_run_resumes_without_training(short_run):
  workdir, result = short_run
  again = train_lib.train(toy_method.ToyMethod(), toy_method.make_source(), None, _config(),
                          workdir)
  assert again.resumed_from == STEPS and again.step_compiles == 0
  with checkpoint_lib.Checkpointer(workdir) as ckpt:
    saved_seconds = ckpt.metadata()["train_seconds"]
  # A resumed run's time includes that of the processes before it (up to its checkpoint).
  assert again.seconds >= saved_seconds
  chex.assert_trees_all_equal(parallel_lib.to_host(again.state.params),
               parallel_lib.to_host(result.state.params))
  with pytest.raises(ValueError, match="holds a run with seed 1, not 2; resume with the same "
                                       "seed or use a new workdir."):
    train_lib.train(toy_method.ToyMethod(), toy_method.make_source(), None, _config(seed=2),
                    workdir)
  narrow = toy_method.ToyMethod()
  narrow.net = toy_method.ToyNet(hidden=8)
  with pytest.raises(ValueError, match=(
      r"Checkpoint 40 in .* does not fit this method and optimizer \(model_state/batch_stats/"
      r"BatchNorm_0/mean is float32\[16\] there and float32\[8\] here; .*\); resume with "
      r"the run's own settings or use a new workdir\.")):
    train_lib.train(narrow, toy_method.make_source(), None, _config(), workdir)


def test_non_finite_loss_stops_with_step_and_task(tmp_path):
  method = toy_method.ToyMethod(nan_at_step=7, nan_task=0)
  config = _config(steps=20, checkpoint_every=3, log_every=5, eval_every=0)
  with pytest.raises(FloatingPointError, match=(
      r"^Training stopped because the loss of task 'third' became non-finite \(NaN or "
      r"infinity\) at step 7; nothing after it was saved and the newest checkpoint \(step 6\) "
      r"is intact\.$")):
    train_lib.train(method, toy_method.make_source(), None, config, tmp_path)
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    assert max(ckpt.all_steps()) == 6
  par = parallel_lib.Parallel("mesh")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=par.replicated),
      jax.eval_shape(lambda: _fresh_state(method)))
  state, metadata = checkpoint_lib.restore_latest(tmp_path, abstract)
  assert int(state.step) == 6 and metadata["step"] == 6
  assert int(state.nonfinite_step) == -1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(parallel_lib.to_host(state.params)))
  assert [r["step"] for r in _records(tmp_path)] == [5]  # stopped at the boundary after step 7


def _fresh_state(method):
  optimizer = _config().make_optimizer()
  sample = toy_method.make_source().get(np.arange(16))
  return train_lib.state.init_fn(method, optimizer)(jax.random.PRNGKey(0), sample)


def test_config_and_evaluation_errors():
  with pytest.raises(ValueError, match="TrainConfig.steps must be >= 1, got 0."):
    train_lib.TrainConfig(steps=0)
  with pytest.raises(ValueError, match=r"TrainConfig.eval_every must be >= 0 \(0 = default\)"):
    train_lib.TrainConfig(eval_every=-1)
  with pytest.raises(ValueError, match="Unknown parallel mode 'spmd'"):
    train_lib.TrainConfig(parallel="spmd")
  with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
    dataclasses.replace(_config(), optimizer="lamb").make_optimizer()
  only_third = toy_method.make_source("test", n=8).with_tasks("third")
  with pytest.raises(ValueError, match="The evaluation data toy test has no labels for task"
                                       r"\(s\) brightness."):
    loop.Evaluator(toy_method.ToyMethod(), parallel_lib.Parallel("mesh"), only_third, 8)


def test_control_labels():
  assert loop.control_label(None) == "default"
  assert loop.control_label({"preference": np.array([0.7, 0.3]), "budget": 0.5}) == (
      "budget=0.5;preference=0.7,0.3")
  assert loop.control_label({"widths": (1, 2)}) == "widths=1,2"


def test_metric_writer_jsonl_and_tensorboard(tmp_path, monkeypatch):
  scalars = []

  class FakeSummaryWriter:
    def add_scalar(self, tag, value, step):
      scalars.append((tag, value, step))

    def flush(self):
      pass

    def close(self):
      scalars.append("closed")

  monkeypatch.setattr(loop, "_tensorboard_writer", lambda logdir: FakeSummaryWriter())
  writer = loop.MetricWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 0.5, "loss/a": float("nan")})
  writer.write(4, "eval", {"a/accuracy": 0.25}, label="default")
  writer.close()
  assert _records(tmp_path) == [
      {"step": 3, "split": "train", "loss": 0.5, "loss/a": None},  # NaN is written as null
      {"step": 4, "split": "eval", "label": "default", "a/accuracy": 0.25}]
  assert scalars[0] == ("train/loss", 0.5, 3)  # NaN stays out of TensorBoard (a gap)
  assert scalars[1:] == [("eval/default/a/accuracy", 0.25, 4), "closed"]
  silent = loop.MetricWriter(str(tmp_path / "other"), enabled=False)  # processes other than 0
  silent.write(1, "train", {"loss": 1.0})
  assert not (tmp_path / "other").exists()
