"""The Colab quickstart notebook installs itself in a bare runtime and runs end to end, headless.

One execution serves every check. It simulates a bare runtime (Colab, a fresh Jupyter): an sdist
of the package is built from the working tree (in a temporary copy, so nothing is written into
the repository), and a python3 kernel is started in a throwaway virtual environment, with its
working directory outside the repository and no PYTHONPATH. That environment sees the test
interpreter's site-packages (for jax, flax, ipykernel, pip...) through a `.pth` file listing
folders of links to their entries, minus everything of dymu_jax (its editable-install finder
and metadata, or an installed copy), so `import dymu_jax` fails there before the run. The
notebook's install cell then has to install the sdist, named by `DYMU_JAX_SOURCE` (pip's own
`PIP_*` variables keep that install offline: with no build isolation where `wheel` or
setuptools >= 70.1 can build the sdist, else with setuptools and wheel fetched once beforehand
into a local wheelhouse, the only step that may use pip's index). The rest of the notebook
then runs in its tiny setting (`DYMU_QUICKSTART_TINY=1`: 16 px synthetic scenes, a narrow
ResNet, 3 training steps), and its saved figures and its printed width/MACs table are checked.

Where such a runtime cannot be made (no venv module, no pip, no setuptools build backend, no
symbolic links, or no way to get the sdist's build requirements) the bare-runtime test is
skipped with the reason, and the same execution runs instead in the test interpreter from
`notebooks/`, as a checkout would.

The committed notebook is checked without running it: the install cell and the Colab badge,
and saved outputs (from the tiny setting) that show every figure, without errors, without
machine-specific paths, within a size a repository page renders.

Skipped when the notebook tooling (nbclient, nbformat, ipykernel) is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
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
SOURCE_LINE = ('DYMU_JAX_SOURCE = os.environ.get("DYMU_JAX_SOURCE", '
               '"git+https://github.com/dymu-jax/dymu_jax.git")')
COLAB_BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/dymu-jax/dymu_jax/blob/main/notebooks/"
    "quickstart.ipynb)")
MAX_NOTEBOOK_BYTES = 500_000  # with its figures, still rendered on a repository page
# What an sdist build needs from the working tree (those present), and the packages setup.cfg
# installs.
BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE")
PACKAGES = ("dymu_jax", "experiments")
# Test only: which interpreter the kernel ran on, and where it imported dymu_jax from.
PROBE_CELL = "import sys\nimport dymu_jax\nprint(sys.executable)\nprint(dymu_jax.__file__)"


class NoBareRuntime(Exception):
  """A bare runtime cannot be simulated here; the message says why."""


def stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream")


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
  return cells[0]


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


def run(command, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def tail(done: subprocess.CompletedProcess, chars: int = 2000) -> str:
  return (done.stdout + done.stderr)[-chars:]


@contextlib.contextmanager
def environ(changes: dict):
  """os.environ with `changes` applied (None: removed), restored afterwards."""
  saved = {k: os.environ.get(k) for k in changes}
  try:
    for k, v in changes.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


# Site-packages entries of an install of this project: packages, metadata, editable finders.
PROJECT_ENTRIES = ("dymu_jax", "dymu-jax", "experiments", "__editable__.dymu_jax",
                   "__editable___dymu_jax")


def left_out(name: str) -> bool:
  """Whether a site-packages entry stays out of the bare environment: this project's, a .pth
  file (not processed there anyway) or an egg-link."""
  return name.lower().startswith(PROJECT_ENTRIES) or name.endswith((".pth", ".egg-link"))


def outer_site_dirs() -> list[str]:
  """The test interpreter's site-packages folders (its virtual environment's, or the system's)."""
  paths = sysconfig.get_paths()
  candidates = [paths["purelib"], paths["platlib"], *getattr(site, "getsitepackages", list)()]
  candidates += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  dirs = []
  for p in candidates:
    p = os.path.realpath(p)
    if os.path.isdir(p) and p not in dirs:
      dirs.append(p)
  return dirs


