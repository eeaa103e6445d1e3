"""Flags shared by the entry points (train, evaluate, export) and the builders they feed.

Every flag is documented in `--helpfull`. Flag files (`--flagfile=experiments/flags/...`) set
any of them; a flag on the command line after `--flagfile` overrides the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from typing import Any, Mapping

from absl import flags
from absl import logging

from dymu_jax import data as data_lib
from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax.train import loop as train_loop


def require_number(name: str, lower: float | None = None, upper: float | None = None, *,
                   open_lower: bool = False, open_upper: bool = False,
                   flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Refuses NaN, infinity and values outside the range of the float flag `name` while the
  flags are parsed, naming the range (absl's own bounds let NaN and infinity through)."""
  _require(name, {"low": lower, "high": upper, "open_low": open_lower,
                  "open_high": open_upper}, float, flag_values)


def require_integer(name: str, lower: int, meaning: str = "",
                    flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Refuses values of the integer flag `name` below `lower` while the flags are parsed;
  `meaning` names a sentinel (e.g. "-1 = the backbone's default")."""
  _require(name, {"low": lower, "meaning": meaning}, int, flag_values)


def _require(name: str, bounds: Mapping[str, Any], scalar: type,
             flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The validator of a number flag in `bounds` (as `methods.options.option`'s metadata)."""
  flags.register_validator(
      name, lambda value: value is None or methods_lib.options.in_range(value, bounds),
      message=f"must be {methods_lib.options.describe_range(bounds, scalar)}",
      flag_values=flag_values)


# --- run ---
flags.DEFINE_string("workdir", None,
                    "The run's folder: checkpoints, metrics.jsonl, event files, summary.json "
                    "(train writes it; evaluate and export read it).")
flags.DEFINE_integer("eval_batch_size", 0,
                     "Evaluation batch size; 0 = --batch_size when training, 256 otherwise.",
                     lower_bound=0)

# --- data ---
flags.DEFINE_string("dataset", "synthetic",
                    f"Dataset name: one of {', '.join(data_lib.DATASETS)}.")
flags.DEFINE_string("data_dir", None,
                    "Folder (or file) holding the dataset; not needed for 'synthetic'. "
                    "multi_mnist: an MNIST IDX folder or a ParetoMTL pickle; utkface: the folder "
                    "with utkface_32x32.npz; arrays: an .npz; cifar100_mtl: a TFDS data_dir; "
                    "nyud / pascal_context: the NYUD_MT / PASCAL_MT folder.")
flags.DEFINE_list("tasks", [], "Tasks to train, comma-separated; empty = all of the dataset's.")
flags.DEFINE_integer("data_seed", 0, "Seed of how the dataset is built and split.",
                     lower_bound=0)
flags.DEFINE_integer("image_size", 0, "Image side length; 0 keeps the dataset's own size (each "
                     "backbone has a smallest size it accepts, e.g. 20 px for lenet).",
                     lower_bound=0)
flags.DEFINE_integer("num_train", 0, "Training examples to build or keep; 0 = dataset default.",
                     lower_bound=0)
flags.DEFINE_integer("num_test", 0, "Test examples to build or keep; 0 = dataset default.",
                     lower_bound=0)
flags.DEFINE_float("test_fraction", 0.2,
                   "Held-out fraction for datasets without an official split (utkface, arrays).")
require_number("test_fraction", 0, 1, open_lower=True, open_upper=True)
flags.DEFINE_string("task_spec", "",
                    "For --dataset=arrays: a JSON file or 'name:kind[:outputs],...' giving the "
                    "kind of each label array.")
flags.DEFINE_bool("standardise_inputs", True,
                  "For --dataset=arrays with feature vectors (an 'inputs' array of shape (N, D)): "
                  "standardise each feature with the training split's mean and std.")
flags.DEFINE_bool("standardise_targets", True,
                  "For --dataset=arrays with feature vectors: train each regression task on its "
                  "labels standardised with the training split's mean and std (losses in those "
                  "units); predictions and metrics stay in the labels' own units.")
flags.DEFINE_bool("augment", False,
                  "Random flip and scale-crop that keep dense labels aligned (dense datasets).")

# --- model ---
flags.DEFINE_string("backbone", "resnet_small",
                    "Encoder: lenet, resnet_small, resnet18, resnet34, mobilenet_v2 (images) or "
                    "mlp (feature vectors).")
flags.DEFINE_integer("head_width", 0,
                     "Hidden width of every task decoder; 0 takes the backbone's default.",
                     lower_bound=0)
flags.DEFINE_bool("head_batch_norm", False,
                  "Batch norm in the hidden layers of the classification/regression heads "
                  "(a slimmable network recalibrates them per width configuration; see "
                  "dymu_jax/models/decoders.py).")
flags.DEFINE_list("backbone_options", [],
                  "Options of the backbone class as name=value pairs, e.g. "
                  "'channel_divisor=2,batch_norm=true' for lenet or 'output_stride=8' for the "
                  "ResNets (see dymu_jax/models/backbones.py).")
flags.DEFINE_string("pretrained", "",
                    "ImageNet weights the backbone starts from: a torchvision state dict of "
                    "resnet18, resnet34 or mobilenet_v2 at its default widths (branched streams, one per task: "
                    "resnet18 or mobilenet_v2, loaded into every stream) in a .safetensors, "
                    ".npz or .pth/.pt file; empty = random initialisation. Only a fresh run "
                    "loads it (a resumed run restores its checkpoint), and only a run's first "
                    "stage (later stages start from their earlier stage).")

FLAGS = flags.FLAGS


def expand_flag_files(argv: list[str]) -> tuple[list[str], tuple[str, ...]]:
  """(`argv` with every `--flagfile=PATH` / `--flagfile PATH` replaced by its flags, the flag
  files given on the command line), so that includes resolve next to their file."""
  out, files, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg in ("--flagfile", "-flagfile") and i + 1 < len(argv):
      path, i = argv[i + 1], i + 2
    elif arg.startswith(("--flagfile=", "-flagfile=")):
      path, i = arg.partition("=")[2], i + 1
    else:
      out.append(arg)
      i += 1
      if arg == "--":
        out.extend(argv[i:])
        break
      continue
    files.append(os.path.relpath(os.path.abspath(os.path.expanduser(path))))
    out.extend(files_lib.flag_file_args(path))
  return out, tuple(files)


def flag_values() -> dict:
  """The run's flags (only the ones defined by this project) as a JSON-serialisable dict."""
  values = {}
  for module_name, module_flags in FLAGS.flags_by_module_dict().items():
    if "experiments" not in module_name:
      continue
    for flag in module_flags:
      if flag.name in ALIASES:  # recorded under the option's own name
        continue
      value = flag.value
      try:
        json.dumps(value)
      except TypeError:
        value = str(value)
      values[flag.name] = value
  return values


def ensure_workdir(path: str, flag: str = "--workdir") -> str:
  """`path` as an absolute, existing, writable folder (created if missing); a file in the way
  or a folder we may not write stops with one sentence naming `flag`.

  A URI (gs://bucket/run, any `etils.epath` filesystem) is kept as given and created there;
  whether it may be written shows at the first write.
  """
  if not files_lib.is_local(path):
    folder = files_lib.run_path(path)
    if folder.exists() and not folder.is_dir():
      raise ValueError(f"{flag} needs the folder {folder}, but it is a file; choose another "
                       f"{flag}.")
    folder.mkdir(parents=True, exist_ok=True)
    return os.fspath(folder)
  path = files_lib.run_dir(path)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "it" if existing == path else existing
    raise ValueError(f"{flag} needs the folder {path}, but {what} is a file; choose another "
                     f"{flag}.")
  os.makedirs(path, exist_ok=True)
  if hasattr(os, "statvfs") and os.statvfs(path).f_flag & os.ST_RDONLY:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
  return path


# --- method options: one flag per field of each registered method's config ---------------------
# `--<Config.PREFIX>_<field>` (see `dymu_jax.methods.options`); the option's former names are
# aliases, and a saved run is read under its new name, a former name or the field's legacy value.


def config_owners() -> dict[type, tuple[str, ...]]:
  """{config class with options: the registered methods that take it}, in registry order."""
  owners: dict[type, list[str]] = {}
  for name in methods_lib.METHODS:
    config = methods_lib.config_of(name)
    if config.fields():
      owners.setdefault(config, []).append(name)
  return {config: tuple(names) for config, names in owners.items()}


def _list_validator(name: str, config: type, field) -> None:
  scalar = config.types()[field.name][0]

  def check(values) -> bool:
    try:
      return all(methods_lib.options.in_range(scalar(v), field.metadata) for v in values or ())
    except ValueError:
      return False

  kind = "whole numbers" if scalar is int else "numbers"
  allowed = methods_lib.options.range_text(field.metadata)
  flags.register_validator(name, check,
                           message=f"must be comma-separated {kind} {allowed}".strip())


def define_option_flags(config: type, module_name: str = __name__) -> None:
  """Defines one flag per field of the `MethodConfig` subclass `config` (its name
  `config.flag_name(field)`, its type, default, help, range and choices), and its former names
  as aliases (kept out of `flag_values`); `module_name` owns them (absl's `--helpfull`
  grouping, and which command's flags they are)."""
  types = config.types()
  for field in config.fields():
    name, meta = config.flag_name(field.name), field.metadata
    scalar, is_tuple, _ = types[field.name]
    text = f"{config.TITLE}: {meta['help']}" + (
        f" Formerly --{', --'.join(meta['former'])}." if meta["former"] else "")
    if is_tuple:
      flags.DEFINE_list(name, [str(v) for v in field.default], text, module_name=module_name)
      if scalar in (int, float):
        _list_validator(name, config, field)
    elif scalar is bool:
      flags.DEFINE_bool(name, field.default, text, module_name=module_name)
    elif meta["choices"]:
      flags.DEFINE_enum(name, field.default, list(meta["choices"]), text, module_name=module_name)
    elif scalar is int:
      flags.DEFINE_integer(name, field.default, text, module_name=module_name)
    elif scalar is float:
      flags.DEFINE_float(name, field.default, text, module_name=module_name)
    else:
      flags.DEFINE_string(name, field.default, text, module_name=module_name)
    if scalar in (int, float) and not is_tuple:
      _require(name, meta, scalar)
    for former in meta["former"]:
      flags.DEFINE_alias(former, name, module_name=module_name)
      ALIASES.add(former)


ALIASES: set[str] = set()
for _config in config_owners():
  define_option_flags(_config)


def format_eval(eval_metrics: dict, tasks, labelled: dict | None = None) -> str:
  """The final evaluation as a small text table: one line per control and task, or, for more
  than `loop.MAX_TASKS_LISTED` tasks, one summary line per control (`loop.describe_eval`:
  mean, median and worst of each primary metric; the tasks without a labelled example, from
  `labelled` = {control label: {task: count}} when given)."""
  lines = []
  for label, per_task in eval_metrics.items():
    if len(tasks) > train_loop.MAX_TASKS_LISTED:
      prefix = f"[{label}] " if label else ""
      lines.append(prefix + train_loop.describe_eval(
          per_task, tasks, (labelled or {}).get(label)))
      continue
    for task in tasks:
      values = per_task.get(task.name, {})
      shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
      prefix = f"[{label}] " if label else ""
      lines.append(f"{prefix}{task.name}: {shown}")
  return "\n".join(lines)


# Errors that come from what the user asked for (flags, data, a diverging run, a folder that
# cannot be written, a full disk): reported as one sentence; --traceback shows the full stack.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, OSError)
flags.DEFINE_bool("traceback", False, "Show the full traceback of errors, not one sentence.")

# OS errors by what they mean for the user: nothing can be written there, or a path is a file
# where a folder is needed (or the reverse).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}
_PATH_ERRNOS = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


# How tensorstore (under orbax's checkpoints) reports a full disk: a ValueError naming the file.
_FULL_DISK_TEXT = "No space left on device"
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def describe_error(error: BaseException, folders: str = "--workdir") -> str:
  """One sentence for a user-facing error: its own message, or for an OS error (which has an
  errno; the messages our code raises have none) the path, the reason and what to do."""
  if isinstance(error, ValueError) and _FULL_DISK_TEXT in str(error):
    found = _TENSORSTORE_FILE.search(str(error))
    error = OSError(errno.ENOSPC, _FULL_DISK_TEXT, found.group(1) if found else None)
  if not isinstance(error, OSError) or error.errno is None:
    return str(error)
  path = error.filename if error.filename is not None else error.filename2
  where = f" {os.fspath(path)}" if path is not None else ""
  reason = f"{error.strerror or os.strerror(error.errno)} (errno {error.errno})"
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return (f"cannot write{where}: {reason}; free some space or choose a folder on another "
            f"disk with {folders}.")
  if error.errno in _WRITE_ERRNOS | _ACCESS_ERRNOS:
    return f"cannot write{where}: {reason}; choose a writable folder with {folders}."
  if error.errno in _PATH_ERRNOS:
    return (f"cannot use{where}: {reason}; a file stands where a folder is needed (or the "
            f"reverse), so choose another path with {folders}.")
  if error.errno == errno.ENOENT:
    return f"cannot open{where}: {reason}."
  return f"cannot read or write{where}: {reason}."


@contextlib.contextmanager
def user_errors(folders: str = "--workdir"):
  """Turns user-facing errors into one line on stderr and exit status 2; `folders` names the
  flags of the command's output folders (OS errors suggest choosing another one)."""
  try:
    yield
  except USER_ERRORS as error:
    if FLAGS.traceback:
      raise
    print(f"error: {describe_error(error, folders)}", file=sys.stderr)
    sys.exit(2)


def quiet_logging():
  """Library INFO logs (orbax, absl) hide the progress bar; show warnings unless asked."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
