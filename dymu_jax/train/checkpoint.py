"""Checkpoints: the train state plus a JSON record of the run, with orbax.

Layout: `<workdir>/checkpoints/<step>/{state, metadata}`, the newest `max_to_keep` kept. Saves
are asynchronous where orbax supports it (training goes on while the files are written); a
checkpoint is renamed into place only once complete, so a run killed mid-save leaves the
previous checkpoint as the newest one. The state saved is the canonical one (replicated on the
mesh, see `parallel.Parallel.canonical_state`), so a checkpoint restores into either parallel
mode. A state whose non-finite guard has tripped is never saved.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from dymu_jax.train import parallel as parallel_lib
from dymu_jax.train import state as state_lib

PyTree = Any
STATE, METADATA = "state", "metadata"
SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(os.fspath(workdir)), SUBDIR)


def _jsonable(value: Mapping[str, Any]) -> dict:
  """A JSON-safe copy (values JSON cannot hold become strings)."""
  return json.loads(json.dumps(dict(value), default=str))


class Checkpointer:
  """Saves and restores `TrainState`s under `<workdir>/checkpoints`.

  Args:
    workdir: the run's folder.
    max_to_keep: how many of the newest checkpoints to keep (None keeps all).
    save_interval_steps: `save` writes only at multiples of this step (`force` overrides),
      and the first time when the folder holds no checkpoint yet (orbax's initial save).
    async_save: write in the background where orbax can.
  """

  def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 (or None to keep all), got {max_to_keep}.")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, state: state_lib.TrainState, metadata: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` at its step; True when a save was started.

    Raises:
      FloatingPointError: the state's guard shows a non-finite loss (nothing is written).
    """
    guard = parallel_lib.to_host((state.step, state.nonfinite_step, state.nonfinite_task))
    step, bad_step, bad_task = (int(v) for v in guard)
    if state_lib.guard_tripped(bad_step):
      raise FloatingPointError(
          f"Refusing to checkpoint step {step}: its loss became non-finite at step {bad_step} "
          f"(task index {bad_task}).")
    if step in self.manager.all_steps():
      return False  # e.g. the final save of a run resumed at its last step
    record = _jsonable({**(metadata or {}), "step": step})
    return self.manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         METADATA: ocp.args.JsonSave(record)}),
        force=force)

  def check_compatible(self, step: int, abstract_state: PyTree) -> None:
    """Stops with one sentence when checkpoint `step` holds other arrays than the state wants.

    Checked on the stored tree's metadata, before any array is read.
    """
    stored = _array_specs(self.manager.item_metadata(step)[STATE])
    wanted = _array_specs(abstract_state)
    problems = [f"{path} is missing there" for path in sorted(set(wanted) - set(stored))]
    problems += [f"{path} is not expected here" for path in sorted(set(stored) - set(wanted))]
    problems += [f"{path} is {stored[path]} there and {wanted[path]} here"
                 for path in sorted(set(stored) & set(wanted)) if stored[path] != wanted[path]]
    if problems:
      shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
      raise ValueError(
          f"Checkpoint {step} in {self.directory} does not fit this method and optimizer "
          f"({shown}); resume with the run's own settings or use a new workdir.")

  def restore(self, step: int, abstract_state: PyTree) -> tuple[state_lib.TrainState, dict]:
    """(state, metadata) of checkpoint `step`, placed as `abstract_state`'s shardings say."""
    self.check_compatible(step, abstract_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                         METADATA: ocp.args.JsonRestore()}))
    return restored[STATE], dict(restored[METADATA])

  def metadata(self, step: int | None = None) -> dict:
    """The JSON record of checkpoint `step` (default: the newest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
    return dict(restored[METADATA])

  def wait(self) -> None:
    """Blocks until background saves are complete."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


def _array_specs(tree: PyTree) -> dict[str, str]:
  """"a/b/c" path -> "float32[3, 4]" for every array of a state tree (or its metadata)."""

  def key_name(key):
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(key_name(k) for k in path):
          f"{getattr(leaf, 'dtype', '?')}{list(getattr(leaf, 'shape', ()))}"
          for path, leaf in leaves}


def restore_latest(workdir: str | os.PathLike, abstract_state: PyTree
                   ) -> tuple[state_lib.TrainState, dict] | None:
  """(state, metadata) of the newest checkpoint of `workdir`, or None when there is none.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings (see
  `parallel.Parallel.abstract_state`); restore replicated on the mesh, then
  `Parallel.place_state` puts the state into the step's layout for either mode.
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  with Checkpointer(workdir, async_save=False) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      return None
    return checkpointer.restore(step, abstract_state)


def abstract_like(state: PyTree, sharding: jax.sharding.Sharding | None = None) -> PyTree:
  """The abstract tree (shapes, dtypes, shardings) of a concrete state."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding if sharding is not None else x.sharding),
      state)
