"""The train state: one pytree holding everything a run needs to continue bit-for-bit.

The state is what the compiled step consumes and returns, what is checkpointed and what is
restored. Besides parameters and optimizer state it carries the step (which is also the data
position: batch `step` of a run is a pure function of (seed, step)), the run's key (per-step
keys are `fold_in(rng, step)`) and the non-finite guard, which records the first step whose
loss was NaN or infinite without a host round-trip.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
NO_STEP = -1  # guard value: no non-finite loss seen so far


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    params: the differentiated variables (the Flax "params" collection).
    model_state: every other variable collection (e.g. {"batch_stats": ...}); {} when none.
    opt_state: the optax optimizer state.
    step: int32 scalar, number of completed steps (= index of the next batch).
    rng: the run's PRNG key (raw uint32 key); the key of step s is `fold_in(rng, s)`.
    nonfinite_step: int32 scalar, the first step whose loss was not finite, or -1.
    nonfinite_task: int32 scalar, index (into the step's task tuple) of the first non-finite
      task loss at that step, or -1 when only the total loss or the gradient was non-finite.
  """

  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  step: jax.Array
  rng: jax.Array
  nonfinite_step: jax.Array
  nonfinite_task: jax.Array

  @property
  def variables(self) -> dict:
    """Flax variables `{"params": ..., <other collections>...}` for `method.predict`."""
    return {"params": self.params, **self.model_state}


def split_variables(variables: Mapping[str, PyTree]) -> tuple[PyTree, dict]:
  """Flax variables -> (params, the other collections)."""
  if "params" not in variables:
    raise ValueError(f"A method's init must return variables with a 'params' collection; got "
                     f"collections {sorted(variables)}.")
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return params, model_state


def create(variables: Mapping[str, PyTree], optimizer: optax.GradientTransformation,
           rng: jax.Array, step: int = 0) -> TrainState:
  """A fresh state from initial variables (traceable: use it inside jit to place the state)."""
  params, model_state = split_variables(variables)
  return TrainState(
      params=params, model_state=model_state, opt_state=optimizer.init(params),
      step=jnp.asarray(step, jnp.int32), rng=rng,
      nonfinite_step=jnp.asarray(NO_STEP, jnp.int32),
      nonfinite_task=jnp.asarray(NO_STEP, jnp.int32))


def init_fn(method, optimizer: optax.GradientTransformation
            ) -> Callable[..., TrainState]:
  """`fn(seed_key, sample_batch, initial=None) -> TrainState` for `jax.jit(...)`; `initial`
  (collection name -> variables) replaces those collections of `method.init`'s variables
  before the optimizer state is made (`replace_collections`).

  The seed key is split into an init key (model weights) and the run key (per-step keys), so
  the same seed gives the same initial weights and the same per-step randomness.
  """

  def init(seed_key, sample_batch, initial=None):
    run_key = jax.random.split(seed_key)[1]
    variables = init_variables(method, seed_key, sample_batch)
    if initial:
      variables = replace_collections(variables, initial)
    return create(variables, optimizer, run_key)

  return init


def init_variables(method, seed_key, sample_batch) -> PyTree:
  """`method.init`'s variables for a run's seed key, drawn with its init half (`init_fn`)."""
  return method.init(jax.random.split(seed_key)[0], sample_batch)


def replace_collections(variables: Mapping[str, PyTree], initial: Mapping[str, PyTree]) -> dict:
  """`variables` with the collections of `initial` in place of the initialised ones (e.g. an
  earlier stage's frozen network restored from its checkpoint). Each must have the name,
  structure, shapes and dtypes of the collection it replaces; one sentence otherwise."""
  variables = dict(variables)
  for name, value in initial.items():
    if name not in variables:
      raise ValueError(f"The method's variables have no collection {name!r} to start from "
                       f"(they have {', '.join(sorted(variables))}).")
    want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), variables[name])
    got = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), value)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(f"The given {name!r} collection does not match the method's: other "
                       f"layers, shapes or dtypes (was it trained with other model options?).")
    variables[name] = value
  return variables


def guard_tripped(nonfinite_step) -> bool:
  """True when a host copy of `state.nonfinite_step` shows a non-finite step."""
  return int(nonfinite_step) != NO_STEP
