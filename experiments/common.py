"""Flags shared by the entry points (train, evaluate, export) and the builders they feed.

Every flag is documented in `--helpfull`. Flag files (`--flagfile=experiments/flags/...`) set
any of them; a flag on the command line after `--flagfile` overrides the file.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import inspect
import json
import math
import os
import re
import sys
from typing import Any, Mapping

from absl import flags
from absl import logging

from dymu_jax import data as data_lib
from dymu_jax import files as files_lib
from dymu_jax import methods as methods_lib
from dymu_jax import models
from dymu_jax.models import branched
from dymu_jax.train import loop as train_loop


def require_number(name: str, lower: float | None = None, upper: float | None = None, *,
                   open_lower: bool = False, open_upper: bool = False,
                   flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Refuses NaN, infinity and values outside the range of the float flag `name` while the
  flags are parsed, naming the range (absl's own bounds let NaN and infinity through)."""
  if lower is not None and upper is not None:
    allowed = (f"in {'(' if open_lower else '['}{lower:g}, {upper:g}"
               f"{')' if open_upper else ']'}")
  elif lower is not None:
    allowed = f"{'>' if open_lower else '>='} {lower:g}"
  elif upper is not None:
    allowed = f"{'<' if open_upper else '<='} {upper:g}"
  else:
    allowed = ""

  def check(value) -> bool:
    if value is None:  # the flag's "not set" default
      return True
    return (math.isfinite(value)
            and (lower is None or (value > lower if open_lower else value >= lower))
            and (upper is None or (value < upper if open_upper else value <= upper)))

  flags.register_validator(name, check, message=f"must be a finite number {allowed}".strip(),
                           flag_values=flag_values)


def require_integer(name: str, lower: int, meaning: str = "",
                    flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Refuses values of the integer flag `name` below `lower` while the flags are parsed;
  `meaning` names a sentinel (e.g. "-1 = the backbone's default")."""
  note = f" ({meaning})" if meaning else ""
  flags.register_validator(name, lambda value: value is None or value >= lower,
                           message=f"must be a whole number >= {lower}{note}",
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
                  "(recalibrated per SubNet under ECMT; see dymu_jax/models/decoders.py).")
flags.DEFINE_list("backbone_options", [],
                  "Options of the backbone class as name=value pairs, e.g. "
                  "'channel_divisor=2,batch_norm=true' for lenet or 'output_stride=8' for the "
                  "ResNets (see dymu_jax/models/backbones.py).")

FLAGS = flags.FLAGS


def data_config(values: Mapping[str, Any] | None = None) -> data_lib.DataConfig:
  """The dataset of the flags (or of a saved run's flag `values`)."""
  v = _values(values)
  return data_lib.DataConfig(
      name=v["dataset"], data_dir=v["data_dir"], seed=v["data_seed"],
      image_size=v["image_size"], num_train=v["num_train"], num_test=v["num_test"],
      test_fraction=v["test_fraction"], task_spec=v["task_spec"],
      standardise_inputs=v.get("standardise_inputs", True),  # .get: runs saved before them
      standardise_targets=v.get("standardise_targets", False))


def load_sources(values: Mapping[str, Any] | None = None):
  """(train source, test source) restricted to `--tasks`; an empty split stops with one
  sentence (an empty test split would put NaN metrics in summary.json)."""
  v = _values(values)
  config = data_config(v)
  train = data_lib.load(config, "train").with_tasks(v["tasks"] or None)
  test = data_lib.load(config, "test").with_tasks(v["tasks"] or None)
  for source in (train, test):
    if not len(source):
      raise ValueError(f"The {source.split} split of {source.name} is empty ({len(train)} "
                       f"training and {len(test)} test examples), so there is nothing to "
                       f"{'train on' if source is train else 'evaluate'}; give the dataset more "
                       f"examples or change --test_fraction={v['test_fraction']:g}.")
  return train, test


def check_data_fits(train_source, batch_size: int, values: Mapping[str, Any] | None = None
                    ) -> None:
  """Before any tracing: one batch of --batch_size fits the training split, and its images
  are as large as the backbone needs (`backbones.min_image_size`)."""
  v = _values(values)
  if len(train_source) < batch_size:
    raise ValueError(f"The training split of {train_source.name} has {len(train_source)} "
                     f"example(s), fewer than one batch of --batch_size={batch_size}; lower "
                     f"--batch_size or give the dataset more examples.")
  shape = tuple(train_source.image_shape)
  if len(shape) != 3:  # feature vectors (D,): no pixels; the network checks the input kind
    return
  height, width = shape[:2]
  backbone = v["backbone"]
  options = parse_options(v.get("backbone_options") or [], "--backbone_options")
  minimum = models.backbones.min_image_size(backbone, options)
  if min(height, width) < minimum:
    raise ValueError(f"--backbone={backbone} needs images of at least {minimum}x{minimum} px, "
                     f"but the {train_source.name} images are {height}x{width}; set "
                     f"--image_size={minimum} or more, or choose another --backbone.")


def _values(values: Mapping[str, Any] | None) -> Mapping[str, Any]:
  return flag_values() if values is None else values


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


def parse_options(values, flag: str) -> dict:
  """'name=value' strings as a dict; values are Python literals (true/false too) or strings."""
  options = {}
  for item in values:
    name, sep, text = item.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"{flag} takes name=value pairs, got {item!r}.")
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
      value = lowered == "true"
    else:
      try:
        value = ast.literal_eval(text.strip())
        if isinstance(value, list):  # hashable module attributes
          value = tuple(value)
      except (ValueError, SyntaxError):
        value = text.strip()
    options[name.strip()] = value
  return options


def model_options(values: Mapping[str, Any] | None = None) -> dict:
  """Keyword arguments of `dymu_jax.models.build_multitask` from the model flags."""
  v = _values(values)
  options = {"backbone": v["backbone"]}
  if v["head_width"]:
    options["head_width"] = v["head_width"]
  if v.get("head_batch_norm"):  # .get: runs saved before the flag existed
    options["head_batch_norm"] = True
  backbone_options = parse_options(v.get("backbone_options") or [], "--backbone_options")
  if backbone_options:
    cls = models.backbones.get_backbone(v["backbone"])
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(backbone_options) - known)
    if unknown:
      raise ValueError(f"--backbone_options has {', '.join(unknown)}, which backbone "
                       f"{v['backbone']!r} does not take; it takes {', '.join(sorted(known))}.")
    options["backbone_kwargs"] = backbone_options
  return options


