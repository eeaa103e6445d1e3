"""The architecture's direction of flow, checked on the source: the library never imports the
entry points, and the entry points (`experiments/`) import no concrete method or model
internal and never branch on a method's name, so a method added to the registry needs no edit
there (`test_method_registry.py` trains, evaluates and exports such a method)."""

from __future__ import annotations

import ast
import glob
import os

from dymu_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(folder: str) -> dict[str, ast.Module]:
  paths = sorted(glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True))
  return {os.path.relpath(p, ROOT): ast.parse(open(p, encoding="utf-8").read()) for p in paths}


def _imports(tree: ast.Module) -> list[str]:
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.extend(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.extend(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_the_library_never_imports_the_entry_points():
  offenders = {path: name for path, tree in _modules("dymu_jax").items()
               for name in _imports(tree) if name.split(".")[0] == "experiments"}
  assert not offenders, offenders


def test_entry_points_import_no_concrete_method_or_model_internal():
  # Allowed: the registry (`dymu_jax.methods`), and the library's public packages.
  forbidden = ("dymu_jax.methods.", "dymu_jax.models.")
  offenders = {path: name for path, tree in _modules("experiments").items()
               for name in _imports(tree) if name.startswith(forbidden)}
  assert not offenders, offenders


def test_entry_points_never_branch_on_a_method_name():
  """No string in `experiments/` code equals a registered method's name (help text and
  docstrings may mention methods; a comparison or lookup by name may not)."""
  names = set(methods.METHODS)
  offenders = []
  for path, tree in _modules("experiments").items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
        offenders.append(f"{path}:{node.lineno}: {node.value!r}")
  assert not offenders, offenders
