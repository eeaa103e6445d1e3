"""Checkpoints: the train state plus a JSON record of the run, with orbax.

Layout: `<workdir>/checkpoints/<step>/{state, metadata}`, the newest `max_to_keep` kept. Saves
are asynchronous where orbax supports it (training goes on while the files are written); a
checkpoint is renamed into place only once complete, so a run killed mid-save leaves the
previous checkpoint as the newest one. The state saved is the canonical one (replicated on the
mesh, see `parallel.Parallel.canonical_state`), so a checkpoint restores into either parallel
mode. A state whose non-finite guard has tripped is never saved.

Checkpoints heal: every save records a checksum (BLAKE2b) of each array in the JSON record, and
`restore_intact` verifies them after reading. A step that is incomplete (an item folder
missing, an empty step folder), unreadable (a truncated or deleted file, broken JSON) or whose
arrays do not match their checksums (flipped bytes) is reported in one sentence naming the step
and the file, and the next older step is used; training moves such steps aside to
`<workdir>/checkpoints_damaged/` so that the run rewrites them. Checkpoints written before
checksums existed are restored unverified.

The workdir may be on any filesystem `etils.epath` knows (`gs://bucket/run`...): orbax takes
epath paths, and the checks here read through `dymu_jax.files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from dymu_jax import files as files_lib
from dymu_jax.train import parallel as parallel_lib
from dymu_jax.train import state as state_lib

PyTree = Any
STATE, METADATA = "state", "metadata"
SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "checkpoints_damaged"  # where training moves steps that failed to restore
CHECKSUMS = "_checksums"  # key of the record: {array path: BLAKE2b hex digest}
ARRAYS = "_arrays"  # key of the record: {array path: "float32[3, 4]"}, as saved


class DamagedCheckpoint(ValueError):
  """A checkpoint step that is incomplete, unreadable or fails its checksums."""

  def __init__(self, step: int, where: str, reason: str):
    self.step, self.where, self.reason = step, where, reason
    super().__init__(f"checkpoint {step} is damaged ({where}: {reason})")


class NoIntactCheckpoint(FileNotFoundError):
  """Every checkpoint step of a folder is damaged."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """`<workdir>/checkpoints`: an absolute local path, or a URI (gs://bucket/run/checkpoints)."""
  return os.fspath(files_lib.run_path(workdir) / SUBDIR)


def has_checkpoint_dir(workdir: str | os.PathLike) -> bool:
  return files_lib.is_dir(checkpoint_dir(workdir))


def _report(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


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
    """The newest checkpoint's step whose folder is complete (both items present), or None.

    Cheap: no array is read; `restore_intact` verifies the content.
    """
    for step in reversed(self.all_steps()):
      if self._missing_item(step) is None:
        return step
    return None

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
    if not force and not self.manager.should_save(step):
      return False  # not a save step: skip the checksums too
    record = {**_jsonable({**(metadata or {}), "step": step}), CHECKSUMS: checksums(state),
              ARRAYS: _array_specs(state)}
    return self.manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         METADATA: ocp.args.JsonSave(record)}),
        force=force)

  def check_compatible(self, step: int, abstract_state: PyTree) -> None:
    """Stops with one sentence when checkpoint `step` holds other arrays than the state wants.

    Checked on the stored tree's metadata, before any array is read.

    Raises:
      DamagedCheckpoint: the stored tree's metadata cannot be read.
      ValueError: it reads, and holds other arrays (another method or optimizer).
    """
    try:
      stored = _array_specs(self.manager.item_metadata(step)[STATE])
    except Exception as error:  # pylint: disable=broad-except
      raise self._damage(step, STATE, error) from error
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
    """(state, metadata) of checkpoint `step`, placed as `abstract_state`'s shardings say,
    its arrays verified against the checksums saved with them.

    Raises:
      DamagedCheckpoint: the step is incomplete, unreadable or fails its checksums.
      ValueError: the step holds other arrays than `abstract_state` (see `check_compatible`).
    """
    record = self._record(step)
    expected = record.pop(CHECKSUMS, None)
    saved_arrays = record.pop(ARRAYS, None)
    self._check_state_files(step)
    try:
      self.check_compatible(step, abstract_state)
    except DamagedCheckpoint:
      raise
    except ValueError as error:
      if saved_arrays is not None and saved_arrays == _array_specs(abstract_state):
        # The record saved with the arrays lists exactly the wanted ones: the stored tree
        # description is what is damaged, not the run's settings.
        raise DamagedCheckpoint(step, f"{STATE}/_METADATA", "the stored tree does not match "
                                "the arrays recorded with it") from error
      raise
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
      state = restored[STATE]
    except Exception as error:  # pylint: disable=broad-except
      raise self._damage(step, STATE, error) from error
    if expected is not None:
      found = checksums(state)
      bad = [path for path in sorted(expected) if found.get(path) != expected[path]]
      if bad or set(found) != set(expected):
        shown = bad[0] if bad else "the set of arrays"
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DamagedCheckpoint(step, f"{STATE}/", f"{shown}{more} does not match its checksum")
    return state, record

  def restore_intact(self, abstract_state: PyTree, *,
                     accept: Callable[[int, dict], None] | None = None,
                     move_damaged: bool = False,
                     report: Callable[[str], None] = _report
                     ) -> tuple[int, state_lib.TrainState, dict] | None:
    """(step, state, metadata) of the newest checkpoint that reads and verifies; None when the
    folder holds no checkpoint.

    Each damaged newer step is reported in one sentence (`report`) and skipped. `accept(step,
    metadata)` may refuse a step by raising (e.g. another run's seed): that error propagates.
    `move_damaged` (training) moves the skipped steps to `<workdir>/checkpoints_damaged/`, so
    that the run writes those steps again.

    Raises:
      NoIntactCheckpoint: every step is damaged (one sentence listing each).
    """
    steps = list(reversed(self.all_steps()))
    damaged = []
    for i, step in enumerate(steps):
      try:
        if accept is not None:
          accept(step, self._record(step, with_checksums=False))
        state, record = self.restore(step, abstract_state)
      except DamagedCheckpoint as damage:
        damaged.append(damage)
        if i + 1 < len(steps):
          report(f"{_capitalised(str(damage))} in {self.directory}; falling back to step "
                 f"{steps[i + 1]}.")
        continue
      if damaged and move_damaged:
        self._move_aside([d.step for d in damaged], report)
      return step, state, record
    if not damaged:
      return None
    listed = "; ".join(str(d) for d in damaged)
    raise NoIntactCheckpoint(
        f"No intact checkpoint in {self.directory} ({listed}); move that folder away to start "
        f"the run over.")

  def metadata(self, step: int | None = None) -> dict:
    """The JSON record of checkpoint `step` (default: the newest one whose record reads)."""
    if step is not None:
      return self._record(step, with_checksums=False)
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        return self._record(step, with_checksums=False)
      except DamagedCheckpoint as damage:
        damaged.append(str(damage))
    if damaged:
      raise NoIntactCheckpoint(f"No readable checkpoint record in {self.directory} "
                               f"({'; '.join(damaged)}).")
    raise FileNotFoundError(f"No checkpoint in {self.directory}.")

  # -- damage detection ------------------------------------------------------------------------

  def _step_dir(self, step: int) -> str:
    return os.fspath(files_lib.run_path(self.directory) / str(step))

  def _missing_item(self, step: int) -> str | None:
    for item in (STATE, METADATA):
      if not files_lib.is_dir(files_lib.run_path(self._step_dir(step)) / item):
        return item
    return None

  def _record(self, step: int, with_checksums: bool = True) -> dict:
    """Checkpoint `step`'s JSON record (DamagedCheckpoint when incomplete or unreadable)."""
    missing = self._missing_item(step)
    if missing is not None:
      raise DamagedCheckpoint(step, f"{missing}/", "the folder is missing")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
      record = restored[METADATA]
    except Exception as error:  # pylint: disable=broad-except
      raise self._damage(step, f"{METADATA}/{METADATA}", error) from error
    if not isinstance(record, Mapping):
      raise DamagedCheckpoint(step, f"{METADATA}/", "the record is not a JSON object")
    record = dict(record)
    if not with_checksums:
      record.pop(CHECKSUMS, None)
      record.pop(ARRAYS, None)
    return record

  def _check_state_files(self, step: int) -> None:
    """Names the file when one of the state's JSON files (tree, shardings, array metadata) is
    missing or does not parse: orbax's own errors often name none."""
    step_dir = files_lib.run_path(self._step_dir(step))
    for name in _STATE_JSON_FILES:
      paths = sorted((step_dir / STATE).glob(name), key=os.fspath)
      if not paths and name in _REQUIRED_STATE_FILES:
        raise DamagedCheckpoint(step, f"{STATE}/{name}", "the file is missing")
      for path in paths:
        try:
          json.loads(files_lib.read_bytes(path).decode("utf-8"))
        except (OSError, ValueError) as error:
          raise DamagedCheckpoint(step, os.fspath(path.relative_to(step_dir)),
                                  f"{type(error).__name__}: {_first_line(error)}") from error

  def _damage(self, step: int, item: str, error: BaseException) -> DamagedCheckpoint:
    """A DamagedCheckpoint naming the file that `error` (or an error it chains) names, else
    the item folder, with the innermost error's first line as the reason."""
    chain, seen = [], error
    while seen is not None and len(chain) < 10:
      chain.append(seen)
      seen = seen.__cause__ or seen.__context__
    step_dir = self._step_dir(step)
    where = item if "/" in item else f"{item}/"
    for link in chain:
      match = re.search(re.escape(step_dir) + r"/([^\s'\"]+)", str(link))
      if match:
        where = match.group(1).rstrip(".,:;)]")
        break
    inner = chain[-1]
    reason = f"{type(inner).__name__}: {_first_line(inner)}"
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return DamagedCheckpoint(step, where, reason)

  def _move_aside(self, steps: list[int], report: Callable[[str], None]) -> None:
    target_root = files_lib.makedirs(files_lib.run_path(self.directory).parent / DAMAGED_SUBDIR)
    for step in steps:
      target, k = target_root / str(step), 1
      while target.exists():
        target, k = target_root / f"{step}.{k}", k + 1
      files_lib.move_dir(self._step_dir(step), target)
      report(f"Moved damaged checkpoint {step} to {target}; training writes that step again.")
    self.manager.reload()

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