# --- GradSplit and PCGrad (--method=gradsplit / pcgrad; METHODS.md section 3) ---
flags.DEFINE_integer("gradsplit_stages", 1,
                     "GradSplit: how many of the last encoder stages split the output channels "
                     "of their layers into one group per task.")
flags.DEFINE_list("gradsplit_group_sizes", [],
                  "GradSplit: relative channel-group size per task, in task order (e.g. 2,1,1); "
                  "empty = equal groups.")
flags.DEFINE_enum("gradsplit_routing", "learned", list(methods_lib.gradsplit.ROUTINGS),
                  "GradSplit: 'learned' (hard sharing for --gradsplit_warmup_steps while "
                  "gradient conflicts are measured, then M from them by --gradsplit_criterion) "
                  "or 'fixed' (--gradsplit_matrix from the first step).")
flags.DEFINE_string("gradsplit_matrix", "",
                    "GradSplit with --gradsplit_routing=fixed: the routing matrix M, rows "
                    "separated by ';' and entries by ',' (M[t][s] = 1: channel group t takes "
                    "task s's gradient; the diagonal must be 1), e.g. '1,0;1,1', or the words "
                    "'identity' (strict split) or 'ones' (hard sharing).")
flags.DEFINE_integer("gradsplit_warmup_steps", 100,
                     "GradSplit with learned routing: hard-sharing steps that estimate the "
                     "conflicts; M is frozen after them.")
flags.DEFINE_enum("gradsplit_mode", "activation", list(methods_lib.gradsplit.MODES),
                  "GradSplit: 'activation' routes the gradients flowing through the split "
                  "layers' outputs; 'weight' masks only the split layers' weight gradients.")
flags.DEFINE_enum("gradsplit_criterion", "module_mean", list(methods_lib.gradsplit.CRITERIA),
                  "GradSplit with --gradsplit_routing=learned: how the warm-up's gradient "
                  "cosines set M. 'module_mean' [ours] gives every split layer (conv, batch "
                  "norm, dense) its own M: M[t,s] = 1 where that layer's mean cos(g_t, g_s) on "
                  "group t is >= --gradsplit_margin; 'module_frequency' [ours]: per layer, "
                  "M[t,s] = 1 where the fraction of warm-up steps with a negative cosine is <= "
                  "--gradsplit_margin; 'pooled': one M for all layers from the cosine over every "
                  "split parameter together (the first version, whose large aligned kernels hid "
                  "the conflicts: M came out all ones). Runs saved before this flag used "
                  "'pooled'.")
