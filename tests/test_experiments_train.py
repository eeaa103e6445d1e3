"""The training CLI: flag files parse, bad flags stop with one sentence, a short run learns."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from experiments import cli_help
from experiments import train  # noqa: F401  (defines the flags)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "flags", "*.flags")))


def run_cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("path", FLAG_FILES, ids=os.path.basename)
def test_flag_file_parses(path):
  """Every flag file names only defined flags and valid values (absl rejects the rest)."""
  with open(path) as f:
    first = f.readline()
  assert first.startswith("#"), f"{path} must start with a comment (command, runtime, purpose)"
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    fv(["prog", f"--flagfile={path}"])  # raises on an unknown flag or an invalid value
    assert fv.method in train.methods_lib.METHODS
    assert fv.dataset in train.common.data_lib.DATASETS
    cli_help.check_method_flags(fv.method, cli_help.given_flags())  # no other method's option
  finally:
    fv.unparse_flags()


def parsed(name: str) -> dict:
  fv = flags.FLAGS
  fv.unparse_flags()
  try:
    fv(["prog", f"--flagfile={os.path.join(ROOT, 'experiments', 'flags', name)}"])
    return train.common.flag_values()
  finally:
    fv.unparse_flags()


def test_phn_flag_files_are_the_authors_settings():
  """PHN as its authors ran it on Multi-MNIST; PHN-BN as close to it as it allows."""
  phn = parsed("multi_mnist_phn.flags")
  authors = {"backbone": "lenet", "phn_chunk_size": 0, "optimizer": "adam",
             "learning_rate": 1e-4, "schedule": "constant", "batch_size": 256, "steps": 6330,
             "num_train": 0, "phn_dirichlet_alpha": 0.2}
  assert {k: phn[k] for k in authors} == authors
  assert train.settings.parse_options(phn["backbone_options"], "--backbone_options") == {
      "batch_norm": False}
  bn = parsed("multi_mnist_phn_bn.flags")
  assert {k: bn[k] for k in authors} == authors
  assert train.settings.parse_options(bn["backbone_options"], "--backbone_options") == {
      "batch_norm": True}


def test_dymu_flag_files_use_the_papers_regulariser_and_a_trunk():
  for name in ("multi_mnist_dymu.flags", "utkface_dymu.flags", "synthetic_dymu.flags"):
    v = parsed(name)
    assert v["dymu_anchor_init"] == "trunk" and v["dymu_task_weights"] == "validation"
    assert v["dymu_depth_factor"] == "paper" and v["dymu_use_gradient"] == "stop"
    assert v["dymu_lambda_active"] == 1.0 and v["dymu_lambda_inactive"] == 0.1
    assert v["dymu_validation_examples"] > 0 and 0 < v["dymu_anchor_learning_rate"] < v[
        "learning_rate"]
  main = parsed("multi_mnist_dymu.flags")
  for ablation in ("all_active", "no_inactive", "no_weight_hypernet"):
    v = parsed(f"multi_mnist_dymu_{ablation}.flags")
    assert v["dymu_anchor_dir"] == "workdirs/multi_mnist_dymu/anchor"
    same = ("num_train", "num_test", "backbone_options", "dymu_lambda_active",
            "dymu_depth_factor", "dymu_use_gradient", "dymu_stage_steps", "dymu_task_weights")
    assert {k: v[k] for k in same} == {k: main[k] for k in same}, ablation


def test_unknown_flag_is_rejected_by_the_parser(tmp_path):
  bad = tmp_path / "bad.flags"
  bad.write_text("--dataset=synthetic\n--no_such_flag=3\n")
  flags.FLAGS.unparse_flags()
  try:
    with pytest.raises(flags.UnrecognizedFlagError, match="no_such_flag"):
      flags.FLAGS(["prog", f"--flagfile={bad}"])
  finally:
    flags.FLAGS.unparse_flags()


def test_unknown_flag_in_flag_file_fails(tmp_path):
  bad = tmp_path / "bad.flags"
  bad.write_text("--dataset=synthetic\n--no_such_flag=3\n")
  result = run_cli(f"--flagfile={bad}", f"--workdir={tmp_path / 'w'}", timeout=60)
  assert result.returncode != 0
  assert "no_such_flag" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset=imagenet"], "Unknown dataset 'imagenet'; available datasets are synthetic"),
    (["--dataset=utkface"], "utkface needs data: pass --data_dir="),
    (["--dataset=synthetic", "--tasks=depth,colour"], "Unknown task 'colour'"),
    (["--dataset=utkface", "--data_dir=/no/such/folder"], "does not exist"),
    (["--steps=0"], "--steps=0: 0 is not a positive integer"),
    (["--task_weights=1,x"], "--task_weights must be comma-separated numbers"),
    (["--backbone=lenet", "--backbone_options=depth=3"],
     "--backbone_options has depth, which backbone 'lenet' does not take"),
    (["--backbone_options=output_stride"], "--backbone_options takes name=value pairs"),
    (["--method=ecmt", "--dymu_lambda_active=2"],
     "--dymu_lambda_active is an option of DYMU (--method=dymu), but this run has --method=ecmt"),
    (["--method=phn_bn", "--kd=none"], "kd is an option of ECMT (--method=ecmt)"),
    (["--execution=fast"], "--execution: Execution choice 'fast' in 'fast' is not one of"),
])
def test_bad_flags_stop_with_one_sentence(tmp_path, args, message):
  result = run_cli(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_augment_without_per_pixel_tasks_stops_with_one_sentence(tmp_path):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "digits.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
           digit=np.arange(40) % 10)
  result = run_cli("--dataset=arrays", f"--data_dir={tmp_path / 'digits.npz'}",
                   "--task_spec=digit:classification", "--augment", "--batch_size=8",
                   f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and ("--augment applies to datasets with per-pixel tasks; 'arrays' "
                              "has none, so drop --augment.") in lines[0], result.stderr


def test_missing_workdir_is_a_usage_error():
  result = run_cli("--steps=1", timeout=60)
  assert result.returncode != 0
  assert "--workdir is required" in result.stderr


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_short_run_learns(tmp_path, compute_dtype):
  """A small static run on synthetic scenes: the training loss falls by a clear margin, in
  float32 and in mixed precision; the compiled programs land in the persistent compilation
  cache it names."""
  workdir = tmp_path / "run"
  result = run_cli(f"--compute_dtype={compute_dtype}",
      "--dataset=synthetic", "--image_size=16", "--num_train=256", "--num_test=64",
      "--method=static", "--backbone=resnet_small", "--head_width=16", "--steps=60",
      "--batch_size=16", "--learning_rate=3e-3", "--log_every=10", "--checkpoint_every=30",
      "--eval_every=0", "--noprogress", f"--workdir={workdir}",
      f"--compilation_cache={tmp_path / 'xla'}", "--compilation_cache_min_seconds=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert glob.glob(str(tmp_path / "xla" / "jit_train_step-*")), os.listdir(tmp_path / "xla")
  assert f"execution: cpu, fast_ops=on,passes=unrolled, {compute_dtype}" in result.stdout
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_losses = [r["loss"] for r in records if r.get("split", r.get("kind")) == "train"]
  assert len(train_losses) >= 5, records[:3]
  assert train_losses[-1] < 0.7 * train_losses[0], train_losses
  summary = json.load(open(workdir / "summary.json"))
  per_task = next(iter(summary["eval"].values()))
  assert set(per_task) == {"segmentation", "depth", "normals", "edges"}
  assert "miou" in per_task["segmentation"]
  if compute_dtype == "float32":
    # Re-running a finished run is a no-op that keeps the run's own training time.
    again = run_cli(*result.args[3:], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already trained (60 steps, {summary['seconds']:.1f} s)" in again.stdout
    assert json.load(open(workdir / "summary.json"))["seconds"] == summary["seconds"]


def test_multi_mnist_run_learns_on_drawn_digits(tmp_path, drawn_mnist):
  """A fresh clone's end-to-end check: Multi-MNIST pairs built from digits the tests draw,
  a LeNet trained through the CLI beats chance on both digits and writes event files."""
  workdir = tmp_path / "run"
  result = run_cli(
      "--dataset=multi_mnist", f"--data_dir={drawn_mnist}", "--num_train=512",
      "--num_test=200", "--method=static", "--backbone=lenet", "--steps=200",
      "--batch_size=32", "--learning_rate=3e-3", "--log_every=50", "--checkpoint_every=200",
      "--eval_every=0", "--noprogress", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(workdir / "summary.json"))
  per_task = next(iter(summary["eval"].values()))
  accuracies = {name: per_task[name]["accuracy"] for name in ("left", "right")}
  assert min(accuracies.values()) > 0.35, accuracies  # chance is 0.1 (0.585 / 0.47 measured)
  assert glob.glob(str(workdir / "events.out.tfevents.*")), os.listdir(workdir)
  assert f"metrics: {workdir / 'metrics.jsonl'}" in result.stdout, result.stdout[:2000]


def test_every_training_flag_is_in_one_help_group():
  """`--help` groups cannot fall behind the flags: each training flag is shown exactly once."""
  modules = ("experiments.train", "experiments.common", "experiments.runtime")
  defined = {f.name for module in modules for f in flags.FLAGS.get_flags_for_module(module)
             if f.name not in train.common.ALIASES}  # former names: shown with their flag
  shown = [name for _, names in cli_help.TRAIN_GROUPS for name in cli_help._expand(names)]
  assert len(shown) == len(set(shown)), sorted(n for n in shown if shown.count(n) > 1)
  assert set(shown) == defined, (sorted(defined - set(shown)), sorted(set(shown) - defined))


def test_help_shows_the_key_flags_grouped():
  result = run_cli("--help", timeout=120)
  assert result.returncode == 0, result.stderr
  text = result.stdout
  for flag in ("--dataset", "--data_dir", "--method", "--backbone", "--workdir", "--steps",
               "--batch_size", "--eval_every", "--dymu_lambda_active", "--gradsplit_criterion",
               "--ecmt_num_subnets", "--phn_chunk_size"):
    assert f"\n  {flag}:" in text, flag
  headings = [l for l in text.split("\n\nData:")[1].splitlines()
              if l.endswith(":") and not l.startswith(" ")]
  headings = ["Data:", *headings]
  assert headings[:3] == ["Data:", "Model:", "Method:"], headings
  assert "DYMU (--method=dymu):" in headings and "ECMT (--method=ecmt):" in headings
  assert "--jax_" not in text and "--helpfull lists every flag" in text