def build_sdist(workdir: str) -> str:
  """Path of an sdist built from a copy of the working tree's package files."""
  if importlib.util.find_spec("setuptools") is None:
    raise NoBareRuntime("setuptools (the build backend of setup.cfg) is not installed")
  src, dist = os.path.join(workdir, "src"), os.path.join(workdir, "dist")
  os.makedirs(src)
  for name in BUILD_FILES:
    if os.path.isfile(os.path.join(ROOT, name)):
      shutil.copy2(os.path.join(ROOT, name), src)
  for name in PACKAGES:
    shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  done = run([sys.executable, "-c",
              "import sys\nfrom setuptools import build_meta\n"
              "print('SDIST=' + build_meta.build_sdist(sys.argv[1]))", dist], cwd=src)
  assert done.returncode == 0, f"building the sdist failed:\n{tail(done)}"
  name = [line for line in done.stdout.splitlines() if line.startswith("SDIST=")][-1][6:]
  sdist = os.path.join(dist, name)
  with tarfile.open(sdist) as archive:
    members = set(archive.getnames())
  top = name[:-len(".tar.gz")]
  for package in PACKAGES:
    assert f"{top}/{package}/__init__.py" in members, f"the sdist lacks {package}: {members}"
  return sdist


def make_bare_venv(workdir: str) -> tuple[str, str, str]:
  """(venv folder, its python, its site-packages): every dependency, no dymu_jax, no pip of its
  own (the test interpreter's pip is seen like every other package)."""
  if importlib.util.find_spec("venv") is None:
    raise NoBareRuntime("the venv module is not available")
  folder = os.path.join(workdir, "venv")
  done = run([sys.executable, "-m", "venv", "--without-pip", folder])
  if done.returncode != 0:
    raise NoBareRuntime(f"python -m venv failed:\n{tail(done)}")
  python = os.path.join(folder, "Scripts", "python.exe") if os.name == "nt" else os.path.join(
      folder, "bin", "python")
  done = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
  assert done.returncode == 0, tail(done)
  purelib = done.stdout.strip()
  # One folder of links per outer site-packages, listed by a .pth file: .pth files inside the
  # listed folders are not processed (and are not linked either), so no editable install of
  # dymu_jax is active there, and its metadata is left out so that pip does not see it either.
  shadows = []
  for i, outer in enumerate(outer_site_dirs()):
    shadow = os.path.join(workdir, f"site{i}")
    os.makedirs(shadow)
    for name in os.listdir(outer):
      if not left_out(name):
        try:
          os.symlink(os.path.join(outer, name), os.path.join(shadow, name))
        except OSError as e:
          raise NoBareRuntime(f"cannot create symbolic links here: {e}") from e
    shadows.append(shadow)
  with open(os.path.join(purelib, "_outer_site_packages.pth"), "w", encoding="utf-8") as f:
    f.write("".join(s + "\n" for s in shadows))
  return folder, python, purelib


def dymu_entries() -> dict:
  """{path: modification time} of this project's entries in the test interpreter's
  site-packages."""
  entries = {}
  for outer in outer_site_dirs():
    for name in os.listdir(outer):
      if name.lower().startswith(PROJECT_ENTRIES):
        entries[os.path.join(outer, name)] = os.stat(os.path.join(outer, name)).st_mtime_ns
  return entries