flags.DEFINE_float("gradsplit_margin", None,
                   "GradSplit with --gradsplit_routing=learned: the criterion's threshold. For "
                   "'module_mean' and 'pooled' the least mean cosine that shares, in [-1, 1] "
                   "(default 0.0); for 'module_frequency' the largest fraction of warm-up steps "
                   "with a negative cosine that shares, in [0, 1] (default 0.5). The diagonal of "
                   "M is always 1.")
flags.DEFINE_enum("pcgrad_order", "fixed", list(methods_lib.pcgrad.ORDERS),
                  "PCGrad: project onto the other tasks in task order ('fixed') or in an order "
                  "drawn per step from the run's key ('random', seeded by --seed).")


def _gradsplit_options(v: Mapping[str, Any]) -> dict:
  routing = v.get("gradsplit_routing", "learned")  # .get: runs saved before the flags existed
  matrix = (v.get("gradsplit_matrix") or "").strip()
  if matrix and routing != "fixed":
    raise ValueError(f"--gradsplit_matrix={matrix} is only used with --gradsplit_routing=fixed; "
                     f"drop it or set --gradsplit_routing=fixed.")
  if routing == "fixed" and not matrix:
    raise ValueError("--gradsplit_routing=fixed needs --gradsplit_matrix, such as 'identity' "
                     "or rows like '1,0;1,1'.")
  options = {"split_stages": v.get("gradsplit_stages", 1), "routing": routing,
             "warmup_steps": v.get("gradsplit_warmup_steps", 100),
             "mode": v.get("gradsplit_mode", "activation")}
  if options["split_stages"] < 1:
    raise ValueError(f"--gradsplit_stages must be at least 1, got {options['split_stages']}.")
  if routing == "learned" and options["warmup_steps"] < 1:
    raise ValueError(f"--gradsplit_warmup_steps={options['warmup_steps']} leaves no step to "
                     f"estimate the conflicts; give at least 1, or use --gradsplit_routing=fixed.")
  sizes = parse_floats(v.get("gradsplit_group_sizes") or [], "--gradsplit_group_sizes")
  if sizes and min(sizes) <= 0:
    raise ValueError(f"--gradsplit_group_sizes must be positive, got "
                     f"{','.join(v['gradsplit_group_sizes'])}.")
  if sizes:
    options["group_sizes"] = sizes
  if matrix:
    options["routing_matrix"] = matrix
  # Runs saved before --gradsplit_criterion existed trained with the pooled criterion.
  criterion = v.get("gradsplit_criterion", "pooled")
  margin = v.get("gradsplit_margin")
  if criterion not in methods_lib.gradsplit.CRITERIA:
    raise ValueError(f"--gradsplit_criterion={criterion} is unknown; use one of "
                     f"{', '.join(methods_lib.gradsplit.CRITERIA)}.")
  if margin is not None and routing != "learned":
    raise ValueError(f"--gradsplit_margin={margin:g} is only used with "
                     f"--gradsplit_routing=learned; drop it or set --gradsplit_routing=learned.")
  if routing == "learned":
    methods_lib.gradsplit.check_margin(criterion, margin, "--gradsplit_margin")
    options["criterion"] = criterion
    if margin is not None:
      options["margin"] = float(margin)
  return options


# --- DYMU and PHN (--method=dymu / phn / phn_bn; METHODS.md section 1) ---
flags.DEFINE_enum("dymu_stage", "all", list(methods_lib.dymu.STAGES) + ["all"],
                  "DYMU: the training stage. 'all' runs pretrain (with --dymu_anchor_init=trunk), "
                  "anchor, edge and weight in sequence, each in its own subfolder "
                  "<workdir>/{pretrain,anchor,edge,weight} (each resumes from its own "
                  "checkpoints); a single stage trains in --workdir itself and reads its input "
                  "from --dymu_pretrain_dir (anchor from a trunk), --dymu_anchor_dir (edge) or "
                  "--dymu_edge_dir (weight).")
flags.DEFINE_string("dymu_pretrain_dir", "",
                    "DYMU with --dymu_stage=anchor and --dymu_anchor_init=trunk: the workdir of "
                    "the finished pretrain stage.")
