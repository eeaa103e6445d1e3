"""Checkpoints: save/keep/restore, the non-finite refusal, kill-and-resume of a real run, and
the fallback past damaged checkpoints (incomplete, unreadable, or failing their checksums)."""

import json
import os
import signal
import subprocess
import sys
import time

import glob
import shutil

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
    assert ckpt.metadata(6) == {"seed": 3, "flags": {"lr": 0.1}, "step": 6}  # no checksums
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


# -- damaged checkpoints --------------------------------------------------------------------------

def _big_state(step: int) -> state_lib.TrainState:
  """Arrays large enough that orbax stores them in data files (small ones sit in the index)."""
  variables = {"params": {"w": jnp.arange(40000.0) * step, "b": jnp.full((2, 3), float(step))}}
  state = state_lib.create(variables, optax.adam(1e-3), jax.random.PRNGKey(7), step=step)
  return jax.device_put(state, parallel_lib.Parallel("mesh").replicated)


def _two_steps(workdir) -> str:
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as ckpt:
    for step in (1, 2):
      assert ckpt.save(_big_state(step), {"seed": 0}, force=True)
  return os.path.join(workdir, "checkpoints", "2")


def _largest_file(folder: str) -> str:
  files = [f for f in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _flip(path: str, count: int = 8) -> None:
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for i in range(middle, middle + count):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(step_dir: str) -> None:
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGE = {  # name -> (damage(step folder), what the report names)
    "deleted data file": (lambda d: os.remove(_largest_file(os.path.join(d, "state"))),
                          "checkpoint 2 is damaged (state/"),
    "truncated data file": (lambda d: _truncate(_largest_file(os.path.join(d, "state"))),
                            "checkpoint 2 is damaged (state/"),
    "flipped bytes": (lambda d: _flip(_largest_file(os.path.join(d, "state"))),
                      "checkpoint 2 is damaged (state/: params/w does not match its checksum)"),
    "empty step folder": (_empty, "checkpoint 2 is damaged (state/: the folder is missing)"),
    "broken metadata": (lambda d: open(os.path.join(d, "metadata", "metadata"), "w").write("{x"),
                        "checkpoint 2 is damaged (metadata/metadata: JSONDecodeError"),
    "deleted tree description": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                                 "checkpoint 2 is damaged (state/_METADATA: the file is missing)"),
    "truncated tree description": (lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
                                   "checkpoint 2 is damaged (state/_METADATA: JSONDecodeError"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, kind):
  damage, named = DAMAGE[kind]
  damage(_two_steps(tmp_path))
  reports = []
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    step, state, metadata = ckpt.restore_intact(checkpoint_lib.abstract_like(_big_state(0)),
                                                report=reports.append)
  assert step == 1 and metadata == {"seed": 0, "step": 1}
  chex.assert_trees_all_equal(parallel_lib.to_host(state), parallel_lib.to_host(_big_state(1)))
  assert len(reports) == 1 and named.lower() in reports[0].lower(), reports
  assert reports[0].endswith("; falling back to step 1.") and "\n" not in reports[0]
  assert os.path.isdir(tmp_path / "checkpoints" / "2")  # left in place unless asked


def test_training_moves_damaged_steps_aside_and_writes_them_again(tmp_path):
  _flip(_largest_file(os.path.join(_two_steps(tmp_path), "state")))
  reports = []
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    step, _, _ = ckpt.restore_intact(checkpoint_lib.abstract_like(_big_state(0)),
                                     move_damaged=True, report=reports.append)
    assert step == 1 and ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.save(_big_state(2), {"seed": 0}, force=True)  # the step is written again
  assert os.path.isdir(tmp_path / "checkpoints_damaged" / "2")
  assert "Moved damaged checkpoint 2 to" in reports[1]
  restored = checkpoint_lib.restore_latest(tmp_path, checkpoint_lib.abstract_like(_big_state(0)))
  assert int(restored[0].step) == 2


def test_no_intact_checkpoint_is_one_sentence_listing_each_step(tmp_path):
  step_dir = _two_steps(tmp_path)
  _flip(_largest_file(os.path.join(step_dir, "state")))
  _empty(os.path.join(os.path.dirname(step_dir), "1"))
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    assert ckpt.latest_step() == 2  # cheap: only the folders are checked
    with pytest.raises(checkpoint_lib.NoIntactCheckpoint,
                       match=r"^No intact checkpoint in .*checkpoints \(checkpoint 2 is damaged "
                             r"\(state/: params/w does not match its checksum\); checkpoint 1 is "
                             r"damaged \(state/: the folder is missing\)\); move that folder away"):
      ckpt.restore_intact(checkpoint_lib.abstract_like(_big_state(0)), report=print)
    assert ckpt.metadata() == {"seed": 0, "step": 2}  # the newest record that reads


def test_a_refusal_by_accept_is_not_taken_for_damage(tmp_path):
  _two_steps(tmp_path)

  def other_seed(step, metadata):
    raise ValueError(f"seed {metadata['seed']} of step {step} is not this run's")

  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    with pytest.raises(ValueError, match="seed 0 of step 2 is not this run's"):
      ckpt.restore_intact(checkpoint_lib.abstract_like(_big_state(0)), accept=other_seed)


def test_checkpoints_without_checksums_restore_unverified(tmp_path):
  record_file = os.path.join(_two_steps(tmp_path), "metadata", "metadata")
  with open(record_file) as f:
    record = json.load(f)
  assert set(record[checkpoint_lib.CHECKSUMS]) == {
      path for path in checkpoint_lib.checksums(_big_state(2))}
  del record[checkpoint_lib.CHECKSUMS]  # as written before checksums existed
  with open(record_file, "w") as f:
    json.dump(record, f)
  restored = checkpoint_lib.restore_latest(tmp_path, checkpoint_lib.abstract_like(_big_state(0)))
  assert int(restored[0].step) == 2


def test_checksums_see_dtype_shape_and_every_byte():
  base = {"a": np.zeros((2, 3), np.float32)}
  digest = checkpoint_lib.checksums(base)["a"]
  assert checkpoint_lib.checksums({"a": np.zeros((3, 2), np.float32)})["a"] != digest
  assert checkpoint_lib.checksums({"a": np.zeros((2, 3), np.int32)})["a"] != digest
  changed = np.zeros((2, 3), np.float32)
  changed[1, 2] = 1e-30
  assert checkpoint_lib.checksums({"a": changed})["a"] != digest
  assert checkpoint_lib.checksums({"a": np.zeros((2, 3), np.float32)})["a"] == digest
