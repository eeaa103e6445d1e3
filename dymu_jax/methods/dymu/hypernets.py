"""DYMU's hypernetworks: the edge hypernetwork h(r, c) -> parent logits and the weight
hypernetwork g(r, c) -> batch-norm shifts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dymu_jax.models import branched

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Hypernetworks.


class ControlEmbedding(nn.Module):
  """p = sum_i r_i e_i + c e_c, with learned embeddings (dimension `features`)."""

  num_tasks: int
  features: int = 32

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    init = nn.initializers.normal(1.0)
    tasks = self.param("task_embeddings", init, (self.num_tasks, self.features), jnp.float32)
    res = self.param("resource_embedding", init, (self.features,), jnp.float32)
    preference = jnp.asarray(preference, jnp.float32)
    resource = jnp.asarray(resource, jnp.float32)
    return preference @ tasks + resource[..., None] * res


class EdgeHypernet(nn.Module):
  """h(r, c) -> parent logits (L, N, N): embedding, MLP, one N x N linear head per layer.

  Attributes:
    num_tasks: N.
    num_layers: L (parent choices per child stream).
    embedding_features: embedding dimension (32).
    hidden: widths of the MLP's hidden layers ((100, 100)).
    self_logit: initial bias of every child's own-stream parent logit [ours option, default
      0: uniform start].
  """

  num_tasks: int
  num_layers: int
  embedding_features: int = 32
  hidden: tuple[int, ...] = (100, 100)
  self_logit: float = 0.0

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    n = self.num_tasks
    x = ControlEmbedding(n, self.embedding_features, name="embedding")(preference, resource)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
    bias = self.self_logit * jnp.eye(n, dtype=jnp.float32).reshape(-1)
    heads = [nn.Dense(n * n, bias_init=lambda *_: bias, name=f"layer{l}")(x)
             for l in range(self.num_layers)]
    return jnp.stack(heads, axis=-2).reshape(*x.shape[:-1], self.num_layers, n, n)


class WeightHypernet(nn.Module):
  """g(r, c) -> one flat vector of batch-norm shifts: embedding, MLP, a zero-initialised head.

  Attributes:
    num_tasks: N.
    num_outputs: size of the flattened shift tree (`batch_norm_shift_template`).
    embedding_features: embedding dimension (32).
    hidden: widths of the MLP's hidden layers ((100, 100, 100)).
  """

  num_tasks: int
  num_outputs: int
  embedding_features: int = 32
  hidden: tuple[int, ...] = (100, 100, 100)

  @nn.compact
  def __call__(self, preference: jax.Array, resource: jax.Array) -> jax.Array:
    x = ControlEmbedding(self.num_tasks, self.embedding_features, name="embedding")(
        preference, resource)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f"hidden{i}")(x))
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name="shifts")(x)


def shift_unraveler(anchor_variables: PyTree):
  """(size of the flat shift vector, fn flat -> shift tree) for the anchor's batch norms."""
  template = branched.batch_norm_shift_template(anchor_variables)
  if not template:
    raise ValueError("The anchor has no batch norm, so the weight hypernetwork has nothing to "
                     "shift; build the branched network with batch norm.")
  flat, unravel = ravel_pytree(template)
  return int(flat.shape[0]), unravel