flags.DEFINE_string("dymu_anchor_dir", "",
                    "DYMU with --dymu_stage=edge: the workdir of the finished anchor stage.")
flags.DEFINE_string("dymu_edge_dir", "",
                    "DYMU with --dymu_stage=weight: the workdir of the finished edge stage.")
flags.DEFINE_list("dymu_stage_steps", [],
                  "DYMU: optimizer steps of the anchor, edge and weight stages (three numbers); "
                  "empty = --steps for every stage. The pretrain stage takes "
                  "--dymu_pretrain_steps.")
flags.DEFINE_integer("dymu_pretrain_steps", 1000,
                     "DYMU with --dymu_anchor_init=trunk: steps of the pretrain stage (one trunk "
                     "trained with hard sharing on every task).", lower_bound=1)
flags.DEFINE_float("dymu_anchor_learning_rate", 0.0,
                   "DYMU: learning rate of the anchor stage (the streams' fine-tuning from the "
                   "trunk: keep it small so the streams stay close); 0 = --learning_rate.")
require_number("dymu_anchor_learning_rate", 0)
flags.DEFINE_integer("dymu_validation_examples", 2000,
                     "DYMU: training examples held out of the pretrain and anchor stages; the "
                     "anchor's task losses on them set the task weights, and the anchor report "
                     "(stream divergence, cost of each one-edge change) is measured on them. "
                     "0 = hold none out (the weights then come from training images).",
                     lower_bound=0)
flags.DEFINE_enum("dymu_task_weights", "validation", ["validation", "train", "uniform"],
                  "DYMU: w_i of the edge and weight stages: 1 / the anchor's loss of task i on "
                  "the held-out examples ('validation'), on training images ('train', the "
                  "earlier default, which overfitted anchors make about ten times too large), "
                  "or 1 ('uniform'). Scaled to mean 1 unless --nodymu_task_weight_normalise.")
flags.DEFINE_bool("dymu_task_weight_normalise", True,
                  "DYMU: scale the task weights w to mean 1.")
flags.DEFINE_enum("dymu_depth_factor", "paper", list(methods_lib.dymu.DEPTH_FACTORS),
                  "DYMU: depth factor of L_active. 'paper': (L - l) / L with l = 1..L as printed "
                  "(the decoders' parents weigh 0); 'shifted': l = 0..L-1 (every choice pulled).")
flags.DEFINE_enum("dymu_use_gradient", "stop", list(methods_lib.dymu.USE_GRADIENTS),
                  "DYMU: 'stop' treats P_use in L_active as a usage weight (no gradient); 'flow' "
                  "lets the edge hypernetwork shrink the term by making nodes unused.")
flags.DEFINE_integer("dymu_head_hidden_layers", -1,
                     "DYMU: hidden layers of every decoder; -1 = the backbone's default (lenet 0, "
                     "resnet_small 1). --head_batch_norm needs at least 1.")
require_integer("dymu_head_hidden_layers", -1, "-1 = the backbone's default")
flags.DEFINE_float("dymu_lambda_active", 1.0,
                   "DYMU: lambda_A, weight of the active-task sharing term (1 in the paper, "
                   "0.05 in a related filing).")
require_number("dymu_lambda_active", 0)
flags.DEFINE_float("dymu_lambda_inactive", 0.1,
                   "DYMU: lambda_I, weight of the term that pulls inactive tasks onto their "
                   "nearest active task; 0 turns it off.")
require_number("dymu_lambda_inactive", 0)
flags.DEFINE_float("dymu_tau_factor", 0.6,
                   "DYMU: task i is active when r_i >= tau = dymu_tau_factor / N; 0 makes every "
                   "task active.")
require_number("dymu_tau_factor", 0, 1)
flags.DEFINE_float("dymu_dirichlet_alpha", 0.2,
                   "DYMU: training preferences are drawn from Dirichlet(alpha 1_N).")
require_number("dymu_dirichlet_alpha", 0, open_lower=True)
flags.DEFINE_float("dymu_initial_temperature", 5.0,
                   "DYMU: initial Gumbel-softmax temperature of the edge stage.")
require_number("dymu_initial_temperature", 0, open_lower=True)
flags.DEFINE_float("dymu_temperature_decay", 0.97,
                   "DYMU: the temperature is multiplied by this every --dymu_temperature_every "
                   "steps.")
