"""The training CLI: flag files parse, bad flags stop with one sentence, a short run learns."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from absl import flags

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
  finally:
    fv.unparse_flags()


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
    (["--steps=0"], "steps must be >= 1"),
    (["--task_weights=1,x"], "--task_weights must be comma-separated numbers"),
    (["--backbone=lenet", "--backbone_options=depth=3"],
     "--backbone_options has depth, which backbone 'lenet' does not take"),
    (["--backbone_options=output_stride"], "--backbone_options takes name=value pairs"),
])
def test_bad_flags_stop_with_one_sentence(tmp_path, args, message):
  result = run_cli(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], result.stderr
  assert "Traceback" not in result.stderr


def test_missing_workdir_is_a_usage_error():
  result = run_cli("--steps=1", timeout=60)
  assert result.returncode != 0
  assert "--workdir is required" in result.stderr


def test_short_run_learns(tmp_path):
  """A small static run on synthetic scenes: the training loss falls by a clear margin."""
  workdir = tmp_path / "run"
  result = run_cli(
      "--dataset=synthetic", "--image_size=16", "--num_train=256", "--num_test=64",
      "--method=static", "--backbone=resnet_small", "--head_width=16", "--steps=60",
      "--batch_size=16", "--learning_rate=3e-3", "--log_every=10", "--checkpoint_every=30",
      "--eval_every=0", "--noprogress", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_losses = [r["loss"] for r in records if r.get("split", r.get("kind")) == "train"]
  assert len(train_losses) >= 5, records[:3]
  assert train_losses[-1] < 0.7 * train_losses[0], train_losses
  summary = json.load(open(workdir / "summary.json"))
  per_task = next(iter(summary["eval"].values()))
  assert set(per_task) == {"segmentation", "depth", "normals", "edges"}
  assert "miou" in per_task["segmentation"]
