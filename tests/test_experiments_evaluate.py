"""The evaluation and export CLIs on a tiny trained ECMT run (synthetic scenes, with batch norm
and dense decoders): the sweep's results and report, the budget check, the masked-vs-sliced
check, the encoder-score cache, the standalone export equal to the SuperNet, bad inputs, and
damaged run files.

A damaged newest checkpoint: `train` resumes from the previous intact step (and ends where an
undamaged run ends), `evaluate` and `export` use the previous step, each saying so in one
sentence; with no intact step, one sentence and exit status 2 (the damage kinds themselves are
covered in test_train_checkpoint.py). Truncated caches are rebuilt with a message, and a
truncated summary.json is named by `results` and rewritten by `train`."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dymu_jax import controls
from dymu_jax.evaluation import measures
from dymu_jax.methods import ecmt
from dymu_jax.metrics import pareto
from dymu_jax.models import serialize
from dymu_jax.models.widths import WidthConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--calibration_examples=32", "--score_examples=32", "--eval_batch_size=16"]


def run_cli(module, *args, timeout=900):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


TRAIN = ["--dataset=synthetic", "--image_size=16", "--num_train=128", "--num_test=32",
         "--method=ecmt", "--backbone=resnet_small", "--head_width=8", "--batch_size=16",
         "--checkpoint_every=1", "--log_every=1", "--noprogress"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 3-step ECMT run with checkpoints at steps 1, 2 and 3."""
  path = tmp_path_factory.mktemp("ecmt") / "run"
  result = run_cli("train", *TRAIN, "--steps=3", f"--workdir={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  return path


@pytest.fixture(scope="module")
def evaluation(workdir):
  result = run_cli("evaluate", f"--workdir={workdir}", "--budgets=0.05,0.3,0.6,1.0",
                   "--num_preferences=4", "--budget_check_points=6", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "eval" / "results.json") as f:
    return json.load(f), result.stdout


def test_evaluate_writes_the_sweep_and_its_measures(workdir, evaluation):
  results, stdout = evaluation
  names = ["segmentation", "depth", "normals", "edges"]
  assert results["tasks"] == names and results["num_preferences"] == 4
  assert results["skipped_budgets"] == [0.05]  # below the smallest SubNet: reported, skipped
  assert [row["budget"] for row in results["budgets"]] == [0.3, 0.6, 1.0]
  for row in results["budgets"]:
    assert row["within_budget"] and row["max_macs"] <= row["budget_macs"]
    assert len(row["points"]) == 4
    for point in row["points"]:
      assert set(point["metrics"]) == set(names)
      assert np.isclose(sum(point["preference"]), 1.0)
    assert row["hypervolume"] >= 0 and np.isfinite(row["uniformity"])
    assert np.isfinite(row["delta_m"]) and np.isfinite(row["mean_normalised_metric"])
  # The encoder depends on the budget only, never on the preference.
  for row in results["budgets"]:
    assert len({tuple(p["encoder"]) for p in row["points"]}) == 1
  check = results["budget_check"]
  assert check["over_budget"] == 0 and check["searches"] == 6 * 4
  # The masked evaluation equals the physically sliced, recalibrated SubNet.
  assert len(results["sliced_check"]) == 3
  assert max(c["max_metric_difference"] for c in results["sliced_check"]) < 1e-4
  report = (workdir / "eval" / "report.md").read_text()
  assert "| budget |" in report and "rank contr." in report and "Budget check" in report
  for plot in ("controllability.png", "cost_vs_budget.png"):
    assert plot in results["plots"] and (workdir / "eval" / plot).stat().st_size > 1000
    assert f"({plot})" in report
  assert "scoring 256 encoder configurations" in stdout
  scores = json.load(open(workdir / "encoder_scores.json"))["scores"]
  assert len(scores) == 256
  full = [s for e, s in scores if e == [1.0] * 4]
  assert full == [1.0]  # scores are relative to the SuperNet
  # The default grid for 4 tasks: Das-Dennis with the fewest divisions giving >= 4 points (the
  # 4 corners); the search caps decoders by the preference; one data-derived HV reference.
  grid = results["preference_grid"]
  assert grid["grid"] == "rays" and grid["divisions"] == 1 and grid["num_preferences"] == 4
  np.testing.assert_allclose([p["preference"] for p in results["budgets"][0]["points"]],
                             controls.das_dennis(4, 1))
  assert results["preference_cap"] is True
  assert "preference cap on" in report and "Das-Dennis grid" in report
  losses = np.concatenate([row["losses"] for row in results["budgets"]])
  np.testing.assert_allclose(results["hypervolume_reference"], pareto.default_reference(losses))
  assert results["hypervolume_reference_source"].startswith("just worse than every loss")
  assert f"{[round(x, 4) for x in results['hypervolume_reference']]}" in report


def test_ecmt_sweep_without_the_preference_cap_and_with_a_given_reference(workdir, evaluation,
                                                                        tmp_path):
  out = tmp_path / "uncapped"
  result = run_cli("evaluate", f"--workdir={workdir}", f"--output_dir={out}", "--budgets=0.6",
                   "--num_preferences=3", "--preference_grid=random", "--preference_seed=5",
                   "--noecmt_preference_cap", "--hv_reference=9,9,9,9", "--max_test_examples=16",
                   "--budget_check_points=2", "--noplots", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out / "results.json"))
  assert results["preference_cap"] is False
  assert results["preference_grid"]["grid"] == "random" and results["preference_seed"] == 5
  assert results["hypervolume_reference"] == [9.0] * 4
  assert results["hypervolume_reference_source"] == "--hv_reference"
  (row,) = results["budgets"]
  assert row["hypervolume"] == pytest.approx(pareto.hypervolume(row["losses"], [9.0] * 4))
  # The random grid is the former sweep, and each point is the uncapped search's SubNet.
  prefs = np.random.default_rng(5).dirichlet(np.ones(4), size=3)
  np.testing.assert_array_equal([p["preference"] for p in row["points"]], prefs)
  table = ecmt.CostTable.load(workdir / "cost_table.json")
  scores = {tuple(e): s for e, s in json.load(open(workdir / "encoder_scores.json"))["scores"]}
  for point, r in zip(row["points"], prefs):
    config = ecmt.search(r, 0.6, cost_table=table, scores=scores, preference_cap=False)
    assert (list(config.encoder), list(config.decoders)) == (point["encoder"], point["decoders"])
  report = (out / "report.md").read_text()
  assert "preference cap off" in report and "(--hv_reference)" in report