require_number("dymu_temperature_decay", 0, 1, open_lower=True)
flags.DEFINE_integer("dymu_temperature_every", 300,
                     "DYMU: steps between temperature decays (300 at the paper's 30k steps per "
                     "stage; scale it with the edge stage's steps).", lower_bound=1)
flags.DEFINE_integer("dymu_embedding_features", 32,
                     "DYMU: dimension of the task and resource embeddings of both "
                     "hypernetworks.", lower_bound=1)
flags.DEFINE_list("dymu_edge_hidden", ["100", "100"],
                  "DYMU: hidden widths of the edge hypernetwork's MLP.")
flags.DEFINE_list("dymu_weight_hidden", ["100", "100", "100"],
                  "DYMU: hidden widths of the weight hypernetwork's MLP.")
flags.DEFINE_float("dymu_self_logit", 0.0,
                   "DYMU: initial bias of every child's own-stream parent logit (0: uniform "
                   "start).")
require_number("dymu_self_logit")
flags.DEFINE_enum("dymu_anchor_init", "trunk", list(methods_lib.dymu.ANCHOR_INITS),
                  "DYMU: how the anchor's single-task streams start. 'trunk' (the paper's "
                  "recipe): copies of one trunk trained with hard sharing (the pretrain stage), "
                  "then each fine-tuned on its task, so channels still correspond and low-level "
                  "cross-task edges are cheap; 'shared': one random draw for every stream; "
                  "'independent': a draw per stream.")
flags.DEFINE_list("dymu_eval_resources", ["0", "1"],
                  "DYMU: resource preferences c evaluated (at the uniform preference) during "
                  "training.")
flags.DEFINE_integer("dymu_affinity_images", 128,
                     "DYMU: training images K of the RSA task affinity (computed once, on the "
                     "frozen anchor, before the edge stage).")
require_integer("dymu_affinity_images", 2)
flags.DEFINE_enum("dymu_affinity_normalisation", "row", list(methods_lib.affinity.NORMALISATIONS),
                  "DYMU: 'row' divides each row of the RSA distances by its maximum (the spec; "
                  "with 2 tasks it makes A the identity); 'pair' divides each distance by its "
                  "own bound and keeps a graded affinity for 2 tasks.")
flags.DEFINE_integer("dymu_task_weight_examples", 512,
                     "DYMU: training images on which the anchor's single-task losses L_i are "
                     "measured; the edge and weight stages weight task i by 1 / L_i.",
                     lower_bound=1)
flags.DEFINE_float("phn_dirichlet_alpha", 0.2,
                   "PHN, PHN-BN: training preferences are drawn from Dirichlet(alpha 1_N).")
require_number("phn_dirichlet_alpha", 0, open_lower=True)
flags.DEFINE_list("phn_hidden", ["100", "100"],
                  "PHN, PHN-BN: hidden widths of the hypernetwork's preference MLP.")
flags.DEFINE_integer("phn_chunk_size", 1024,
                     "PHN, PHN-BN: generated values per chunk (0: one head for all values).",
                     lower_bound=0)
flags.DEFINE_integer("phn_chunk_features", 32,
                     "PHN, PHN-BN: dimension of the learned chunk embeddings.", lower_bound=1)

DYMU_STAGES = methods_lib.dymu.STAGES
# Runtime inputs of the later DYMU stages (not flags): see `experiments.runs.dymu_stage_inputs`.
DYMU_INPUTS = ("trunk_variables", "anchor_variables", "edge_params", "affinity",
               "task_weights")


def parse_ints(values, flag: str) -> tuple[int, ...]:
  """A list flag of whole numbers as ints (empty: ()); one sentence when not whole numbers."""
  try:
    return tuple(int(str(v).strip()) for v in values or ())
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated whole numbers, got "
                     f"{','.join(str(v) for v in values)!r}.") from None


def dymu_stages(values: Mapping[str, Any] | None = None) -> tuple[str, ...]:
  """The DYMU stages a training run covers: for --dymu_stage=all, pretrain (only with
  --dymu_anchor_init=trunk), anchor, edge and weight; else the one."""
  v = _values(values)
  stage = v.get("dymu_stage", "all")
  if stage == "all":
    if v.get("dymu_anchor_init", "independent") == "trunk":
      return DYMU_STAGES
    return tuple(s for s in DYMU_STAGES if s != "pretrain")
  if stage not in DYMU_STAGES:
    raise ValueError(f"Unknown --dymu_stage={stage}; allowed: {', '.join(DYMU_STAGES)}, all.")
  return (stage,)


