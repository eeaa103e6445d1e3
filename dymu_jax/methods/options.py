"""Typed method options: each method declares its options once, as a frozen `MethodConfig`.

A method module defines `Config(MethodConfig)`, a frozen dataclass whose fields are made with
`option(default, help, ...)`: the type annotation, default, help text, allowed range or choices,
and the names the option had before. Everything else derives from it:

* `dymu_jax.methods.build(name, tasks, method_options={...})` builds the `Config` (unknown names
  are refused with the allowed ones), checks it (`MethodConfig.check`) and hands the builder
  `config.options()`, the fields the method object takes;
* the command line (`experiments/common.py`) defines one flag per field under one naming rule,
  `--<PREFIX>_<field>` (e.g. `--ecmt_lambda_kd`, `--dymu_tau_factor`), with the field's help,
  type, range and choices; names in `former` stay accepted as aliases;
* a run records the config as a dict (`MethodConfig.to_dict`), and a run saved before a field
  existed is read with the field's `legacy` value (what such runs trained with).

Methods that share options share one `Config` class (PHN and PHN-BN). Fields with
`method=False` are read by the code that drives the method (e.g. DYMU's stage runner) and are
not passed to the method object.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, ClassVar, Mapping

from dymu_jax.train import stages as stages_lib

_MISSING = dataclasses.MISSING


def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,  # pylint: disable=redefined-builtin
           open_low: bool = False, open_high: bool = False, choices: tuple[str, ...] = (),
           former: tuple[str, ...] = (), legacy: Any = _MISSING, method: bool = True,
           meaning: str = "") -> Any:
  """A `MethodConfig` field.

  Args:
    default: the value when not given (tuples for sequences, so configs stay hashable).
    help: one or two sentences for `--help`.
    low, high, open_low, open_high: the allowed range of a number (each element of a tuple).
    choices: the allowed values of a text option.
    former: the option's earlier flag names (still accepted; runs saved with them still load).
    legacy: the value of runs saved before this option existed, when it differs from `default`.
    method: False for options read by what drives the method, not by the method object.
    meaning: what a sentinel value means, for errors (e.g. "-1 = the backbone's default").
  """
  metadata = {"help": help, "low": low, "high": high, "open_low": open_low,
              "open_high": open_high, "choices": tuple(choices), "former": tuple(former),
              "legacy": legacy, "method": method, "meaning": meaning}
  return dataclasses.field(default=default, metadata=metadata)


def element_type(annotation: Any) -> tuple[type, bool, bool]:
  """(scalar type, is a tuple, may be None) of a field annotation such as `float`,
  `tuple[int, ...]` or `float | None`."""
  optional = False
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    optional = type(None) in args
    (annotation,) = [a for a in args if a is not type(None)]
    args = typing.get_args(annotation)
  if typing.get_origin(annotation) is tuple:
    return args[0], True, optional
  return annotation, False, optional


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Base of every method's options (a frozen, hashable dataclass; see the module docstring).

  Class attributes:
    PREFIX: the option family's flag prefix (`--<PREFIX>_<field>`); "" for a method without
      options.
    TITLE: the methods' name for help headings and errors (e.g. "PHN and PHN-BN").
    INPUT_DIRS: the fields that name earlier run folders a run reads (DYMU's stage inputs);
      runs of one configuration may read different folders, so the results page groups them
      by whether each is set, not by its value.
    STAGE_FIELD: the field that selects which stages of a staged method a run trains ("" for
      a method of one stage).
  """

  PREFIX: ClassVar[str] = ""
  TITLE: ClassVar[str] = ""
  # Fields that shape the network besides the model options (a stage read by a later one must
  # agree on them with it).
  MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()
  # A method trained in stages: the field that selects the stage, and the fields that name
  # the folders of finished earlier stages (their runs' flags may differ between seeds).
  STAGE_FIELD: ClassVar[str] = ""
  INPUT_DIRS: ClassVar[tuple[str, ...]] = ()
  # The options a user may change when deploying a trained run (a `DeployOptions` subclass,
  # e.g. ECMT's search options; None: none). The method takes them as fields of the same names
  # (`MethodBase.replace_options`); evaluate and export set them from flags `--<field>`.
  DEPLOY: ClassVar[type | None] = None

  @classmethod
  def flag_name(cls, field: str) -> str:
    """The command-line flag of a field: `<PREFIX>_<field>`."""
    return f"{cls.PREFIX}_{field}"

  @classmethod
  def fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)

  @classmethod
  def types(cls) -> dict[str, tuple[type, bool, bool]]:
    """{field: (scalar type, is a tuple, may be None)}."""
    hints = typing.get_type_hints(cls)
    return {f.name: element_type(hints[f.name]) for f in cls.fields()}

  @classmethod
  def from_options(cls, options: Mapping[str, Any] | None = None) -> "MethodConfig":
    """The config of `options` (field -> value; sequences become tuples); unknown names are
    refused with the allowed ones."""
    options = dict(options or {})
    names = [f.name for f in cls.fields()]
    unknown = sorted(set(options) - set(names))
    if unknown:
      raise ValueError(f"Unknown {cls.TITLE or 'method'} option(s) {', '.join(unknown)}; "
                       f"allowed: {', '.join(names) or 'none'}.")
    types_ = cls.types()
    for name, value in options.items():
      scalar, is_tuple, _ = types_[name]
      if isinstance(value, (list, tuple)):
        options[name] = value = _freeze(value)  # hashable, as static configs must be
      if is_tuple and value is not None and not isinstance(value, (str, tuple)):
        options[name] = tuple(value)
      elif scalar is float and isinstance(value, int) and not isinstance(value, bool):
        options[name] = float(value)
    return cls(**options)

  def to_dict(self) -> dict:
    """The config as a JSON-ready dict (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def options(self) -> dict:
    """Keyword arguments of the method object: every field not marked `method=False`."""
    return {f.name: getattr(self, f.name) for f in self.fields() if f.metadata.get("method", True)}

  def check(self, name: Callable[[str], str] | None = None) -> "MethodConfig":
    """Raises ValueError (one sentence) for a value outside its field's range or choices, then
    runs `check_values`; `name(field)` is how errors name a field (by default the field, after
    "<TITLE> options: "; the command line passes its flag names). Returns the config."""
    if name is None:  # the library's callers: name the fields, once prefixed by the method
      try:
        return self.check(lambda field: field)
      except ValueError as error:
        raise ValueError(f"{self.TITLE or 'Method'} options: {error}") from None
    types_ = self.types()
    for f in self.fields():
      value = getattr(self, f.name)
      if value is None:
        continue
      m = f.metadata
      scalar, is_tuple, _ = types_[f.name]
      values = value if is_tuple else (value,)
      shown = ",".join(str(v) for v in values) if is_tuple else f"{value!r}"
      if m.get("choices") and any(v not in m["choices"] for v in values):
        raise ValueError(f"{name(f.name)}={shown} is not allowed; choose one of "
                         f"{', '.join(m['choices'])}.")
      if scalar in (int, float):
        for v in values:
          if isinstance(v, bool) or not isinstance(v, (int, float)) or (
              scalar is int and not float(v).is_integer()):
            raise ValueError(f"{name(f.name)}={shown} must be "
                             f"{'whole numbers' if scalar is int else 'numbers'}.")
          if not in_range(v, m):
            raise ValueError(f"{name(f.name)}={shown} must be {describe_range(m, scalar)}.")
    self.check_values(name)
    return self

  def check_values(self, name: Callable[[str], str]) -> None:
    """Checks between fields (a subclass's own rules); `name` as in `check`."""

  def plan(self, workdir: str, steps: int, name: Callable[[str], str] = lambda field: field
           ) -> tuple:
    """The stages a training run in `workdir` of `steps` steps covers, as
    `dymu_jax.train.stages.Stage`s (run by `stages.run_stages`): by default one, the run
    itself; a method trained in stages plans its own (DYMU). `name` as in `check`."""
    return (stages_lib.Stage(name="", folder=workdir, steps=int(steps), config=self),)

  def stage_name(self) -> str:
    """The stage this config trains (its `STAGE_FIELD`; "" for a method of one stage)."""
    return getattr(self, self.STAGE_FIELD) if self.STAGE_FIELD else ""

  def restored_options(self, folder: str, num_tasks: int) -> dict:
    """Options a run trained in `folder` was built with besides this config (measured on an
    earlier stage and saved next to it: DYMU's task affinity and weights); by default none."""
    del folder, num_tasks
    return {}


def _freeze(value: Any) -> Any:
  """Lists (nested too) as tuples."""
  return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def in_range(value: float, m: Mapping[str, Any]) -> bool:
  if not math.isfinite(value):
    return False
  low, high = m.get("low"), m.get("high")
  if low is not None and (value <= low if m.get("open_low") else value < low):
    return False
  return high is None or (value < high if m.get("open_high") else value <= high)


def range_text(m: Mapping[str, Any]) -> str:
  """The range `m` (an `option`'s metadata: low, high, open_low, open_high, meaning) in words,
  e.g. "in (0, 1]", ">= 2 (the largest and smallest SubNets plus random ones)" or ""."""
  low, high = m.get("low"), m.get("high")
  if low is not None and high is not None:
    text = (f"in {'(' if m.get('open_low') else '['}{low:g}, {high:g}"
            f"{')' if m.get('open_high') else ']'}")
  elif low is not None:
    text = f"{'>' if m.get('open_low') else '>='} {low:g}"
  elif high is not None:
    text = f"{'<' if m.get('open_high') else '<='} {high:g}"
  else:
    text = ""
  note = f" ({m['meaning']})" if m.get("meaning") else ""
  return f"{text}{note}".strip()


def describe_range(m: Mapping[str, Any], scalar: type = float) -> str:
  """A number in the range `m` in words, e.g. "a finite number in (0, 1]" or "a whole number
  >= 2"."""
  kind = "a whole number" if scalar is int else "a finite number"
  return f"{kind} {range_text(m)}".strip()


@dataclasses.dataclass(frozen=True)
class DeployOptions(MethodConfig):
  """Base of a method's deployment options (`MethodConfig.DEPLOY`): fields made with `option`,
  whose flags are `--<field>` (no prefix: they are options of steering a trained run, shared by
  the evaluate and export commands, not of training)."""

  @classmethod
  def flag_name(cls, field: str) -> str:
    return field


@dataclasses.dataclass(frozen=True)
class NoOptions(MethodConfig):
  """The config of a method without options of its own (static, single-task)."""
