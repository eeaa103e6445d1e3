"""Atomic writes: a reader sees the old file or the new one, never a part, and no leftovers."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import pytest

from dymu_jax import files
from dymu_jax.train import loop


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "summary.json"
  files.write_json(path, {"a": 1})
  files.write_json(path, {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2}
  files.atomic_write(tmp_path / "page.md", "héllo")
  assert (tmp_path / "page.md").read_text(encoding="utf-8") == "héllo"
  assert sorted(os.listdir(tmp_path / "sub")) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  files.write_json(path, {"old": True})

  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space left"):
    files.write_json(path, {"new": True})
  assert json.loads(path.read_text()) == {"old": True}
  assert os.listdir(tmp_path) == ["results.json"]


def test_save_figure_writes_the_format_of_the_extension(tmp_path):
  fig, ax = plt.subplots()
  ax.plot([0, 1], [1, 0])
  files.save_figure(fig, tmp_path / "plot.png", dpi=50)
  files.save_figure(fig, tmp_path / "plot.svg")
  plt.close(fig)
  assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:400]


def test_metrics_file_keeps_one_record_per_step_after_a_resume(tmp_path):
  """Records after the checkpoint a run resumes from, and a line cut off by a kill, go."""
  path = tmp_path / loop.METRICS_FILE
  lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) + "\n"
           for s in (10, 20, 30)]
  path.write_text("".join(lines) + '{"step": 40, "spl')
  writer = loop.MetricWriter(str(tmp_path))
  assert writer.truncate_after(20) == 2
  assert path.read_text() == "".join(lines[:2])
  assert writer.truncate_after(20) == 0
  writer.close()