def dymu_stage_steps(values: Mapping[str, Any] | None = None) -> dict[str, int]:
  """Optimizer steps per DYMU stage: --dymu_stage_steps (anchor, edge, weight) or --steps for
  each; the pretrain stage --dymu_pretrain_steps."""
  v = _values(values)
  pretrain = int(v.get("dymu_pretrain_steps", 1000))
  if pretrain < 1:
    raise ValueError(f"--dymu_pretrain_steps must be at least 1, got {pretrain}.")
  main_stages = tuple(s for s in DYMU_STAGES if s != "pretrain")
  steps = parse_ints(v.get("dymu_stage_steps") or [], "--dymu_stage_steps")
  if not steps:
    return {"pretrain": pretrain, **{stage: int(v["steps"]) for stage in main_stages}}
  if len(steps) != len(main_stages) or min(steps) < 1:
    raise ValueError(f"--dymu_stage_steps takes three numbers >= 1 (anchor, edge and weight "
                     f"steps), got {','.join(str(s) for s in steps)}.")
  return {"pretrain": pretrain, **dict(zip(main_stages, steps))}


def dymu_model_options(values: Mapping[str, Any] | None = None) -> dict:
  """Keyword arguments of `branched.build_branched` (DYMU's anchor) from the model flags."""
  v = _values(values)
  backbone = v["backbone"]
  if backbone not in branched.BACKBONES:
    raise ValueError(f"DYMU's anchor streams are built on --backbone="
                     f"{' or '.join(branched.BACKBONES)}, got {backbone!r}.")
  hidden_layers = int(v.get("dymu_head_hidden_layers", -1))  # .get: older runs
  if hidden_layers < -1:
    raise ValueError(f"--dymu_head_hidden_layers must be -1 (the backbone's default) or >= 0, "
                     f"got {hidden_layers}.")
  if v.get("head_batch_norm") and (
      hidden_layers == 0 or (hidden_layers < 0 and branched.DEFAULT_HEAD_HIDDEN_LAYERS[backbone]
                             == 0)):
    raise ValueError(f"--head_batch_norm puts batch norm in the decoders' hidden layers, but "
                     f"DYMU's {backbone} decoders have none; add --dymu_head_hidden_layers=1 "
                     f"or drop --head_batch_norm.")
  options = {"backbone": backbone}
  if v["head_width"]:
    options["head_width"] = v["head_width"]
  if hidden_layers >= 0:
    options["head_hidden_layers"] = hidden_layers
  if v.get("head_batch_norm"):
    options["head_batch_norm"] = True
  backbone_options = parse_options(v.get("backbone_options") or [], "--backbone_options")
  if backbone_options:
    blocks = {"lenet": branched.lenet_blocks,
              "resnet_small": branched.resnet_small_blocks,
              "mlp": branched.mlp_blocks}[backbone]
    known = set(inspect.signature(blocks).parameters) - {"bn_momentum", "bn_axis_name"}
    unknown = sorted(set(backbone_options) - known)
    if unknown:
      raise ValueError(f"--backbone_options has {', '.join(unknown)}, which DYMU's {backbone} "
                       f"streams do not take; they take {', '.join(sorted(known))}.")
    options["backbone_kwargs"] = backbone_options
  return options


def _dymu_options(v: Mapping[str, Any]) -> dict:
  stage = v.get("dymu_stage", "all")
  if stage not in DYMU_STAGES:
    raise ValueError(f"A DYMU method is built for one stage ({', '.join(DYMU_STAGES)}), got "
                     f"--dymu_stage={stage}.")
  resources = parse_floats(v.get("dymu_eval_resources") or [], "--dymu_eval_resources")
  return {
      "stage": stage, "lambda_active": v["dymu_lambda_active"],
      "lambda_inactive": v["dymu_lambda_inactive"], "tau_factor": v["dymu_tau_factor"],
      "dirichlet_alpha": v["dymu_dirichlet_alpha"],
      "initial_temperature": v["dymu_initial_temperature"],
      "temperature_decay": v["dymu_temperature_decay"],
      "temperature_every": v["dymu_temperature_every"],
      "embedding_features": v["dymu_embedding_features"],
      "edge_hidden": parse_ints(v["dymu_edge_hidden"], "--dymu_edge_hidden"),
      "weight_hidden": parse_ints(v["dymu_weight_hidden"], "--dymu_weight_hidden"),
      "self_logit": v["dymu_self_logit"],
      "anchor_init": v.get("dymu_anchor_init", "independent"),
      # .get: runs saved before these flags existed trained with the earlier choices.
      "depth_factor": v.get("dymu_depth_factor", "shifted"),
      "use_gradient": v.get("dymu_use_gradient", "flow"),
      "eval_resources": resources if resources is not None else (0.0, 1.0),
  }


