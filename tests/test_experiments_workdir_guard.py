"""One run per workdir: changed flags are refused on resume (or recorded when allowed), and a
second concurrent run is refused while a stale lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from dymu_jax.runs import guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset=synthetic", "--image_size=16", "--num_train=32", "--num_test=16",
        "--method=static", "--backbone=resnet_small", "--head_width=8", "--batch_size=8",
        "--eval_every=0", "--log_every=1", "--noprogress"]


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.train", *TINY, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def one_error(result) -> str:
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  return errors[0]


def test_changed_flags_ignore_length_cadence_places_and_unknown_flags():
  saved = {"learning_rate": 1e-3, "steps": 10, "data_dir": "/a", "tasks": ["x", "y"],
           "method": "static"}
  current = {"learning_rate": 3e-3, "steps": 20, "data_dir": "/b", "tasks": ("x", "y"),
             "method": "static", "new_flag": 1}
  assert guard.changed_flags(saved, current) == {"learning_rate": (1e-3, 3e-3)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("guard") / "run"
  result = run_cli("--steps=2", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert not (workdir / guard.LOCK_FILE).exists()  # released at the end
  return workdir


@pytest.mark.parametrize("changed, listed", [
    (["--learning_rate=0.003"], "--learning_rate 0.001 -> 0.003"),
    (["--method=pcgrad"], "--method 'static' -> 'pcgrad'"),
    (["--batch_size=4", "--num_train=24"], "--batch_size 8 -> 4, --num_train 32 -> 24"),
])
def test_resuming_with_other_flags_is_refused(finished, changed, listed):
  error = one_error(run_cli("--steps=3", f"--workdir={finished}", *changed))
  assert "holds a run trained with other flags" in error and listed in error, error
  assert "--allow_changed_flags" in error


def test_allowed_change_is_recorded(tmp_path, finished):
  workdir = tmp_path / "run"
  result = run_cli("--steps=2", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_cli("--steps=3", f"--workdir={workdir}", "--learning_rate=0.003",
                   "--allow_changed_flags")
  assert result.returncode == 0, result.stderr[-3000:]
  history = [json.loads(l) for l in open(workdir / guard.HISTORY_FILE)]
  assert history[0]["step"] == 2
  assert history[0]["changed"] == {"learning_rate": {"from": 0.001, "to": 0.003}}


def test_second_run_on_a_locked_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir / guard.LOCK_FILE
  lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": "now"}))  # this test process: alive
  error = one_error(run_cli("--steps=1", f"--workdir={workdir}"))
  assert "is in use by another training run (pid" in error, error
  assert not (workdir / "checkpoints").exists()
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock.write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                              "started": "earlier"}))
  result = run_cli("--steps=1", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "taking over the stale lock" in result.stdout
  assert not lock.exists()
