"""The Colab quickstart notebook runs end to end, headless, in its tiny setting.

The notebook (notebooks/quickstart.ipynb) is executed cell by cell in a fresh python3 kernel
(the interpreter running pytest) with `DYMU_QUICKSTART_TINY=1`: 16 px synthetic scenes, a
narrow ResNet, 3 training steps. Then its saved figures and its printed width/MACs table are
checked. Skipped when the notebook tooling (nbclient, nbformat, ipykernel) is not installed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="nbformat is not installed (pip install -e .[test] adds it)")
nbclient = pytest.importorskip(
    "nbclient", reason="nbclient is not installed (pip install -e .[test] adds it)")
pytest.importorskip(
    "ipykernel", reason="ipykernel is not installed, so no python3 kernel can start "
    "(pip install -e .[test] adds it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "quickstart.ipynb")
FIGURES = ("quickstart_setting1_uniform.png", "quickstart_setting2_segmentation.png",
           "quickstart_setting3_geometry.png", "quickstart_preference_sweep.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 300


def stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream")


def parse_table(text: str) -> tuple[int, list[dict]]:
  """(SuperNet MACs, rows) from the static cell's printed table."""
  full = None
  rows = []
  for line in text.splitlines():
    if line.startswith("SuperNet MACs:"):
      full = int(line.split(":")[1])
      continue
    cols = [c.strip() for c in line.split("|")]
    if len(cols) != 9 or not cols[0].isdigit():
      continue  # the header, or anything else
    rows.append({"label": cols[1], "preference": [float(p) for p in cols[2].split()],
                 "budget": float(cols[3]), "budget_macs": int(cols[4]),
                 "encoder": [float(m) for m in cols[5].split()],
                 "decoders": [float(m) for m in cols[6].split()], "macs": int(cols[7]),
                 "fraction": float(cols[8].rstrip("%")) / 100})
  assert full is not None, f"no 'SuperNet MACs:' line in the static cell's output:\n{text}"
  return full, rows


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """(executed notebook, output folder, wall seconds) of one tiny headless run."""
  out = tmp_path_factory.mktemp("quickstart_out")
  scratch = tmp_path_factory.mktemp("quickstart_tmp")
  # A "python3" kernelspec for this interpreter, ahead of any other on the Jupyter path (a
  # user-level "python3" spec could point at another Python without dymu_jax's packages).
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  os.makedirs(jupyter_path / "kernels" / "python3")
  with open(jupyter_path / "kernels" / "python3" / "kernel.json", "w", encoding="utf-8") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "Python 3 (tests)", "language": "python"}, f)
  env = {
      "JUPYTER_PATH": os.pathsep.join(filter(None, [str(jupyter_path),
                                                    os.environ.get("JUPYTER_PATH", "")])),
      "DYMU_QUICKSTART_TINY": "1",
      "DYMU_QUICKSTART_HEADLESS": "1",
      "DYMU_QUICKSTART_OUT": str(out),
      "TMPDIR": str(scratch),  # the notebook's training workdir lands here, not in /tmp
      "MPLBACKEND": "module://matplotlib_inline.backend_inline",
      # A 3-step run is all compilation: less LLVM optimisation halves it on a CPU (the
      # compiled code runs slower, which a 3-step run does not notice).
      "XLA_FLAGS": " ".join(filter(None, [
          os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true"])),
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Last cell (test only): which interpreter the kernel ran on.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOK_DIR}})
    started = time.time()
    client.execute()
    seconds = time.time() - started
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  print(f"quickstart notebook (tiny) executed in {seconds:.1f} s")
  return nb, out, seconds


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"cell {i} of {NOTEBOOK} was saved with outputs; clear them before committing.")


def test_runs_without_errors_in_the_test_interpreter(executed):
  nb, _, _ = executed
  errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
  assert not errors
  # The kernel ran on the interpreter (virtual environment) running the tests.
  assert stream_text(nb.cells[-1]).strip() == sys.executable


def test_saves_non_trivial_figures(executed):
  _, out, _ = executed
  for name in FIGURES:
    path = os.path.join(out, name)
    assert os.path.isfile(path), f"{name} missing; {sorted(os.listdir(out))}"
    with open(path, "rb") as f:
      head = f.read(len(PNG_MAGIC))
    assert head == PNG_MAGIC, f"{name} is not a PNG file"
    assert os.path.getsize(path) > 1024, f"{name} is only {os.path.getsize(path)} bytes"


def test_width_table_respects_budgets(executed):
  nb, _, _ = executed
  cells = [c for c in nb.cells if "static-table" in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1
  full, rows = parse_table(stream_text(cells[0]))
  assert [r["label"] for r in rows] == ["uniform", "segmentation", "geometry"]
  for r in rows:
    assert r["budget_macs"] == math.floor(r["budget"] * full), r
    assert 0 < r["macs"] <= r["budget_macs"], f"MACs over budget: {r}"
    assert r["fraction"] == pytest.approx(r["macs"] / full, abs=1e-3)
    assert sum(r["preference"]) == pytest.approx(1.0, abs=0.02)
    assert len(r["encoder"]) == 4 and len(r["decoders"]) == 4
  # The whole budget with a uniform preference is the SuperNet; the budgets then shrink.
  assert rows[0]["macs"] == full
  assert rows[0]["budget"] > rows[1]["budget"] > rows[2]["budget"]
  assert rows[1]["macs"] < full
  # A segmentation-heavy preference never gives segmentation a narrower decoder than another.
  assert rows[1]["decoders"][0] == max(rows[1]["decoders"])


def test_sweep_covers_five_preferences_at_two_budgets(executed):
  nb, _, _ = executed
  printed = "".join(stream_text(c) for c in nb.cells if c.cell_type == "code")
  assert "10 settings," in printed
