"""Tabular data (`--dataset=arrays`, feature vectors, `--backbone=mlp`) through the CLIs.

* every method that builds an MLP (static and ECMT training are in test_models_mlp.py; DYMU's
  branched streams are covered elsewhere): `experiments.train`, then `experiments.evaluate`
  with its smallest sweep, on one shared tabular file;
* ECMT's evaluation (the SubNet search) and `experiments.export`, whose exported network
  loads alone (`serialize.load_network`) and predicts on standardised rows;
* a one-task-per-example set of 100 tasks (a `task_id` column) trained and evaluated: the
  evaluation report summarises (mean, median, worst of the primary metric, labelled test
  examples) instead of listing every task, every task goes to `eval/per_task.csv`, and a task
  without any labelled test example reads "no labelled test examples" instead of NaN.

Sizes are tiny (hidden layers of 16 units, 30 steps) so that the whole file stays within a few
minutes on a shared 2-core CPU; most of that is compiling (the 100 heads above all).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dymu_jax import data
from dymu_jax.models import serialize

from test_models_mlp import D, TASK_SPEC, write_tabular

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("linear", "wave", "sign")
STEPS = 30
TRAIN = ["--dataset=arrays", f"--task_spec={TASK_SPEC}", "--backbone=mlp", "--head_width=16",
         f"--steps={STEPS}", "--batch_size=32", "--learning_rate=3e-3", "--log_every=1",
         f"--checkpoint_every={STEPS}", "--eval_every=0", "--noprogress"]
HIDDEN = '"hidden=(16,16)"'
# The smallest sweep `evaluate` offers: 2 preferences (the fewest for rank correlations; the
# Das-Dennis grid of 3 tasks then has its 3 corners), no plots.
SWEEP = ["--num_preferences=2", "--noplots"]
# ECMT: one budget, one budget-check point, few held-out rows for calibration and scoring.
ECMT_SWEEP = [*SWEEP, "--budgets=1.0", "--budget_check_points=1", "--calibration_examples=32",
              "--score_examples=32"]
NO_LABELS = "no labelled test examples"


def cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def check_ran(result):
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  return result


def train_losses(workdir):
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [r["loss"] for r in records if r["split"] == "train"]


def summary_tasks(workdir):
  summary = json.load(open(workdir / "summary.json"))
  return {label: set(per_task) for label, per_task in summary["eval"].items()}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  """The tabular file of test_models_mlp.py (6 features on very different scales, two
  regression targets and a binary class), shared by every run of this file."""
  return write_tabular(tmp_path_factory.mktemp("tabular") / "table.npz")


def check_export(table, workdir, method, tmp_path):
  """`experiments.export` through the method's deployment: a preference for PHN, nothing for
  a fixed network (single-task: its N networks in one folder); a control the method does not
  take stops with one sentence."""
  out = tmp_path / f"{method}_export"
  steer = ["--preference=0.6,0.2,0.2"] if method.startswith("phn") else []
  result = cli("export", f"--workdir={workdir}", *steer, f"--output_dir={out}")
  check_ran(result)
  assert f"exported the {method} network: " in result.stdout
  model, variables, info = serialize.load_network(out)
  assert info["method"] == method and info["macs"] > 0
  if method.startswith("phn"):
    assert info["preference"] == pytest.approx({"linear": 0.6, "wave": 0.2, "sign": 0.2})
  rows = np.load(table)["inputs"][:4].astype(np.float32)  # raw rows: standardised inside
  predictions = jax.jit(model.apply)(variables, rows)
  assert {k: v.shape for k, v in predictions.items()} == {"linear": (4, 1), "wave": (4, 1),
                                                          "sign": (4, 2)}
  assert all(np.all(np.isfinite(v)) for v in predictions.values())
  wrong = "--budget=0.5" if method.startswith("phn") else "--preference=0.5,0.25,0.25"
  result = cli("export", f"--workdir={workdir}", wrong, f"--output_dir={out}_wrong")
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert f"does not steer a '{method}' run, which takes " in errors[0], errors


# ---------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", ["single_task", "gradsplit", "pcgrad", "phn", "phn_bn"])
def test_every_method_trains_and_evaluates_tabular_data_through_the_cli(table, tmp_path, method):
  workdir = tmp_path / method
  hidden = HIDDEN + (",batch_norm=true" if method == "phn_bn" else "")  # PHN-BN steers BN
  extra = ["--gradsplit_warmup_steps=10"] if method == "gradsplit" else []
  check_ran(cli("train", *TRAIN, f"--data_dir={table}", f"--backbone_options={hidden}",
                f"--method={method}", *extra, f"--workdir={workdir}"))
  losses = train_losses(workdir)
  assert len(losses) == STEPS and np.all(np.isfinite(losses)), losses
  if not method.startswith("phn"):  # PHN draws a preference ray per step: not monotone
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  for label, names in summary_tasks(workdir).items():
    assert names == set(TASKS), (label, names)

  # The training batch size: the fixed methods' evaluation program is the one the run compiled
  # (JAX's persistent compilation cache).
  result = check_ran(cli("evaluate", f"--workdir={workdir}", *SWEEP, "--eval_batch_size=32"))
  results = json.load(open(workdir / "eval" / "results.json"))
  assert results["method"] == method and results["tasks"] == list(TASKS)
  check_export(table, workdir, method, tmp_path)
  assert (workdir / "eval" / "report.md").is_file()
  if method.startswith("phn"):
    (sweep,) = results["sweeps"]
    assert len(sweep["points"]) == 3  # the 3 corners of the simplex
    for point in sweep["points"]:
      assert set(point["metrics"]) == set(TASKS)
      assert all(math.isfinite(v) for m in point["metrics"].values() for v in m.values())
    assert np.all(np.isfinite(sweep["losses"]))
    return
  assert set(results["eval"]["default"]) == set(TASKS)
  num_test = len(data.load(data.DataConfig(name="arrays", data_dir=str(table),
                                            task_spec=TASK_SPEC), "test"))
  assert results["labelled"]["default"] == dict.fromkeys(TASKS, num_test)  # every row labelled
  assert results["kinds"] == {"linear": "regression", "wave": "regression",
                              "sign": "classification"}
  rows = list(csv.DictReader(open(workdir / "eval" / "per_task.csv")))
  assert [r["task"] for r in rows] == list(TASKS)
  assert all(r["labelled"] == str(num_test) and not r["note"] for r in rows)
  assert float(rows[2]["accuracy"]) == results["eval"]["default"]["sign"]["accuracy"]
  assert rows[0]["mae"] and not rows[2]["mae"]  # a column per metric name, empty where absent
  assert f"| default | sign | {num_test} | accuracy=" in result.stdout  # 3 tasks: one row each
  if method == "gradsplit":
    assert results["routing"]["warmup_complete"]


# ---------------------------------------------------------------------------- ECMT and export

def test_ecmt_searches_and_exports_a_tabular_subnet(table, tmp_path):
  workdir = tmp_path / "ecmt"
  check_ran(cli("train", *TRAIN, f"--data_dir={table}", f"--backbone_options={HIDDEN}",
                "--method=ecmt", "--num_subnets=2", f"--workdir={workdir}"))
  losses = train_losses(workdir)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses

  check_ran(cli("evaluate", f"--workdir={workdir}", *ECMT_SWEEP))
  results = json.load(open(workdir / "eval" / "results.json"))
  assert results["method"] == "ecmt" and results["tasks"] == list(TASKS)
  (row,) = results["budgets"]
  assert row["budget"] == 1.0 and row["within_budget"] and len(row["points"]) == 3
  for point in row["points"]:
    assert set(point["metrics"]) == set(TASKS)
  assert results["budget_check"]["over_budget"] == 0
  assert all(check["max_metric_difference"] < 1e-4 for check in results["sliced_check"])

  out = tmp_path / "exported"
  result = check_ran(cli("export", f"--workdir={workdir}", "--preference=0.6,0.2,0.2",
                         "--budget=0.5", "--calibration_examples=32", "--score_examples=32",
                         f"--output_dir={out}"))
  assert f"to {out}" in result.stdout
  model, variables, info = serialize.load_network(out)
  assert info["budget"] == 0.5 and info["macs"] <= 0.5 * info["supernet_macs"]
  assert info["preference"] == pytest.approx({"linear": 0.6, "wave": 0.2, "sign": 0.2})
  stats = {k: np.asarray(v, np.float32) for k, v in info["input_stats"].items()}
  assert stats["mean"].shape == stats["std"].shape == (D,)
  # The exported network takes raw rows: it standardises them itself with the run's statistics.
  rows = np.load(table)["inputs"][:5].astype(np.float32)
  np.testing.assert_allclose(model.pixel_mean, stats["mean"], rtol=1e-6)
  predictions = jax.jit(model.apply)(variables, rows)
  assert {k: v.shape for k, v in predictions.items()} == {"linear": (5, 1), "wave": (5, 1),
                                                          "sign": (5, 2)}
  assert all(np.all(np.isfinite(v)) for v in predictions.values())
  bare = dataclasses.replace(model, pixel_mean=None, pixel_std=None)  # inputs used as given
  expected = jax.jit(bare.apply)(variables, (rows - stats["mean"]) / stats["std"])
  for name in predictions:
    np.testing.assert_allclose(predictions[name], expected[name], rtol=1e-4, atol=1e-5)
  # Regression tasks carry the targets' standardisation (training split mean and std).
  linear = model.tasks[0]
  assert linear.name == "linear" and linear.label_scale != 1.0 and linear.label_offset != 0.0


# ---------------------------------------------------------------------------- 100 tasks

GROUPS = 100
UNLABELLED = "g099"  # every row of this group is in the training split


def write_one_task_per_row(path, per_group=16, test_per_group=3, seed=0):
  """100 regression tasks, one per row (`task_id`): y = w_g . x + b_g + noise, as in
  test_missing_labels.py. `split` puts `test_per_group` rows of every group in the test split,
  except group g099, whose rows are all for training: it has no labelled test example."""
  rng = np.random.default_rng(seed)
  n = GROUPS * per_group
  group = np.arange(n) % GROUPS
  x = rng.normal(size=(n, D))
  w = rng.normal(size=D) + 0.3 * rng.normal(size=(GROUPS, D))
  bias = rng.normal(size=GROUPS)
  y = np.einsum("nd,nd->n", x, w[group]) + bias[group] + 0.05 * rng.normal(size=n)
  names = [f"g{g:03d}" for g in range(GROUPS)]
  test = (np.arange(n) < GROUPS * test_per_group) & (group != names.index(UNLABELLED))
  np.savez(path, inputs=x.astype(np.float32), task_id=np.array(names)[group],
           split=np.where(test, "test", "train"),
           **{name: y.astype(np.float32) for name in names})
  return path, names


def test_one_task_per_row_with_100_tasks_trains_and_evaluates_through_the_cli(tmp_path):
  path, names = write_one_task_per_row(tmp_path / "groups.npz")
  workdir = tmp_path / "groups"
  spec = ",".join(f"{n}:regression" for n in names)
  result = check_ran(cli(
      "train", "--dataset=arrays", f"--data_dir={path}", f"--task_spec={spec}",
      "--backbone=mlp", '--backbone_options="hidden=(16,)"', "--head_width=4",
      # SGD and narrow layers keep the compiled programs small; still, compiling
      # the initialisation of 100 heads takes the longest.
      "--method=static", "--steps=20", "--batch_size=64", "--optimizer=sgd",
      "--learning_rate=1e-2",
      "--log_every=5", "--checkpoint_every=20", "--eval_every=0", "--noprogress",
      f"--workdir={workdir}"))
  # The evaluation log line summarises 100 tasks, naming the one without test labels.
  (line,) = [l for l in result.stdout.splitlines() if l.startswith("eval @ step 20")]
  assert "100 tasks; mae over 99 tasks: mean=" in line, line
  assert f"1 task(s) without a labelled example ({UNLABELLED})" in line, line
  # So does the final printout: one summary line, not a line per task.
  assert not [l for l in result.stdout.splitlines() if l.startswith("g050:")], result.stdout
  assert any(l.startswith("[default] 100 tasks; mae over 99 tasks")
             for l in result.stdout.splitlines()), result.stdout
  assert np.all(np.isfinite(train_losses(workdir)))
  assert summary_tasks(workdir) == {"default": set(names)}

  result = check_ran(cli("evaluate", f"--workdir={workdir}", "--noplots",
                         "--eval_batch_size=64"))  # as in training: the same compiled program
  folder = workdir / "eval"
  report = (folder / "report.md").read_text()
  assert report in result.stdout  # what is printed is the report
  assert "| default | g050 |" not in report and "g050" not in report  # no row per task
  assert "tasks g000, g001, g002, ..., g098, g099 (100 tasks)." in report
  assert "100 tasks at controls `default`; every task's metrics and labelled test examples " \
         "in `per_task.csv`." in report
  assert "| mae (lower is better) | 99 | " in report
  assert ("Labelled test examples per task: 297 in all, min 0, median 3, max 3." in report)
  assert f"1 task(s) with {NO_LABELS} (left out of the summary): {UNLABELLED}." in report
  assert len(report.splitlines()) < 30, report

  results = json.load(open(folder / "results.json"))
  assert results["per_task_file"] == "per_task.csv"
  counts = results["labelled"]["default"]
  assert counts[UNLABELLED] == 0 and {counts[n] for n in names if n != UNLABELLED} == {3}
  (summary,) = results["summary"]["default"]["primary_metrics"]
  maes = [results["eval"]["default"][n]["mae"] for n in names if n != UNLABELLED]
  assert summary["metric"] == "mae" and summary["tasks"] == 99
  np.testing.assert_allclose([summary["mean"], summary["median"], summary["worst"]],
                             [np.mean(maes), np.median(maes), np.max(maes)], rtol=1e-9)
  assert summary["worst_task"] == names[int(np.argmax(maes))]
  assert results["summary"]["default"]["unlabelled"] == [UNLABELLED]

  with open(folder / "per_task.csv") as f:
    assert f.readline().strip() == "task,kind,labelled,mae,rmse,note"
    f.seek(0)
    rows = {r["task"]: r for r in csv.DictReader(f)}
  assert list(rows) == names
  assert rows[UNLABELLED] == {"task": UNLABELLED, "kind": "regression", "labelled": "0",
                              "mae": "", "rmse": "", "note": NO_LABELS}
  for name in names[:-1]:
    row = rows[name]
    assert row["labelled"] == "3" and not row["note"]
    assert float(row["mae"]) == results["eval"]["default"][name]["mae"]
    assert math.isfinite(float(row["rmse"]))