def pip_settings(python: str, workdir: str, env: dict) -> dict:
  """PIP_* variables under which the venv's pip installs the sdist without an index."""
  probe = ("import importlib.util as u, sys\n"
           "if u.find_spec('pip') is None: sys.exit(2)\n"
           "sys.exit(0 if u.find_spec('wheel') or u.find_spec('setuptools') and "
           "u.find_spec('setuptools.command.bdist_wheel') else 1)")
  done = run([python, "-c", probe], env=env, cwd=workdir)
  if done.returncode == 2:
    raise NoBareRuntime("pip is not installed")
  if done.returncode == 0:
    # Build with the setuptools already there. pip reads this variable inverted: "0" turns
    # build isolation off.
    return {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
  # Build isolation as pip's default, its requirements from a local wheelhouse: the only
  # step that uses pip's configured index (a network or a mirror).
  wheelhouse = os.path.join(workdir, "wheelhouse")
  done = run([python, "-m", "pip", "download", "-q", "--retries", "1", "--timeout", "30",
              "--dest", wheelhouse, "setuptools>=40.8.0", "wheel"], cwd=workdir,
             env={**{k: v for k, v in env.items() if k != "PIP_CONFIG_FILE"},
                  **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}})
  if done.returncode != 0:
    raise NoBareRuntime("neither wheel nor setuptools >= 70.1 is installed to build the sdist, "
                        f"and pip could not download them:\n{tail(done, 800)}")
  return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheelhouse}


