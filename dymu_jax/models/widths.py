"""Width configurations of slimmable networks (METHODS.md section 2, "Widths" [ours]).

A `WidthConfig` holds one width multiplier per encoder stage and one per task decoder. It is a
frozen, hashable value, so it can be a static argument of `jax.jit`: each distinct
configuration compiles once, an equal configuration hits the cache.

A slimmed layer keeps `channels(full, multiplier)` channels: the full width at 1.0, otherwise the
nearest multiple of 8, at least 8 and never above the full width [ours]. Input and output layers
(image channels, task outputs) never slim.

Dynamic widths [ours option]: `DynamicWidths` holds the same choice as int32 indices into the
choice set, as arrays. A network run with it computes at full width and zeroes the channels a
slimmed layer would not have (masks), so one compiled program serves every configuration
(training with sampled SubNets without recompiling); its outputs equal the static, sliced path
on the kept channels (and are zero elsewhere). It saves no compute: export and evaluation use
`WidthConfig`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# The default choice set of width multipliers [ours].
WIDTH_CHOICES: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
# Channel counts of slimmed layers are multiples of this [ours].
CHANNEL_DIVISOR = 8


def channels(full: int, multiplier: float | DynamicMultiplier,
             divisor: int = CHANNEL_DIVISOR) -> int | jax.Array:
  """Number of channels of a layer of full width `full` slimmed by `multiplier`.

  Exactly `full` at multiplier 1.0; otherwise `full * multiplier` rounded to the nearest multiple
  of `divisor` (halves round up), at least `divisor`, never above `full`. A `DynamicMultiplier`
  gives the same count as a traced int32 scalar.
  """
  if isinstance(multiplier, DynamicMultiplier):
    return multiplier.channels(full, divisor)
  if full < 1:
    raise ValueError(f"A layer needs a full width of at least 1 channel, got {full}.")
  if not 0.0 < multiplier <= 1.0:
    raise ValueError(f"A width multiplier must lie in (0, 1], got {multiplier}.")
  if divisor < 1:
    raise ValueError(f"The channel divisor must be a positive integer, got {divisor}.")
  if multiplier == 1.0:
    return full
  rounded = int(full * multiplier / divisor + 0.5) * divisor
  return min(full, max(divisor, rounded))


def _as_multipliers(values: Sequence[float], what: str) -> tuple[float, ...]:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ValueError(f"WidthConfig.{what} must be a sequence of multipliers, got {values!r}.")
  out = tuple(float(v) for v in values)
  for v in out:
    if not 0.0 < v <= 1.0:
      raise ValueError(f"WidthConfig.{what} has multiplier {v}; multipliers must lie in (0, 1].")
  return out


@dataclasses.dataclass(frozen=True)
class WidthConfig:
  """Width multipliers of one SubNet: per encoder stage and per task decoder.

  Attributes:
    encoder: one multiplier per encoder stage, in stage order.
    decoders: one multiplier per task decoder, in task order.
  """

  encoder: tuple[float, ...]
  decoders: tuple[float, ...]

  def __post_init__(self):
    # Lists become tuples so that equal configurations hash equally.
    object.__setattr__(self, "encoder", _as_multipliers(self.encoder, "encoder"))
    object.__setattr__(self, "decoders", _as_multipliers(self.decoders, "decoders"))

  @classmethod
  def full(cls, num_stages: int, num_tasks: int) -> WidthConfig:
    """The SuperNet: every multiplier 1.0."""
    return cls((1.0,) * num_stages, (1.0,) * num_tasks)

  @classmethod
  def smallest(cls, num_stages: int, num_tasks: int,
               choices: Sequence[float] = WIDTH_CHOICES) -> WidthConfig:
    """The narrowest SubNet: every multiplier the smallest choice."""
    low = min(_check_choices(choices))
    return cls((low,) * num_stages, (low,) * num_tasks)

  @classmethod
  def sample(cls, rng: np.random.Generator, num_stages: int, num_tasks: int,
             choices: Sequence[float] = WIDTH_CHOICES, tied_encoder: bool = False
             ) -> WidthConfig:
    """A random configuration: every stage and every decoder drawn independently, uniformly.

    Args:
      rng: numpy generator (the caller seeds it; same seed, same configs).
      num_stages: encoder stages.
      num_tasks: task decoders.
      choices: allowed multipliers.
      tied_encoder: draw one multiplier shared by all encoder stages [ours option].
    """
    choices = _check_choices(choices)
    if tied_encoder:
      encoder = (choices[rng.integers(len(choices))],) * num_stages
    else:
      encoder = tuple(choices[i] for i in rng.integers(len(choices), size=num_stages))
    decoders = tuple(choices[i] for i in rng.integers(len(choices), size=num_tasks))
    return cls(encoder, decoders)

  def validate(self, num_stages: int, num_tasks: int,
               choices: Sequence[float] | None = WIDTH_CHOICES) -> WidthConfig:
    """Returns self, or raises ValueError (one sentence) when it does not fit the network.

    Args:
      num_stages: encoder stages the network has.
      num_tasks: task decoders the network has.
      choices: allowed multipliers; None accepts any multiplier in (0, 1].
    """
    if len(self.encoder) != num_stages:
      raise ValueError(
          f"WidthConfig has {len(self.encoder)} encoder multipliers {self.encoder} but the "
          f"encoder has {num_stages} stages.")
    if len(self.decoders) != num_tasks:
      raise ValueError(
          f"WidthConfig has {len(self.decoders)} decoder multipliers {self.decoders} but the "
          f"network has {num_tasks} task decoders.")
    if choices is not None:
      allowed = _check_choices(choices)
      for what, values in (("encoder", self.encoder), ("decoder", self.decoders)):
        for v in values:
          if v not in allowed:
            raise ValueError(
                f"Width multiplier {v} of the {what} is not an allowed choice; allowed: "
                f"{', '.join(str(c) for c in allowed)}.")
    return self


def _check_choices(choices: Sequence[float]) -> tuple[float, ...]:
  out = tuple(sorted(float(c) for c in choices))
  if not out or any(not 0.0 < c <= 1.0 for c in out) or len(set(out)) != len(out):
    raise ValueError(
        f"Width choices must be distinct multipliers in (0, 1], got {tuple(choices)!r}.")
  return out


def encoder_configs(num_stages: int, choices: Sequence[float] = WIDTH_CHOICES
                    ) -> list[tuple[float, ...]]:
  """Every encoder multiplier tuple (len(choices) ** num_stages of them), widest last."""
  return list(itertools.product(_check_choices(choices), repeat=num_stages))


def enumerate_configs(num_stages: int, num_tasks: int,
                      choices: Sequence[float] = WIDTH_CHOICES) -> Iterator[WidthConfig]:
  """Every width configuration, encoder-major (len(choices) ** (stages + tasks) of them)."""
  choices = _check_choices(choices)
  for encoder in itertools.product(choices, repeat=num_stages):
    for decoders in itertools.product(choices, repeat=num_tasks):
      yield WidthConfig(encoder, decoders)


@dataclasses.dataclass(frozen=True)
class DynamicMultiplier:
  """One stage's (or decoder's) multiplier as a traced index into a static choice set."""

  index: jax.Array
  choices: tuple[float, ...]

  def channels(self, full: int, divisor: int = CHANNEL_DIVISOR) -> jax.Array:
    # A lookup table of the static counts keeps the rounding identical to the static path.
    table = jnp.asarray([channels(full, c, divisor) for c in self.choices], jnp.int32)
    return table[self.index]


@flax.struct.dataclass
class DynamicWidths:
  """A width configuration as arrays of indices into `choices` (a pytree; not static).

  Attributes:
    encoder: int32 (num_stages,), index of each stage's multiplier in `choices`.
    decoders: int32 (num_tasks,), index of each decoder's multiplier in `choices`.
    choices: the choice set (static; must equal the network's `width_choices`).
  """

  encoder: jax.Array
  decoders: jax.Array
  choices: tuple[float, ...] = flax.struct.field(pytree_node=False, default=WIDTH_CHOICES)

  @classmethod
  def from_config(cls, config: WidthConfig,
                  choices: Sequence[float] = WIDTH_CHOICES) -> DynamicWidths:
    """The indices of a static configuration (every multiplier must be a choice)."""
    choices = _check_choices(choices)
    config.validate(len(config.encoder), len(config.decoders), choices)
    # device_put of numpy arrays: jnp.asarray would compile a small program per shape.
    index = lambda ms: jax.device_put(np.asarray([choices.index(m) for m in ms], np.int32))
    return cls(index(config.encoder), index(config.decoders), choices)

  @classmethod
  def sample(cls, key: jax.Array, num_stages: int, num_tasks: int,
             choices: Sequence[float] = WIDTH_CHOICES) -> DynamicWidths:
    """Uniform independent indices per stage and decoder, drawn with `key` (jit-friendly)."""
    choices = _check_choices(choices)
    enc_key, dec_key = jax.random.split(key)
    return cls(jax.random.randint(enc_key, (num_stages,), 0, len(choices), jnp.int32),
               jax.random.randint(dec_key, (num_tasks,), 0, len(choices), jnp.int32),
               choices)

  def validate(self, num_stages: int, num_tasks: int,
               choices: Sequence[float] | None = WIDTH_CHOICES) -> DynamicWidths:
    """Returns self, or raises ValueError when its shapes or choice set do not fit."""
    if tuple(self.encoder.shape) != (num_stages,):
      raise ValueError(
          f"DynamicWidths.encoder has shape {tuple(self.encoder.shape)} but the encoder has "
          f"{num_stages} stages.")
    if tuple(self.decoders.shape) != (num_tasks,):
      raise ValueError(
          f"DynamicWidths.decoders has shape {tuple(self.decoders.shape)} but the network has "
          f"{num_tasks} task decoders.")
    if choices is not None and tuple(self.choices) != _check_choices(choices):
      raise ValueError(
          f"DynamicWidths uses choices {tuple(self.choices)} but the network allows "
          f"{_check_choices(choices)}.")
    return self

  def encoder_multipliers(self) -> tuple[DynamicMultiplier, ...]:
    return tuple(DynamicMultiplier(self.encoder[i], tuple(self.choices))
                 for i in range(self.encoder.shape[0]))

  def decoder_multipliers(self) -> tuple[DynamicMultiplier, ...]:
    return tuple(DynamicMultiplier(self.decoders[i], tuple(self.choices))
                 for i in range(self.decoders.shape[0]))


def is_dynamic(width) -> bool:
  """True for a channel count given as an array (the masked path), False for a Python int."""
  return isinstance(width, (jax.Array, np.ndarray))
