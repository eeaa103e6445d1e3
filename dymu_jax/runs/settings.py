"""A run's settings: its flag values (name -> value, as `experiments.train` saves them with every
checkpoint) as the typed objects the library builds from.

Every function takes the values as a mapping, so a notebook rebuilds a saved run's data, model
and method from `load_run(workdir).values` exactly as the command line built them; the entry
points pass their parsed flags (`experiments.common.flag_values()`). Errors name the flags.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax import models
from dymu_jax import train as train_lib
from dymu_jax.models import pretrained as pretrained_lib

# Flags added after some runs were saved: their values for older runs.
LATER_FLAGS = {"backbone_options": [], "tasks": [], "task_weights": [], "pretrained": "",
               "head_batch_norm": False, "standardise_inputs": True,
               "standardise_targets": False}


def with_defaults(values: Mapping[str, Any]) -> dict:
  """`values` with the flags a run saved before they existed (`LATER_FLAGS`) filled in."""
  return {**LATER_FLAGS, **dict(values)}


def data_config(values: Mapping[str, Any]) -> data_lib.DataConfig:
  """The dataset of the flag `values`."""
  v = with_defaults(values)
  return data_lib.DataConfig(
      name=v["dataset"], data_dir=v["data_dir"], seed=v["data_seed"],
      image_size=v["image_size"], num_train=v["num_train"], num_test=v["num_test"],
      test_fraction=v["test_fraction"], task_spec=v["task_spec"],
      standardise_inputs=v["standardise_inputs"], standardise_targets=v["standardise_targets"])


def load_sources(values: Mapping[str, Any]):
  """(train source, test source) restricted to `--tasks`; an empty split stops with one
  sentence (an empty test split would put NaN metrics in summary.json)."""
  v = with_defaults(values)
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


def train_config(values: Mapping[str, Any]) -> train_lib.TrainConfig:
  """The `TrainConfig` of the flag `values` (its fields are flags of the same names)."""
  fields = {f.name for f in dataclasses.fields(train_lib.TrainConfig)}
  return train_lib.TrainConfig(**{k: v for k, v in values.items() if k in fields})


def check_data_fits(train_source, batch_size: int, values: Mapping[str, Any]) -> None:
  """Before any tracing: one batch of --batch_size fits the training split, and its images
  are as large as the backbone needs (`backbones.min_image_size`)."""
  v = with_defaults(values)
  if len(train_source) < batch_size:
    raise ValueError(f"The training split of {train_source.name} has {len(train_source)} "
                     f"example(s), fewer than one batch of --batch_size={batch_size}; lower "
                     f"--batch_size or give the dataset more examples.")
  shape = tuple(train_source.image_shape)
  if len(shape) != 3:  # feature vectors (D,): no pixels; the network checks the input kind
    return
  height, width = shape[:2]
  backbone = v["backbone"]
  minimum = models.backbones.min_image_size(
      backbone, parse_options(v["backbone_options"], "--backbone_options"))
  if min(height, width) < minimum:
    raise ValueError(f"--backbone={backbone} needs images of at least {minimum}x{minimum} px, "
                     f"but the {train_source.name} images are {height}x{width}; set "
                     f"--image_size={minimum} or more, or choose another --backbone.")


def check_pretrained(values: Mapping[str, Any]) -> None:
  """--pretrained before any data is read: an existing file of a format
  `models.pretrained.read_state_dict` reads, for a backbone with a torchvision layout
  (`models.pretrained.PRETRAINED_BACKBONES`)."""
  v = with_defaults(values)
  path = v["pretrained"]
  if not path:
    return
  either = lambda items: f"{', '.join(items[:-1])} or {items[-1]}"
  backbones = either(pretrained_lib.PRETRAINED_BACKBONES)
  suffixes = either(pretrained_lib.FILE_SUFFIXES)
  if v["backbone"] not in pretrained_lib.PRETRAINED_BACKBONES:
    raise ValueError(f"--pretrained={path} loads torchvision weights into a {backbones} "
                     f"backbone, but --backbone={v['backbone']} has no torchvision layout; "
                     f"choose one of those backbones or drop --pretrained.")
  if not os.path.isfile(path):
    raise ValueError(f"--pretrained={path} is not a file; give a {suffixes} torchvision state "
                     f"dict of {backbones}, or leave it empty for random initialisation.")
  if not path.endswith(pretrained_lib.FILE_SUFFIXES):
    raise ValueError(f"--pretrained={path} must be a {suffixes} file holding a torchvision "
                     f"state dict of {backbones}.")


def parse_options(values: Sequence[str], flag: str) -> dict:
  """'name=value' strings as a dict; values are Python literals (true/false too) or strings."""
  options = {}
  for item in values or ():
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


def parse_floats(values: Sequence[str], flag: str) -> tuple[float, ...] | None:
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


def model_options(values: Mapping[str, Any]) -> dict:
  """Keyword arguments of the method's network builder (`models.build_multitask`, or DYMU's
  branched streams) from the model flags; the builder refuses options its backbone lacks."""
  v = with_defaults(values)
  options = {"backbone": v["backbone"]}
  if v["head_width"]:
    options["head_width"] = v["head_width"]
  if v["head_batch_norm"]:
    options["head_batch_norm"] = True
  backbone_options = parse_options(v["backbone_options"], "--backbone_options")
  if backbone_options:
    options["backbone_kwargs"] = backbone_options
  return options


def _field_value(raw, scalar: type, is_tuple: bool, flag: str):
  """A saved or given flag value as the field's type (list flags hold strings)."""
  if not is_tuple or raw is None or isinstance(raw, str):
    return raw
  try:
    return tuple(scalar(v) if scalar in (int, float) else v for v in raw)
  except ValueError:
    raise ValueError(f"--{flag} must be comma-separated "
                     f"{'whole numbers' if scalar is int else 'numbers'}, got "
                     f"{','.join(str(v) for v in raw)!r}.") from None


