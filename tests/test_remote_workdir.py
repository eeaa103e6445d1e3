"""A run on a non-local filesystem: `--workdir=fake://bucket/runs/ecmt` trains, resumes with more
steps, is evaluated and exported, and every file lands in the fake store, none under the cwd.

`fake://` is an `etils.epath` scheme registered here (`FakePath`, stored like epath's `gs://`):
its files live in the folder $DYMU_FAKE_STORE, reached only through `FakeBackend`, which maps
`fake://<key>` to `<store>/<key>`. `os.path` on the URI string finds nothing there, so a run
file that skipped epath would be missed, and an audit hook stops (and names, FAKE_OS_ACCESS)
any `open`, `mkdir`, `rename`... of a path holding "fake:". Orbax writes the arrays with
tensorstore, which knows local paths and gs:// only: its path normalisation maps fake:// onto
the store as well (the part tensorstore's gcs driver plays for gs://).

The CLIs run as subprocesses, in an empty cwd: `python tests/test_remote_workdir.py MODULE
FLAGS...` installs the scheme and runs `experiments.MODULE` as __main__.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEME = "fake://"
STORE_ENV = "DYMU_FAKE_STORE"

# ----------------------------------------------------------------------------------------------
# The fake filesystem.


def _store() -> str:
  return os.environ[STORE_ENV]


def _local(path) -> str:
  text = os.fspath(path)
  if not text.startswith(SCHEME):
    raise ValueError(f"not a {SCHEME} path: {text!r}")
  return os.path.join(_store(), text[len(SCHEME):])


def _remote(local) -> str:
  return SCHEME + os.path.relpath(os.fspath(local), _store())


class FakeBackend(backend_lib.Backend):
  """epath's backend calls on fake:// paths, done by the os backend in the store folder."""

  os_backend = backend_lib.os_backend

  def open(self, path, mode):
    return self.os_backend.open(_local(path), mode)

  def exists(self, path):
    return self.os_backend.exists(_local(path))

  def isdir(self, path):
    return self.os_backend.isdir(_local(path))

  def listdir(self, path):
    return self.os_backend.listdir(_local(path))

  def glob(self, path):
    return [_remote(p) for p in self.os_backend.glob(_local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for folder, dirs, files in self.os_backend.walk(_local(top), top_down=top_down,
                                                    on_error=on_error):
      yield _remote(folder), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    self.os_backend.makedirs(_local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self.os_backend.mkdir(_local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    self.os_backend.rmtree(_local(path))

  def remove(self, path):
    self.os_backend.remove(_local(path))

  def rename(self, path, dst):
    self.os_backend.rename(_local(path), _local(dst))

  def replace(self, path, dst):
    self.os_backend.replace(_local(path), _local(dst))

  def copy(self, path, dst, overwrite):
    self.os_backend.copy(_local(path), _local(dst), overwrite=overwrite)

  def stat(self, path):
    return self.os_backend.stat(_local(path))


_BACKEND = FakeBackend()


@epath.register_path_cls(SCHEME)
class FakePath(gpath.PosixGPath):
  """fake://bucket/run, held as the parts ("/", "fake", "bucket", "run") as epath holds gs://."""

  def __new__(cls, *parts):
    full = "/".join(os.fspath(p) for p in parts)
    if full.startswith(SCHEME):
      parts = ("/fake/" + full[len(SCHEME):],)
    return super().__new__(cls, *parts)

  @property
  def _uri_scheme(self):
    return "fake" if self.parts[:2] == ("/", "fake") else None

  @property
  def _backend(self):
    return _BACKEND if self._uri_scheme else backend_lib.os_backend


def _install_in_subprocess() -> None:
  """Tensorstore's paths mapped onto the store, and no os-level access to a "fake:" path."""
  # pylint: disable=g-import-not-at-top,protected-access
  from orbax.checkpoint._src.serialization import tensorstore_utils
  normalize = tensorstore_utils._normalize_path

  def fake_normalize(path):
    path = normalize(path)  # os.path.normpath: fake://x becomes fake:/x
    return os.path.join(_store(), path[len("fake:/"):]) if path.startswith("fake:/") else path

  tensorstore_utils._normalize_path = fake_normalize

  def fake(value) -> bool:
    if isinstance(value, bytes):
      value = value.decode(errors="replace")
    elif isinstance(value, os.PathLike):
      value = os.fspath(value)
    return isinstance(value, str) and "fake:" in value  # also <cwd>/fake:/bucket/...

  def hook(event, args):
    if event in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.listdir",
                 "os.scandir", "os.chmod", "os.truncate", "shutil.copyfile", "shutil.move",
                 "shutil.rmtree") and any(fake(a) for a in args):
      print(f"FAKE_OS_ACCESS {event} {args!r}", file=sys.stderr, flush=True)
      raise RuntimeError(f"{event} of a fake:// path through os: {args!r}")

  sys.addaudithook(hook)


# ----------------------------------------------------------------------------------------------
# The run.

WORKDIR = "fake://bucket/runs/ecmt"
TRAIN = ["--dataset=synthetic", "--image_size=16", "--num_train=32", "--num_test=16",
         "--method=ecmt", "--backbone=resnet_small", "--tasks=depth,edges", "--head_width=8",
         "--width_choices=0.5,1.0", "--num_subnets=2", "--batch_size=16", "--checkpoint_every=1",
         "--log_every=1", "--noprogress"]
SEARCH = ["--calibration_examples=16", "--score_examples=16", "--eval_batch_size=16"]


def run_cli(module, *args, store, cwd, timeout=600):
  env = {**os.environ, STORE_ENV: str(store),
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, os.path.abspath(__file__), module, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "FAKE_OS_ACCESS" not in result.stderr, result.stderr[-3000:]
  return result


def _train_records(path) -> list[int]:
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records if r["split"] == "train"]


def test_train_resume_evaluate_export_on_a_fake_filesystem(tmp_path, monkeypatch):
  store, cwd = tmp_path / "store", tmp_path / "cwd"
  store.mkdir()
  cwd.mkdir()
  run = store / "bucket" / "runs" / "ecmt"

  first = run_cli("train", *TRAIN, "--steps=2", f"--workdir={WORKDIR}", store=store, cwd=cwd)
  assert f"metrics: {WORKDIR}/metrics.jsonl" in first.stdout
  assert f"TensorBoard event files: {WORKDIR} (tensorboard --logdir there)" in first.stdout
  assert f"checkpoints: {WORKDIR}/checkpoints" in first.stdout
  assert sorted(os.listdir(run / "checkpoints")) == ["1", "2"]

  second = run_cli("train", *TRAIN, "--steps=3", f"--workdir={WORKDIR}", store=store, cwd=cwd)
  assert "resuming at step 2 of 3" in second.stdout
  assert sorted(os.listdir(run / "checkpoints")) == ["1", "2", "3"]
  assert _train_records(run / "metrics.jsonl") == [1, 2, 3]
  events = sorted(p for p in os.listdir(run) if p.startswith("events.out.tfevents."))
  assert len(events) == 2 and all((run / e).stat().st_size > 0 for e in events)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["method"] == "ecmt" and summary["steps"] == 3
  assert not (run / ".dymu_lock").exists()  # released through epath

  evaluation = run_cli("evaluate", f"--workdir={WORKDIR}", "--budgets=1.0",
                       "--num_preferences=2", "--budget_check_points=2", *SEARCH,
                       store=store, cwd=cwd)
  assert f"evaluating ecmt from {WORKDIR} (step 3)" in evaluation.stdout
  results = json.loads((run / "eval" / "results.json").read_text())
  assert results["workdir"] == WORKDIR and results["step"] == 3
  assert results["prepare_cache_dir"] == WORKDIR  # cost_table.json, encoder_scores.json there
  assert "| budget |" in (run / "eval" / "report.md").read_text()
  assert results["plots"]
  for plot in results["plots"]:
    assert (run / "eval" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (run / "encoder_scores.json").is_file() and (run / "cost_table.json").is_file()

  export = run_cli("export", f"--workdir={WORKDIR}", *SEARCH, store=store, cwd=cwd)
  assert "scoring" not in export.stdout  # the encoder scores cached by evaluate were read
  (folder,) = os.listdir(run / "export")
  assert f"to {WORKDIR}/export/{folder}" in export.stdout
  assert sorted(os.listdir(run / "export" / folder)) == ["network.json", "variables.msgpack"]

  # The export loads back from the URI, naming the run it came from.
  from dymu_jax.models import serialize  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(STORE_ENV, str(store))
  _, _, extra = serialize.load_network(f"{WORKDIR}/export/{folder}")
  assert extra["source_workdir"] == WORKDIR and extra["checkpoint_step"] == 3

  # Nothing went to a local "fake:" folder, and writes left no temporary files.
  stray = [os.path.join(d, n) for d, dirs, files in os.walk(cwd) for n in dirs + files
           if n.startswith("fake:")]
  assert not stray and not os.path.exists(os.path.join(ROOT, "fake:"))
  leftovers = [n for _, _, files in os.walk(store) for n in files if n.endswith(".tmp")]
  assert not leftovers


def test_run_paths_resolve_local_folders_only(tmp_path, monkeypatch):
  from dymu_jax import files  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  assert os.fspath(files.run_path("runs/a")) == str(tmp_path / "runs" / "a")
  assert files.run_dir("~/x") == os.path.join(os.path.expanduser("~"), "x")
  assert files.run_dir("gs://bucket/run") == "gs://bucket/run"
  assert files.run_dir("fake://bucket/run/") == "fake://bucket/run"
  assert files.scheme("gs://bucket/run") == "gs" and files.is_local("/tmp/a://b")


def test_event_files_a_remote_path_refuses_are_skipped_in_one_line(tmp_path, monkeypatch):
  from dymu_jax.train import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(STORE_ENV, str(tmp_path))

  def refuse(self, path):
    raise PermissionError(13, "Permission denied", path)

  factory = loop._EpathRecordWriterFactory  # pylint: disable=protected-access
  monkeypatch.setattr(factory, "directory_check", refuse)
  writer = loop.MetricWriter("fake://bucket/tb")
  lines = writer.describe("fake://bucket/tb/checkpoints", 0, 2).splitlines()
  assert lines[2].startswith("  TensorBoard event files: not written (fake://bucket/tb refused "
                             "them: PermissionError")
  writer.write(1, "train", {"loss": 0.5})
  writer.write(2, "train", {"loss": 0.25})
  writer.close()
  assert _train_records(tmp_path / "bucket" / "tb" / loop.METRICS_FILE) == [1, 2]


def test_workdir_lock_on_a_fake_filesystem(tmp_path, monkeypatch):
  from dymu_jax.runs import guard  # pylint: disable=g-import-not-at-top
  from dymu_jax import files  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(STORE_ENV, str(tmp_path))
  workdir = "fake://bucket/locked"
  files.makedirs(workdir)
  lock_file = tmp_path / "bucket" / "locked" / guard.LOCK_FILE
  with guard.WorkdirLock(workdir):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(ValueError, match="is in use by another training run"):
      with guard.WorkdirLock(workdir):
        pass
  assert not lock_file.exists()
  # A lock whose process is gone (same host) is taken over.
  lock_file.write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))
  with guard.WorkdirLock(workdir):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert not lock_file.exists()


if __name__ == "__main__":
  # python tests/test_remote_workdir.py MODULE FLAGS...: experiments.MODULE with fake:// paths.
  sys.path.insert(0, ROOT)
  _install_in_subprocess()
  module = f"experiments.{sys.argv[1]}"
  sys.argv = [module, *sys.argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
