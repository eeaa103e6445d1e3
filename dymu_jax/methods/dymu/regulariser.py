"""DYMU's sampling of parents (Gumbel-softmax, hard argmax) and its branching regulariser
(see the package docstring)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


PyTree = Any


# The regulariser's depth factor: the paper's (L - l) / L with l = 1..L (the decoders' parent
# choice weighs 0), or the earlier [ours] shift l = 0..L-1 (every choice weighs >= 1 / L).
DEPTH_FACTORS = ("paper", "shifted")
# Whether gradients flow through P_use in L_active: "stop" treats it as a usage weight (the
# paper states it is a weight; stopping the gradient is ours, measured); "flow" lets h also
# lower the usage of nodes to shrink the term.
USE_GRADIENTS = ("stop", "flow")


# ----------------------------------------------------------------------------------------------
# Sampling parents and the branching regulariser.


def temperature(step, initial: float = 5.0, decay: float = 0.97, every: int = 300):
  """Gumbel-softmax temperature at `step`: initial * decay ** floor(step / every)."""
  return initial * jnp.power(decay, jnp.floor_divide(jnp.asarray(step), every)).astype(
      jnp.float32)


def gumbel_softmax(rng: jax.Array, logits: jax.Array, tau) -> jax.Array:
  """softmax((logits + Gumbel noise) / tau) over the last axis (the soft relaxation)."""
  noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax((logits + noise) / tau, axis=-1)


def hard_parents(logits: jax.Array) -> jax.Array:
  """One-hot argmax rows of parent logits (L, N, N): the argmax tree as nu."""
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def parent_use_probability(nu: jax.Array) -> jax.Array:
  """P_use (L + 1, N): probability that node (l, i) is in the tree, node layers 0..L.

  Row L (the decoders) is 1; `P_use(l, i) = 1 - prod_k (1 - nu[l][k, i] P_use(l + 1, k))`.
  With one-hot `nu` it is exactly 1 for the nodes the tree uses and 0 for the others.
  """
  num_layers, num_tasks = nu.shape[0], nu.shape[1]
  rows = [jnp.ones((num_tasks,), nu.dtype)]
  for l in reversed(range(num_layers)):
    picked = nu[l] * rows[0][:, None]  # [k, i]: child k uses parent i
    rows.insert(0, 1.0 - jnp.prod(1.0 - picked, axis=0))
  return jnp.stack(rows)


def active_tasks(preference: jax.Array, tau_factor: float = 0.6) -> jax.Array:
  """Boolean (N,): r_i >= tau = tau_factor / N."""
  return preference >= tau_factor / preference.shape[-1]


def depth_weights(num_layers: int, depth_factor: str = "paper") -> jax.Array:
  """The depth factor of each of the L parent choices (choice 0 feeds block layer 1).

  "paper": (L - l) / L with l = 1..L, so L - 1 .. 0 over L (the decoders' parents weigh 0:
  decoders stay task-specific, sharing is pushed into low layers first). "shifted" [ours,
  earlier default]: l = 0..L - 1, so 1 .. 1 / L.
  """
  if depth_factor not in DEPTH_FACTORS:
    raise ValueError(f"Unknown depth factor {depth_factor!r}; allowed: "
                     f"{', '.join(DEPTH_FACTORS)}.")
  l = jnp.arange(num_layers, dtype=jnp.float32) + (1.0 if depth_factor == "paper" else 0.0)
  return (num_layers - l) / num_layers


def branching_regularizer(nu: jax.Array, preference: jax.Array, resource: jax.Array,
                          affinity: jax.Array, lambda_active: float = 1.0,
                          lambda_inactive: float = 0.1, tau_factor: float = 0.6,
                          depth_factor: str = "paper", use_gradient: str = "stop"
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Omega = c lambda_A L_active + lambda_I L_inactive (module docstring).

  Args:
    nu: parent distributions (L, N, N), `nu[l][j]` those of node (l + 1, j).
    preference: r (N,).
    resource: c (scalar).
    affinity: A (N, N).
    lambda_active, lambda_inactive, tau_factor: see the module docstring.
    depth_factor: "paper" or "shifted" (`depth_weights`).
    use_gradient: "stop" (P_use is a usage weight, no gradient) or "flow".

  Returns:
    (Omega, {"l_active": ..., "l_inactive": ...}).
  """
  if use_gradient not in USE_GRADIENTS:
    raise ValueError(f"Unknown use_gradient {use_gradient!r}; allowed: "
                     f"{', '.join(USE_GRADIENTS)}.")
  num_layers, num_tasks = nu.shape[0], nu.shape[1]
  active = active_tasks(preference, tau_factor)
  # dist[l, i, j] = ||nu[l][i] - nu[l][j]||^2
  dist = jnp.sum(jnp.square(nu[:, :, None, :] - nu[:, None, :, :]), axis=-1)
  p_use = parent_use_probability(nu)[1:]  # children's usage, (L, N)
  if use_gradient == "stop":
    p_use = jax.lax.stop_gradient(p_use)
  depth = depth_weights(num_layers, depth_factor)
  pair = (active[:, None] & active[None, :] & ~jnp.eye(num_tasks, dtype=bool)).astype(
      jnp.float32)
  weights = (depth[:, None, None] * pair[None] * jnp.asarray(affinity, jnp.float32)[None]
             * p_use[:, :, None] * p_use[:, None, :])
  l_active = jnp.sum(weights * dist)
  # Each inactive task follows its nearest active task (A is never empty: max r >= 1/N).
  to_active = jnp.where(active[None, :, None], dist, jnp.inf)  # [l, i (active), j]
  nearest = jnp.min(to_active, axis=1)  # [l, j]
  l_inactive = jnp.sum(jnp.where(~active[None, :], nearest, 0.0))
  omega = resource * lambda_active * l_active + lambda_inactive * l_inactive
  return omega, {"l_active": l_active, "l_inactive": l_inactive}
