"""`python -m benchmarks.device_check --quick`: the device table runs end to end on CPU.

Every planned row (each method, each DYMU stage, the bfloat16 and flipped-execution rows)
compiles once, does not recompile while timed, and reports a finite loss; the input pipeline's
figure is printed under the table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_device_check_prints_every_row(tmp_path):
  out = tmp_path / "device.json"
  result = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--quick",
                           f"--json_out={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = report["rows"]
  labels = {r["method"] for r in rows}
  assert labels == {"static", "ecmt", "gradsplit", "pcgrad", "dymu pretrain", "dymu anchor",
                    "dymu edge", "dymu weight"}, labels
  assert {(r["method"], r["dtype"]) for r in rows} >= {("static", "bfloat16")}
  executions = {r["execution"] for r in rows if r["method"] == "pcgrad"}
  assert executions == {"fast_ops=on,passes=unrolled", "fast_ops=on,passes=vmap"}, executions
  for row in rows:
    assert "error" not in row, row
    assert row["compiles"] >= 1 and row["compiles_timed"] == 0, row
    assert row["samples_per_s"] > 0 and math.isfinite(row["loss"]), row
  assert report["pipeline_examples_per_s"] > 0
  table = result.stdout[result.stdout.index("device: cpu"):]
  assert "samples/s" in table and "input pipeline (synthetic scenes" in table, table
  assert len([l for l in table.splitlines() if l.startswith(("static", "dymu"))]) == 7, table
