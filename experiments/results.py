r"""Collect finished runs into one Markdown page of results, each number with its commands.

    python -m experiments.results --workdirs='workdirs/*' --output=docs/results.md \
        --overwrite_tracked

What the page shows, and how seeds are grouped, is described in `dymu_jax/results/__init__.py`
(the library that builds the page; `dymu_jax.results.render` from a notebook).

Nothing is re-measured here: the page shows what the runs recorded, so regenerate it after new
runs. Wall times are those of the machine and load each run had.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from absl import flags

from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax import results as results_lib
from experiments import cli_help
from experiments import common
from experiments import train

flags.DEFINE_list("workdirs", ["workdirs/*"],
                  "Run folders: globs or paths, comma-separated; folders without a finished "
                  "run are skipped with a note.")
flags.DEFINE_string("output", None,
                    "The Markdown file to write; default results.md in the run folders' common "
                    "parent (e.g. workdirs/results.md).")
flags.DEFINE_bool("overwrite_tracked", False,
                  "Allow --output to replace a file tracked by git (e.g. regenerating "
                  "docs/results.md); refused otherwise, so a command run from the repository "
                  "root cannot overwrite a committed page by accident.")
flags.DEFINE_string("flags_dir", os.path.join(os.path.dirname(__file__), "flags"),
                    "Folder of the flag files that training commands are matched against.")
flags.DEFINE_bool("copy_plots", True,
                  "Copy each evaluation's PNG plots next to the page, and draw the page's own "
                  "plots (loss fronts, cost against hypervolume) there.")
flags.DEFINE_string("reference_method", methods_lib.REFERENCE_METHOD,
                    "The --method whose runs are the Delta_m reference of the fixed-network "
                    "table.")

FLAGS = train.FLAGS  # with the training command's flags, which `train` defines
_OWN = ("workdirs", "output", "overwrite_tracked", "flags_dir", "copy_plots", "reference_method")


def training_defaults() -> dict[str, Any]:
  """{flag: default} of every defined flag but this page's own (the training command's)."""
  return {name: FLAGS[name].default for name in FLAGS if name not in _OWN}


def output_path(output: str | None, run_dirs) -> str:
  """--output, or results.md in the common parent of the run folders."""
  if output:
    return os.path.abspath(output)
  # Runs on another filesystem (gs://...) have no local parent: the page goes to the cwd.
  parents = [os.path.dirname(os.path.abspath(d)) for d in run_dirs
             if files_lib.is_local(d)] or [os.getcwd()]
  return os.path.join(os.path.commonpath(parents), "results.md")


def is_tracked(path: str) -> bool:
  """Whether `path` is a file that git tracks (False outside a repository or without git)."""
  if not os.path.isfile(path):
    return False
  try:
    result = subprocess.run(["git", "ls-files", "--error-unmatch", os.path.basename(path)],
                            cwd=os.path.dirname(path), capture_output=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return False
  return result.returncode == 0


def check_output(output: str) -> None:
  """The page's folder exists (created if missing) and can be written, and `output` is not a
  folder; else one sentence naming --output."""
  if os.path.isdir(output):
    raise ValueError(f"--output={output} is a folder; give the Markdown file to write, such "
                     f"as {os.path.join(output, 'results.md')}.")
  common.ensure_workdir(os.path.dirname(output), "--output")


def main(argv):
  del argv
  common.quiet_logging()
  with common.user_errors("--output"):
    if FLAGS.output:  # a page that cannot be written stops before the runs are read
      check_output(output_path(FLAGS.output, []))
    defaults = training_defaults()
    found, notes = results_lib.load_runs(FLAGS.workdirs, defaults)
    if not found:
      skipped = f" (skipped: {'; '.join(notes)})" if notes else ""
      raise FileNotFoundError(f"No finished run in {', '.join(FLAGS.workdirs)}{skipped}; "
                              f"train one with python -m experiments.train first.")
    output = output_path(FLAGS.output, [run["workdir"] for run in found])
    if not FLAGS.overwrite_tracked and is_tracked(output):
      raise ValueError(f"{output} is tracked by git; pass --overwrite_tracked to regenerate "
                       f"it, or choose another --output.")
    check_output(output)
    text = results_lib.render(found, notes, output, FLAGS.flags_dir, FLAGS.copy_plots,
                              defaults=defaults, reference_method=FLAGS.reference_method)
    files_lib.atomic_write(output, text)
    print(f"{len(found)} runs -> {output}" + (f" ({len(notes)} folders skipped)" if notes
                                              else ""))


if __name__ == "__main__":
  cli_help.run(main, __doc__, (("Collect", ("workdirs", "output", "overwrite_tracked",
                                            "flags_dir", "copy_plots")),))
