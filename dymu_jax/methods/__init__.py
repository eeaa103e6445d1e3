"""Methods: each module owns its model composition, its loss, its sampling and its controls.

`build(name, tasks, ...)` returns an object implementing `dymu_jax.methods.base.Method`. A
method is one module plus one `register` line (below): the entry points list, build, train,
evaluate and export what is registered, and name no method.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from dymu_jax import models
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import affinity, dymu, ecmt, gradsplit, options, pcgrad, phn, static  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Registration:
  """A registered method.

  Attributes:
    description: one line for --help.
    builder: `builder(tasks, model_options, *, config, task_weights, axis_name, **inputs)` ->
      the method (`model_options`: keyword arguments of the network builder, e.g.
      `models.build_multitask`'s; `config`: a checked instance of `config`; `inputs`: runtime
      values that are not options, such as DYMU's frozen earlier stages; see
      `on_multitask_net`).
    config: the method's options, a `options.MethodConfig` subclass (`NoOptions` for none).
  """

  description: str
  builder: Callable[..., Any]
  config: type[options.MethodConfig] = options.NoOptions


_REGISTRY: dict[str, Registration] = {}


def register(name: str, description: str, builder: Callable[..., Any],
             config: type[options.MethodConfig] = options.NoOptions) -> None:
  """Adds a method under `name` (a new name; `builder` and `config` as in `Registration`)."""
  if name in _REGISTRY:
    raise ValueError(f"A method named {name!r} is registered already.")
  if not (isinstance(config, type) and issubclass(config, options.MethodConfig)):
    raise ValueError(f"The config of method {name!r} must be a MethodConfig subclass, got "
                     f"{config!r}.")
  _REGISTRY[name] = Registration(description, builder, config)


def registration(name: str) -> Registration:
  """The registration of method `name`; an unknown name stops with the registered ones."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown method {name!r}; available methods are {', '.join(_REGISTRY)}.")
  return _REGISTRY[name]


def config_of(name: str) -> type[options.MethodConfig]:
  """The `MethodConfig` subclass of method `name`."""
  return registration(name).config


def configs() -> tuple[type[options.MethodConfig], ...]:
  """Every registered method's config class, once each, in registration order."""
  return tuple(dict.fromkeys(entry.config for entry in _REGISTRY.values()))


def normalise_flag_values(values: Mapping[str, Any]) -> dict:
  """A saved run's flag values with method options under their current flag names (runs saved
  before a rename hold the former name, `option(former=...)`)."""
  values = dict(values)
  for config in configs():
    for field in config.fields():
      name = config.flag_name(field.name)
      for former in field.metadata["former"]:
        if former in values and name not in values:
          values[name] = values.pop(former)
  return values


def on_multitask_net(build_fn: Callable[..., Any], **fixed) -> Callable[..., Any]:
  """A builder for a method on a `MultiTaskNet`: `build_fn(tasks, make_net, *, task_weights,
  axis_name, **fixed, **config.options(), **inputs)`, with `make_net(tasks)` building the
  network from the model options (batch norms pooled over `axis_name`)."""

  def builder(tasks, model_options, *, config, task_weights, axis_name, **inputs):
    model_options = dict(model_options or {})
    backbone = model_options.get("backbone", "resnet_small")
    if model_options.get("backbone_kwargs"):
      known = {f.name for f in dataclasses.fields(models.backbones.get_backbone(backbone))}
      unknown = sorted(set(model_options["backbone_kwargs"]) - (known - {"parent", "name"}))
      if unknown:
        raise ValueError(f"--backbone_options has {', '.join(unknown)}, which backbone "
                         f"{backbone!r} does not take; it takes "
                         f"{', '.join(sorted(known - {'parent', 'name'}))}.")
    make_net = functools.partial(models.build_multitask, bn_axis_name=axis_name,
                                 **model_options)
    return build_fn(tasks, make_net, task_weights=task_weights, axis_name=axis_name,
                    **fixed, **config.options(), **inputs)

  return builder


class _Descriptions(collections.abc.Mapping):
  """name -> description of every registered method, in registration order (a live view)."""

  def __getitem__(self, name: str) -> str:
    return _REGISTRY[name].description

  def __iter__(self) -> Iterator[str]:
    return iter(_REGISTRY)

  def __len__(self) -> int:
    return len(_REGISTRY)


