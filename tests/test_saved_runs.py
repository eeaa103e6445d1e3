"""Old run folders keep loading: tiny runs saved in the run-folder format of 2026-12
(`tests/data/saved_runs`, written by `tests/data/make_saved_runs.py` through
`experiments.train`) are restored with today's code, predict what they predicted when saved,
deploy, and export.

A failure here means a change broke users' existing runs: keep the old format loading, or, if
the break is intended, say so in the README and regenerate the folders on purpose.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dymu_jax.models import serialize
from dymu_jax import runs as runs_lib

from test_models_mlp import write_tabular

SAVED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "saved_runs")
with open(os.path.join(SAVED, "expected.json")) as f:
  EXPECTED = json.load(f)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
  return write_tabular(tmp_path_factory.mktemp("tabular") / "table.npz")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_saved_run_restores_and_predicts_as_when_saved(name, table, tmp_path):
  # A copy: restoring must not need to write into the folder, and the test leaves it as is.
  folder = shutil.copytree(os.path.join(SAVED, name), tmp_path / name)
  run = runs_lib.load_run(runs_lib.resolve(os.fspath(folder)), data_dir=os.fspath(table))
  expected = EXPECTED[name]
  assert run.step == expected["step"] and run.method.name == name
  rows = run.test_source.get(np.arange(4))["image"]
  controls = expected["controls"]
  predictions = run.method.predict(run.variables, rows, controls)
  assert set(predictions) == set(expected["predictions"])
  for task, values in expected["predictions"].items():
    np.testing.assert_allclose(np.asarray(predictions[task]), np.asarray(values, np.float32),
                               rtol=1e-4, atol=1e-5)
  # The deployment half works on the restored run (ECMT needs held-out images to prepare).
  held_out = runs_lib.held_out(run, 16, 16, 16)
  prepared = run.method.prepare(run.variables, held_out)
  deployed = run.method.deploy(run.variables, None, prepared,
                               image_shape=run.test_source.image_shape)
  assert deployed.cost().macs > 0
  network, variables, _ = serialize.load_network(deployed.export(tmp_path / "export"))
  outputs = network.apply(variables, rows)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in outputs.values())