def options_config(config: type, values: Mapping[str, Any]):
  """The `MethodConfig` subclass `config` from the flag `values`: each field from its flag
  (`config.flag_name`) or a former name, else its legacy value for runs saved before it,
  else its default; checked with errors that name the flags."""
  types, options = config.types(), {}
  for field in config.fields():
    name = config.flag_name(field.name)
    key = next((k for k in (name, *field.metadata["former"]) if k in values), None)
    if key is not None:
      scalar, is_tuple, _ = types[field.name]
      options[field.name] = _field_value(values[key], scalar, is_tuple, name)
    elif field.metadata["legacy"] is not dataclasses.MISSING:  # saved before the option
      options[field.name] = field.metadata["legacy"]
  return config.from_options(options).check(lambda field: f"--{config.flag_name(field)}")


def method_config(values: Mapping[str, Any]):
  """The method's config (`methods.config_of(--method)`) from the flag `values`."""
  return options_config(methods_lib.config_of(values["method"]), values)


def deploy_config(values: Mapping[str, Any]):
  """The method's deployment options (`MethodConfig.DEPLOY`) from the flag `values`."""
  return options_config(methods_lib.config_of(values["method"]).DEPLOY, values)


def run_record(train: train_lib.TrainConfig, values: Mapping[str, Any],
               flag_files: Sequence[str] = ()) -> dict:
  """What a run was made of, typed: {method, method_config, data, model, train, flag_files}
  (saved with its checkpoints next to the flat flags)."""
  return {"method": values["method"], "method_config": method_config(values).to_dict(),
          "data": dataclasses.asdict(data_config(values)), "model": model_options(values),
          "train": dataclasses.asdict(train), "flag_files": list(flag_files)}


def build_method(values: Mapping[str, Any], tasks, *, axis_name: str | None = None,
                 inputs: Mapping[str, Any] | None = None):
  """The method of the flag `values` for `tasks`.

  `inputs`: runtime values that are not flags (options a stage measured on its earlier stage,
  `dymu_jax.train.stages.StageStart.options`); their "task_weights" replace --task_weights.
  """
  v = with_defaults(values)
  inputs = dict(inputs or {})
  weights = inputs.pop("task_weights", None) or parse_floats(v["task_weights"],
                                                             "--task_weights")
  return methods_lib.build(v["method"], tasks, model_options=model_options(v),
                           axis_name=axis_name, task_weights=weights,
                           config=method_config(v), method_options=inputs)


def check_task_weights(values: Mapping[str, Any]) -> None:
  """--task_weights before any data is read: numbers >= 0, not all 0, and one per task of
  --tasks when those are listed (otherwise the method checks the count against the data)."""
  v = with_defaults(values)
  weights = parse_floats(v["task_weights"], "--task_weights")
  if weights is None:
    return
  shown = ",".join(v["task_weights"])
  if min(weights) < 0 or max(weights) == 0:
    raise ValueError(f"--task_weights={shown} must be numbers >= 0, not all 0 (one loss weight "
                     f"per task, in task order).")
  if v["tasks"] and len(weights) != len(v["tasks"]):
    raise ValueError(f"--task_weights={shown} gives {len(weights)} weight(s) for the "
                     f"{len(v['tasks'])} tasks of --tasks={','.join(v['tasks'])}; give one per "
                     f"task, in that order.")