METHODS = _Descriptions()

register("static", "hard sharing, one shared encoder and a decoder per task, fixed task "
         "weights", on_multitask_net(static.build))
register("single_task", "one independent network per task (the single-task baselines)",
         on_multitask_net(static.build, single_task=True))
register("ecmt", "slimmable SuperNet trained with sandwich-sampled SubNets and CI-KD; "
         "controlled by (preference, budget) through a MACs search", on_multitask_net(ecmt.build),
         ecmt.Config)
register("gradsplit", "hard sharing whose last encoder stages split their channels into one "
         "group per task; a routing matrix per split layer (learned from that layer's gradient "
         "conflicts on a warm-up, or fixed) decides which tasks' gradients reach each group",
         on_multitask_net(gradsplit.build), gradsplit.Config)
register("pcgrad", "hard sharing trained with PCGrad: conflicting per-task gradients of the "
         "shared encoder are projected onto each other's normal planes",
         on_multitask_net(pcgrad.build), pcgrad.Config)
register("dymu", "single-task anchor streams fine-tuned from one pretrained trunk, then an edge "
         "hypernetwork that turns (preference, resource) into a tree of shared blocks and a "
         "weight hypernetwork that shifts its batch norms (stages pretrain, anchor, edge, "
         "weight: --dymu_stage)", dymu.build_registered, dymu.Config)
register("phn", "Pareto HyperNetwork: a hypernetwork (chunked or not) generates every weight of "
         "the shared network from the preference", on_multitask_net(phn.build, mode="all"),
         phn.Config)
register("phn_bn", "PHN-BN: a hypernetwork generates only the batch-norm scales and biases of "
         "the shared network from the preference; the other weights are learned directly",
         on_multitask_net(phn.build, mode="bn"), phn.Config)

# The method a command trains when none is named, and the one whose runs are Delta_m's
# single-task reference (its test metrics per task) on the results page.
DEFAULT_METHOD = "static"
REFERENCE_METHOD = "single_task"

def build(name: str, tasks: Sequence[tasks_lib.Task], *, model_options: dict | None = None,
          axis_name: str | None = None, task_weights: Sequence[float] | None = None,
          method_options: Mapping[str, Any] | None = None,
          config: options.MethodConfig | None = None):
  """The method `name` for `tasks` with the model built from `model_options`.

  Args:
    name: a key of `METHODS`.
    tasks: the tasks to learn.
    model_options: keyword arguments of `dymu_jax.models.build_multitask` (backbone, ...).
    axis_name: the pmap axis name when training with `--parallel=pmap` (batch statistics are
      pooled over it), else None.
    task_weights: loss weight per task (every method; DYMU's edge and weight stages take
      `dymu.task_weights_from_losses` of the anchor).
    method_options: the method's options (fields of `config_of(name)`, e.g. `ecmt.Config`),
      and runtime inputs that are not options (DYMU: stage and affinity), by name; DYMU's
      frozen earlier stages are not options but variable collections
      (`dymu.stage_variables`, given to `train.train(..., initial_variables=...)`).
    config: the method's options as a config instance (instead of their names in
      `method_options`).

  DYMU builds a `branched.BranchedNet`, not a `MultiTaskNet`: of `model_options` it takes only
  `dymu.MODEL_OPTIONS` (others are left out).
  """
  entry = registration(name)
  tasks = tuple(tasks)
  model_options = dict(model_options or {})
  weights = tuple(float(w) for w in task_weights) if task_weights else None
  if weights is not None and not (all(math.isfinite(w) and w >= 0 for w in weights)
                                  and any(weights)):
    raise ValueError(f"Task weights must be finite numbers >= 0, not all 0, got "
                     f"{', '.join(f'{w:g}' for w in weights)}.")
  given = dict(method_options or {})
  fields = {f.name for f in entry.config.fields()}
  if config is None:
    config = entry.config.from_options({k: v for k, v in given.items() if k in fields})
  elif not isinstance(config, entry.config):
    raise ValueError(f"Method {name!r} takes a {entry.config.__name__} config, got "
                     f"{type(config).__name__}.")
  inputs = {k: v for k, v in given.items() if k not in fields}
  return entry.builder(tasks, model_options, config=config.check(), task_weights=weights,
                       axis_name=axis_name, **inputs)