def bare_runtime(workdir: str, base_env: dict) -> dict:
  """Builds the sdist and the environment; returns the kernel's python and its variables."""
  sdist = build_sdist(os.path.join(workdir, "build"))
  folder, python, purelib = make_bare_venv(workdir)
  runtime = os.path.join(workdir, "runtime")  # the kernel's working directory
  os.makedirs(runtime)
  # Nothing of the caller's pip set-up (config files, PIP_* variables, its cache) applies.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME")}
  env.update(base_env, VIRTUAL_ENV=folder, PYTHONNOUSERSITE="1", PIP_CONFIG_FILE=os.devnull,
             PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_CACHE_DIR=os.path.join(workdir, "pip-cache"))
  done = run([python, "-c", "import dymu_jax; print(dymu_jax.__file__)"], env=env, cwd=runtime)
  assert done.returncode != 0, (
      f"dymu_jax is importable in the bare environment before the notebook installs it: "
      f"{done.stdout.strip()}")
  env.update(pip_settings(python, workdir, env), DYMU_JAX_SOURCE=sdist)
  return {"python": python, "purelib": purelib, "sdist": sdist, "cwd": runtime, "env": env}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The one tiny headless run: {nb, out, seconds, bare (the runtime, or None), why_not}."""
  out = tmp_path_factory.mktemp("quickstart_out")
  scratch = tmp_path_factory.mktemp("quickstart_tmp")
  base_env = {
      "DYMU_QUICKSTART_TINY": "1",
      "DYMU_QUICKSTART_HEADLESS": "1",
      "DYMU_QUICKSTART_OUT": str(out),
      "TMPDIR": str(scratch),  # temporary files (pip's build, the kernel's) land here
      "MPLBACKEND": "module://matplotlib_inline.backend_inline",
      # A 3-step run is all compilation: less LLVM optimisation halves it on a CPU (the
      # compiled code runs slower, which a 3-step run does not notice).
      "XLA_FLAGS": " ".join(filter(None, [
          os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true"])),
  }
  site_before = dymu_entries()
  started = time.time()
  try:
    bare = bare_runtime(str(tmp_path_factory.mktemp("bare")), base_env)
    why_not = None
    python, cwd = bare["python"], bare["cwd"]
    # The kernel's environment exactly: variables of the test process left out are removed.
    changes = {k: bare["env"].get(k) for k in set(os.environ) | set(bare["env"])}
  except NoBareRuntime as e:
    bare, why_not = None, str(e)
    python, cwd, changes = sys.executable, NOTEBOOK_DIR, dict(base_env)
  setup_seconds = time.time() - started
  # A "python3" kernelspec for that interpreter, ahead of any other on the Jupyter path (a
  # user-level "python3" spec could point at another Python).
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  os.makedirs(jupyter_path / "kernels" / "python3")
  with open(jupyter_path / "kernels" / "python3" / "kernel.json", "w", encoding="utf-8") as f:
    json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "Python 3 (tests)", "language": "python"}, f)
  changes["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(jupyter_path),
                                                          os.environ.get("JUPYTER_PATH", "")]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(PROBE_CELL))
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  with environ(changes):  # the kernel inherits this process's environment
    started = time.time()
    client.execute()
    seconds = time.time() - started
  print(f"quickstart notebook (tiny) executed in {seconds:.1f} s "
        f"({'bare runtime, set up in %.1f s' % setup_seconds if bare else 'test interpreter'})")
  return {"nb": nb, "out": out, "seconds": seconds, "bare": bare, "why_not": why_not,
          "site_before": site_before, "site_after": dymu_entries()}


def test_committed_notebook_has_install_cell_and_colab_badge():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown" and COLAB_BADGE in nb.cells[0].source
  assert "DYMU_JAX_SOURCE" in nb.cells[0].source  # a fork changes both together
  install = tagged(nb, "install")
  assert install is next(c for c in nb.cells if c.cell_type == "code"), (
      "the install cell is not the first code cell")
  assert SOURCE_LINE in install.source.splitlines()
  assert "git clone" not in install.source and "google.colab" not in install.source


def test_committed_notebook_shows_its_outputs():
  """Saved with the outputs of a tiny run, so a repository page shows every figure."""
  size = os.path.getsize(NOTEBOOK)
  assert size <= MAX_NOTEBOOK_BYTES, f"{NOTEBOOK} is {size} bytes with its outputs"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
      "save the notebook after running all of it, in order, from a fresh kernel")
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= len(FIGURES)
  static = tagged(nb, "static-table")
  assert sum("image/png" in o.get("data", {}) for o in static.outputs) == 3
  full, rows = parse_table(stream_text(static))
  assert full > 0 and [r["label"] for r in rows] == ["uniform", "segmentation", "geometry"]
  assert "TINY setting" in "".join(stream_text(c) for c in code)
  # No machine-specific paths in what a reader sees (the figures' data is not text).
  texts = [stream_text(c) for c in code] + [
      o.get("data", {}).get(mime, "") for o in outputs
      for mime in ("text/plain", "text/markdown", "text/html")]
  markers = ("/tmp/", "/work/", "/home/", "/root/", "/Users/", "site-packages", ROOT,
             os.path.expanduser("~") + os.sep)
  for text in texts:
    text = "".join(text)
    found = [m for m in markers if m in text]
    assert not found, f"machine-specific path {found} in a saved output:\n{text}"


def test_bare_runtime_installs_the_sdist(executed):
  bare = executed["bare"]
  if bare is None:
    pytest.skip(f"no bare runtime could be simulated: {executed['why_not']}")
  nb = executed["nb"]
  assert stream_text(tagged(nb, "install")).strip() == (
      f"installed dymu_jax from {bare['sdist']}")
  executable, location = stream_text(nb.cells[-1]).splitlines()
  assert executable == bare["python"]
  # Imported from the sdist's install in the throwaway environment, not from the repository.
  assert os.path.realpath(location).startswith(os.path.realpath(bare["purelib"]) + os.sep)
  # And nothing went into the test interpreter's site-packages.
  assert executed["site_after"] == executed["site_before"]


def test_runs_without_errors(executed):
  nb = executed["nb"]
  errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
            if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
  assert not errors
  if executed["bare"] is None:  # the kernel ran on the interpreter running the tests
    assert stream_text(nb.cells[-1]).splitlines()[0] == sys.executable


def test_saves_non_trivial_figures(executed):
  out = executed["out"]
  for name in FIGURES:
    path = os.path.join(out, name)
    assert os.path.isfile(path), f"{name} missing; {sorted(os.listdir(out))}"
    with open(path, "rb") as f:
      head = f.read(len(PNG_MAGIC))
    assert head == PNG_MAGIC, f"{name} is not a PNG file"
    assert os.path.getsize(path) > 1024, f"{name} is only {os.path.getsize(path)} bytes"


def test_width_table_respects_budgets(executed):
  nb = executed["nb"]
  full, rows = parse_table(stream_text(tagged(nb, "static-table")))
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
  nb = executed["nb"]
  printed = "".join(stream_text(c) for c in nb.cells if c.cell_type == "code")
  assert "10 settings," in printed
