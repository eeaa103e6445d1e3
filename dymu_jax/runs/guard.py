"""One run per workdir: a lock against concurrent runs, and no silent change of flags on resume.

Two training commands on one workdir used to both exit 0, the second run's checkpoints
replacing the first's while `metrics.jsonl` interleaved both; and resuming a static run's
workdir with `--method=ecmt` or another learning rate continued it as a hybrid that no flag
file describes. So:

* `WorkdirLock(workdir)` holds `<workdir>/.dymu_lock` ({pid, host, started}) for the duration of
  a training command. A second command on the same workdir stops with one sentence while the
  owner lives; a lock whose process is gone (same host) is taken over with a message.
* `check_resume_flags(workdir, flags)` compares the flags saved with the newest checkpoint with
  this command's. Flags that only say how long, how often or where (`CHANGEABLE`) may change;
  any other difference stops the command with one sentence listing the differences, unless
  `--allow_changed_flags`, which records them in `<workdir>/flag_history.jsonl`.

Both work on a workdir on any `etils.epath` filesystem (gs://bucket/run): there the lock file
is written and read through epath, which has no exclusive create, so two commands starting in
the same instant may both pass; any later one is refused as locally.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from typing import Any, Mapping

from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax.train import stages as stages_lib

LOCK_FILE = ".dymu_lock"
HISTORY_FILE = "flag_history.jsonl"

# Flags a resumed run may change: its length, its logging/evaluation cadence, where its data
# and outputs live, how it is spread over devices, and how errors are shown.
CHANGEABLE = frozenset({
    "steps", "workdir", "data_dir", "eval_every",
    "eval_batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
    "prefetch", "traceback", "multi_host", "parallel", "allow_changed_flags",
    "dymu_eval_resources", "execution", "compilation_cache", "compilation_cache_min_seconds",
})


def _normal(value: Any) -> Any:
  """JSON round trip: tuples and lists compare equal, as saved flags are JSON."""
  return json.loads(json.dumps(value))


def changed_flags(saved: Mapping[str, Any], current: Mapping[str, Any],
                  ignore_prefix: str | None = None) -> dict[str, tuple]:
  """{flag: (saved value, current value)} of the flags that differ and may not change.

  Flags missing from `saved` (added to the library after that run was saved) are skipped, and
  so are flags starting with `ignore_prefix`.
  """
  return {name: (saved[name], current[name]) for name in sorted(current)
          if name in saved and name not in CHANGEABLE
          and not (ignore_prefix and name.startswith(ignore_prefix))
          and _normal(saved[name]) != _normal(current[name])}


def check_resume_flags(workdir: str, current: Mapping[str, Any], *, allow: bool,
                       ignore_prefix: str | None = None) -> dict:
  """Refuses (ValueError) to resume `workdir` with changed flags unless `allow`; returns them.

  With `allow`, the changes are appended to `<workdir>/flag_history.jsonl`. `ignore_prefix`:
  flags checked elsewhere (a DYMU stage's own "dymu_" options: its inputs and affinity are
  checked against what the stage was trained on by the stage runner).
  """
  metadata = stages_lib.saved_metadata(workdir)
  if metadata is None:
    return {}
  # Options saved under a former name compare under their flag.
  saved = methods_lib.normalise_flag_values(metadata.get("run", {}).get("flags") or {})
  changes = changed_flags(saved, current, ignore_prefix)
  if not changes:
    return {}
  listed = ", ".join(f"--{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())
  if not allow:
    raise ValueError(f"{workdir} holds a run trained with other flags ({listed}); resume with "
                     f"its flags, use a new --workdir, or pass --allow_changed_flags to "
                     f"continue it anyway (recorded in {HISTORY_FILE}).")
  record = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
            "step": stages_lib.latest_step(workdir),
            "changed": {k: {"from": v[0], "to": v[1]} for k, v in changes.items()}}
  files_lib.append_text(files_lib.run_path(workdir) / HISTORY_FILE, json.dumps(record) + "\n")
  print(f"continuing {workdir} with changed flags ({listed}); recorded in {HISTORY_FILE}",
        flush=True)
  return changes


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` one training command at a time on `workdir`."""

  def __init__(self, workdir: str):
    self.path = files_lib.run_path(workdir) / LOCK_FILE
    self.held = False

  def _owner(self) -> dict | None:
    try:
      return json.loads(files_lib.read_bytes(self.path).decode("utf-8"))
    except (OSError, ValueError):
      return None

  def _create(self, record: dict) -> None:
    """Writes the lock file holding `record`; FileExistsError when there is one."""
    if files_lib.is_local(self.path):
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
      return
    # No exclusive create on object stores: look, write, and read back who holds it.
    if self.path.exists():
      raise FileExistsError(self.path)
    self.path.write_text(json.dumps(record))
    if self._owner() != record:
      raise FileExistsError(self.path)

  def __enter__(self):
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        self._create(record)
      except FileExistsError:
        owner = self._owner()
        if owner is None or (owner.get("host") == record["host"]
                             and not _alive(int(owner.get("pid", -1)))):
          print(f"taking over the stale lock {self.path} "
                f"({'unreadable' if owner is None else 'pid ' + str(owner.get('pid'))} is gone)",
                flush=True)
          files_lib.remove(self.path)
          continue
        raise ValueError(f"{self.path.parent} is in use by another training run "
                         f"(pid {owner.get('pid')} on {owner.get('host')}, started "
                         f"{owner.get('started')}); wait for it, or use another --workdir "
                         f"(delete {self.path} if that run is gone).") from None
      self.held = True
      return self
    raise ValueError(f"Could not take the lock {self.path}; another run is starting there.")

  def __exit__(self, *exc):
    if self.held and (self._owner() or {}).get("pid") == os.getpid():
      files_lib.remove(self.path)
    self.held = False
    return False
