r"""Examples per second of each registered dataset's training `Batcher`, single-threaded.

    python -m benchmarks.data_throughput                       # every dataset, ../shared/data
    python -m benchmarks.data_throughput --datasets=synthetic --seconds=3

Each dataset's train split is loaded with `dymu_jax.data.load`, from `--data_root/<folder>`
(multi_mnist reads `mnist/`, utkface `utkface/`, every other dataset the folder of its own name;
synthetic needs none). Batches of `--batch_size` are drawn one after the other, without prefetch,
for about `--seconds` each: once plain and once through `augment.make_augment(tasks)` when the
dataset has dense (per-pixel) labels. A dataset that cannot be loaded (missing data, a loader
that is not there) is reported as skipped with the reason. Synthetic scenes are measured at each
of `--synthetic_sizes`. The figures include building the batch in memory, nothing else.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from dymu_jax import data
from dymu_jax.data import augment as augment_lib

flags.DEFINE_string("data_root", os.path.join("..", "shared", "data"),
                    "Folder holding one data folder per dataset (see FOLDERS).")
flags.DEFINE_list("datasets", [], "Datasets to measure; empty = every registered one.")
flags.DEFINE_integer("batch_size", 256, "Examples per batch (smaller for smaller datasets).")
flags.DEFINE_float("seconds", 1.0, "Time spent measuring each configuration.")
flags.DEFINE_list("synthetic_sizes", ["64", "128"], "Image sizes of the synthetic scenes.")
flags.DEFINE_string("json_out", "", "Also write the results to this JSON file.")

FLAGS = flags.FLAGS

# Dataset name -> its folder under --data_root (None: needs no data).
FOLDERS = {"synthetic": None, "multi_mnist": "mnist", "utkface": "utkface"}


def examples_per_second(batcher: data.Batcher, seconds: float) -> tuple[float, float]:
  """(per wall-clock second, per CPU second of this process) of `batcher.batch(step)` over
  consecutive steps, after two warm-up batches.

  The CPU-time figure is what one free core would give when other processes share the machine.
  """
  batcher.batch(0)
  batcher.batch(1)
  step, start, cpu_start = 2, time.perf_counter(), time.process_time()
  while True:
    batcher.batch(step)
    step += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds and step > 3:
      examples = (step - 2) * batcher.global_batch_size
      return examples / elapsed, examples / max(time.process_time() - cpu_start, 1e-9)


def measure(config: data.DataConfig, label: str, batch_size: int, seconds: float) -> dict:
  """One row of the report: plain and augmented examples/s, or why the dataset was skipped."""
  row = {"dataset": label}
  try:
    source = data.load(config, "train")
  except (data.DatasetError, ImportError, NotImplementedError) as error:
    row["skipped"] = f"{type(error).__name__}: {error}"
    return row
  batch = min(batch_size, len(source))
  row.update(examples=len(source), batch_size=batch,
             image_shape=list(source.image_shape), tasks=[t.name for t in source.tasks])
  row["plain"], row["plain_cpu"] = examples_per_second(data.Batcher(source, batch, seed=0),
                                                       seconds)
  if any(t.is_dense for t in source.tasks):
    augment = augment_lib.make_augment(source.tasks)
    row["augmented"], row["augmented_cpu"] = examples_per_second(
        data.Batcher(source, batch, seed=0, augment=augment), seconds)
  return row


def configs(names, data_root, synthetic_sizes):
  """(DataConfig, label) for each measurement."""
  for name in names:
    if name == "synthetic":
      for size in synthetic_sizes:
        yield data.DataConfig(name=name, image_size=int(size)), f"synthetic {size}px"
      continue
    folder = os.path.join(data_root, FOLDERS.get(name, name))
    yield data.DataConfig(name=name, data_dir=folder), name


def report(rows) -> str:
  """A table: examples/s per wall-clock second and (in brackets) per CPU second."""
  lines = [f"{'dataset':<18}{'image':>10}{'plain ex/s (cpu)':>24}{'augmented ex/s (cpu)':>24}"
           f"  tasks"]
  for row in rows:
    if "skipped" in row:
      lines.append(f"{row['dataset']:<18}  skipped: {row['skipped']}")
      continue
    plain = f"{row['plain']:,.0f} ({row['plain_cpu']:,.0f})"
    augmented = (f"{row['augmented']:,.0f} ({row['augmented_cpu']:,.0f})"
                 if "augmented" in row else "n/a")
    shape = "x".join(str(v) for v in row["image_shape"])
    lines.append(f"{row['dataset']:<18}{shape:>10}{plain:>24}{augmented:>24}  "
                 f"{', '.join(row['tasks'])}")
  return "\n".join(lines)


def main(argv):
  del argv
  names = FLAGS.datasets or list(data.DATASETS)
  unknown = [n for n in names if n not in data.DATASETS]
  if unknown:
    raise app.UsageError(f"Unknown dataset(s) {', '.join(unknown)}; available: "
                         f"{', '.join(data.DATASETS)}.")
  rows = []
  for config, label in configs(names, FLAGS.data_root, FLAGS.synthetic_sizes):
    rows.append(measure(config, label, FLAGS.batch_size, FLAGS.seconds))
    print(report(rows[-1:]).splitlines()[-1], flush=True)
  print(f"\nbatch {FLAGS.batch_size}, numpy {np.__version__}, one thread, no prefetch:")
  print(report(rows))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
