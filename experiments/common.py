"""Flags shared by the entry points (train, evaluate, export) and the builders they feed.

Every flag is documented in `--helpfull`. Flag files (`--flagfile=experiments/flags/...`) set
any of them; a flag on the command line after `--flagfile` overrides the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import flags
from absl import logging

from dymu_jax import data as data_lib

# --- data ---
flags.DEFINE_string("dataset", "synthetic",
                    f"Dataset name: one of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_string("data_dir", None,
                    "Folder (or file) holding the dataset; not needed for 'synthetic'. "
                    "multi_mnist: an MNIST IDX folder or a ParetoMTL pickle; utkface: the folder "
                    "with utkface_32x32.npz; arrays: an .npz; cifar100_mtl: a TFDS data_dir; "
                    "nyud / pascal_context: the NYUD_MT / PASCAL_MT folder.")
flags.DEFINE_list("tasks", [], "Tasks to train, comma-separated; empty = all of the dataset's.")
flags.DEFINE_integer("data_seed", 0, "Seed of how the dataset is built and split.")
flags.DEFINE_integer("image_size", 0, "Image side length; 0 keeps the dataset's own size.")
flags.DEFINE_integer("num_train", 0, "Training examples to build or keep; 0 = dataset default.")
flags.DEFINE_integer("num_test", 0, "Test examples to build or keep; 0 = dataset default.")
flags.DEFINE_float("test_fraction", 0.2,
                   "Held-out fraction for datasets without an official split (utkface, arrays).")
flags.DEFINE_string("task_spec", "",
                    "For --dataset=arrays: a JSON file or 'name:kind[:outputs],...' giving the "
                    "kind of each label array.")
flags.DEFINE_bool("augment", False,
                  "Random flip and scale-crop that keep dense labels aligned (dense datasets).")

# --- model ---
flags.DEFINE_string("backbone", "resnet_small",
                    "Encoder: lenet, resnet_small, resnet18, resnet34 or mobilenet_v2.")
flags.DEFINE_integer("head_width", 0,
                     "Hidden width of every task decoder; 0 takes the backbone's default.")

FLAGS = flags.FLAGS


def data_config() -> data_lib.DataConfig:
  return data_lib.DataConfig(
      name=FLAGS.dataset, data_dir=FLAGS.data_dir, seed=FLAGS.data_seed,
      image_size=FLAGS.image_size, num_train=FLAGS.num_train, num_test=FLAGS.num_test,
      test_fraction=FLAGS.test_fraction, task_spec=FLAGS.task_spec)


def load_sources():
  """(train source, test source) restricted to `--tasks`."""
  config = data_config()
  train = data_lib.load(config, "train").with_tasks(FLAGS.tasks or None)
  test = data_lib.load(config, "test").with_tasks(FLAGS.tasks or None)
  return train, test


def flag_values() -> dict:
  """The run's flags (only the ones defined by this project) as a JSON-serialisable dict."""
  values = {}
  for module_name, module_flags in FLAGS.flags_by_module_dict().items():
    if "experiments" not in module_name:
      continue
    for flag in module_flags:
      value = flag.value
      try:
        json.dumps(value)
      except TypeError:
        value = str(value)
      values[flag.name] = value
  return values


def ensure_workdir(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  return path


def model_options() -> dict:
  """Keyword arguments of `dymu_jax.models.build_multitask` from the model flags."""
  options = {"backbone": FLAGS.backbone}
  if FLAGS.head_width:
    options["head_width"] = FLAGS.head_width
  return options


def parse_floats(values, flag: str) -> tuple[float, ...] | None:
  """A list flag of numbers as floats; None when empty; one sentence when not numbers."""
  if not values:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated numbers, got {','.join(values)!r}.")


def format_eval(eval_metrics: dict, tasks) -> str:
  """The final evaluation as a small text table: one line per control and task."""
  lines = []
  for label, per_task in eval_metrics.items():
    for task in tasks:
      values = per_task.get(task.name, {})
      shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
      prefix = f"[{label}] " if label else ""
      lines.append(f"{prefix}{task.name}: {shown}")
  return "\n".join(lines)


# Errors that come from what the user asked for (flags, data, a diverging run): reported as
# one sentence; --traceback shows the full stack.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
flags.DEFINE_bool("traceback", False, "Show the full traceback of errors, not one sentence.")


@contextlib.contextmanager
def user_errors():
  """Turns user-facing errors into one line on stderr and exit status 2."""
  try:
    yield
  except USER_ERRORS as error:
    if FLAGS.traceback:
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def quiet_logging():
  """Library INFO logs (orbax, absl) hide the progress bar; show warnings unless asked."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