def _phn_options(v: Mapping[str, Any]) -> dict:
  return {"dirichlet_alpha": v["phn_dirichlet_alpha"],
          "hidden": parse_ints(v["phn_hidden"], "--phn_hidden"),
          "chunk_size": v["phn_chunk_size"], "chunk_features": v["phn_chunk_features"]}


def method_options(values: Mapping[str, Any] | None = None) -> dict:
  """The method's own options from its flags (only the running method's)."""
  v = _values(values)
  if v["method"] == "gradsplit":
    return _gradsplit_options(v)
  if v["method"] == "pcgrad":
    return {"order": v.get("pcgrad_order", "fixed")}
  if v["method"] == "dymu":
    return _dymu_options(v)
  if v["method"] in ("phn", "phn_bn"):
    return _phn_options(v)
  if v["method"] != "ecmt":
    return {}
  options = {"num_subnets": v["num_subnets"], "lambda_kd": v["lambda_kd"], "kd": v["kd"],
             "lambda_mutual": v["lambda_mutual"],
             "mutual_temperature": v["mutual_temperature"]}
  choices = parse_floats(v["width_choices"], "--width_choices")
  if choices:
    options["width_choices"] = choices
  return options


def build_method(values: Mapping[str, Any] | None = None, tasks=None, *,
                 axis_name: str | None = None, inputs: Mapping[str, Any] | None = None):
  """The method of the flags (or of a saved run's flag `values`) for `tasks`.

  `inputs`: for the DYMU edge and weight stages, the runtime inputs among `DYMU_INPUTS`
  (`experiments.runs.dymu_stage_inputs`); their "task_weights" replace --task_weights.
  """
  v = _values(values)
  if v["method"] == "dymu":
    inputs = dict(inputs or {})
    unknown = sorted(set(inputs) - set(DYMU_INPUTS))
    if unknown:
      raise ValueError(f"Unknown DYMU input(s) {', '.join(unknown)}; allowed: "
                       f"{', '.join(DYMU_INPUTS)}.")
    weights = inputs.pop("task_weights", None) or parse_floats(v["task_weights"],
                                                               "--task_weights")
    return methods_lib.build(
        "dymu", tasks, model_options=dymu_model_options(v), axis_name=axis_name,
        task_weights=weights, method_options={**method_options(v), **inputs})
  return methods_lib.build(
      v["method"], tasks, model_options=model_options(v), axis_name=axis_name,
      task_weights=parse_floats(v["task_weights"], "--task_weights"),
      method_options=method_options(v))


def parse_floats(values, flag: str) -> tuple[float, ...] | None:
  """A list flag of numbers as floats; None when empty; one sentence when not finite numbers."""
  if not values:
    return None
  try:
    numbers = tuple(float(v) for v in values)
  except ValueError:
    raise ValueError(f"{flag} must be comma-separated numbers, got "
                     f"{','.join(values)!r}.") from None
  if not all(math.isfinite(x) for x in numbers):
    raise ValueError(f"{flag} must be finite numbers (no nan or inf), got {','.join(values)}.")
  return numbers


def check_task_weights(values: Mapping[str, Any] | None = None) -> None:
  """--task_weights before any data is read: numbers >= 0, not all 0, and one per task of
  --tasks when those are listed (otherwise the method checks the count against the data)."""
  v = _values(values)
  weights = parse_floats(v.get("task_weights") or [], "--task_weights")
  if weights is None:
    return
  shown = ",".join(v["task_weights"])
  if min(weights) < 0 or max(weights) == 0:
    raise ValueError(f"--task_weights={shown} must be numbers >= 0, not all 0 (one loss weight "
                     f"per task, in task order).")
  if v.get("tasks") and len(weights) != len(v["tasks"]):
    raise ValueError(f"--task_weights={shown} gives {len(weights)} weight(s) for the "
                     f"{len(v['tasks'])} tasks of --tasks={','.join(v['tasks'])}; give one per "
                     f"task, in that order.")


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
