"""ECMT's analytic cost table: the MACs and parameters of every encoder stage and decoder at
every width, built once per network and image shape and cacheable to JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.models import cost as cost_lib
from dymu_jax.models.multitask import MultiTaskNet
from dymu_jax.models.widths import WIDTH_CHOICES, WidthConfig, channels, encoder_configs

PyTree = Any


def _sorted_choices(choices: Sequence[float]) -> tuple[float, ...]:
  out = tuple(sorted(float(c) for c in choices))
  if not out or any(not 0.0 < c <= 1.0 for c in out) or len(set(out)) != len(out):
    raise ValueError(
        f"width_choices must be distinct multipliers in (0, 1], got {tuple(choices)!r}.")
  return out


# ----------------------------------------------------------------------------------------------
# Analytic cost table.


def model_signature(model: nn.Module, image_shape: Sequence[int],
                    choices: Sequence[float]) -> str:
  """A short hash of the network's definition, the image shape and the width choices."""
  text = f"{model!r}|{tuple(int(d) for d in image_shape)}|{tuple(choices)}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class CostTable:
  """Per-example MACs of every encoder configuration and of every decoder width given it.

  Attributes:
    signature: `model_signature` of the network, image shape and choices it was built for.
    image_shape: (H, W, C).
    choices: the width choices, ascending.
    num_stages: encoder stages.
    task_names: the decoders, in order.
    encoder_configs: every encoder multiplier tuple (`widths.encoder_configs` order).
    encoder_macs: int64 (E,), MACs of the encoder (and anything outside the decoders).
    decoder_macs: int64 (E, T, C), MACs of decoder t at choice c given encoder e.
    encoder_params, decoder_params: the same for the parameters a configuration uses (as
      `models.cost.count` counts them), so that a SubNet's cost needs no trace.
  """

  signature: str
  image_shape: tuple[int, ...]
  choices: tuple[float, ...]
  num_stages: int
  task_names: tuple[str, ...]
  encoder_configs: tuple[tuple[float, ...], ...]
  encoder_macs: np.ndarray
  decoder_macs: np.ndarray
  encoder_params: np.ndarray
  decoder_params: np.ndarray

  def __post_init__(self):
    index = {e: i for i, e in enumerate(self.encoder_configs)}
    object.__setattr__(self, "_index", index)

  def encoder_index(self, encoder: Sequence[float]) -> int:
    key = tuple(float(m) for m in encoder)
    if key not in self._index:
      raise ValueError(f"Encoder multipliers {key} are not a configuration of this cost table "
                       f"({self.num_stages} stages, choices {self.choices}).")
    return self._index[key]

  def macs(self, config: WidthConfig) -> int:
    """Per-example MACs of a full width configuration."""
    e = self.encoder_index(config.encoder)
    if len(config.decoders) != len(self.task_names):
      raise ValueError(f"WidthConfig has {len(config.decoders)} decoder multipliers but the "
                       f"cost table has {len(self.task_names)} tasks.")
    dec = [self.decoder_macs[e, t, self.choices.index(m)] for t, m in enumerate(config.decoders)]
    return int(self.encoder_macs[e] + sum(dec))

  def params(self, config: WidthConfig) -> int:
    """Parameters a full width configuration uses."""
    e = self.encoder_index(config.encoder)
    dec = [self.decoder_params[e, t, self.choices.index(m)]
           for t, m in enumerate(config.decoders)]
    return int(self.encoder_params[e] + sum(dec))

  def cost(self, config: WidthConfig) -> cost_lib.Cost:
    """MACs and parameters of a configuration (`models.cost.Cost`), from the table."""
    return cost_lib.Cost(self.macs(config), self.params(config))

  @property
  def full_macs(self) -> int:
    return int(self.encoder_macs[-1] + self.decoder_macs[-1, :, -1].sum())

  @property
  def smallest_macs(self) -> int:
    return int(np.min(self.encoder_macs + self.decoder_macs[:, :, 0].sum(axis=1)))

  def to_json(self) -> dict:
    return {
        "signature": self.signature, "image_shape": list(self.image_shape),
        "choices": list(self.choices), "num_stages": self.num_stages,
        "task_names": list(self.task_names),
        "encoder_configs": [list(e) for e in self.encoder_configs],
        "encoder_macs": self.encoder_macs.tolist(), "decoder_macs": self.decoder_macs.tolist(),
        "encoder_params": self.encoder_params.tolist(),
        "decoder_params": self.decoder_params.tolist(),
    }

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> CostTable:
    return cls(
        signature=str(record["signature"]), image_shape=tuple(record["image_shape"]),
        choices=tuple(float(c) for c in record["choices"]),
        num_stages=int(record["num_stages"]), task_names=tuple(record["task_names"]),
        encoder_configs=tuple(tuple(float(m) for m in e) for e in record["encoder_configs"]),
        encoder_macs=np.asarray(record["encoder_macs"], np.int64),
        decoder_macs=np.asarray(record["decoder_macs"], np.int64),
        # A table saved before parameters were kept raises KeyError: it is rebuilt.
        encoder_params=np.asarray(record["encoder_params"], np.int64),
        decoder_params=np.asarray(record["decoder_params"], np.int64))

  def save(self, path: str | os.PathLike) -> None:
    files_lib.write_json(path, self.to_json(), indent=None)

  @classmethod
  def load(cls, path: str | os.PathLike) -> CostTable:
    """The table saved in `path` (files_lib.DamagedFile when it does not parse)."""
    return cls.from_json(files_lib.read_json(path))


def _count(model, variables, image_shape, config) -> list[cost_lib.LayerCost]:
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return [r for r in cost_lib.count_layers(model, variables, images, widths=config, train=False)
          if r.macs]


class _UnsupportedModel(Exception):
  """The per-layer cost model does not describe this network (use direct counting)."""


def _layer_model(model, variables, image_shape, choices, num_stages, num_tasks):
  """Per layer: (part, taps, in (full, var), exponent of in, out (full, var)).

  Every layer's MACs are `taps * cin^alpha * cout` (alpha 0 for depthwise), and its channel
  counts are `channels(full, multiplier of one variable)` (an encoder stage or a decoder) or
  constant. Which variable governs each count is found by slimming one variable at a time.
  """
  num_vars = num_stages + num_tasks
  low = min(choices)

  def config_of(multipliers):
    return WidthConfig(tuple(multipliers[:num_stages]), tuple(multipliers[num_stages:]))

  full = _count(model, variables, image_shape, config_of([1.0] * num_vars))
  probes = []
  for v in range(num_vars):
    multipliers = [1.0] * num_vars
    multipliers[v] = low
    probe = _count(model, variables, image_shape, config_of(multipliers))
    if [r.path for r in probe] != [r.path for r in full]:
      raise _UnsupportedModel("layer sequence changes with the widths")
    probes.append(probe)
  described = []
  for i, layer in enumerate(full):
    cin_full, cout_full = layer.in_shape[-1], layer.out_shape[-1]
    in_var = [v for v in range(num_vars) if probes[v][i].in_shape[-1] != cin_full]
    out_var = [v for v in range(num_vars) if probes[v][i].out_shape[-1] != cout_full]
    if len(in_var) > 1 or len(out_var) > 1:
      raise _UnsupportedModel(f"{layer.path} depends on several widths")
    in_var = in_var[0] if in_var else None
    out_var = out_var[0] if out_var else None

    def predict(multipliers, alpha, taps, in_var=in_var, out_var=out_var, cin_full=cin_full,
                cout_full=cout_full):
      cin = cin_full if in_var is None else channels(cin_full, multipliers[in_var])
      cout = cout_full if out_var is None else channels(cout_full, multipliers[out_var])
      return taps * cin**alpha * cout

    chosen = None
    for alpha in (1, 0):
      taps, rest = divmod(layer.macs, cin_full**alpha * cout_full)
      if rest:
        continue
      ok = True
      for v in range(num_vars):
        multipliers = [1.0] * num_vars
        multipliers[v] = low
        if predict(multipliers, alpha, taps) != probes[v][i].macs:
          ok = False
          break
      if ok:
        chosen = (alpha, taps)
        break
    if chosen is None:
      raise _UnsupportedModel(f"{layer.path} MACs are not taps * cin * cout")
    described.append((layer.path, chosen, predict))
  return described


def _layer_params(model, variables, image_shape, config) -> dict[str, tuple[int, int, int]]:
  """{layer path: (params, cin, cout)} of one configuration, every layer (with or without MACs);
  a layer called more than once owns its parameters once (its widest call), as in `count`."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  out: dict[str, tuple[int, int, int]] = {}
  for r in cost_lib.count_layers(model, variables, images, widths=config, train=False):
    cin = int(r.in_shape[-1]) if r.in_shape else 0
    cout = int(r.out_shape[-1]) if r.out_shape else 0
    if r.path not in out or r.params > out[r.path][0]:
      out[r.path] = (int(r.params), cin, cout)
  return out


def _param_model(model, variables, image_shape, choices, num_stages, num_tasks):
  """Per layer path: a function of the multipliers giving its parameters.

  Every layer's parameters are `p1 * cin^alpha * cout + p2 * cout + p3` (a kernel, a bias or a
  normalisation's scale and offset, a constant), with its channel counts governed by at most one
  width variable each, as for the MACs (`_layer_model`); the coefficients are solved exactly from
  the full network and one probe per variable. Raises `_UnsupportedModel` otherwise.
  """
  num_vars = num_stages + num_tasks
  low = min(choices)

  def config_of(multipliers):
    return WidthConfig(tuple(multipliers[:num_stages]), tuple(multipliers[num_stages:]))

  full = _layer_params(model, variables, image_shape, config_of([1.0] * num_vars))
  probes = []
  for v in range(num_vars):
    multipliers = [1.0] * num_vars
    multipliers[v] = low
    probe = _layer_params(model, variables, image_shape, config_of(multipliers))
    if list(probe) != list(full):
      raise _UnsupportedModel("layer set changes with the widths")
    probes.append(probe)
  described = []
  for path, (params, cin_full, cout_full) in full.items():
    in_var = [v for v in range(num_vars) if probes[v][path][1] != cin_full]
    out_var = [v for v in range(num_vars) if probes[v][path][2] != cout_full]
    if len(in_var) > 1 or len(out_var) > 1:
      raise _UnsupportedModel(f"{path} depends on several widths")
    in_var = in_var[0] if in_var else None
    out_var = out_var[0] if out_var else None
    described.append((path, _fit_params(path, params, cin_full, cout_full, in_var, out_var,
                                        probes, low)))
  return described


def _fit_params(path, params, cin_full, cout_full, in_var, out_var, probes, low):
  """The exact parameter function of one layer (see `_param_model`)."""
  at = lambda v: probes[v][path]
  for alpha in (1, 0):
    # Unknowns: slope in cin^alpha * cout (p1), in cout (p2), constant (p3).
    if in_var is not None and out_var is not None:
      p_in, cin_low, _ = at(in_var)
      p_out, _, cout_low = at(out_var)
      d_in = cout_full * (cin_full**alpha - cin_low**alpha)
      if not d_in or (params - p_in) % d_in:
        continue
      p1 = (params - p_in) // d_in
      d_out = cout_full - cout_low
      rest = (params - p_out) - p1 * cin_full**alpha * d_out
      if not d_out or rest % d_out:
        continue
      p2 = rest // d_out
    elif out_var is not None:  # cin constant: p1 * cin^alpha folds into p2
      p_out, _, cout_low = at(out_var)
      d_out = cout_full - cout_low
      if not d_out or (params - p_out) % d_out:
        continue
      p1, p2 = 0, (params - p_out) // d_out
    elif in_var is not None:  # cout constant
      p_in, cin_low, _ = at(in_var)
      d_in = cout_full * (cin_full**alpha - cin_low**alpha)
      if not d_in or (params - p_in) % d_in:
        continue
      p1, p2 = (params - p_in) // d_in, 0
    else:
      p1, p2 = 0, 0
    p3 = params - p1 * cin_full**alpha * cout_full - p2 * cout_full

    def predict(multipliers, p1=p1, p2=p2, p3=p3, alpha=alpha):
      cin = cin_full if in_var is None else channels(cin_full, multipliers[in_var])
      cout = cout_full if out_var is None else channels(cout_full, multipliers[out_var])
      return p1 * cin**alpha * cout + p2 * cout + p3

    def probe(v):
      multipliers = [1.0] * len(probes)
      multipliers[v] = low
      return multipliers

    if all(predict(probe(v)) == probes[v][path][0] for v in range(len(probes))):
      return predict
  raise _UnsupportedModel(f"{path} parameters are not p1 * cin^a * cout + p2 * cout + p3")


def _part_of(path: str, task_names: Sequence[str]) -> int:
  """-1 for the encoder (and anything outside a decoder), else the task index."""
  for t, name in enumerate(task_names):
    if path.startswith(f"head_{name}/") or path == f"head_{name}":
      return t
  return -1


def build_cost_table(model: MultiTaskNet, image_shape: Sequence[int],
                     choices: Sequence[float] | None = None, *, direct: bool = False
                     ) -> CostTable:
  """The `CostTable` of `model` on images of shape (H, W, C), analytic (`models.cost`).

  A few abstract traces (the full network, then one per stage and decoder slimmed alone) give a
  per-layer model of MACs as a function of the multipliers, from which every configuration is
  computed in numpy; it is checked against direct counts of three configurations. Networks it
  does not describe (or `direct=True`) are counted configuration by configuration (slow:
  encoder configurations x choices traces).
  """
  image_shape = tuple(int(d) for d in image_shape)
  choices = _sorted_choices(choices or model.width_choices or WIDTH_CHOICES)
  num_stages, task_names = model.num_stages, tuple(t.name for t in model.tasks)
  num_tasks = len(task_names)
  encoders = tuple(tuple(float(m) for m in e) for e in encoder_configs(num_stages, choices))
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  enc = np.zeros((len(encoders),), np.int64)
  dec = np.zeros((len(encoders), num_tasks, len(choices)), np.int64)
  enc_params, dec_params = np.zeros_like(enc), np.zeros_like(dec)
  described = None
  if not direct:
    try:
      described = _layer_model(model, variables, image_shape, choices, num_stages, num_tasks)
      param_layers = _param_model(model, variables, image_shape, choices, num_stages, num_tasks)
    except _UnsupportedModel:
      described = None
  if described is not None:
    parts = [_part_of(path, task_names) for path, _, _ in described]
    encoder_layers = [d for p, d in zip(parts, described) if p < 0]
    decoder_layers = [(p, d) for p, d in zip(parts, described) if p >= 0]
    for e, encoder in enumerate(encoders):
      multipliers = list(encoder) + [1.0] * num_tasks
      enc[e] = sum(predict(multipliers, alpha, taps)
                   for _, (alpha, taps), predict in encoder_layers)
      for c, m in enumerate(choices):
        multipliers = list(encoder) + [m] * num_tasks
        for part, (_, (alpha, taps), predict) in decoder_layers:
          dec[e, part, c] += predict(multipliers, alpha, taps)
    for path, predict in param_layers:
      part = _part_of(path, task_names)
      for e, encoder in enumerate(encoders):
        if part < 0:
          enc_params[e] += predict(list(encoder) + [1.0] * num_tasks)
          continue
        for c, m in enumerate(choices):
          dec_params[e, part, c] += predict(list(encoder) + [m] * num_tasks)
  else:
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    for e, encoder in enumerate(encoders):
      for c, m in enumerate(choices):
        # One trace per configuration gives both: MACs per call, parameters once per layer.
        records = cost_lib.count_layers(model, variables, images,
                                        widths=WidthConfig(encoder, (m,) * num_tasks),
                                        train=False)
        params: dict[str, int] = {}
        for record in records:
          params[record.path] = max(params.get(record.path, 0), int(record.params))
          part = _part_of(record.path, task_names)
          if part < 0:
            if c == 0:
              enc[e] += record.macs
          else:
            dec[e, part, c] += record.macs
        for path, count in params.items():
          part = _part_of(path, task_names)
          if part < 0:
            if c == 0:
              enc_params[e] += count
          else:
            dec_params[e, part, c] += count
  table = CostTable(model_signature(model, image_shape, choices), image_shape, choices,
                    num_stages, task_names, encoders, enc, dec, enc_params, dec_params)
  if described is not None:
    # Guard the per-layer model with direct counts of a few configurations.
    mixed = WidthConfig(tuple(choices[i % len(choices)] for i in range(num_stages)),
                        tuple(choices[(i + 1) % len(choices)] for i in range(num_tasks)))
    for config in (WidthConfig.full(num_stages, num_tasks),
                   WidthConfig.smallest(num_stages, num_tasks, choices), mixed):
      images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
      counted = cost_lib.count(model, variables, images, widths=config, train=False)
      if (counted.macs, counted.params) != (table.macs(config), table.params(config)):
        return build_cost_table(model, image_shape, choices, direct=True)
  return table


_COST_TABLES: dict[str, CostTable] = {}


def cached_cost_table(model: MultiTaskNet, image_shape: Sequence[int],
                      choices: Sequence[float] | None = None,
                      path: str | os.PathLike | None = None) -> CostTable:
  """`build_cost_table`, computed once per model, image shape and choices.

  Kept in memory, and in the JSON file `path` when given (a file built for another network or
  image shape is rebuilt and overwritten).
  """
  choices = _sorted_choices(choices or model.width_choices or WIDTH_CHOICES)
  signature = model_signature(model, image_shape, choices)
  on_disk = None
  if path is not None and files_lib.exists(path):
    try:
      on_disk = CostTable.load(path)
    except (files_lib.DamagedFile, KeyError, TypeError, ValueError) as error:
      print(f"{error}; rebuilding the cost table.", flush=True)
  if on_disk is not None and on_disk.signature != signature:
    on_disk = None  # built for another network, image size or choice set
  table = _COST_TABLES.get(signature) or on_disk or build_cost_table(model, image_shape, choices)
  _COST_TABLES[signature] = table
  if path is not None and on_disk is None:
    table.save(path)
  return table