# The JSON files orbax writes in a state folder (glob patterns); the first is required.
_STATE_JSON_FILES = ("_METADATA", "_sharding", "array_metadatas/process_*")
_REQUIRED_STATE_FILES = ("_METADATA",)


def _first_line(error: BaseException) -> str:
  text = str(error) or type(error).__name__
  return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _capitalised(text: str) -> str:
  return text[:1].upper() + text[1:]


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _paths_and_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  return [("/".join(_key_name(k) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _array_specs(tree: PyTree) -> dict[str, str]:
  """"a/b/c" path -> "float32[3, 4]" for every array of a state tree (or its metadata)."""
  return {path: f"{getattr(leaf, 'dtype', '?')}{list(getattr(leaf, 'shape', ()))}"
          for path, leaf in _paths_and_leaves(tree)}


def checksums(tree: PyTree) -> dict[str, str]:
  """"a/b/c" path -> BLAKE2b digest (hex) of the array's dtype, shape and bytes.

  Replicated arrays of a multi-host run are read from this process's first copy.
  """
  digests = {}
  for path, leaf in _paths_and_leaves(parallel_lib.to_host(tree)):
    array = np.ascontiguousarray(leaf)
    digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=16)
    digest.update(array.reshape(-1).view(np.uint8).data)
    digests[path] = digest.hexdigest()
  return digests


def restore_latest(workdir: str | os.PathLike, abstract_state: PyTree
                   ) -> tuple[state_lib.TrainState, dict] | None:
  """(state, metadata) of the newest checkpoint of `workdir`, or None when there is none.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings (see
  `parallel.Parallel.abstract_state`); restore replicated on the mesh, then
  `Parallel.place_state` puts the state into the step's layout for either mode.
  """
  if not has_checkpoint_dir(workdir):
    return None
  with Checkpointer(workdir, async_save=False) as checkpointer:
    restored = checkpointer.restore_intact(abstract_state)
  return None if restored is None else restored[1:]


def abstract_like(state: PyTree, sharding: jax.sharding.Sharding | None = None) -> PyTree:
  """The abstract tree (shapes, dtypes, shardings) of a concrete state."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding if sharding is not None else x.sharding),
      state)