def test_the_preference_cap_flag_sets_the_deployment_option(workdir):
  """--preference_cap (and its former name --ecmt_preference_cap) reaches every search of the
  sweep and of its budget check through the method's `DEPLOY_OPTIONS`; unset, the method keeps
  its own default; evaluate calls no search but the method's."""
  import types  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  from experiments import runs  # pylint: disable=g-import-not-at-top
  from dymu_jax import runs as runs_lib  # pylint: disable=g-import-not-at-top
  run = types.SimpleNamespace(method=runs_lib.load_run(str(workdir)).method)
  absl_flags.FLAGS.unparse_flags()
  try:
    for argv, expected in ((["evaluate"], True), (["evaluate", "--noecmt_preference_cap"], False),
                           (["evaluate", "--nopreference_cap", "--decoder_reserve=0.2"], False)):
      absl_flags.FLAGS(argv)
      method = run.method.replace_options(**runs.deploy_options(run.method))
      assert method.preference_cap is expected
      assert method.decoder_reserve == (0.2 if "--decoder_reserve=0.2" in argv
                                        else ecmt.DECODER_RESERVE)
      absl_flags.FLAGS.unparse_flags()
  finally:
    absl_flags.FLAGS.unparse_flags()
  source = open(evaluate.__file__).read()
  assert "ecmt.search(" not in source.replace("`ecmt.search(preference_cap", "")


