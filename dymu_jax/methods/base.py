"""The interface between a method and the training engine / evaluator.

A method owns its model(s), its training loss, its sampling of controls and the controls a user
may set after training. The engine (`dymu_jax.train`) and `experiments/evaluate.py` speak only
this interface, so a new method is one new module under `dymu_jax.methods`.

Variables follow Flax: `{"params": ..., <other collections, e.g. "batch_stats">: ...}`. The
engine differentiates with respect to `params` only; every other collection is the "model
state" that the loss returns updated.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import jax

from dymu_jax import tasks as tasks_lib

PyTree = Any
Controls = Mapping[str, Any] | None  # e.g. {"preference": (0.7, 0.3), "budget": 0.5}


class Method(Protocol):
  """What every method module provides (see `static.StaticMethod` for the simplest one)."""

  name: str
  tasks: tuple[tasks_lib.Task, ...]
  # The pmap axis over which batch statistics are pooled: `train.method_axis_name(mode)`,
  # "batch" under --parallel=pmap and None under the default mesh mode (where jit sees the
  # global batch). `train.train` rejects a method built for the other mode.
  axis_name: str | None

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    """Initial variables `{"params": ..., ...}` for a sample batch (shapes only matter)."""

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
    """(scalar training loss, (aux scalars, updated model_state)), traced inside jit.

    Aux scalars use the keys "loss/<task name>" for each task's loss; methods may add more.
    """

  def predict(self, variables: PyTree, images: jax.Array, controls: Controls = None
              ) -> dict[str, jax.Array]:
    """Evaluation-mode predictions, one array per task name, for the given controls."""

  # Optional: `loss_and_grad(params, model_state, batch, rng, step)` returning what
  # `jax.value_and_grad(loss, has_aux=True)` would; the train step then applies this gradient
  # (for methods that route or project per-task gradients: GradSplit, PCGrad).

  def eval_controls(self) -> Sequence[Controls]:
    """The controls the training loop evaluates at each evaluation (default: `[None]`)."""
