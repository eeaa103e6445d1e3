"""Shared test fixtures: where the real data lives, and small helpers.

Tests that read `../shared/data` (real MNIST digits, UTKFace faces, the Multi-MNIST sample
pickle) skip with one reason line when it is absent, as in a fresh clone; with
`DYMU_REQUIRE_TEST_DATA=1` (set by `.ci/run`) they fail instead, so CI always runs them. Point
the tests at another copy with `DYMU_SHARED_DATA=/path/to/data`. A fresh clone still runs the
Multi-MNIST loader and a short training run on `drawn_mnist`, digits the tests draw.
"""

import os

import pytest

from drawn_digits import write_mnist_folder

# The project root's sibling `shared/data` (CI clones the repository next to `shared/`).
SHARED_DATA = os.path.abspath(
    os.environ.get("DYMU_SHARED_DATA",
                   os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")))
REQUIRE_TEST_DATA = os.environ.get("DYMU_REQUIRE_TEST_DATA", "0") == "1"


@pytest.fixture(scope="session")
def shared_data():
  """Path of `../shared/data`: skips the test when it is missing (fails under CI's
  DYMU_REQUIRE_TEST_DATA=1)."""
  if not os.path.isdir(SHARED_DATA):
    message = (f"real test data not found at {SHARED_DATA} (set DYMU_SHARED_DATA to a folder "
               "holding mnist/, utkface/ and multi_mnist_sample/; see README, Tests)")
    if REQUIRE_TEST_DATA:
      pytest.fail(message + "; DYMU_REQUIRE_TEST_DATA=1 requires it.")
    pytest.skip(message)
  return SHARED_DATA


@pytest.fixture(scope="session")
def drawn_mnist(tmp_path_factory):
  """A folder of MNIST-format IDX files (400 train, 200 test digits) drawn by the tests."""
  return write_mnist_folder(tmp_path_factory.mktemp("drawn_mnist"))
