"""One device against eight simulated ones, in both parallel modes.

The eight-device runs happen in a subprocess that sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing jax, so this test process
(and the rest of the suite) keeps seeing one device.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dymu_jax.train import parallel as parallel_lib
import toy_method

SCRIPT = os.path.join(os.path.dirname(__file__), "_train_script.py")
STEPS = 6


@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("parallel")
  # A fresh compilation cache lets the resumed loop reuse the first loop's compiled step.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  out = tmp / "runs.npz"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "parallel", "--workdir", str(tmp / "work"), "--out", str(out),
       "--steps", str(STEPS)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  return dict(np.load(out)), summary


def _runs(arrays, name):
  return {k[len(name) + 1:]: v for k, v in arrays.items() if k.startswith(name + "/")}


def test_this_process_still_sees_one_device():
  assert jax.device_count() == 1


@pytest.mark.parametrize("run", ["mesh8", "pmap8"])
def test_eight_devices_match_one(eight_device_runs, run):
  arrays, summary = eight_device_runs
  assert summary["devices"] == 8
  reference, other = _runs(arrays, "mesh1"), _runs(arrays, run)
  assert sorted(reference) == sorted(other)
  assert reference["losses"].shape == (STEPS, 3)
  for key in reference:
    np.testing.assert_allclose(other[key], reference[key], rtol=0, atol=1e-5, err_msg=key)
  # The parameters did move, so agreeing is not trivial.
  initial = reference["losses"][0, 0]
  assert abs(reference["losses"][-1, 0] - initial) > 1e-3


def test_batch_statistics_pooling_matters(eight_device_runs):
  # Per-device statistics over 2 examples change the outputs: the match above needs pooling.
  _, summary = eight_device_runs
  assert summary["unpooled_difference"] > 1e-2


def test_pmap_loop_resumes_into_pmap_layout(eight_device_runs):
  _, summary = eight_device_runs
  assert summary["resumed_from"] == STEPS // 2
  assert summary["first_compiles"] == 1
  metrics = summary["eval"]["default"]
  assert 0.0 <= metrics["third"]["accuracy"] <= 1.0
  assert np.isfinite(metrics["brightness"]["mae"])


def test_parallel_checks_mode_batch_and_method():
  with pytest.raises(ValueError, match="Unknown parallel mode 'ddp'; allowed modes are mesh, "
                                       "pmap"):
    parallel_lib.Parallel("ddp")
  assert parallel_lib.method_axis_name("pmap") == "batch"
  assert parallel_lib.method_axis_name("mesh") is None
  par = parallel_lib.Parallel("pmap")
  with pytest.raises(ValueError, match="needs a method built with axis_name='batch'"):
    par.check_method(toy_method.ToyMethod(axis_name=None))
  par.check_method(toy_method.ToyMethod(axis_name="batch"))
  with pytest.raises(ValueError, match="needs a method built with axis_name=None"):
    parallel_lib.Parallel("mesh").check_method(toy_method.ToyMethod(axis_name="batch"))


def test_pmap_batch_layout_and_state_round_trip():
  par = parallel_lib.Parallel("pmap")
  batch = par.shard_batch({"image": np.arange(12, dtype=np.float32).reshape(4, 3)})
  assert batch["image"].shape == (1, 4, 3)
  tree = {"w": np.arange(3, dtype=np.float32)}
  placed = par.place_state(tree)
  assert placed["w"].shape == (1, 3)
  back = par.canonical_state(placed)
  assert back["w"].shape == (3,)
  np.testing.assert_array_equal(parallel_lib.to_host(back)["w"], tree["w"])
