"""The training engine: state, compiled step, parallelism, checkpoints and the loop.

    from dymu_jax import train
    result = train.train(method, train_source, eval_source, train.TrainConfig(steps=1000),
                         workdir, run_metadata={...})
"""

from dymu_jax.train.checkpoint import Checkpointer, restore_latest
from dymu_jax.train.loop import Evaluator, TrainConfig, TrainResult, train
from dymu_jax.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from dymu_jax.train.parallel import (AXIS_NAME, MODES, CompileCounter, Parallel,
                                     initialize_distributed, method_axis_name)
from dymu_jax.train.state import TrainState
from dymu_jax.train.step import make_train_step, per_task_losses_and_grads

__all__ = ["AXIS_NAME", "Checkpointer", "CompileCounter", "Evaluator", "MODES", "OPTIMIZERS",
           "Parallel", "SCHEDULES", "TrainConfig", "TrainResult", "TrainState",
           "initialize_distributed", "make_optimizer", "make_schedule", "make_train_step",
           "method_axis_name", "per_task_losses_and_grads", "restore_latest", "train"]
