"""DYMU's options (METHODS.md section 1): the method's, its decoders', and its stages'.

Flags `--dymu_<field>`. The fields marked `method=False` are read by the stage runner (which
stages to train, on which earlier stage, for how many steps, how the task weights and the
affinity are measured) or by the branched network's builder (`head_hidden_layers`); the rest
are `DymuMethod` fields.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

from dymu_jax import files as files_lib
from dymu_jax.methods import affinity
from dymu_jax.methods import options as options_lib
from dymu_jax.methods.dymu import stages as dymu_stages
from dymu_jax.train import stages as stages_lib
from dymu_jax.methods.dymu.method import ANCHOR_INITS, STAGES
from dymu_jax.methods.dymu.regulariser import DEPTH_FACTORS, USE_GRADIENTS

option = options_lib.option
TASK_WEIGHTS = ("validation", "train", "uniform")
# The resource preferences evaluated during training when none are given.
EVAL_RESOURCES = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """DYMU's options; see the module docstring."""

  PREFIX: ClassVar[str] = "dymu"
  TITLE: ClassVar[str] = "DYMU"
  MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("head_hidden_layers",)
  INPUT_DIRS: ClassVar[tuple[str, ...]] = ("pretrain_dir", "anchor_dir", "edge_dir")
  STAGE_FIELD: ClassVar[str] = "stage"

  # --- the stages (the stage runner) ---
  stage: str = option(
      "all", "The training stage. 'all' runs pretrain (with anchor_init=trunk), anchor, edge "
      "and weight in sequence, each in its own subfolder <workdir>/{pretrain,anchor,edge,weight} "
      "(each resumes from its own checkpoints); a single stage trains in --workdir itself and "
      "reads its input from --dymu_pretrain_dir (anchor from a trunk), --dymu_anchor_dir (edge) "
      "or --dymu_edge_dir (weight).", choices=STAGES + ("all",), method=False)
  pretrain_dir: str = option(
      "", "With stage=anchor and anchor_init=trunk: the workdir of the finished pretrain stage.",
      method=False)
  anchor_dir: str = option("", "With stage=edge: the workdir of the finished anchor stage.",
                           method=False)
  edge_dir: str = option("", "With stage=weight: the workdir of the finished edge stage.",
                         method=False)
  stage_steps: tuple[int, ...] = option(
      (), "Optimizer steps of the anchor, edge and weight stages (three numbers); empty = "
      "--steps for every stage. The pretrain stage takes pretrain_steps.", low=1, method=False)
  pretrain_steps: int = option(
      1000, "With anchor_init=trunk: steps of the pretrain stage (one trunk trained with hard "
      "sharing on every task).", low=1, method=False)
  anchor_learning_rate: float = option(
      0.0, "Learning rate of the anchor stage (the streams' fine-tuning from the trunk: keep it "
      "small so the streams stay close); 0 = --learning_rate.", low=0, method=False)
  validation_examples: int = option(
      2000, "Training examples held out of the pretrain and anchor stages; the anchor's task "
      "losses on them set the task weights, and the anchor report (stream divergence, cost of "
      "each one-edge change) is measured on them. 0 = hold none out (the weights then come from "
      "training images).", low=0, method=False)
  task_weights: str = option(
      "validation", "w_i of the edge and weight stages: 1 / the anchor's loss of task i on the "
      "held-out examples ('validation'), on training images ('train', the earlier default, "
      "which overfitted anchors make about ten times too large), or 1 ('uniform'). Scaled to "
      "mean 1 unless task_weight_normalise is off.", choices=TASK_WEIGHTS, method=False)
  task_weight_normalise: bool = option(True, "Scale the task weights w to mean 1.",
                                       method=False)
  task_weight_examples: int = option(
      512, "Training images on which the anchor's single-task losses L_i are measured; the edge "
      "and weight stages weight task i by 1 / L_i.", low=1, method=False)
  affinity_images: int = option(
      128, "Training images K of the RSA task affinity (computed once, on the frozen anchor, "
      "before the edge stage).", low=2, method=False)
  affinity_normalisation: str = option(
      "row", "'row' divides each row of the RSA distances by its maximum (the spec; with 2 tasks "
      "it makes A the identity); 'pair' divides each distance by its own bound and keeps a "
      "graded affinity for 2 tasks.", choices=affinity.NORMALISATIONS, method=False)
  # --- the decoders (the branched network's builder) ---
  head_hidden_layers: int = option(
      -1, "Hidden layers of every decoder; -1 = the backbone's default (lenet 0, resnet_small "
      "1). --head_batch_norm needs at least 1.", low=-1, method=False,
      meaning="-1 = the backbone's default")
  # --- the method ---
  lambda_active: float = option(
      1.0, "lambda_A, weight of the active-task sharing term (1 in the paper, 0.05 in a related "
      "filing).", low=0)
  lambda_inactive: float = option(
      0.1, "lambda_I, weight of the term that pulls inactive tasks onto their nearest active "
      "task; 0 turns it off.", low=0)
  tau_factor: float = option(
      0.6, "Task i is active when r_i >= tau = tau_factor / N; 0 makes every task active.",
      low=0, high=1)
  dirichlet_alpha: float = option(
      0.2, "Training preferences are drawn from Dirichlet(alpha 1_N).", low=0, open_low=True)
  initial_temperature: float = option(
      5.0, "Initial Gumbel-softmax temperature of the edge stage.", low=0, open_low=True)
  temperature_decay: float = option(
      0.97, "The temperature is multiplied by this every temperature_every steps.", low=0,
      high=1, open_low=True)
  temperature_every: int = option(
      300, "Steps between temperature decays (300 at the paper's 30k steps per stage; scale it "
      "with the edge stage's steps).", low=1)
  embedding_features: int = option(
      32, "Dimension of the task and resource embeddings of both hypernetworks.", low=1)
  edge_hidden: tuple[int, ...] = option((100, 100),
                                        "Hidden widths of the edge hypernetwork's MLP.", low=1)
  weight_hidden: tuple[int, ...] = option(
      (100, 100, 100), "Hidden widths of the weight hypernetwork's MLP.", low=1)
  self_logit: float = option(
      0.0, "Initial bias of every child's own-stream parent logit (0: uniform start).")
  anchor_init: str = option(
      "trunk", "How the anchor's single-task streams start. 'trunk' (the paper's recipe): "
      "copies of one trunk trained with hard sharing (the pretrain stage), then each "
      "fine-tuned on its task, so channels still correspond and low-level cross-task edges are "
      "cheap; 'shared': one random draw for every stream; 'independent': a draw per stream.",
      choices=ANCHOR_INITS, legacy="independent")
  depth_factor: str = option(
      "paper", "Depth factor of L_active. 'paper': (L - l) / L with l = 1..L as printed (the "
      "decoders' parents weigh 0); 'shifted': l = 0..L-1 (every choice pulled).",
      choices=DEPTH_FACTORS, legacy="shifted")
  use_gradient: str = option(
      "stop", "'stop' treats P_use in L_active as a usage weight (no gradient); 'flow' lets the "
      "edge hypernetwork shrink the term by making nodes unused.", choices=USE_GRADIENTS,
      legacy="flow")
  eval_resources: tuple[float, ...] = option(
      EVAL_RESOURCES, "Resource preferences c evaluated (at the uniform preference) during "
      "training.", low=0, high=1)

  def options(self) -> dict:
    options = super().options()
    options["eval_resources"] = self.eval_resources or EVAL_RESOURCES
    if self.stage in STAGES:  # "all" is the runner's: each stage's method gets its own
      options["stage"] = self.stage
    return options

  def stages(self) -> tuple[str, ...]:
    """The stages a training run covers: for stage=all, pretrain (only with
    anchor_init=trunk), anchor, edge and weight; else the one."""
    if self.stage != "all":
      return (self.stage,)
    if self.anchor_init == "trunk":
      return STAGES
    return tuple(s for s in STAGES if s != "pretrain")

  def steps_per_stage(self, steps: int, name=lambda field: field) -> dict[str, int]:
    """Optimizer steps per stage: stage_steps (anchor, edge, weight) or `steps` for each; the
    pretrain stage pretrain_steps."""
    main_stages = tuple(s for s in STAGES if s != "pretrain")
    if not self.stage_steps:
      return {"pretrain": self.pretrain_steps, **{stage: int(steps) for stage in main_stages}}
    if len(self.stage_steps) != len(main_stages):
      raise ValueError(f"{name('stage_steps')} takes three numbers >= 1 (anchor, edge and "
                       f"weight steps), got {','.join(str(s) for s in self.stage_steps)}.")
    return {"pretrain": self.pretrain_steps, **dict(zip(main_stages, self.stage_steps))}

  def plan(self, workdir: str, steps: int, name=lambda field: field) -> tuple:
    """The stages of a run in `workdir` (`dymu_jax.train.stages.Stage`s with DYMU's hooks).

    stage=all trains every stage in <workdir>/<stage> (pretrain only with anchor_init=trunk);
    with anchor_dir it trains the edge and weight stages on that finished anchor instead
    (ablations that share one anchor). A single stage trains in `workdir` on pretrain_dir
    (anchor from a trunk), anchor_dir (edge) or edge_dir (weight). An input folder a stage
    would not read, or a missing one, stops with one sentence.
    """
    root = files_lib.run_dir(workdir)
    given = lambda path: files_lib.run_dir(path) if path else ""
    inputs = {"pretrain": given(self.pretrain_dir), "anchor": given(self.anchor_dir),
              "edge": given(self.edge_dir)}
    readers = {"pretrain": ("anchor",), "anchor": ("edge", "all"), "edge": ("weight",)}
    for key, allowed in readers.items():
      if inputs[key] and self.stage not in allowed:
        raise ValueError(
            f"{name(key + '_dir')} is read by {name('stage')}={' or '.join(allowed)}, not by "
            f"{name('stage')}={self.stage}" + (
                f" (which trains its own {key} stage in <workdir>/{key})"
                if self.stage == "all" else "") + "; drop it.")
    for key, folder in inputs.items():
      if folder and not files_lib.is_dir(files_lib.run_path(folder)):
        raise ValueError(f"{name(key + '_dir')}={getattr(self, key + '_dir')} does not exist; "
                         f"give the workdir of a finished {name('stage')}={key} run.")
    stages = self.stages()
    if len(stages) == 1:
      folders = {stages[0]: root}
    else:
      if inputs["anchor"]:
        stages = ("edge", "weight")
      folders = {stage: os.fspath(files_lib.run_path(root) / stage) for stage in stages}
      for stage in stages:
        if _READS.get(stage) in folders:
          inputs[_READS[stage]] = folders[_READS[stage]]
      if inputs["anchor"] in (root, *folders.values()) and "anchor" not in folders:
        raise ValueError(f"{name('anchor_dir')}={self.anchor_dir} is this run's own folder; "
                         f"give the workdir of another, finished anchor stage.")
    steps_per_stage = self.steps_per_stage(steps, name)
    planned = []
    for stage in stages:
      reads = _READS.get(stage, "")
      if stage == "anchor" and self.anchor_init != "trunk":
        reads = ""
      if reads and not inputs[reads]:
        extra = f" with {name('anchor_init')}=trunk" if stage == "anchor" else ""
        raise ValueError(f"{name('stage')}={stage}{extra} needs {name(reads + '_dir')}, the "
                         f"workdir of a finished {name('stage')}={reads} run (or train every "
                         f"stage with {name('stage')}=all).")
      config = dataclasses.replace(self, stage=stage, pretrain_dir=inputs["pretrain"],
                                   anchor_dir=inputs["anchor"], edge_dir=inputs["edge"])
      hooks = _HOOKS.get(stage, {})
      planned.append(stages_lib.Stage(
          name=stage,
          folder=folders[stage], steps=steps_per_stage[stage], config=config,
          reads=inputs[reads] if reads else "", reads_stage=reads,
          learning_rate=self.anchor_learning_rate if stage == "anchor" else 0.0,
          holdout=self.validation_examples if stage in ("pretrain", "anchor") else 0,
          **hooks))
    return tuple(planned)

  def restored_options(self, folder: str, num_tasks: int) -> dict:
    """The edge and weight stages' task affinity and weights, from their folder."""
    if self.stage not in ("edge", "weight"):
      return {}
    return dymu_stages.restored_options(folder, num_tasks)


# The stage each stage starts from, and its hooks (`dymu_jax.methods.dymu.stages`).
_READS = {"anchor": "pretrain", "edge": "anchor", "weight": "edge"}
_HOOKS = {"anchor": {"start": dymu_stages.start_anchor, "finish": dymu_stages.finish_anchor},
          "edge": {"start": dymu_stages.start_edge,
                   "check_finished": dymu_stages.check_finished_edge},
          "weight": {"start": dymu_stages.start_weight}}
