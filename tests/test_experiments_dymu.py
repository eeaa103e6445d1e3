"""DYMU and PHN through the CLIs: a tiny four-stage DYMU run on Multi-MNIST (pretrained trunk,
anchor, edge, weight) trained with `--dymu_stage=all` and evaluated (sweeps at c = 0 and 1, costs, affinity files, report), its
resume, a tiny PHN run and its sweep, and bad DYMU flags.

Everything is tiny (16 px images, a 4-6-8 channel LeNet, a few steps) so that the file stays
short on a shared CPU; what is checked is the plumbing, not the learning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dymu_jax import controls as controls_lib
from dymu_jax.metrics import pareto
from dymu_jax.methods.dymu import stages as dymu_stages
from dymu_jax import runs as runs_lib
from experiments import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = '--backbone_options="conv_channels=(4,6)","kernel_sizes=(5,3)",fc_features=8'
HYPER = ["--dymu_edge_hidden=16,16", "--dymu_weight_hidden=16", "--dymu_embedding_features=8",
         "--dymu_affinity_images=32", "--dymu_affinity_normalisation=pair",
         "--dymu_temperature_every=1"]
EVAL = ["--eval_batch_size=16", "--num_preferences=4", "--cost_preferences=64"]


def run_cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def data_args(shared_data) -> list[str]:
  return ["--dataset=multi_mnist", f"--data_dir={os.path.join(shared_data, 'mnist')}",
          "--num_train=128", "--num_test=48", "--image_size=16", "--backbone=lenet", BACKBONE,
          "--batch_size=16", "--noprogress", "--log_every=1", "--checkpoint_every=1"]


def dymu_args(shared_data, workdir) -> list[str]:
  return [*data_args(shared_data), "--method=dymu", *HYPER, "--dymu_stage_steps=3,3,2",
          "--dymu_pretrain_steps=2", "--dymu_validation_examples=32",
          "--dymu_anchor_learning_rate=3e-4", f"--workdir={workdir}"]


def train_records(path) -> list[dict]:
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("split") == "train"]


@pytest.fixture(scope="module")
def dymu_run(tmp_path_factory, shared_data):
  workdir = tmp_path_factory.mktemp("dymu") / "run"
  result = run_cli("train", *dymu_args(shared_data, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


@pytest.fixture(scope="module")
def dymu_eval(dymu_run):
  workdir, _ = dymu_run
  result = run_cli("evaluate", f"--workdir={workdir}", *EVAL)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "eval" / "results.json") as f:
    return json.load(f)


def test_all_stages_train_in_their_folders_with_affinity_files(dymu_run):
  workdir, stdout = dymu_run
  for stage, steps in (("pretrain", 2), ("anchor", 3), ("edge", 3), ("weight", 2)):
    assert [r["step"] for r in train_records(workdir / stage / "metrics.jsonl")] == list(
        range(1, steps + 1)), stage
    # Each stage's saved flags describe it alone: load_run rebuilds it as that stage.
    values = runs_lib.saved_metadata(str(workdir / stage))["run"]["flags"]
    assert values["dymu_stage"] == stage and values["steps"] == steps
  assert "omega" in train_records(workdir / "edge" / "metrics.jsonl")[0]
  summary = json.load(open(workdir / "summary.json"))
  assert summary["flags"]["dymu_stage"] == "all" and set(summary["stages"]) == {
      "pretrain", "anchor", "edge", "weight"}
  assert summary["steps"] == 10 and summary["eval"] == summary["stages"]["weight"]["eval"]
  # The pretrain and anchor stages trained without the 32 held-out examples, the anchor at its
  # own learning rate, from the trunk.
  assert "DYMU stage pretrain: 2 steps at learning rate 0.001 on 96 training examples" in stdout
  assert "DYMU stage anchor: 3 steps at learning rate 0.0003 on 96 training examples" in stdout
  assert "DYMU stage edge: 3 steps at learning rate 0.001 on 128 training examples" in stdout
  anchor_source = runs_lib.saved_metadata(str(workdir / "anchor"))["run"]["stage_source"]
  assert anchor_source == {"pretrain_dir": str(workdir / "pretrain"), "pretrain_step": 2}
  # The anchor report: divergence per block and the probe trees, on the held-out examples.
  report = json.load(open(workdir / "anchor" / dymu_stages.ANCHOR_REPORT))
  assert report["examples"] == 32 and len(report["divergence"]) == 3
  assert len(report["probes"]) == 12  # 6 one-edge changes, 6 prefix-sharing trees
  for d in report["divergence"]:  # fine-tuned copies of one trunk: close, not identical
    assert 0 < d[0][1] < 0.5 and d[0][1] == d[1][0]
  assert "| block 0 shared (stream 0) |" in (workdir / "anchor" / dymu_stages.ANCHOR_REPORT_MD
                                             ).read_text()
  assert set(summary["eval"]) == {"preference=0.5,0.5;resource=0",
                                  "preference=0.5,0.5;resource=1"}
  # The edge stage wrote A and w (and a heat map); the weight stage copied them.
  record = json.load(open(workdir / "edge" / dymu_stages.AFFINITY_FILE))
  a = np.asarray(record["affinity"])
  assert record["tasks"] == ["left", "right"] and record["normalisation"] == "pair"
  assert record["num_images"] == 32 and a.shape == (2, 2)
  np.testing.assert_allclose(np.diag(a), 1.0, atol=1e-6)
  assert 0 <= a[0, 1] < 1 and np.isclose(a[0, 1], a[1, 0])  # pair normalisation: graded
  # w = 1 / the anchor's held-out losses, scaled to mean 1.
  inverse = 1.0 / np.asarray(record["anchor_task_losses"])
  np.testing.assert_allclose(record["task_weights"], inverse / inverse.mean(), rtol=1e-6)
  assert record["task_weight_source"] == "held-out"
  assert json.load(open(workdir / "weight" / dymu_stages.AFFINITY_FILE)) == record
  for stage in ("edge", "weight"):
    assert (workdir / stage / dymu_stages.AFFINITY_PLOT).stat().st_size > 1000
  assert "task affinity A =" in stdout


def test_evaluate_sweeps_both_resources_with_and_without_weight_hypernet(dymu_run, dymu_eval):
  workdir, _ = dymu_run
  results = dymu_eval
  assert results["method"] == "dymu" and results["stage"] == "weight"
  assert results["workdir"] == str(workdir / "weight") and results["step"] == 2
  assert results["variants"] == ["edge", "weight"] and results["resources"] == [0.0, 1.0]
  sweeps = {(s["variant"], s["resource"]): s for s in results["sweeps"]}
  assert set(sweeps) == {("edge", 0.0), ("edge", 1.0), ("weight", 0.0), ("weight", 1.0)}
  # The default grid: PHN's rays for 2 tasks; the default HV reference of a 2-task Multi-MNIST
  # run is (2, 2) (the tiny run's losses may all lie past it: HV 0 is then right).
  assert results["preference_grid"]["grid"] == "rays"
  assert results["hypervolume_reference"] == [2.0, 2.0]
  assert "Multi-MNIST default (2, 2)" in results["hypervolume_reference_source"]
  assert results["cost_band"] == {"min_macs_fraction": 0.0, "max_macs_fraction": 0.6}
  for sweep in sweeps.values():
    assert len(sweep["points"]) == 4 and np.asarray(sweep["losses"]).shape == (4, 2)
    np.testing.assert_allclose([p["preference"] for p in sweep["points"]],
                               controls_lib.phn_rays(4), rtol=1e-6)
    assert sweep["hypervolume"] == pytest.approx(pareto.hypervolume(sweep["losses"], [2, 2]))
    assert np.isfinite(sweep["uniformity"])
    assert 1 <= sweep["distinct_trees"] <= 4 and np.isfinite(sweep["delta_m"])
    # Matched cost: the HV of the trees using at most 60 % of the anchor's MACs, and each
    # task's mean accuracy over the sweep against the anchor's.
    band = sweep["cost_band"]
    fractions = [p["macs_fraction"] for p in sweep["points"]]
    assert band["num_points"] == sum(f <= 0.6 + 1e-9 for f in fractions)
    assert band["hypervolume"] == pytest.approx(pareto.cost_band_hypervolume(
        sweep["losses"], fractions, [2, 2], 0.6)[0])
    assert sweep["mean_macs_fraction"] == pytest.approx(np.mean(fractions))
    for name in ("left", "right"):
      versus = sweep["versus_anchor"][name]
      anchor = results["anchor_metrics"][name]["accuracy"]
      assert versus["anchor"] == pytest.approx(anchor)
      assert versus["sweep_mean"] == pytest.approx(sweep["mean_metric"][name])
      assert versus["ratio"] == pytest.approx(versus["sweep_mean"] / anchor)
    assert sweep["min_ratio_to_anchor"] == pytest.approx(
        min(v["ratio"] for v in sweep["versus_anchor"].values()))
    for point in sweep["points"]:
      assert 0 < point["macs_fraction"] <= 1 and 0 < point["params_fraction"] <= 1
      assert np.isclose(sum(point["preference"]), 1.0)
      assert set(point["metrics"]) == {"left", "right"}
  # The same preferences at every level, and the same trees with or without the weight
  # hypernetwork (it only shifts batch norms).
  for c in (0.0, 1.0):
    edge, weight = sweeps[("edge", c)], sweeps[("weight", c)]
    assert [p["preference"] for p in edge["points"]] == [p["preference"] for p in
                                                         weight["points"]]
    assert [p["tree"] for p in edge["points"]] == [p["tree"] for p in weight["points"]]
  cost = results["cost"]
  assert cost["preferences"] == 64 and [r["resource"] for r in cost["by_resource"]] == [0, 1]
  for row in cost["by_resource"]:
    assert 0 < row["min_macs_fraction"] <= row["mean_macs_fraction"] <= row[
        "max_macs_fraction"] <= 1
    assert 0 < row["mean_params_fraction"] <= 1 and row["distinct_trees"] >= 1
    assert len(row["macs_fractions"]) == 64 and len(row["dominant_preference"]) == 64
    assert min(row["dominant_preference"]) >= 0.5
  assert results["affinity"]["affinity"] == json.load(
      open(workdir / "edge" / dymu_stages.AFFINITY_FILE))["affinity"]
  # The affinity is the method's artefact: listed, next to the report, its heat map a plot.
  assert results["artefacts"] == ["affinity"] and "dymu_affinity.png" in results["plots"]
  assert json.load(open(workdir / "eval" / dymu_stages.AFFINITY_FILE))["affinity"] == results[
      "affinity"]["affinity"]
  report = (workdir / "eval" / "report.md").read_text()
  for text in ("| edge, c=0 |", "| weight, c=1 |", "## Cost", "## Task affinity",
               "![task affinity](dymu_affinity.png)", "HV (losses)", "distinct trees",
               "## Matched cost", "HV (cost band)", "MACs fraction <= 0.6",
               "`--preference_grid=rays`: PHN's evaluation rays", "[2.0, 2.0]"):
    assert text in report, text
  for plot in ("cost_vs_preference.png", "tradeoff_front.png", "controllability.png",
               "dymu_affinity.png"):
    assert (workdir / "eval" / plot).stat().st_size > 1000, plot
    assert f"({plot})" in report


def test_reported_points_match_the_controlled_network(dymu_run, dymu_eval):
  """A sweep point recomputed through the method's own predict and cost agrees."""
  workdir, _ = dymu_run
  run = runs_lib.load_run(runs_lib.resolve(str(workdir)))
  method = run.method
  assert method.stage == "weight"
  batch = run.test_source.get(np.arange(len(run.test_source)))
  for sweep in dymu_eval["sweeps"]:
    variables = run.variables
    if sweep["variant"] == "edge":  # the anchor and the edge hypernetwork only
      variables = {"params": {"edge_hypernet": variables["edge_hypernet"]["params"]},
                   "anchor": variables["anchor"]}
    point = sweep["points"][1]
    controls = {"preference": point["preference"], "resource": sweep["resource"]}
    controller = method.controller(variables)
    tree = controller.tree(point["preference"], sweep["resource"])
    assert [list(row) for row in tree.parents] == point["tree"]
    cost = method.net.tree_cost(tree, run.test_source.image_shape)
    assert cost.macs == point["macs"] and cost.params == point["params"]
    predictions = method.predict(variables, batch["image"], controls)
    for name in ("left", "right"):
      accuracy = float(np.mean(np.argmax(predictions[name], -1) == batch[name]))
      assert accuracy == pytest.approx(point["metrics"][name]["accuracy"], abs=1e-6)


