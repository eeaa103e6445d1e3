"""Checkpoints: save/keep/restore, the non-finite refusal, and kill-and-resume of a real run."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax.train import checkpoint as checkpoint_lib
from dymu_jax.train import parallel as parallel_lib
from dymu_jax.train import state as state_lib

SCRIPT = os.path.join(os.path.dirname(__file__), "_train_script.py")


def _state(step: int, scale: float = 1.0) -> state_lib.TrainState:
  variables = {"params": {"w": jnp.arange(4.0) * scale, "b": jnp.ones((2, 3))},
               "batch_stats": {"mean": jnp.full((3,), float(scale))}}
  state = state_lib.create(variables, optax.adam(1e-3), jax.random.PRNGKey(7), step=step)
  return jax.device_put(state, parallel_lib.Parallel("mesh").replicated)


def test_save_keep_and_restore_latest(tmp_path):
  assert checkpoint_lib.restore_latest(tmp_path, None) is None  # no checkpoints/ at all
  with checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (2, 3, 4, 5, 6):
      saved = ckpt.save(_state(step, scale=step), {"seed": 3, "flags": {"lr": 0.1}})
      assert saved == (step % 2 == 0)  # only multiples of the interval
    assert ckpt.save(_state(7, scale=7), {"seed": 3}, force=True)
    assert not ckpt.save(_state(7, scale=7), {"seed": 3}, force=True)  # already there
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.metadata(6) == {"seed": 3, "flags": {"lr": 0.1}, "step": 6}
  abstract = checkpoint_lib.abstract_like(_state(0))
  state, metadata = checkpoint_lib.restore_latest(tmp_path, abstract)
  assert metadata == {"seed": 3, "step": 7}
  expected = _state(7, scale=7)
  chex.assert_trees_all_equal(parallel_lib.to_host(state),
               parallel_lib.to_host(expected))
  assert state.params["w"].sharding == parallel_lib.Parallel("mesh").replicated
  # Restored into the pmap layout (a leading device axis) for mode "pmap".
  placed = parallel_lib.Parallel("pmap").place_state(state)
  assert placed.params["b"].shape == (1, 2, 3)


def test_never_saves_a_state_with_a_non_finite_step(tmp_path):
  bad = _state(3).replace(nonfinite_step=jnp.int32(2), nonfinite_task=jnp.int32(1))
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FloatingPointError, match=r"Refusing to checkpoint step 3: its loss "
                                                 r"became non-finite at step 2 \(task index 1\)"):
      ckpt.save(bad, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == []


def test_restore_names_what_does_not_fit(tmp_path):
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(_state(2))
    ckpt.wait()
    other = _state(2).replace(params={"w": jnp.zeros(5), "extra": jnp.zeros(1)})
    with pytest.raises(ValueError, match=(
        r"^Checkpoint 2 in .* does not fit this method and optimizer \(params/extra is missing "
        r"there; params/b is not expected here; params/w is float32\[4\] there and "
        r"float32\[5\] here\); resume with the run's own settings or use a new "
        r"workdir\.$")):
      ckpt.restore(2, checkpoint_lib.abstract_like(other))


def test_checkpointer_rejects_bad_options(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep must be >= 1"):
    checkpoint_lib.Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps must be >= 1, got 0."):
    checkpoint_lib.Checkpointer(tmp_path, save_interval_steps=0)


def _finalized_steps(workdir):
  folder = checkpoint_lib.checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  steps, every = 20, 4
  # A shared compilation cache spares the second and third process most of the compiling.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)

  def command(workdir, out, delay=0.0, checkpoint_every=every):
    return [sys.executable, SCRIPT, "train", "--workdir", str(workdir), "--out", str(out),
            "--steps", str(steps), "--checkpoint_every", str(checkpoint_every), "--seed", "5",
            "--delay", str(delay)]

  def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])

  start = lambda cmd, **kw: subprocess.Popen(cmd, env=env, text=True, **kw)
  # The run to kill, slowed down (0.25 s a batch) so that it is surely mid-run when its first
  # checkpoint lands, and beside it the uninterrupted reference (checkpoints do not change the
  # numbers; the reference only writes its last one).
  workdir = tmp_path / "killed"
  victim = start(command(workdir, tmp_path / "never.npz", delay=0.25),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  reference = start(command(tmp_path / "uninterrupted", tmp_path / "reference.npz",
                            checkpoint_every=0),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not _finalized_steps(workdir) and time.time() < deadline and victim.poll() is None:
    time.sleep(0.05)
  assert victim.poll() is None, "the run ended before it could be killed"
  os.kill(victim.pid, signal.SIGKILL)
  victim.wait()
  saved = _finalized_steps(workdir)
  assert saved and every <= max(saved) < steps
  assert not os.path.exists(tmp_path / "never.npz")
  assert finish(reference)["resumed_from"] is None

  resumed = finish(start(command(workdir, tmp_path / "resumed.npz"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE))
  assert resumed["resumed_from"] == max(saved)
  expected, actual = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
  assert sorted(expected) == sorted(actual) and len(expected) > 0
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=1e-6, err_msg=key)
