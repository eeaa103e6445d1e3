"""Training in stages: each stage a run of its own that starts from a finished earlier one.

A method whose training has stages (DYMU: pretrain -> anchor -> edge -> weight) describes them
with its config's `MethodConfig.plan`, a tuple of `Stage`s; every other method has one stage,
the run itself. `run_stages` trains them in order, each in its own folder:

* a finished stage (its newest checkpoint and `summary.json` at its steps) is not trained
  again: its input (the earlier stage's folder and step) must be the one it was trained on;
* otherwise the stage restores the earlier stage's finished run (`load`), derives from it what
  it starts with (`Stage.start`: extra method options and the variable collections handed to
  `train(..., initial_variables=...)`, e.g. the frozen anchor), and trains, resuming from its
  own checkpoints; a resumed stage must start from the same input;
* after training, `Stage.finish` may write a report next to the stage (DYMU: the anchor
  report).

The runner knows nothing about flags or methods: the caller supplies how a finished run is
loaded and how one stage is trained (`experiments.train` does both from its flags). The record
of where a stage's input came from is saved with its checkpoints (`SOURCE_KEY`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from dymu_jax import files as files_lib
from dymu_jax.data import base as data_base
from dymu_jax.train import checkpoint as checkpoint_lib

# Key of the run metadata that records a stage's input; runs saved by the earlier DYMU-only
# runner used LEGACY_SOURCE_KEY.
SOURCE_KEY = "stage_source"
LEGACY_SOURCE_KEY = "dymu"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class Finished:
  """A finished earlier stage, restored: its folder, checkpoint step, method and variables."""

  folder: str
  step: int
  method: Any
  variables: Any


@dataclasses.dataclass(frozen=True)
class StageStart:
  """What a stage starts from besides its config.

  Attributes:
    options: method options measured on the earlier stage (DYMU: the task affinity and
      weights), passed to the method's builder.
    variables: variable collections that replace the initialised ones
      (`train(..., initial_variables=...)`).
  """

  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  variables: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What `Stage.start`, `Stage.finish` and `Stage.check_finished` see.

  Attributes:
    stage: the stage.
    earlier: the finished stage it reads (None when it reads none, or in `check_finished`).
    train_source, test_source: the run's data (all training examples; the stage itself may
      train on fewer, see `Stage.holdout`).
    seed: the run's seed.
    is_chief: whether this process writes files next to the run (process 0).
    held_out: the training examples the stage did not train on (`Stage.holdout`), or None;
      set for `Stage.finish`.
  """

  stage: "Stage"
  earlier: Finished | None
  train_source: Any
  test_source: Any
  seed: int
  is_chief: bool = True
  held_out: Any = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a run.

  Attributes:
    name: its name ("" for a run of one stage).
    folder: where it trains (its checkpoints, metrics and summary).
    steps: optimizer steps.
    config: the method config it is built with (the run's, with its own stage selected).
    reads: the folder of the finished stage it starts from ("" = none).
    reads_stage: that stage's name.
    learning_rate: its peak learning rate; 0 = the run's.
    holdout: training examples it does not train on (drawn with the seed; `Stage.finish` may
      measure on them).
    start: (StageContext) -> StageStart, what it starts from; None = nothing.
    finish: (StageContext, Finished) -> text or None, run after training (a report).
    check_finished: (StageContext) -> None, raises when a finished stage's derived inputs
      changed (its input folder and step are checked by the runner).
  """

  name: str
  folder: str
  steps: int
  config: Any = None
  reads: str = ""
  reads_stage: str = ""
  learning_rate: float = 0.0
  holdout: int = 0
  start: Callable[[StageContext], StageStart] | None = dataclasses.field(
      default=None, compare=False)
  finish: Callable[[StageContext, Finished], str | None] | None = dataclasses.field(
      default=None, compare=False)
  check_finished: Callable[[StageContext], None] | None = dataclasses.field(
      default=None, compare=False)

  @property
  def label(self) -> str:
    """How messages name it: "stage edge", or "" for a run of one stage."""
    return f"stage {self.name}" if self.name else ""


def latest_step(folder: str) -> int | None:
  """The newest complete checkpoint's step in `folder`, or None (no folder, no checkpoint)."""
  if not checkpoint_lib.has_checkpoint_dir(folder):
    return None
  with checkpoint_lib.Checkpointer(folder, async_save=False) as checkpointer:
    return checkpointer.latest_step()


def saved_metadata(folder: str) -> dict | None:
  """The JSON record of `folder`'s newest checkpoint, or None when it has none."""
  if latest_step(folder) is None:
    return None
  with checkpoint_lib.Checkpointer(folder, async_save=False) as checkpointer:
    return checkpointer.metadata()


def finished_summary(folder: str, steps: int) -> dict | None:
  """The summary of a run that already reached `steps` in `folder`, or None. A damaged summary
  is reported and counts as unfinished (training restores the final checkpoint and rewrites
  it)."""
  path = files_lib.run_path(folder) / SUMMARY
  if latest_step(folder) != steps or not files_lib.is_file(path):
    return None
  try:
    summary = files_lib.read_json(path)
  except files_lib.DamagedFile as error:
    print(f"{error}; evaluating the run's final checkpoint again to rewrite it.", flush=True)
    return None
  return summary if isinstance(summary, dict) and summary.get("steps") == steps else None


def source_of(stage: Stage) -> dict:
  """Where `stage`'s input comes from, without loading it: {"<earlier>_dir", "<earlier>_step"}
  (the finished earlier stage's folder and newest step), or {} for a stage that reads none."""
  if not stage.reads:
    return {}
  folder = files_lib.run_dir(stage.reads)
  return {f"{stage.reads_stage}_dir": folder, f"{stage.reads_stage}_step": latest_step(folder)}


def check_same_source(stage: Stage, source: Mapping[str, Any]) -> None:
  """A stage resumed in its folder must continue on the input it started from."""
  metadata = saved_metadata(stage.folder)
  if metadata is None:
    return
  run = metadata.get("run", {})
  saved = run.get(SOURCE_KEY, run.get(LEGACY_SOURCE_KEY))
  if saved is not None and saved != dict(source):
    what = f"The {stage.name} stage" if stage.name else "The run"
    raise ValueError(f"{what} in {stage.folder} was started from {saved}, but its input is "
                     f"now {dict(source)}; resume with the same input or use a new workdir.")


def resolve(folder: str) -> str:
  """The run folder to load for `folder`: itself when it holds checkpoints, else (the parent
  folder of a run in stages) its newest trained stage: the last of its summary's stages that
  has a checkpoint, or, for a parent without a summary, the stage folder trained last."""
  folder = files_lib.run_dir(folder)
  if checkpoint_lib.has_checkpoint_dir(folder):
    return folder
  root = files_lib.run_path(folder)
  try:
    stages = list(files_lib.read_json(root / SUMMARY).get("stages", {}))
  except (files_lib.DamagedFile, FileNotFoundError, OSError, AttributeError):
    stages = []
  if not stages and os.path.isdir(root):  # an unfinished parent: its stage folders by age
    trained = [name for name in os.listdir(root)
               if checkpoint_lib.has_checkpoint_dir(os.fspath(root / name))]
    stages = sorted(trained, key=lambda name: os.path.getmtime(root / name / checkpoint_lib.SUBDIR))
  for name in reversed(stages):
    if latest_step(os.fspath(root / name)) is not None:
      return os.fspath(root / name)
  return folder


def run_stages(stages: tuple[Stage, ...], *, train_source, test_source, seed: int,
               load: Callable[[str, str], Finished],
               train_stage: Callable[[Stage, StageStart, Mapping[str, Any], Any], dict],
               check: Callable[[Stage], None] = lambda stage: None,
               is_chief: bool = True, title: str = "") -> dict[str, dict]:
  """Trains `stages` in order; returns {stage name: its summary, with "workdir"}.

  Args:
    stages: the plan (`MethodConfig.plan`).
    train_source, test_source, seed: the run's data and seed.
    load: (folder, stage name) -> that finished stage, restored (and checked to fit this run):
      the earlier stage a stage reads, and a stage just trained for its `finish`.
    train_stage: (stage, StageStart, source record, training source) -> the stage's summary
      (it builds the method, trains, writes summary.json); the training source is the run's
      minus `stage.holdout` held-out examples.
    check: called for every stage before it trains or is skipped (e.g. the caller's check that
      a resumed run keeps its flags).
    is_chief: whether this process writes reports.
    title: how messages name the method ("DYMU stage edge: ...").
  """
  summaries = {}
  for stage in stages:
    prefix = f"{title} {stage.label}: " if stage.label else ""
    done = finished_summary(stage.folder, stage.steps)
    if done is not None:
      check_same_source(stage, source_of(stage))
      if stage.check_finished is not None:
        stage.check_finished(StageContext(stage, None, train_source, test_source, seed,
                                          is_chief))
      check(stage)
      summaries[stage.name] = {**done, "workdir": stage.folder}
      seconds = f", {done['seconds']:.1f} s" if "seconds" in done else ""
      print(f"{prefix}already trained ({done['steps']} steps{seconds}); results in "
            f"{stage.folder}", flush=True)
      continue
    earlier = load(stage.reads, stage.reads_stage) if stage.reads else None
    context = StageContext(stage, earlier, train_source, test_source, seed, is_chief)
    start = stage.start(context) if stage.start is not None else StageStart()
    source = ({f"{stage.reads_stage}_dir": earlier.folder,
               f"{stage.reads_stage}_step": earlier.step} if earlier is not None else {})
    check_same_source(stage, source)
    check(stage)
    stage_source, held_out = data_base.holdout_split(train_source, stage.holdout, seed)
    summary = train_stage(stage, start, source, stage_source)
    summaries[stage.name] = {**summary, "workdir": stage.folder}
    if stage.finish is not None and is_chief:
      text = stage.finish(dataclasses.replace(context, held_out=held_out),
                          load(stage.folder, stage.name))
      if text:
        print(text)
  return summaries
