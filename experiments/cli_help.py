"""`--help` of the entry points: the flags a user looks for, grouped; and which method owns which.

absl's own `--help` lists only the flags defined in the main module, so `experiments.train
--help` showed none of `--dataset`, `--data_dir`, `--tasks` or `--backbone` (they live in
`experiments/common.py`). Each entry point passes its groups to `run`, which prints them for
`--help` / `-h` / `-?` / `--helpshort` and leaves `--helpfull` (every flag, absl's and
orbax's included) to absl. A test checks that every flag of the training command is in exactly
one group, so the help cannot fall behind the flags.

`METHOD_FLAGS` ("which method reads this flag") derives from the registered methods' configs:
the per-method help headings come from it, and `check_method_flags` refuses a method option
given with another `--method` (it would otherwise be ignored silently).
"""

from __future__ import annotations

import sys
import textwrap
from typing import Callable, Sequence

from absl import app
from absl import flags

from experiments import common
from experiments import runtime

FLAGS = flags.FLAGS
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")
WIDTH = 100



def _method_flags() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
  """Heading -> (the methods that read these flags, the flags): one group per registered
  method config (`dymu_jax.methods.options`), its flags `--<PREFIX>_<field>`."""
  groups = {}
  for config, owners in common.config_owners().items():
    heading = f"{config.TITLE} ({', '.join('--method=' + m for m in owners)})"
    groups[heading] = (owners, tuple(config.flag_name(f.name) for f in config.fields()))
  return groups


METHOD_FLAGS = _method_flags()
# Former names of method options (aliases) -> their flag.
_FORMER = {former: config.flag_name(f.name)
           for config in common.config_owners() for f in config.fields()
           for former in f.metadata["former"]}

# Flags of `experiments/runtime.py`, which every command defines and `run` applies.
RUNTIME_GROUP = ("Execution and compilation cache", runtime.NAMES)

TRAIN_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Data", ("dataset", "data_dir", "tasks", "task_spec", "num_train", "num_test",
              "test_fraction", "image_size", "data_seed", "standardise_inputs",
              "standardise_targets", "augment")),
    ("Model", ("backbone", "head_width", "head_batch_norm", "backbone_options", "pretrained")),
    ("Method", ("method", "task_weights")),
    ("Training", ("workdir", "steps", "batch_size", "seed", "optimizer", "learning_rate",
                  "schedule", "warmup_steps", "decay_steps", "decay_factor", "weight_decay",
                  "grad_clip", "momentum", "allow_changed_flags")),
    ("Evaluation, logging and checkpoints", ("eval_every", "eval_batch_size", "log_every",
                                             "checkpoint_every", "keep_checkpoints",
                                             "progress")),
    ("Devices and errors", ("parallel", "multi_host", "prefetch", "compute_dtype", "traceback")),
    RUNTIME_GROUP,
    *((heading, names) for heading, (_, names) in METHOD_FLAGS.items()),
)


def _expand(names: Sequence[str]) -> list[str]:
  """Flag names, with "prefix_*" expanded to the defined flags of that prefix (sorted)."""
  out = []
  for name in names:
    if name.endswith("*"):
      out.extend(sorted(n for n in FLAGS if n.startswith(name[:-1])))
    elif name in FLAGS:
      out.append(name)
  return out


def _describe(name: str) -> str:
  flag = FLAGS[name]
  default = flag.default_as_str if flag.default_as_str is not None else "None"
  text = f"--{name}: {flag.help} (default: {default})"
  return textwrap.fill(text, WIDTH, initial_indent="  ", subsequent_indent="      ")


def help_text(doc: str, groups: Sequence[tuple[str, Sequence[str]]]) -> str:
  """The command's docstring, then each group's flags under its heading."""
  lines = [doc.strip(), ""]
  for heading, names in groups:
    expanded = _expand(names)
    if not expanded:
      continue
    lines.append(f"{heading}:")
    lines.extend(_describe(name) for name in expanded)
    lines.append("")
  lines.append("--helpfull lists every flag, including absl's and the libraries'.")
  return "\n".join(lines)


def owner_of(name: str) -> tuple[str, tuple[str, ...]] | None:
  """(heading, methods) of the method whose option `name` is; None for a general flag."""
  name = _FORMER.get(name, name)
  for heading, (methods, names) in METHOD_FLAGS.items():
    if name in names:
      return heading, methods
  return None


def check_method_flags(method: str, given: Sequence[str]) -> None:
  """Raises ValueError when a flag in `given` belongs to a method other than `method`."""
  for name in given:
    owner = owner_of(name)
    if owner is not None and method not in owner[1]:
      heading, _ = owner
      raise ValueError(f"--{name} is an option of {heading.split(' (')[0]} "
                       f"({', '.join('--method=' + m for m in owner[1])}), but this run has "
                       f"--method={method}; remove it or change --method.")


def given_flags() -> list[str]:
  """Names of the flags set on the command line or in a flag file."""
  return [name for name in FLAGS if FLAGS[name].present]


# The flag files of the command line (`common.expand_flag_files`), recorded with a run.
FLAG_FILES: tuple[str, ...] = ()


def parse_flags(argv: Sequence[str]) -> list[str]:
  """`FLAGS(argv)` after expanding the flag files (their includes resolve next to them); a bad
  flag (unknown, not a number, out of range) stops like every other user error: `error: <one
  sentence naming the flag>` on stderr and exit status 2."""
  global FLAG_FILES
  try:
    argv, FLAG_FILES = common.expand_flag_files(list(argv))
    return FLAGS(argv)
  except ValueError as error:  # a flag file that is missing or includes itself
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as error:
    message = " ".join(str(error).split())
    print(f"error: {message}{'' if message.endswith('.') else '.'}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable, doc: str, groups: Sequence[tuple[str, Sequence[str]]]) -> None:
  """`absl.app.run(main)`, with `--help` showing `groups` instead of the main module's flags,
  bad flags reported in one sentence (`parse_flags`), and the runtime flags applied
  (`runtime.apply`: `--execution`, `--compilation_cache`) before `main` runs."""

  def parse(argv):
    args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_ARGS for a in args):
      print(help_text(doc, groups))
      sys.exit(0)
    remaining = parse_flags(argv)
    try:
      runtime.apply()
    except ValueError as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)
    return remaining

  app.run(main, flags_parser=parse)
