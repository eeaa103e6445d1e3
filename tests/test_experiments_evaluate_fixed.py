"""Fixed-control methods through the CLIs: a tiny GradSplit run trained and evaluated (routing
JSON and heat map, cost, report), the cost convention of every method, and bad GradSplit and
PCGrad flags."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax.runs import settings
from experiments import common
from experiments import train  # noqa: F401  (defines --method and the optimisation flags)
from dymu_jax import methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import gradsplit
from dymu_jax.models import cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = '--backbone_options="stage_channels=(8,16)","stage_sizes=(1,1)"'
RESNET = {"backbone": "resnet_small", "head_width": 8,
          "backbone_kwargs": {"stage_channels": (8, 16), "stage_sizes": (1, 1)}}


def run_cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gradsplit_run(tmp_path_factory):
  """A 3-step GradSplit run (2-step warm-up) on 8 px images with two regression tasks (MLP
  heads keep compiling short), evaluated against itself."""
  folder = tmp_path_factory.mktemp("gradsplit")
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(80, 8, 8, 3)).astype(np.float32)
  np.savez(folder / "toy.npz", images=images, a=images.mean(axis=(1, 2, 3)) * 10,
           b=images[..., 0].mean(axis=(1, 2)) * 5)
  workdir = folder / "run"
  result = run_cli("train", "--dataset=arrays", f"--data_dir={folder / 'toy.npz'}",
                   "--task_spec=a:regression,b:regression", "--backbone=resnet_small",
                   "--head_width=8", BACKBONE, "--batch_size=8", "--noprogress",
                   "--method=gradsplit", "--gradsplit_warmup_steps=2", "--steps=3",
                   "--log_every=1", "--checkpoint_every=3", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  # Training itself leaves the learned routing and its heat map in the workdir.
  assert (workdir / gradsplit.ROUTING_FILE).is_file()
  assert (workdir / gradsplit.HEATMAP_FILE).stat().st_size > 1000
  assert f"wrote {workdir / gradsplit.ROUTING_FILE} (routing)" in result.stdout
  # Its own run as the reference: Delta_m must come out exactly 0.
  result = run_cli("evaluate", f"--workdir={workdir}", f"--reference_workdir={workdir}",
                   "--eval_batch_size=8")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_gradsplit_run_logs_and_evaluates_its_routing(gradsplit_run):
  workdir = gradsplit_run
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  logged = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in logged] == [1, 2, 3]
  assert all("gradsplit/cos_a_b" in r and "gradsplit/M_b_a" in r for r in logged)
  assert [r["gradsplit/M_a_b"] for r in logged[:2]] == [1.0, 1.0]  # warm-up

  results = json.load(open(workdir / "eval" / "results.json"))
  assert results["method"] == "gradsplit" and results["delta_m"] == 0.0
  routing = json.load(open(workdir / gradsplit.ROUTING_FILE))
  assert routing["tasks"] == ["a", "b"] and routing["warmup_steps_seen"] == 2
  assert routing["warmup_complete"] and routing["split_modules"] == ["stage2_block0"]
  assert routing["criterion"] == "module_mean" and routing["margin"] == 0.0
  modules = routing["modules"]
  assert [m["name"] for m in modules] == [f"stage2_block0/{n}" for n in (
      "bn1", "bn2", "conv1", "conv2", "downsample_bn", "downsample_conv")]
  # Each module's learned M is the sign pattern of its mean cosines; conflict frequencies are
  # fractions of the 2 warm-up steps.
  for entry in modules + [routing["pooled"]]:
    for t in range(2):
      assert entry["matrix"][t][t] == 1 and entry["conflict_frequency"][t][t] == 0
      for s in range(2):
        assert entry["matrix"][t][s] == int(t == s or entry["mean_cosine"][t][s] >= 0)
        assert entry["conflict_frequency"][t][s] in (0, 0.5, 1)
        if entry["conflict_frequency"][t][s] == 0:
          assert entry["mean_cosine"][t][s] >= 0
  assert results["routing"]["modules"] == modules
  assert results["routing"]["pooled"] == routing["pooled"]
  for folder in (workdir, workdir / "eval"):
    assert (folder / gradsplit.HEATMAP_FILE).stat().st_size > 1000
  assert (workdir / "eval" / gradsplit.ROUTING_FILE).is_file()

  cost_ = results["cost"]
  assert cost_["backward_passes"] == 2 and cost_["batch_size"] == 8
  assert cost_["training_macs_per_example"] == round(
      cost_["inference_macs"] * 5 + cost_["gradient_macs_per_step"] / 8)
  report = (workdir / "eval" / "report.md").read_text()
  assert "## GradSplit routing" in report and f"![routing]({gradsplit.HEATMAP_FILE})" in report
  assert "Criterion `module_mean`" in report and "Per split module" in report
  assert "| stage2_block0/downsample_bn | " in report and "off-diagonal entries are 0" in report
  assert "training MACs / example" in report and f"{cost_['inference_macs']:,}" in report
  assert "Delta_m against single-task" in report


def test_training_cost_counts_one_backward_pass_per_task_where_the_method_makes_them():
  task_list = (tasks_lib.regression("a"), tasks_lib.regression("b"), tasks_lib.regression("c"))
  images = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  costs = {}
  for name in ("static", "single_task", "gradsplit", "pcgrad"):
    method = methods.build(name, task_list, model_options=RESNET)
    variables = jax.eval_shape(lambda x, m=method: m.init(jax.random.key(0), {"image": x}),
                               images)
    costs[name] = method.training_cost(variables, (8, 8, 3), batch_size=16)
  forward = cost.count(methods.build("static", task_list, model_options=RESNET).model, None,
                       images, train=False).macs
  assert forward > 0
  static, single = costs["static"], costs["single_task"]
  assert static["inference_macs"] == forward and static["backward_passes"] == 1
  assert static["training_macs_per_example"] == 3 * forward
  assert single["inference_macs"] > forward and single["params"] > static["params"]
  assert single["training_macs_per_example"] == 3 * single["inference_macs"]
  for name in ("gradsplit", "pcgrad"):
    c = costs[name]
    # The same network at inference; three backward passes per step when training.
    assert c["inference_macs"] == forward and c["params"] == static["params"]
    assert c["backward_passes"] == 3 and c["gradient_macs_per_step"] > 0
    assert c["training_macs_per_example"] == round(7 * forward + c["gradient_macs_per_step"] / 16)


@pytest.mark.parametrize("flags_, message", [
    (["--gradsplit_routing=fixed"], "--gradsplit_routing=fixed needs --gradsplit_routing_matrix"),
    (["--gradsplit_matrix=identity"], "--gradsplit_routing_matrix=identity is only used with "
                                      "--gradsplit_routing=fixed"),
    (["--gradsplit_routing=fixed", "--gradsplit_matrix=1,0;0,1;1,1"],
     "routing matrix '1,0;0,1;1,1' has 3 row(s) of 2 entries; give 2 rows of 2"),
    (["--gradsplit_routing=fixed", "--gradsplit_matrix=1,1;0,0"],
     "has 0 on its diagonal at row 1"),
    (["--gradsplit_routing=fixed", "--gradsplit_matrix=1,2;0,1"], "entries must be 0 or 1, got 2"),
    (["--gradsplit_warmup_steps=0"], "--gradsplit_warmup_steps=0 leaves no step to estimate"),
    (["--gradsplit_stages=3"], "split_stages=3 must lie in 1..2"),
    (["--gradsplit_group_sizes=1,1,1"], "group sizes (1.0, 1.0, 1.0) must be 2 positive numbers"),
    (["--gradsplit_margin=1.5"], "--gradsplit_margin=1.5 must lie in [-1, 1] with criterion "
                                 "'module_mean' (it is a cosine)"),
    (["--gradsplit_criterion=pooled", "--gradsplit_margin=-2"], "--gradsplit_margin=-2 must lie "
                                                                "in [-1, 1]"),
    (["--gradsplit_criterion=module_frequency", "--gradsplit_margin=-0.1"],
     "--gradsplit_margin=-0.1 must lie in [0, 1] with criterion 'module_frequency'"),
    (["--gradsplit_routing=fixed", "--gradsplit_matrix=identity", "--gradsplit_margin=0.1"],
     "--gradsplit_margin=0.1 is only used with --gradsplit_routing=learned"),
])
def test_bad_gradsplit_flags_stop_with_one_sentence(flags_, message):
  fv = common.FLAGS
  fv.unparse_flags()
  try:
    fv(["prog", "--method=gradsplit", BACKBONE, *flags_])
    with pytest.raises(ValueError) as error:
      task_list = tuple(tasks_lib.regression(n) for n in ("depth", "edges"))
      settings.build_method(common.flag_values(), task_list)
  finally:
    fv.unparse_flags()
  text = str(error.value)
  assert message in text, text
  assert text.endswith(".") and ". " not in text.replace("e.g. ", "")


@pytest.mark.parametrize("flags_, criterion, threshold", [
    ([], "module_mean", 0.0),
    (["--gradsplit_margin=0.05"], "module_mean", 0.05),
    (["--gradsplit_criterion=module_frequency"], "module_frequency", 0.5),
    (["--gradsplit_criterion=module_frequency", "--gradsplit_margin=0.25"], "module_frequency",
     0.25),
    (["--gradsplit_criterion=pooled"], "pooled", 0.0),
])
def test_gradsplit_criterion_flags(flags_, criterion, threshold):
  fv = common.FLAGS
  fv.unparse_flags()
  try:
    fv(["prog", "--method=gradsplit", BACKBONE, *flags_])
    task_list = tuple(tasks_lib.regression(n) for n in ("depth", "edges"))
    method = settings.build_method(common.flag_values(), task_list)
  finally:
    fv.unparse_flags()
  assert method.criterion == criterion and method.threshold == threshold


def test_unknown_gradsplit_criterion_and_runs_saved_before_the_flag():
  fv = common.FLAGS
  fv.unparse_flags()
  try:
    with pytest.raises(common.flags.IllegalFlagValueError,
                       match=re.escape("--gradsplit_criterion=median: value should be one "
                                       "of <module_mean|module_frequency|pooled>")):
      fv(["prog", "--method=gradsplit", "--gradsplit_criterion=median"])
  finally:
    fv.unparse_flags()
  # The flags of a run saved before --gradsplit_criterion existed: it trained with "pooled".
  saved = {"method": "gradsplit", "gradsplit_routing": "learned", "gradsplit_warmup_steps": 5,
           "gradsplit_stages": 1}  # and its former name of --gradsplit_split_stages
  assert settings.method_config(saved).criterion == "pooled"
  with pytest.raises(ValueError, match=re.escape(
      "--gradsplit_criterion='median' is not allowed; choose one of module_mean, "
      "module_frequency, pooled.")):
    settings.method_config({**saved, "gradsplit_criterion": "median"})


@pytest.mark.parametrize("flags_, message", [
    (["--gradsplit_split_stages=0"], "--gradsplit_split_stages=0: must be a whole number >= 1"),
    (["--gradsplit_group_sizes=1,x"], "--gradsplit_group_sizes=['1', 'x']: must be "
                                      "comma-separated numbers > 0"),
    (["--gradsplit_group_sizes=1,-1"], "must be comma-separated numbers > 0"),
])
def test_bad_gradsplit_flags_stop_at_parsing(flags_, message):
  fv = common.FLAGS
  fv.unparse_flags()
  try:
    with pytest.raises(common.flags.IllegalFlagValueError, match=re.escape(message)):
      fv(["prog", "--method=gradsplit", BACKBONE, *flags_])
  finally:
    fv.unparse_flags()


def test_bad_gradsplit_flag_through_the_cli(tmp_path):
  result = run_cli("train", "--dataset=synthetic", "--num_train=16", "--num_test=16",
                   "--tasks=depth,edges", "--method=gradsplit", "--gradsplit_routing=fixed",
                   "--gradsplit_matrix=0,1;1,1", f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "has 0 on its diagonal at row 0" in lines[0], result.stderr
  assert "Traceback" not in result.stderr
  result = run_cli("train", "--method=pcgrad", "--pcgrad_order=sorted",
                   f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode != 0 and "pcgrad_order" in result.stderr