def test_cost_band_and_anchor_ratio_helpers():
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  assert evaluate.parse_cost_band(["0.6"]) == (0.0, 0.6)
  assert evaluate.parse_cost_band(["0.3", "0.7"]) == (0.3, 0.7)
  for bad in (["0.7", "0.3"], ["a"], ["0.1", "0.2", "0.3"]):
    with pytest.raises(ValueError, match="--cost_band"):
      evaluate.parse_cost_band(bad)
  sweep = {"losses": [[1, 3], [2, 2], [3, 1]],
           "points": [{"macs_fraction": f} for f in (0.9, 0.6, 0.4)]}
  assert measures.cost_band(sweep, [4, 4], (0.0, 0.6)) == {
      "min_macs_fraction": 0.0, "max_macs_fraction": 0.6, "hypervolume": 5.0, "num_points": 2}
  versus = measures.versus({"a": 0.9, "b": 2.0}, {"a": {"accuracy": 1.0},
                                                         "b": {"mae": 1.0}},
                                  {"a": "accuracy", "b": "mae"}, {"a": True, "b": False})
  assert versus["a"]["ratio"] == pytest.approx(0.9) and versus["b"]["ratio"] == 0.5
  assert versus["b"]["sweep_mean"] == 2.0 and versus["b"]["anchor"] == 1.0


def test_export_is_a_standalone_network_equal_to_the_supernet(workdir, evaluation, tmp_path):
  out = tmp_path / "subnet"
  result = run_cli("export", f"--workdir={workdir}", "--preference=0.7,0.1,0.1,0.1",
                   "--budget=0.6", f"--output_dir={out}", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "scoring" not in result.stdout  # the encoder scores come from the cache
  model, variables, info = serialize.load_network(out)
  assert info["macs"] <= ecmt.budget_macs(0.6, ecmt.CostTable.load(workdir / "cost_table.json"))
  config = WidthConfig(tuple(info["widths"]["encoder"]), tuple(info["widths"]["decoders"]))
  assert config.decoders[0] >= max(config.decoders[1:])  # the preferred task is not narrower

  # The SuperNet, from its checkpoint, with the exported (recalibrated) statistics written into
  # the leading channels: the exported parameters are its leading blocks, and the outputs of
  # the standalone network equal the SuperNet's at that configuration.
  from dymu_jax import runs as runs_lib  # pylint: disable=g-import-not-at-top
  run = runs_lib.load_run(str(workdir))
  full = run.variables
  for path, small in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    big = full["params"]
    for key in path:
      big = big[key.key]
    index = tuple(slice(0, n) for n in small.shape)
    np.testing.assert_array_equal(np.asarray(big)[index], np.asarray(small))

  stats = jax.tree.map(_write, full["batch_stats"], variables["batch_stats"])
  supernet_variables = {"params": full["params"], "batch_stats": stats}
  images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  expected = run.method.model.apply(supernet_variables, images, widths=config, train=False)
  got = model.apply(variables, images, train=False)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) < sum(
      x.size for x in jax.tree.leaves(full["params"]))


def _write(big, small):
  out = np.asarray(big).copy()
  out[tuple(slice(0, n) for n in small.shape)] = np.asarray(small)
  return out


