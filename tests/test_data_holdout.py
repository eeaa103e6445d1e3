"""Held-out splits of a training source (DYMU's validation examples)."""

from __future__ import annotations

import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base


class Numbered(base.DataSource):
  """Example i has image value i and label i % 3."""

  name, split = "numbered", "train"
  tasks = (tasks_lib.classification("mod3", 3),)

  def __len__(self):
    return 20

  def get(self, indices):
    indices = np.asarray(indices)
    return {"image": indices.astype(np.float32).reshape(-1, 1, 1, 1),
            "mod3": (indices % 3).astype(np.int32)}


def test_holdout_split_is_disjoint_complete_and_seeded():
  rest, held = base.holdout_split(Numbered(), 6, seed=3)
  assert len(rest) == 14 and len(held) == 6
  seen_rest = rest.get(np.arange(14))["image"].ravel().astype(int)
  seen_held = held.get(np.arange(6))["image"].ravel().astype(int)
  assert sorted(set(seen_rest) | set(seen_held)) == list(range(20))
  assert not set(seen_rest) & set(seen_held)
  np.testing.assert_array_equal(held.get(np.arange(6))["mod3"], seen_held % 3)
  again = base.holdout_split(Numbered(), 6, seed=3)[1].get(np.arange(6))["image"]
  np.testing.assert_array_equal(again.ravel().astype(int), seen_held)
  other = base.holdout_split(Numbered(), 6, seed=4)[1].get(np.arange(6))["image"]
  assert not np.array_equal(other.ravel().astype(int), seen_held)
  assert held.tasks == Numbered.tasks and rest.name == "numbered"


def test_holdout_of_nothing_and_of_everything():
  source = Numbered()
  assert base.holdout_split(source, 0, seed=0) == (source, None)
  with pytest.raises(ValueError, match="Holding out 20 examples leaves none of the 20"):
    base.holdout_split(source, 20, seed=0)
