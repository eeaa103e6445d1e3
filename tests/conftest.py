"""Shared test fixtures: where the real data lives, and small helpers."""

import os

import pytest

# The project root's sibling `shared/data` (CI clones the repository next to `shared/`).
SHARED_DATA = os.path.abspath(
    os.environ.get("DYMU_SHARED_DATA",
                   os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")))


@pytest.fixture(scope="session")
def shared_data():
  """Path of `../shared/data`; tests that need the real files fail loudly when it is missing."""
  if not os.path.isdir(SHARED_DATA):
    pytest.fail(f"real test data not found at {SHARED_DATA}; set DYMU_SHARED_DATA.")
  return SHARED_DATA
