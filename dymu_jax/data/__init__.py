"""Data sources: every dataset yields batches `{"image": ..., "<task>": labels, ...}`.

`load(config, split)` builds a source by name; each source module has one `load(config, split)`.
Modules are imported lazily so that, for example, TensorFlow Datasets is only imported when
CIFAR-100-MTL is asked for.
"""

from __future__ import annotations

import importlib

from dymu_jax.data.base import (Batcher, DataConfig, DataSource, DatasetError, ArraySource,
                                SPLITS, eval_batches, prefetch)

# dataset name -> module under dymu_jax.data that defines `load(config, split)`.
DATASETS = {
    "synthetic": "synthetic",
    "multi_mnist": "multi_mnist",
    "utkface": "utkface",
    "arrays": "arrays",
    "cifar100_mtl": "cifar100_mtl",
    "nyud": "nyud",
    "pascal_context": "pascal_context",
}


class UnknownDatasetError(DatasetError):
  """A dataset name that is not registered."""


def load(config: DataConfig, split: str) -> DataSource:
  """The `split` ("train" or "test") of the dataset `config.name`."""
  if config.name not in DATASETS:
    raise UnknownDatasetError(f"Unknown dataset {config.name!r}; available datasets are "
                              f"{', '.join(DATASETS)}.")
  module = importlib.import_module(f"dymu_jax.data.{DATASETS[config.name]}")
  return module.load(config, split)


__all__ = ["ArraySource", "Batcher", "DataConfig", "DataSource", "DatasetError", "DATASETS",
           "SPLITS", "UnknownDatasetError", "eval_batches", "load", "prefetch"]
