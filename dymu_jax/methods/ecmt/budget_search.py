"""ECMT's search from (preference, budget) to widths over a `CostTable`."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dymu_jax import controls as controls_lib
from dymu_jax.models.widths import WidthConfig
from dymu_jax.methods.ecmt.cost_table import CostTable

PyTree = Any


# Fraction of the decoders' MACs span the search keeps free for the preference [ours].
DECODER_RESERVE = 0.5


# ----------------------------------------------------------------------------------------------
# The search.


def budget_macs(budget, cost_table: CostTable) -> int:
  """A budget as MACs (`controls.budget_macs` against the SuperNet's MACs)."""
  return controls_lib.budget_macs(budget, cost_table.full_macs)


def _widest(extra_row: np.ndarray, allowance: float) -> int:
  """Index of the widest choice whose extra MACs fit `allowance` (ties: the wider)."""
  fits = np.nonzero(extra_row <= allowance * (1 + 1e-12) + 1e-9)[0]
  return int(fits[-1])


def _allocate(r: np.ndarray, remaining: int, decoder_macs: np.ndarray,
              preference_cap: bool = True) -> list[int]:
  """Choice index per decoder within `remaining` MACs (>= every decoder at its minimum).

  Shares in proportion to r: each decoder's extra MACs over its minimum is at most
  `r_t * lam`, with lam the largest value whose allocation fits (water-filling; lam >= the
  budget left after the minimums, so every decoder gets at least its proportional share).
  What is left then goes to the most preferred tasks first, each taking the widest choice it
  can afford. With `preference_cap` [ours], decoder t's extra MACs are also capped at
  `r_t / max(r)` of its full extra, so the preference shapes the decoders even when the budget
  would let every one be at full width (the most preferred task's cap is its full width; a
  uniform preference caps nothing). Raising r_t (the others scaled down) never narrows
  decoder t.
  """
  base = decoder_macs[:, 0]
  extra = decoder_macs - base[:, None]
  budget = int(remaining - base.sum())
  num_tasks = len(r)
  if preference_cap:
    cap = r / r.max() * extra[:, -1]
  else:
    cap = np.full(num_tasks, np.inf)

  def allocation(lam):
    return [_widest(extra[t], min(r[t] * lam, cap[t])) for t in range(num_tasks)]

  def used(idx):
    return int(sum(extra[t, i] for t, i in enumerate(idx)))

  best = allocation(0.0)
  breakpoints = sorted({float(extra[t, c]) / r[t] for t in range(num_tasks) if r[t] > 0
                        for c in range(extra.shape[1])})
  for lam in breakpoints:
    idx = allocation(lam)
    if used(idx) > budget:
      break
    best = idx
  left = budget - used(best)
  for t in sorted(range(num_tasks), key=lambda t: (-r[t], t)):
    best[t] = _widest(extra[t], min(extra[t, best[t]] + left, cap[t]))
    left = budget - used(best)
  return best


def _too_small(budget, macs: int, smallest: int, full: int, what: str) -> ValueError:
  given = (f"{budget} of the SuperNet's {full:,} MACs ({macs:,} MACs)"
           if isinstance(budget, (float, np.floating)) else f"{macs:,} MACs")
  return ValueError(f"The budget of {given} is below the {smallest:,} MACs (a fraction "
                    f"{smallest / full:.4g} of the SuperNet) of {what}.")


def allocate_decoders(preference, budget, encoder: Sequence[float], *,
                      cost_table: CostTable, preference_cap: bool = True) -> tuple[float, ...]:
  """Decoder multipliers for a fixed encoder configuration (the inner step of `search`)."""
  r = controls_lib.check_preference(preference, cost_table.task_names)
  macs = budget_macs(budget, cost_table)
  e = cost_table.encoder_index(encoder)
  smallest = int(cost_table.encoder_macs[e] + cost_table.decoder_macs[e, :, 0].sum())
  if macs < smallest:
    raise _too_small(budget, macs, smallest, cost_table.full_macs,
                     f"encoder {tuple(encoder)} with the smallest decoders")
  idx = _allocate(r, macs - int(cost_table.encoder_macs[e]), cost_table.decoder_macs[e],
                  preference_cap)
  return tuple(cost_table.choices[i] for i in idx)


def search(preference, budget, *, cost_table: CostTable,
           scores: Mapping[Sequence[float], float] | None = None,
           decoder_reserve: float = DECODER_RESERVE,
           preference_cap: bool = True) -> WidthConfig:
  """The width configuration for a task preference and a compute budget.

  Candidates are the encoder configurations that leave the decoders room to follow the
  preference: the smallest decoders plus `decoder_reserve` of the span between the smallest
  and the widest decoders must fit after the encoder [ours; without a reserve, the
  best-scoring encoder is usually the one that eats the whole budget and every decoder is left
  at its minimum whatever the preference]. When no encoder leaves that room (budgets near the
  smallest configuration), every encoder that fits with the smallest decoders is a candidate.
  For each candidate, the decoders get the budget left after the encoder, in proportion to the
  preference (`allocate_decoders`). Among the candidates the one with the best
  `scores[encoder]` wins (a preference-independent validation score, higher is better, see
  `score_encoders`; encoders without a score rank below every scored one); ties, and the case
  `scores=None`, go to the most expensive candidate (then the larger encoder). The encoder
  therefore depends on the budget only, never on the preference.

  Args:
    preference: T numbers on the simplex, in task order.
    budget: MACs per example (int) or a fraction of the SuperNet's MACs (float in (0, 1]).
    cost_table: from `build_cost_table` / `cached_cost_table` for the network and image size.
    scores: optional {encoder multipliers: score}.
    decoder_reserve: fraction in [0, 1] of the decoders' span an encoder must leave free.
    preference_cap: cap each decoder at r_t / max(r) of its full extra MACs (see
      `_allocate`), so that the preference matters when the budget does not bind.

  Returns:
    A `WidthConfig` whose MACs (`cost_table.macs`) are within the budget.

  Raises:
    ValueError: a preference of the wrong length or off the simplex, a malformed budget, or a
      budget below the smallest configuration's MACs (one sentence each).
  """
  r = controls_lib.check_preference(preference, cost_table.task_names)
  macs = budget_macs(budget, cost_table)
  smallest = cost_table.smallest_macs
  if macs < smallest:
    raise _too_small(budget, macs, smallest, cost_table.full_macs, "the smallest configuration")
  if not 0.0 <= decoder_reserve <= 1.0:
    raise ValueError(f"decoder_reserve must lie in [0, 1], got {decoder_reserve}.")
  minimum = cost_table.encoder_macs + cost_table.decoder_macs[:, :, 0].sum(axis=1)
  span = cost_table.decoder_macs[:, :, -1].sum(axis=1) - cost_table.decoder_macs[:, :, 0].sum(
      axis=1)
  fitting = np.nonzero(minimum + decoder_reserve * span <= macs * (1 + 1e-12))[0]
  if not len(fitting):
    fitting = np.nonzero(minimum <= macs)[0]
  score_of = {}
  if scores:
    score_of = {tuple(float(m) for m in k): float(v) for k, v in scores.items()}
  best_key, best = None, None
  for e in fitting:
    encoder = cost_table.encoder_configs[e]
    idx = _allocate(r, macs - int(cost_table.encoder_macs[e]), cost_table.decoder_macs[e],
                    preference_cap)
    total = int(cost_table.encoder_macs[e]) + int(
        sum(cost_table.decoder_macs[e, t, i] for t, i in enumerate(idx)))
    score = score_of.get(encoder)
    key = (score is not None, score if score is not None else 0.0, total,
           int(cost_table.encoder_macs[e]), int(e))
    if best_key is None or key > best_key:
      best_key, best = key, WidthConfig(encoder, tuple(cost_table.choices[i] for i in idx))
  return best
