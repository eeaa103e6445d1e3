"""Atomic file writes: every JSON, Markdown, plot and cache file of a run goes through here.
(`read_json` is the reading side: a file that does not parse is named in one sentence, so that
caches are rebuilt and summaries rewritten instead of failing with an unnamed JSON error.)

A write goes to a temporary file in the same folder, is flushed to disk, and is renamed over
the target (`os.replace`, atomic on POSIX and Windows), so a crash, a kill or a full disk
leaves either the old file or the new one, never half of one; a reader never sees a partial
file. One home for run outputs also keeps the place where another filesystem would plug in.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path` through a temporary file and a rename."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


class DamagedFile(ValueError):
  """A run file that exists but does not parse (e.g. cut short by a kill before writes were
  atomic, or edited by hand)."""


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`.

  Raises:
    DamagedFile: the file is not UTF-8 JSON (one sentence naming it and where it breaks).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except json.JSONDecodeError as error:
    raise DamagedFile(f"{path} is damaged ({error.msg} at line {error.lineno}, column "
                      f"{error.colno})") from None
  except UnicodeDecodeError:
    raise DamagedFile(f"{path} is damaged (not UTF-8 text)") from None


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
  """`json.dump` made atomic."""
  atomic_write(path, json.dumps(value, indent=indent))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
  """`fig.savefig(path, **kwargs)` made atomic (the format comes from the file extension)."""
  path = os.fspath(path)
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(path)[1].lstrip(".") or "png", **kwargs)
  atomic_write(path, buffer.getvalue())
