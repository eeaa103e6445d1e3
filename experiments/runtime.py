"""How the commands execute on this machine: `--execution` and `--compilation_cache`.

Shared by `experiments.train`, `experiments.evaluate` and `experiments.export` (applied by
`cli_help.run` once the flags are parsed). Neither changes what a run computes beyond float32
rounding, so a resumed run may change them (`dymu_jax.runs.guard.CHANGEABLE`).

* `--execution` chooses the op lowerings and how repeated passes batch (`dymu_jax.execution`):
  "auto" takes the measured defaults of the backend (CPU: the fast-op rewrites and unrolled
  per-task passes; GPU/TPU: plain XLA ops and vmap).
* `--compilation_cache` keeps XLA's compiled programs on disk (JAX's persistent compilation
  cache), so an ablation from another flag file, a resumed run or `evaluate` after `train`
  skips compiling the programs it shares with an earlier command. "auto" is
  `$XDG_CACHE_HOME/dymu_jax/xla` (default `~/.cache/dymu_jax/xla`); "off" turns it off; any
  other value is the folder (a `gs://` path works on TPU VMs). Only programs that took at least
  `--compilation_cache_min_seconds` to compile are stored.
"""

from __future__ import annotations

import os

from absl import flags
import jax

from dymu_jax import execution

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "execution", "auto",
    "Op lowerings and repeated passes: auto (CPU: fast-op rewrites, unrolled per-task passes; "
    "GPU/TPU: plain XLA ops, vmap), cpu, accelerator, or overrides such as "
    "'fast_ops=off' or 'fast_ops=on,passes=vmap'. Same results up to float32 rounding.")
flags.DEFINE_string(
    "compilation_cache", "auto",
    "Folder of the persistent XLA compilation cache: auto = $XDG_CACHE_HOME/dymu_jax/xla "
    "(~/.cache/dymu_jax/xla), off = no cache, or a folder.")
flags.DEFINE_float(
    "compilation_cache_min_seconds", 1.0,
    "Cache only programs whose compilation took at least this many seconds.", lower_bound=0.0)

NAMES = ("execution", "compilation_cache", "compilation_cache_min_seconds")


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dymu_jax", "xla")


def cache_dir(value: str) -> str | None:
  """The cache folder a `--compilation_cache` value names (None: off)."""
  value = value.strip()
  if value.lower() == "off" or not value:
    return None
  return default_cache_dir() if value.lower() == "auto" else os.path.expanduser(value)


def apply() -> None:
  """Puts `--execution` and `--compilation_cache` into effect (once the flags are parsed).

  Raises:
    ValueError: an `--execution` value that is not allowed (one sentence).
  """
  try:
    execution.configure(FLAGS.execution)
  except ValueError as error:
    raise ValueError(f"--execution: {error}") from None
  folder = cache_dir(FLAGS.compilation_cache)
  if folder is not None:
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      FLAGS.compilation_cache_min_seconds)
