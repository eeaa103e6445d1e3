"""Run files on any filesystem: every checkpoint folder, JSON, Markdown, plot, metrics and cache
file of a run goes through here, as an `etils.epath.Path` (local folders, `gs://`, `s3://` and
any scheme registered with `epath.register_path_cls`).

`run_path(workdir)` is the one place a `--workdir` (or an output folder) becomes a path: a local
path is expanded (`~`) and made absolute, exactly as before; a URI such as `gs://bucket/run` is
kept as given (never `os.path.abspath`, which would turn it into `<cwd>/gs:/bucket/run`).

Writes are atomic. Locally a write goes to a temporary file in the same folder, is flushed to
disk, and is renamed over the target (`os.replace`, atomic on POSIX and Windows), so a crash, a
kill or a full disk leaves either the old file or the new one, never half of one. On an object
store (gs, s3, az, hf) an object only appears once its upload is complete, so the write is
direct; on other schemes it goes through a temporary file and `Path.replace`. (`read_json` is
the reading side: a file that does not parse is named in one sentence, so that caches are
rebuilt and summaries rewritten instead of failing with an unnamed JSON error.)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike
# Schemes whose objects appear whole once uploaded: a direct write is already atomic there.
OBJECT_STORES = ("gs", "s3", "az", "hf")


def scheme(path: PathLike) -> str | None:
  """The URI scheme of `path` ("gs" for gs://bucket/run), None for a local path."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  return head if sep and head and "/" not in head else None


def is_local(path: PathLike) -> bool:
  return scheme(path) is None


def run_path(path: PathLike) -> epath.Path:
  """`path` (a workdir, an output folder or a file in one) as an `epath.Path`: a local path
  expanded and absolute, a URI (gs://bucket/run) as given."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  return epath.Path(os.fspath(path))


def run_dir(path: PathLike) -> str:
  """`run_path` as a string: what runs record and print (the absolute path, or the URI)."""
  return os.fspath(run_path(path))


def _path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`, a relative local path left relative (as `open` reads it)."""
  return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


# ----------------------------------------------------------------------------------------------
# Reading and queries.


def exists(path: PathLike) -> bool:
  return _path(path).exists()


def is_dir(path: PathLike) -> bool:
  return _path(path).is_dir()


def is_file(path: PathLike) -> bool:
  return _path(path).is_file()


def read_bytes(path: PathLike) -> bytes:
  with _path(path).open("rb") as f:
    return f.read()


def read_text(path: PathLike) -> str:
  """The UTF-8 text of `path` (undecodable bytes replaced: damaged lines stay visible)."""
  return read_bytes(path).decode("utf-8", errors="replace")


class DamagedFile(ValueError):
  """A run file that exists but does not parse (e.g. cut short by a kill before writes were
  atomic, or edited by hand)."""


def read_json(path: PathLike) -> Any:
  """The JSON value in `path`.

  Raises:
    DamagedFile: the file is not UTF-8 JSON (one sentence naming it and where it breaks).
  """
  path = os.fspath(path)
  try:
    return json.loads(read_bytes(path).decode("utf-8"))
  except json.JSONDecodeError as error:
    raise DamagedFile(f"{path} is damaged ({error.msg} at line {error.lineno}, column "
                      f"{error.colno})") from None
  except UnicodeDecodeError:
    raise DamagedFile(f"{path} is damaged (not UTF-8 text)") from None


# ----------------------------------------------------------------------------------------------
# Writing.


def makedirs(path: PathLike) -> epath.Path:
  """Creates the folder `path` and its parents (no error when it exists); returns it."""
  path = _path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def atomic_write(path: PathLike, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to `path` so that a reader sees the old or the new file."""
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if not is_local(path):
    _remote_write(_path(path), payload)
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
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


def _remote_write(path: epath.Path, payload: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  if scheme(path) in OBJECT_STORES:
    path.write_bytes(payload)  # the object appears whole once uploaded
    return
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    temporary.write_bytes(payload)
    temporary.replace(path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


def write_json(path: PathLike, value: Any, indent: int | None = 1) -> None:
  """`json.dump` made atomic."""
  atomic_write(path, json.dumps(value, indent=indent))


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to `path` (created if missing). Locally a plain append; elsewhere the file
  is read and written whole (object stores cannot append), atomically."""
  if is_local(path):
    with open(os.fspath(path), "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = read_bytes(path) if exists(path) else b""
  atomic_write(path, old + text.encode("utf-8"))


def save_figure(fig, path: PathLike, **kwargs) -> None:
  """`fig.savefig(path, **kwargs)` made atomic (the format comes from the file extension)."""
  name = _path(path).name
  buffer = io.BytesIO()
  fig.savefig(buffer, format=os.path.splitext(name)[1].lstrip(".") or "png", **kwargs)
  atomic_write(path, buffer.getvalue())


def copy_file(source: PathLike, target: PathLike) -> None:
  """Copies the file `source` to `target`, across filesystems too (atomically off the local
  disk)."""
  if is_local(source) and is_local(target):
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(target))), exist_ok=True)
    shutil.copyfile(os.fspath(source), os.fspath(target))
    return
  atomic_write(target, read_bytes(source))


def remove(path: PathLike, missing_ok: bool = True) -> None:
  _path(path).unlink(missing_ok=missing_ok)


def move_dir(source: PathLike, target: PathLike) -> None:
  """Moves the folder `source` to `target`: a rename, or on object stores (which have no folder
  rename) a copy of every file and a delete."""
  if is_local(source) and is_local(target):
    shutil.move(os.fspath(source), os.fspath(target))
    return
  source, target = _path(source), _path(target)
  if scheme(source) not in OBJECT_STORES and scheme(target) == scheme(source):
    source.rename(target)
    return
  for folder, _, names in source.walk():
    relative = os.fspath(folder)[len(os.fspath(source)):].lstrip("/")
    for name in names:
      destination = target / relative / name if relative else target / name
      atomic_write(destination, read_bytes(folder / name))
  source.rmtree()


# ----------------------------------------------------------------------------------------------
# Flag files (local text files of `--name=value` lines).


def flag_file_args(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
  """The flags of a flag file as command-line arguments, with `--flagfile=` lines inside it
  expanded in place. An included path is looked up next to the including file, then in each
  folder above it, then from the working directory: the project's files include
  `experiments/flags/base/<dataset>.flags`, which absl alone finds from the repository root and
  this finds from anywhere. Blank lines and lines starting with # or // are skipped; a loop of
  includes stops with one sentence."""
  path = os.path.abspath(os.path.expanduser(path))
  if path in _seen:
    raise ValueError(f"The flag file {path} includes itself (through "
                     f"{' -> '.join(_seen)}); remove the loop.")
  if not os.path.isfile(path):
    raise ValueError(f"--flagfile={path} does not exist; give the path of a flag file, e.g. "
                     f"experiments/flags/synthetic_static.flags.")
  args = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith(("#", "//")):
        continue
      name, sep, included = line.partition("=")
      if sep and name.lstrip("-") == "flagfile":
        args.extend(flag_file_args(_included(path, os.path.expanduser(included)),
                                   (*_seen, path)))
      else:
        args.append(line)
  return args


def _included(including: str, included: str) -> str:
  """Where the flag file `included` (named inside `including`) is: see `flag_file_args`."""
  if os.path.isabs(included):
    return included
  folder = os.path.dirname(including)
  while True:
    candidate = os.path.join(folder, included)
    if os.path.isfile(candidate):
      return candidate
    parent = os.path.dirname(folder)
    if parent == folder:
      return included  # from the working directory (or not found: reported by the caller)
    folder = parent
