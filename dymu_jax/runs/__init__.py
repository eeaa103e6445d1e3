"""Runs as the library sees them, for the entry points and for notebooks alike.

* `settings`: a run's flag values (as saved with every checkpoint) as typed objects: its data
  (`data_config`, `load_sources`), model options, method config, deployment options, train
  config, and the method itself (`build_method`); with the checks the command line runs before
  any data is read.
* `load`: a trained run rebuilt from its folder (`load_run`), steered for deployment (`steer`:
  deployment options and the held-out images of the method's `prepare`).
* `guard`: one training command per folder (`WorkdirLock`) and no silent change of flags on
  resume (`check_resume_flags`).

    from dymu_jax import runs
    run = runs.load_run(runs.resolve("/tmp/dymu/synthetic_dymu"))  # a parent: its last stage
    method, prepared = runs.steer(run)
"""

from dymu_jax.runs import guard
from dymu_jax.runs import settings
from dymu_jax.runs.load import (TrainedRun, finished_run, held_out, load_run, steer,
                                summary_metrics)
from dymu_jax.train.stages import latest_step, resolve, saved_metadata

__all__ = ["TrainedRun", "finished_run", "guard", "held_out", "latest_step", "load_run",
           "resolve", "saved_metadata", "settings", "steer", "summary_metrics"]