CORNER_EVAL = ["--eval_batch_size=16", "--cost_preferences=8", "--preference_grid=das_dennis",
               "--num_preferences=3", "--hv_reference=5,5", "--noplots"]


def _check_corner_sweeps(results, report):
  """A Das-Dennis sweep of 3 points for 2 tasks: both corners and the middle, finite measures."""
  assert results["preference_grid"]["grid"] == "das_dennis"
  assert results["preference_grid"]["divisions"] == 2
  assert results["hypervolume_reference"] == [5.0, 5.0]
  for sweep in results["sweeps"]:
    prefs = [p["preference"] for p in sweep["points"]]
    assert prefs == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert np.all(np.isfinite(sweep["losses"]))
    assert sweep["uniformity"] == pytest.approx(pareto.uniformity(sweep["losses"], prefs))
    assert sweep["hypervolume"] == pytest.approx(pareto.hypervolume(sweep["losses"], [5, 5]))
  assert "Das-Dennis grid of the simplex, 2 divisions" in report
  assert "(--hv_reference)" in report


def test_dymu_sweep_at_corner_preferences_with_a_cost_band_pair(dymu_run, tmp_path):
  workdir, _ = dymu_run
  out = tmp_path / "corners"
  result = run_cli("evaluate", f"--workdir={workdir}", f"--output_dir={out}", *CORNER_EVAL,
                   "--resources=1", "--cost_band=0.2,0.9")
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(out / "results.json"))
  report = (out / "report.md").read_text()
  _check_corner_sweeps(results, report)
  assert results["cost_band"] == {"min_macs_fraction": 0.2, "max_macs_fraction": 0.9}
  for sweep in results["sweeps"]:
    assert sweep["cost_band"]["min_macs_fraction"] == 0.2
    assert sweep["cost_band"]["max_macs_fraction"] == 0.9
  assert "0.2 <= MACs fraction <= 0.9" in report


