"""DYMU's anchor: single-task losses and task weights before the edge stage, streams from a
pretrained trunk, and what an anchor allows (stream divergence, probe trees)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import losses as losses_lib
from dymu_jax.models.branched import BranchedNet, Tree

from dymu_jax.metrics import accumulate

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Before the edge stage: single-task losses of the anchor.


def anchor_task_losses(net: BranchedNet, anchor_variables: PyTree,
                       batches: Iterable[Mapping[str, Any]]) -> tuple[float, ...]:
  """Mean loss of every task's own stream over `batches` (dicts of images and labels).

  Batches may carry the evaluation padding mask (`data.base.VALID_KEY`); padded rows are
  dropped. Use `1 / loss` as the DYMU task weights [ours].
  """
  run = jax.jit(lambda v, x: net.apply_tree(v, x, net.separate_tree()))
  # Per task: a batch's mean loss is over its labelled examples, so it weighs by their number.
  totals, counts = np.zeros(net.num_tasks), np.zeros(net.num_tasks)
  for batch in batches:
    batch = dict(batch)
    if accumulate.VALID_KEY in batch:
      keep = np.asarray(batch.pop(accumulate.VALID_KEY), bool)
      batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    if not int(np.shape(batch["image"])[0]):
      continue
    predictions = run(anchor_variables, jnp.asarray(batch["image"], jnp.float32))
    for i, t in enumerate(net.tasks):
      present = float(np.sum(np.asarray(losses_lib.example_present(t, batch[t.name]))))
      if present:
        totals[i] += present * float(t.loss(predictions[t.name], jnp.asarray(batch[t.name])))
        counts[i] += present
  if not counts.any():
    raise ValueError("anchor_task_losses needs at least one non-empty batch.")
  missing = [t.name for t, c in zip(net.tasks, counts) if not c]
  if missing:
    raise ValueError(f"anchor_task_losses found no labelled example of task(s) "
                     f"{', '.join(missing)} in the batches, so their losses are undefined.")
  return tuple(float(x) for x in totals / counts)


def task_weights_from_losses(losses: Sequence[float], normalise: bool = True
                             ) -> tuple[float, ...]:
  """w_i = 1 / L_i^anchor [ours], scaled to mean 1 when `normalise` (the default).

  Normalising keeps the task term `sum_i r_i w_i L_i` near the scale of the anchor's losses
  relative to one another, so lambda_A and lambda_I keep the paper's meaning.
  """
  bad = [l for l in losses if not (math.isfinite(l) and l > 0)]
  if bad:
    raise ValueError(f"Single-task losses must be finite and > 0 to set the task weights, got "
                     f"{tuple(losses)}.")
  weights = [1.0 / float(l) for l in losses]
  if normalise:
    mean = sum(weights) / len(weights)
    weights = [w / mean for w in weights]
  return tuple(weights)


# ----------------------------------------------------------------------------------------------
# The anchor from a pretrained trunk, and what an anchor allows.


def streams_from_trunk(trunk_variables: Mapping[str, PyTree], stream: int = 0) -> dict:
  """Anchor variables whose every stream is a copy of the trunk's stream `stream`.

  `trunk_variables` are a pretrain stage's variables (stacked like any `BranchedNet`'s); the
  decoders are kept (each was trained on the shared trunk for its own task).
  """

  def copy(collection):
    out = {}
    for key, tree in collection.items():
      if key.startswith("block"):
        out[key] = jax.tree.map(
            lambda a: jnp.broadcast_to(a[stream:stream + 1], a.shape).copy(), tree)
      else:
        out[key] = tree
    return out

  return {col: copy(tree) for col, tree in trunk_variables.items()}


def stream_divergence(anchor_variables: Mapping[str, PyTree], num_layers: int
                      ) -> list[list[list[float]]]:
  """Per block layer, the (N, N) relative distances between the streams' parameters.

  d_l(i, j) = ||theta_i - theta_j|| / ((||theta_i|| + ||theta_j||) / 2) over every parameter
  of block l (batch-norm scales and biases included): 0 for copies, about 1.4 for independent
  draws of the same scale (sqrt 2). The anchor report prints it so a user sees whether the
  streams still correspond (a cross edge can only be cheap when it is small).
  """
  out = []
  for l in range(num_layers):
    leaves = jax.tree.leaves(anchor_variables["params"][f"block{l}"])
    flat = np.concatenate([np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in leaves],
                          axis=1)
    norms = np.linalg.norm(flat, axis=1)
    n = flat.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if i != j:
          d[i, j] = np.linalg.norm(flat[i] - flat[j]) / max((norms[i] + norms[j]) / 2, 1e-12)
    out.append(d.tolist())
  return out


def probe_trees(num_layers: int, num_tasks: int) -> list[tuple[str, Tree]]:
  """(label, tree) of the anchor's cheapest moves away from the separate tree.

  One-edge changes: child j of parent choice l reads stream i (i != j), everything else
  separate. Prefix sharing: the nodes of block layers 0..k of every stream replaced by
  stream s's (a trunk shared up to block k, then the streams; k = L - 1 is one shared trunk).
  """
  separate = [list(range(num_tasks)) for _ in range(num_layers)]
  trees = []
  for l in range(num_layers):
    for j in range(num_tasks):
      for i in range(num_tasks):
        if i != j:
          parents = [row[:] for row in separate]
          parents[l][j] = i
          where = f"block {l + 1}" if l < num_layers - 1 else "decoder"
          trees.append((f"{where} of stream {j} reads stream {i}", Tree(parents)))
  for s in range(num_tasks):
    for k in range(num_layers):
      parents = [[s] * num_tasks if l <= k else list(range(num_tasks))
                 for l in range(num_layers)]
      label = (f"blocks 0-{k} shared (stream {s})" if k else f"block 0 shared (stream {s})")
      trees.append((label, Tree(parents)))
  return trees