@pytest.mark.parametrize("args, message", [
    (["--preference=0.8,0.3,0,0"], "is not on the simplex"),
    (["--preference=0.5,0.5"], "preference has 2 entries (0.5, 0.5) but there are 4 tasks"),
    (["--budget=0.01"], "is below the"),
    (["--budget=1234.5"], "--budget=1234.5: must be a fraction of the SuperNet's MACs in (0, 1] "
                          "or a whole number of MACs per example above 1"),
])
def test_export_bad_inputs_stop_with_one_sentence(workdir, evaluation, tmp_path, args, message):
  result = run_cli("export", f"--workdir={workdir}", f"--output_dir={tmp_path / 'x'}",
                   *SMALL, *args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_missing_or_untrained_workdir_stops_with_one_sentence(tmp_path):
  result = run_cli("evaluate", f"--workdir={tmp_path / 'nothing'}", timeout=120)
  assert result.returncode == 2 and "does not exist" in result.stderr
  (tmp_path / "empty").mkdir()
  result = run_cli("evaluate", f"--workdir={tmp_path / 'empty'}", timeout=120)
  assert result.returncode == 2 and "has no checkpoints folder" in result.stderr
  result = run_cli("export", timeout=120)
  assert result.returncode != 0 and "--workdir is required" in result.stderr


# ----------------------------------------------------------------------------------------------
# The results page.


def test_results_page_collects_the_run_with_its_commands(workdir, evaluation, tmp_path):
  output = tmp_path / "docs" / "results.md"
  missing = tmp_path / "unfinished"
  missing.mkdir()
  result = run_cli("results", f"--workdirs={workdir},{missing}", f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  page = output.read_text()
  assert "## synthetic" in page and f"### ECMT: `{workdir.name}`" in page
  rows = [line for line in page.splitlines() if line.startswith("| 0.3 |")
          or line.startswith("| 0.6 |") or line.startswith("| 1 |")]
  assert len(rows) == 3 and all("| yes |" in row for row in rows)
  # No flag file has these settings: the command spells the flags that differ from defaults.
  train_line = next(l for l in page.splitlines() if l.startswith("python -m experiments.train"))
  for flag in ("--method=ecmt", "--image_size=16", "--steps=3", "--head_width=8"):
    assert flag in train_line
  assert "--flagfile" not in train_line and "--progress" not in train_line
  assert f"python -m experiments.evaluate --workdir=" in page
  assert "no summary.json" in page  # the unfinished folder is listed, not fatal
  plot = output.parent / "results" / workdir.name / "controllability.png"
  assert plot.stat().st_size > 1000 and "(results/run/controllability.png)" in page


def test_results_matches_flag_files_and_computes_delta_m():
  from absl import flags as absl_flags
  from experiments import results  # defines the training flags
  from dymu_jax.results import collect, tables
  absl_flags.FLAGS.unparse_flags()
  absl_flags.FLAGS(["results"])
  flags_dir = os.path.join(ROOT, "experiments", "flags")
  path = os.path.join(flags_dir, "synthetic_static.flags")
  defaults = results.training_defaults()
  settings = collect.parse_flag_file(path, defaults)
  values = dict(defaults)
  values.update({k: collect.flag_value(v, defaults[k]) for k, v in settings.items()})
  assert collect.matching_flag_file(values, flags_dir, defaults) == path
  command = collect.train_command("/x/workdirs/run", values, flags_dir, defaults)
  assert "--flagfile=" in command and command.endswith("--workdir=/x/workdirs/run")
  values["steps"] = 7  # a setting of the file changed: no file matches, flags are spelled out
  assert collect.matching_flag_file(values, flags_dir, defaults) is None
  assert "--steps=7" in collect.train_command("/x/workdirs/run", values, flags_dir, defaults)
  # Delta_m of primary metrics (the first of each task): +10% accuracy, -10% error -> +10.
  got = tables.delta_m({"a": {"accuracy": 0.55}, "b": {"mae": 9.0, "rmse": 1.0}},
                       {"a": {"accuracy": 0.5}, "b": {"mae": 10.0, "rmse": 5.0}})
  assert got == pytest.approx(10.0)
  assert tables.delta_m({"a": {"accuracy": 0.5}}, {"b": {"accuracy": 0.5}}) is None


# -- damaged run files ----------------------------------------------------------------------------

FALLBACK = "is damaged ("


def _copy(source, tmp_path):
  """A copy of the run (with its evaluation caches), to damage."""
  copy = tmp_path / "run"
  assert (source / "encoder_scores.json").exists()  # the `evaluation` fixture ran
  shutil.copytree(source, copy)
  return copy


def _flip_largest_state_file(workdir, step: int) -> None:
  folder = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _break_record(workdir, step: int) -> None:
  with open(os.path.join(workdir, "checkpoints", str(step), "metadata", "metadata"), "w") as f:
    f.write('{"seed": 0, "run"')


def _fallback_lines(result) -> list[str]:
  return [line for line in result.stderr.splitlines() if FALLBACK in line]


def test_train_resumes_from_the_previous_intact_step(workdir, evaluation, tmp_path):
  workdir = _copy(workdir, tmp_path)
  reference = _copy(workdir, tmp_path / "undamaged")
  _flip_largest_state_file(workdir, 3)
  result = run_cli("train", *TRAIN, "--steps=4", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _fallback_lines(result)
  assert len(lines) == 1 and lines[0].startswith("Checkpoint 3 is damaged (state/"), lines
  assert "does not match its checksum" in lines[0] and "falling back to step 2" in lines[0]
  assert "Moved damaged checkpoint 3 to" in result.stderr
  assert os.path.isdir(workdir / "checkpoints_damaged" / "3")
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "3", "4"]

  # The same run as one that was never damaged: identical losses at every step.
  assert run_cli("train", *TRAIN, "--steps=4", f"--workdir={reference}").returncode == 0

  def losses(folder):
    with open(folder / "metrics.jsonl") as f:
      records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}

  assert losses(workdir) == losses(reference) and sorted(losses(workdir)) == [1, 2, 3, 4]


def test_evaluate_and_export_use_the_previous_intact_step(workdir, evaluation, tmp_path):
  workdir = _copy(workdir, tmp_path)
  _break_record(workdir, 3)
  result = run_cli("evaluate", f"--workdir={workdir}", "--budgets=1.0", "--num_preferences=2",
                   "--budget_check_points=2", "--noplots", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _fallback_lines(result)
  assert lines and lines[0].startswith("Checkpoint 3 is damaged (metadata/metadata: "), lines
  with open(workdir / "eval" / "results.json") as f:
    assert json.load(f)["step"] == 2
  assert os.path.isdir(workdir / "checkpoints" / "3")  # evaluation leaves the run's folder alone

  _flip_largest_state_file(workdir, 2)
  out = tmp_path / "exported"
  result = run_cli("export", f"--workdir={workdir}", "--preference=0.7,0.1,0.1,0.1",
                   "--budget=1.0", f"--output_dir={out}", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  assert _fallback_lines(result), result.stderr[-3000:]
  with open(out / "network.json") as f:
    assert json.load(f)["extra"]["checkpoint_step"] == 1  # 3 and 2 damaged


def test_no_intact_checkpoint_stops_with_one_sentence(workdir, evaluation, tmp_path):
  workdir = _copy(workdir, tmp_path)
  _flip_largest_state_file(workdir, 3)
  _break_record(workdir, 2)
  shutil.rmtree(workdir / "checkpoints" / "1" / "state")
  result = run_cli("evaluate", f"--workdir={workdir}", "--budgets=1.0", "--num_preferences=2",
                   "--noplots", *SMALL)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert errors[0].startswith("error: No intact checkpoint in ") and all(
      f"checkpoint {step} is damaged" in errors[0] for step in (1, 2, 3)), errors
  assert "Traceback" not in result.stderr


def test_truncated_caches_are_rebuilt_and_a_truncated_summary_rewritten(workdir, evaluation,
                                                                         tmp_path):
  workdir = _copy(workdir, tmp_path)
  for name in ("cost_table.json", "encoder_scores.json", "summary.json"):
    with open(workdir / name, "w") as f:
      f.write('{"signature": "abc", "sc')  # what a kill mid-write left before atomic writes
  result = run_cli("evaluate", f"--workdir={workdir}", "--budgets=1.0", "--num_preferences=2",
                   "--budget_check_points=2", "--noplots", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{workdir / 'cost_table.json'} is damaged (" in result.stdout
  assert "rebuilding the cost table" in result.stdout
  assert f"{workdir / 'encoder_scores.json'} is damaged (" in result.stdout
  assert "scoring again" in result.stdout
  for name in ("cost_table.json", "encoder_scores.json"):
    with open(workdir / name) as f:
      json.load(f)  # rewritten whole

  output = tmp_path / "results.md"
  result = run_cli("results", f"--workdirs={workdir}", f"--output={output}")
  assert f"{workdir}: {workdir / 'summary.json'} is damaged (" in result.stdout + result.stderr

  result = run_cli("train", *TRAIN, "--steps=3", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    assert json.load(f)["steps"] == 3