def test_rerunning_the_command_continues_where_it_stopped(dymu_run, dymu_eval, shared_data):
  """A run killed before the weight stage's last checkpoint: the same command trains only the
  missing step, with the same result."""
  workdir, _ = dymu_run
  weight = workdir / "weight"
  before = train_records(weight / "metrics.jsonl")
  sizes = {s: len(train_records(workdir / s / "metrics.jsonl"))
           for s in ("pretrain", "anchor", "edge")}
  affinity_time = os.path.getmtime(workdir / "edge" / dymu_stages.AFFINITY_FILE)
  shutil.rmtree(weight / "checkpoints" / "2")
  assert runs_lib.latest_step(str(weight)) == 1
  result = run_cli("train", *dymu_args(shared_data, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ("pretrain", "anchor", "edge"):
    assert f"DYMU stage {stage}: already trained" in result.stdout
  after = train_records(weight / "metrics.jsonl")
  # Resumed at 1, not restarted: step 2's record was dropped (written after the checkpoint the
  # run continues from) and written again, so metrics.jsonl keeps one record per step.
  assert re.search(r"dropped \d+ line\(s\) written after step 1", result.stdout)
  assert [r["step"] for r in after] == [r["step"] for r in before] and after[-1]["step"] == 2
  assert after[-1]["loss"] == pytest.approx(before[-1]["loss"], rel=1e-5)
  for stage, size in sizes.items():  # finished stages are not trained again
    assert len(train_records(workdir / stage / "metrics.jsonl")) == size
  assert os.path.getmtime(workdir / "edge" / dymu_stages.AFFINITY_FILE) == affinity_time
  assert runs_lib.latest_step(str(weight)) == 2


# ----------------------------------------------------------------------------------------------
# PHN.


@pytest.fixture(scope="module")
def phn_run(tmp_path_factory, shared_data):
  workdir = tmp_path_factory.mktemp("phn") / "run"
  result = run_cli("train", *data_args(shared_data), "--method=phn", "--head_width=8",
                   "--phn_hidden=16", "--phn_chunk_size=256", "--steps=3",
                   f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_cli("evaluate", f"--workdir={workdir}", *EVAL, "--hv_reference=5,5")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "eval" / "results.json") as f:
    return workdir, json.load(f)


def test_phn_sweep_and_report(phn_run):
  workdir, results = phn_run
  assert results["method"] == "phn" and results["variants"] == ["phn"]
  assert results["hypervolume_reference"] == [5.0, 5.0]
  (sweep,) = results["sweeps"]
  assert sweep["resource"] is None and len(sweep["points"]) == 4
  loss = np.asarray(sweep["losses"])
  assert loss.shape == (4, 2) and sweep["hypervolume"] > 0 and np.isfinite(sweep["uniformity"])
  cost = results["cost"]
  assert cost["inference_macs"] > 0 and cost["trained_params"] > cost["params"] > 0
  # The first point recomputed through PHN's own predict.
  run = runs_lib.load_run(str(workdir))
  batch = run.test_source.get(np.arange(len(run.test_source)))
  point = sweep["points"][0]
  predictions = run.method.predict(run.variables, batch["image"],
                                   {"preference": point["preference"]})
  for name in ("left", "right"):
    accuracy = float(np.mean(np.argmax(predictions[name], -1) == batch[name]))
    assert accuracy == pytest.approx(point["metrics"][name]["accuracy"], abs=1e-6)
  report = (workdir / "eval" / "report.md").read_text()
  assert "| phn |" in report and "Deployed network: " in report
  assert "(tradeoff_front.png)" in report and "## Cost" not in report


def test_phn_sweep_at_corner_preferences(phn_run, tmp_path):
  workdir, _ = phn_run
  out = tmp_path / "corners"
  result = run_cli("evaluate", f"--workdir={workdir}", f"--output_dir={out}", *CORNER_EVAL)
  assert result.returncode == 0, result.stderr[-3000:]
  _check_corner_sweeps(json.load(open(out / "results.json")), (out / "report.md").read_text())


def test_results_page_has_the_preference_table(dymu_run, dymu_eval, phn_run, tmp_path):
  dymu_dir, _ = dymu_run
  phn_dir, phn_results = phn_run
  output = tmp_path / "results.md"
  result = run_cli("results", f"--workdirs={dymu_dir},{phn_dir}", f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  page = output.read_text()
  assert "### Preference-controlled networks (DYMU, PHN, PHN-BN)" in page
  assert "Skipped folders" not in page  # the DYMU parent folder counts as one run
  rows = [line for line in page.splitlines() if line.startswith("| `")]
  # DYMU: 2 variants x 2 resources; PHN: one sweep.
  assert len(rows) == 5 and sum(f"| `{phn_dir.name}` | phn |" in r for r in rows) == 1
  # One shared reference: the PHN row's HV differs from its own-reference value (5, 5).
  losses = np.concatenate([np.asarray(s["losses"])
                           for s in dymu_eval["sweeps"] + phn_results["sweeps"]])
  reference = losses.max(0) + 0.1 * (losses.max(0) - losses.min(0))
  assert f"{[round(x, 4) for x in reference.tolist()]}" in page
  # DYMU costs are fractions of its anchor; the edge variant's time leaves out the weight stage.
  cost = dymu_eval["cost"]["by_resource"][0]
  assert f"({cost['mean_macs_fraction']:.3f})" in page
  train_line = next(l for l in page.splitlines()
                    if l.startswith("python -m experiments.train") and "--method=dymu" in l)
  assert "--dymu_stage=" not in train_line and "--steps=" not in train_line
  assert f"--workdir={dymu_dir}" in train_line or train_line.endswith(dymu_dir.name)
  assert (tmp_path / "results" / "multi_mnist_fronts.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# Bad flags.


def run_in_process(*argv):
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    fv(["train", *argv])
    return train.run()
  finally:
    fv.unparse_flags()


@pytest.mark.parametrize("args, message", [
    (["--dymu_stage=edge"], "--dymu_stage=edge needs --dymu_anchor_dir"),
    (["--dymu_stage=weight"], "--dymu_stage=weight needs --dymu_edge_dir"),
    (["--dymu_stage=weight", "--dymu_edge_dir=/no/such/run"],
     "--dymu_edge_dir=/no/such/run does not exist"),
    (["--dymu_stage=anchor", "--dymu_edge_dir=/x"],
     "--dymu_edge_dir is read by --dymu_stage=weight"),
    (["--dymu_stage=anchor"],
     "--dymu_stage=anchor with --dymu_anchor_init=trunk needs --dymu_pretrain_dir"),
    (["--dymu_stage=edge", "--dymu_pretrain_dir=/x"],
     "--dymu_pretrain_dir is read by --dymu_stage=anchor"),
    (["--dymu_validation_examples=128"], "Holding out 128 examples leaves none of the 128"),
    (["--dymu_stage=weight", "--dymu_anchor_dir=/x"],
     "--dymu_anchor_dir is read by --dymu_stage=edge or all"),
    (["--dymu_stage_steps=3,3"], "--dymu_stage_steps takes three numbers"),
    (["--backbone=resnet34"], "DYMU's anchor streams are built on --backbone=lenet or"),
    (["--backbone_options=channel_divisor=2"],
     "--backbone_options has channel_divisor, which DYMU's lenet streams do not take"),
    (["--head_batch_norm"], "--head_batch_norm puts batch norm in the decoders' hidden layers, "
                            "but DYMU's lenet decoders have none"),
])
def test_bad_dymu_flags_stop_with_one_sentence(tmp_path, shared_data, args, message):
  argv = [*dymu_args(shared_data, tmp_path / "w")]
  if any(a.startswith("--backbone") for a in args):
    argv.remove(BACKBONE)
  with pytest.raises(ValueError) as error:
    run_in_process(*argv, *args)
  assert message in str(error.value)
  assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_edge_stage_checks_its_anchor(dymu_run, phn_run, shared_data, tmp_path):
  workdir, _ = dymu_run
  phn_workdir, _ = phn_run
  edge = ["--dymu_stage=edge", f"--workdir={tmp_path / 'edge'}"]
  with pytest.raises(ValueError, match="holds a --method=phn run"):
    run_in_process(*dymu_args(shared_data, tmp_path), *edge,
                   f"--dymu_anchor_dir={phn_workdir}")
  unfinished = tmp_path / "unfinished_anchor"  # as if killed before its last checkpoint
  shutil.copytree(workdir / "anchor", unfinished)
  shutil.rmtree(unfinished / "checkpoints" / "3")
  with pytest.raises(ValueError, match=r"stopped at step 2 of 3; finish it first"):
    run_in_process(*dymu_args(shared_data, tmp_path), *edge, f"--dymu_anchor_dir={unfinished}")
  other = [a for a in dymu_args(shared_data, tmp_path) if a != BACKBONE]
  with pytest.raises(ValueError, match="was built with model options"):
    run_in_process(*other, '--backbone_options="conv_channels=(4,6)","kernel_sizes=(5,3)",'
                   'fc_features=12', *edge, f"--dymu_anchor_dir={workdir / 'anchor'}")


def test_finished_stages_refuse_other_inputs(dymu_run, shared_data):
  workdir, _ = dymu_run
  with pytest.raises(ValueError, match=r"trained with another task affinity \(num_images 32 "
                     r"then and 48 now\)"):
    run_in_process(*dymu_args(shared_data, workdir), "--dymu_affinity_images=48")


def test_bad_stage_fails_in_the_cli(tmp_path):
  result = run_cli("train", "--method=dymu", "--dymu_stage=search",
                   f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode != 0 and "dymu_stage" in result.stderr
  result = run_cli("train", "--method=dymu", "--dymu_stage=edge", "--dataset=synthetic",
                   "--image_size=16", "--num_train=8", "--num_test=8", "--backbone=lenet",
                   f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "needs --dymu_anchor_dir" in lines[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr
