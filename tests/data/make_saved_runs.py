"""Writes tests/data/saved_runs/: tiny runs in today's run-folder format, for
tests/test_saved_runs.py (old run folders must keep loading).

    python tests/data/make_saved_runs.py    # from the repository root; about two minutes

Each run trains an MLP with hidden layers of 4 units for a few steps on the tabular file of
`tests/test_models_mlp.write_tabular` (rebuilt by the test from its seed), through
`experiments.train`, so the folder holds what a user's run holds: checkpoints with the saved
flags, metrics.jsonl and summary.json. `expected.json` records, for each run, the predictions of
the restored method on the first test rows at its evaluation controls; the test restores the
folder with the code of its day and compares. Regenerate only on purpose (a format change that
the README announces), never to make the test pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from test_models_mlp import TASK_SPEC, write_tabular  # pylint: disable=g-import-not-at-top

OUT = os.path.join(ROOT, "tests", "data", "saved_runs")
COMMON = ["--dataset=arrays", f"--task_spec={TASK_SPEC}", "--backbone=mlp",
          '--backbone_options="hidden=(4,4)"', "--head_width=4", "--batch_size=16",
          "--log_every=1", "--eval_every=0", "--noprogress", "--compilation_cache=off"]
RUNS = {
    "static": ["--method=static", "--steps=2", "--checkpoint_every=2"],
    "phn": ["--method=phn", "--steps=2", "--checkpoint_every=2", "--phn_chunk_size=0"],
    "ecmt": ["--method=ecmt", "--steps=2", "--checkpoint_every=2", "--num_subnets=2"],
    "gradsplit": ["--method=gradsplit", "--steps=2", "--checkpoint_every=2",
                  "--gradsplit_warmup_steps=1"],
    "dymu": ["--method=dymu", "--dymu_stage=all", "--dymu_anchor_init=trunk",
             "--dymu_pretrain_steps=1", "--dymu_stage_steps=1,1,1",
             "--dymu_validation_examples=16", "--dymu_edge_hidden=4", "--dymu_weight_hidden=4",
             "--dymu_embedding_features=2", "--dymu_affinity_images=16", "--head_batch_norm",
             "--checkpoint_every=1"],
}


def main():
  table = os.path.join(tempfile.mkdtemp(), "table.npz")
  write_tabular(table)
  shutil.rmtree(OUT, ignore_errors=True)
  os.makedirs(OUT)
  for name, flags in RUNS.items():
    subprocess.run([sys.executable, "-m", "experiments.train", *COMMON, f"--data_dir={table}",
                    *flags, f"--workdir={os.path.join(OUT, name)}"], cwd=ROOT, check=True)
  from dymu_jax import runs as runs_lib  # pylint: disable=g-import-not-at-top
  expected = {}
  for name in RUNS:
    run = runs_lib.load_run(runs_lib.resolve(os.path.join(OUT, name)), data_dir=table)
    rows = run.test_source.get(np.arange(4))["image"]
    controls = run.method.eval_controls()[0]
    predictions = run.method.predict(run.variables, rows, controls)
    expected[name] = {"step": run.step, "controls": _jsonable(controls),
                      "predictions": {k: np.asarray(v).tolist() for k, v in predictions.items()}}
  with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
  for name in RUNS:  # TensorBoard event files are not part of what the test reads
    for folder, _, files in os.walk(os.path.join(OUT, name)):
      for file in files:
        if file.startswith("events.out.tfevents"):
          os.remove(os.path.join(folder, file))


def _jsonable(value):
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
  main()
