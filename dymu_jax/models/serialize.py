"""Standalone export of a network: its definition as JSON and its variables as msgpack.

Three kinds of network are stored: a `MultiTaskNet` (static, PCGrad, GradSplit, PHN's generated
network, ECMT's sliced SubNet); `SingleTaskNets` (the single-task baselines: definition
`{"kind": "single_task_nets", "networks": [one MultiTaskNet definition per task]}`); and a
`branched.TreeNetwork` (one DYMU tree on the anchor's streams, with its batch-norm shifts
applied; definition `{"kind": "branched_tree", ...}`: the `build_branched` options, the tasks,
the tree's parents and the input normalisation).

An exported SubNet (`ecmt.slice_subnet`) is a network of its own; this module writes it to a
folder that needs nothing else to be run again (no SuperNet, no checkpoint, no flags):

  save_network("export/b50", sub, sub_variables, image_shape=(32, 32, 3),
               extra={"widths": config, "macs": table.macs(config), "budget": 0.5})
  net, variables, extra = load_network("export/b50")
  predictions = net.apply(variables, images)
  ages = net.tasks[0].label_units(predictions["age"])  # regression back in the label's units

The folder holds two files:

* `network.json`: `{"format", "version", "network": network_to_json(net), "image_shape",
  "variables": {"file", "sha256"}, "extra"}`. The image shape is part of the definition because
  some layers' kernels cover the whole feature map (LeNet's fc); `extra` is free metadata
  (widths, MACs, preference, budget, source workdir...), stored as JSON (tuples come back as
  lists, a `WidthConfig` as {"encoder": [...], "decoders": [...]}).
* `variables.msgpack`: `flax.serialization.to_bytes` of the variables as numpy arrays. On
  loading, its tree and every shape are checked against `jax.eval_shape` of the network's
  `init` at the saved image shape, and its SHA-256 against the one in `network.json`.

Every problem a user can hit (a missing folder or file, a corrupt or hand-edited file, an
unknown task kind or backbone option) is one `SavedNetworkError` (a ValueError) sentence that
names the path.

(Over 500 lines: one file format for every kind of network a method deploys, with the writer,
the reader and the checks that refuse a damaged or foreign file side by side, so the format
cannot drift between them.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones
from dymu_jax.models import branched
from dymu_jax.models.multitask import MultiTaskNet, SingleTaskNets
from dymu_jax.models.widths import WidthConfig

PyTree = Any

FORMAT = "dymu_jax.network"
# Bump when the meaning of a stored key changes; loaders refuse other versions.
VERSION = 1
NETWORK_FILE = "network.json"
VARIABLES_FILE = "variables.msgpack"

# The fields of a stored task, in `tasks_lib.Task` order.
TASK_KEYS = tuple(f.name for f in dataclasses.fields(tasks_lib.Task))
# Task fields added after version 1 was first written: a stored task without them takes these.
OPTIONAL_TASK_FIELDS = {"label_offset": 0.0}
# Keys of `network_to_json`'s record besides "version" and "tasks".
NETWORK_FIELDS = ("backbone", "backbone_kwargs", "head_width", "head_widths",
                  "head_hidden_layers", "head_batch_norm", "atrous_rates", "image_pooling",
                  "pixel_mean", "pixel_std", "width_choices", "bn_momentum", "bn_axis_name")
# Fields added after version 1 was first written: a record without them takes these values.
OPTIONAL_FIELDS = {"head_batch_norm": False}
_TOP_KEYS = ("format", "version", "network", "image_shape", "variables", "extra")
# A DYMU tree's definition (`TreeNetwork`): "kind" tells it from a MultiTaskNet's.
TREE_KIND = "branched_tree"
TREE_FIELDS = ("version", "kind", "tasks", "builder", "tree", "pixel_mean", "pixel_std")
SINGLE_TASK_KIND = "single_task_nets"


class SavedNetworkError(ValueError):
  """A saved network that cannot be read: missing, corrupt or not matching its definition."""


# ----------------------------------------------------------------------------------------------
# JSON values.


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_json_value(value, what: str):
  """A JSON value for an option (tuples become lists), or one ValueError sentence."""
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (np.bool_, np.integer, np.floating)):
    value = value.item()
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(f"{what} is {value}, which JSON cannot store; use a finite number.")
    return value
  if isinstance(value, (tuple, list)):
    return [_to_json_value(v, what) for v in value]
  raise ValueError(f"{what} is a {type(value).__name__} ({value!r}); a saved network can only "
                   f"hold None, booleans, numbers, strings and tuples of them.")


def _to_tuple(value):
  """JSON lists as (nested) tuples: every sequence option of the models is a tuple."""
  if isinstance(value, list):
    return tuple(_to_tuple(v) for v in value)
  return value


def _check_type(key: str, value, kind: str) -> None:
  """Raises one ValueError sentence when a stored field is not of `kind`."""
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  checks = {
      "str": lambda v: isinstance(v, str),
      "int": is_int,
      "number": _is_number,
      "bool": lambda v: isinstance(v, bool),
      "optional str": lambda v: v is None or isinstance(v, str),
      "list of ints": lambda v: isinstance(v, list) and all(is_int(x) for x in v),
      "optional list of ints": lambda v: v is None or (
          isinstance(v, list) and all(is_int(x) for x in v)),
      "optional list of numbers": lambda v: v is None or (
          isinstance(v, list) and all(_is_number(x) for x in v)),
  }
  if not checks[kind](value):
    raise ValueError(f"Network field {key!r} must be {_kind_text(kind)}, got {value!r}.")


def _kind_text(kind: str) -> str:
  articles = {"int": "an int", "number": "a number", "bool": "a boolean", "str": "a string",
              "optional str": "null or a string", "list of ints": "a list of ints"}
  return articles.get(kind, kind.replace("optional ", "null or a "))


_FIELD_KINDS = {
    "backbone": "str", "head_width": "int", "head_widths": "optional list of ints",
    "head_hidden_layers": "int", "head_batch_norm": "bool", "atrous_rates": "list of ints", "image_pooling": "bool",
    "pixel_mean": "optional list of numbers", "pixel_std": "optional list of numbers",
    "width_choices": "optional list of numbers", "bn_momentum": "number",
    "bn_axis_name": "optional str",
}


def _model_fields() -> set[str]:
  return {f.name for f in dataclasses.fields(MultiTaskNet)} - {"parent", "name"}


# ----------------------------------------------------------------------------------------------
# The network definition.


def _key_mismatch(record: Mapping[str, Any], expected: Sequence[str]) -> str | None:
  """"missing key(s) [...] and unknown key(s) [...]; it needs exactly ..." when the keys of
  `record` are not exactly `expected` (listed in the given order), else None."""
  missing = sorted(set(expected) - set(record))
  unknown = sorted(set(record) - set(expected))
  if not (missing or unknown):
    return None
  return (f"missing key(s) [{', '.join(missing)}] and unknown key(s) [{', '.join(unknown)}]; "
          f"it needs exactly {', '.join(expected)}")


def _tasks_from_json(value) -> tuple[tasks_lib.Task, ...]:
  if not isinstance(value, list) or not value:
    raise ValueError(f"Network field 'tasks' must be a non-empty list, got {value!r}.")
  return tuple(_task_from_json(t, i) for i, t in enumerate(value))


def _tasks_to_json(tasks) -> list:
  return [{k: _to_json_value(getattr(t, k), f"Task {t.name!r} field {k!r}") for k in TASK_KEYS}
          for t in tasks]


def _tree_to_json(model: branched.TreeNetwork) -> dict:
  net = model.net
  if not net.build_options:
    raise ValueError("This BranchedNet was not made by branched.build_branched, so its blocks "
                     "cannot be described for export; build it with build_branched.")
  stats = lambda v: None if v is None else [float(x) for x in v]
  return {
      "version": VERSION, "kind": TREE_KIND, "tasks": _tasks_to_json(net.tasks),
      "builder": [[str(k), _to_json_value(v, f"branched option {k!r}")]
                  for k, v in net.build_options],
      "tree": [list(row) for row in model.tree.parents],
      "pixel_mean": stats(net.pixel_mean), "pixel_std": stats(net.pixel_std),
  }


def _tree_from_json(record: Mapping[str, Any]) -> branched.TreeNetwork:
  mismatch = _key_mismatch(record, sorted(TREE_FIELDS))
  if mismatch:
    raise ValueError(f"The tree network definition has {mismatch}.")
  tasks = _tasks_from_json(record["tasks"])
  pairs = record["builder"]
  if not isinstance(pairs, list) or not all(
      isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
    raise ValueError(f"Network field 'builder' must be a list of [name, value] pairs, got "
                     f"{pairs!r}.")
  options = {k: _to_tuple(v) for k, v in pairs}
  if isinstance(options.get("backbone_kwargs"), tuple):  # stored as [name, value] pairs
    options["backbone_kwargs"] = {k: v for k, v in options["backbone_kwargs"]}
  for key in ("pixel_mean", "pixel_std"):
    _check_type(key, record[key], "optional list of numbers")
  try:
    net = branched.build_branched(tasks, **options)
  except TypeError as e:  # an option build_branched does not take
    raise ValueError(f"Network field 'builder' does not fit branched.build_branched: {e}.") from None
  net = dataclasses.replace(
      net, pixel_mean=None if record["pixel_mean"] is None else tuple(record["pixel_mean"]),
      pixel_std=None if record["pixel_std"] is None else tuple(record["pixel_std"]))
  tree = record["tree"]
  if not (isinstance(tree, list) and all(isinstance(row, list) for row in tree)):
    raise ValueError(f"Network field 'tree' must be a list of lists of parent indices, got "
                     f"{tree!r}.")
  parents = branched.Tree(tuple(tuple(row) for row in tree)).validate(net.num_layers,
                                                                       net.num_tasks)
  return branched.TreeNetwork(net, parents)


def network_to_json(model: MultiTaskNet | branched.TreeNetwork) -> dict:
  """The definition of `model` as a JSON-able dict (every field; see `network_from_json`).

  Raises:
    ValueError: an option JSON cannot hold (e.g. a function in backbone_kwargs), or a
      `MultiTaskNet` field this format does not know (the format must be extended first).
  """
  if isinstance(model, branched.TreeNetwork):
    return _tree_to_json(model)
  if isinstance(model, SingleTaskNets):
    return {"version": VERSION, "kind": SINGLE_TASK_KIND,
            "networks": [network_to_json(net) for net in model.networks]}
  if not isinstance(model, MultiTaskNet):
    raise ValueError(f"network_to_json needs a MultiTaskNet or a branched.TreeNetwork, got "
                     f"{type(model).__name__}.")
  unknown = sorted(_model_fields() - set(NETWORK_FIELDS) - {"tasks"})
  if unknown:
    raise ValueError(f"MultiTaskNet field(s) {', '.join(unknown)} have no place in saved "
                     f"network version {VERSION}; extend dymu_jax.models.serialize first.")
  options = model.backbone_kwargs
  if dataclasses.is_dataclass(options):  # stored as the equivalent (name, value) pairs
    options = tuple((f.name, getattr(options, f.name)) for f in dataclasses.fields(options))
  record = {"version": VERSION, "tasks": _tasks_to_json(model.tasks)}
  for key in NETWORK_FIELDS:
    if key == "backbone_kwargs":
      record[key] = [[str(k), _to_json_value(v, f"backbone option {k!r}")] for k, v in options]
    else:
      record[key] = _to_json_value(getattr(model, key), f"Network field {key!r}")
  return record


def _task_from_json(entry, index: int) -> tasks_lib.Task:
  if not isinstance(entry, dict):
    raise ValueError(f"Task {index} must be an object with keys {', '.join(TASK_KEYS)}, got "
                     f"{entry!r}.")
  entry = {**OPTIONAL_TASK_FIELDS, **entry}
  missing = [k for k in TASK_KEYS if k not in entry]
  unknown = sorted(set(entry) - set(TASK_KEYS))
  if missing or unknown:
    raise ValueError(f"Task {index} has missing key(s) [{', '.join(missing)}] and unknown "
                     f"key(s) [{', '.join(unknown)}]; a task has exactly {', '.join(TASK_KEYS)}.")
  name, kind, outputs = entry["name"], entry["kind"], entry["num_outputs"]
  if not isinstance(name, str) or not isinstance(kind, str) or not (
      isinstance(outputs, int) and not isinstance(outputs, bool)):
    raise ValueError(f"Task {index} needs a string name and kind and an int num_outputs, got "
                     f"{name!r}, {kind!r} and {outputs!r}.")
  if not isinstance(entry["loss_type"], str) or not _is_number(entry["label_scale"]) or not (
      _is_number(entry["label_offset"])) or not (
      entry["pos_weight"] is None or _is_number(entry["pos_weight"])):
    raise ValueError(f"Task {name!r} needs a string loss_type, numbers label_scale and "
                     f"label_offset and a number or null pos_weight.")
  # Task checks the kind itself: an unknown kind is one sentence listing the allowed kinds.
  return tasks_lib.Task(name, kind, outputs, entry["loss_type"], entry["pos_weight"],
                        float(entry["label_scale"]), float(entry["label_offset"]))


def network_from_json(record: Mapping[str, Any]) -> MultiTaskNet | branched.TreeNetwork:
  """The `MultiTaskNet` (or, with "kind": "branched_tree", the `TreeNetwork`) that
  `network_to_json` described.

  Raises:
    ValueError: (one sentence) a record that is not a dict, another version, missing or
      unknown keys, a field of the wrong type, an unknown task kind or backbone, or a backbone
      option the backbone does not take.
  """
  if not isinstance(record, Mapping):
    raise ValueError(f"A network definition must be a JSON object, got {type(record).__name__}.")
  if record.get("version") != VERSION:
    raise ValueError(f"Network definition version {record.get('version')!r} is not supported; "
                     f"this dymu_jax reads version {VERSION}.")
  if "kind" in record:
    if record["kind"] == TREE_KIND:
      return _tree_from_json(record)
    if record["kind"] == SINGLE_TASK_KIND:
      networks = record.get("networks")
      if set(record) != {"version", "kind", "networks"} or not isinstance(networks, list) or (
          not networks):
        raise ValueError(f"A {SINGLE_TASK_KIND!r} definition holds exactly version, kind and "
                         f"a non-empty list of networks, got keys {sorted(record)}.")
      nets = tuple(network_from_json(net) for net in networks)
      if any(not isinstance(net, MultiTaskNet) or len(net.tasks) != 1 for net in nets):
        raise ValueError(f"Each network of a {SINGLE_TASK_KIND!r} definition is a one-task "
                         f"MultiTaskNet.")
      return SingleTaskNets(nets)
    raise ValueError(f"Unknown network kind {record['kind']!r}; saved networks are "
                     f"MultiTaskNets (no kind), {SINGLE_TASK_KIND!r} or {TREE_KIND!r}.")
  record = {**OPTIONAL_FIELDS, **record}
  mismatch = _key_mismatch(record, sorted({"version", "tasks", *NETWORK_FIELDS}))
  if mismatch:
    raise ValueError(f"The network definition has {mismatch}.")
  for key, kind in _FIELD_KINDS.items():
    _check_type(key, record[key], kind)
  tasks = _tasks_from_json(record["tasks"])
  cls = backbones.get_backbone(record["backbone"])  # unknown: one sentence listing names
  allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  pairs = record["backbone_kwargs"]
  if not isinstance(pairs, list) or not all(
      isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
    raise ValueError(f"Network field 'backbone_kwargs' must be a list of [name, value] pairs, "
                     f"got {pairs!r}.")
  unknown_options = sorted({k for k, _ in pairs} - allowed)
  if unknown_options:
    raise ValueError(f"Backbone {record['backbone']!r} does not take option(s) "
                     f"{', '.join(unknown_options)}; it takes {', '.join(sorted(allowed))}.")
  fields = {key: _to_tuple(record[key]) for key in NETWORK_FIELDS}
  fields["backbone_kwargs"] = tuple((k, _to_tuple(v)) for k, v in pairs)
  fields["bn_momentum"] = float(fields["bn_momentum"])
  for key in ("pixel_mean", "pixel_std", "width_choices"):
    if fields[key] is not None:
      fields[key] = tuple(float(v) for v in fields[key])
  return MultiTaskNet(tasks=tasks, **fields)


# ----------------------------------------------------------------------------------------------
# Files.


def _jsonable_extra(value, where: str):
  """`extra` as JSON values (WidthConfig, numpy and tuples converted), or one sentence."""
  if isinstance(value, WidthConfig):
    return {"encoder": list(value.encoder), "decoders": list(value.decoders)}
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise ValueError(f"extra{where} has key {k!r}; extra metadata keys must be strings.")
      out[k] = _jsonable_extra(v, f"{where}[{k!r}]")
    return out
  if isinstance(value, (list, tuple)):
    return [_jsonable_extra(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.ndarray):
    return _jsonable_extra(value.tolist(), where)
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  return _to_json_value(value, f"extra{where}")


def _variable_shapes(model, image_shape: Sequence[int]) -> PyTree:
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  if isinstance(model, branched.TreeNetwork):  # the anchor's stacked streams
    return jax.eval_shape(lambda x: model.net.init(jax.random.key(0), x), images)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)


def _shape_mismatch(variables: PyTree, shapes: PyTree) -> str | None:
  """A description of the first difference in tree or shapes, or None when they match."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
            for path, leaf in leaves}

  have, want = flat(variables), flat(shapes)
  missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  if missing:
    return f"variable {missing[0]} is missing ({len(missing)} missing in all)"
  if unexpected:
    return f"variable {unexpected[0]} is not in the network ({len(unexpected)} such)"
  for name in sorted(want):
    if have[name] != want[name]:
      return f"variable {name} has shape {have[name]} but the network has {want[name]}"
  return None


def save_network(directory: str | os.PathLike, model: MultiTaskNet | branched.TreeNetwork,
                 variables: PyTree,
                 extra: Mapping[str, Any] | None = None, *,
                 image_shape: Sequence[int]) -> None:
  """Writes `network.json` and `variables.msgpack` to `directory` (created if needed).

  Args:
    directory: the export folder; existing files of these names are replaced.
    model: the network (e.g. the SubNet of `ecmt.slice_subnet`, run at its full widths, or a
      DYMU `branched.TreeNetwork` with the anchor's variables).
    variables: its variables ({"params": ..., "batch_stats": ...}), shaped as its `init` gives
      them at `image_shape`.
    extra: JSON-able metadata kept next to the definition (widths, MACs, preference, budget,
      source workdir...).
    image_shape: (H, W, C) of the images the network was built for, or (D,) for feature
      vectors (an MLP backbone).

  Raises:
    ValueError: variables that do not fit the network at `image_shape`, or a definition or
      `extra` that JSON cannot hold.
  """
  directory = os.fspath(directory)
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) not in (1, 3) or min(image_shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C) for images or (D,) for feature vectors, "
                     f"with positive sizes, got {image_shape}.")
  definition = network_to_json(model)
  mismatch = _shape_mismatch(variables, _variable_shapes(model, image_shape))
  if mismatch:
    raise ValueError(f"The variables do not fit the network at image shape {image_shape}: "
                     f"{mismatch}.")
  data = flax.serialization.to_bytes(jax.tree.map(np.asarray, variables))
  record = {
      "format": FORMAT, "version": VERSION, "network": definition,
      "image_shape": list(image_shape),
      "variables": {"file": VARIABLES_FILE, "sha256": hashlib.sha256(data).hexdigest()},
      "extra": _jsonable_extra(dict(extra or {}), ""),
  }
  text = json.dumps(record, indent=2, allow_nan=False) + "\n"
  folder = files_lib.makedirs(directory)  # any epath filesystem (gs://...)
  files_lib.atomic_write(folder / VARIABLES_FILE, data)
  files_lib.atomic_write(folder / NETWORK_FILE, text)


def _read_record(path: str) -> dict:
  try:
    record = json.loads(files_lib.read_bytes(path).decode("utf-8"))
  except json.JSONDecodeError as e:
    raise SavedNetworkError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column "
                            f"{e.colno}).") from None
  except UnicodeDecodeError:
    raise SavedNetworkError(f"{path} is not UTF-8 text, so not a saved network.json.") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise SavedNetworkError(f"{path} is not a saved dymu_jax network (no \"format\": "
                            f"\"{FORMAT}\").")
  if record.get("version") != VERSION:
    raise SavedNetworkError(f"{path} has version {record.get('version')!r}; this dymu_jax "
                            f"reads version {VERSION}.")
  mismatch = _key_mismatch(record, _TOP_KEYS)
  if mismatch:
    raise SavedNetworkError(f"{path} has {mismatch}.")
  shape, files = record["image_shape"], record["variables"]
  if not (isinstance(shape, list) and len(shape) in (1, 3) and all(
      isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
    raise SavedNetworkError(f"{path} has image_shape {shape!r}; it must be [H, W, C] (images) "
                            f"or [D] (feature vectors) of positive ints.")
  if not (isinstance(files, dict) and set(files) == {"file", "sha256"}
          and files["file"] == VARIABLES_FILE and isinstance(files["sha256"], str)):
    raise SavedNetworkError(f"{path} has variables {files!r}; it must be {{\"file\": "
                            f"\"{VARIABLES_FILE}\", \"sha256\": <hex digest>}}.")
  if not isinstance(record["extra"], dict):
    raise SavedNetworkError(f"{path} has extra {record['extra']!r}; it must be an object.")
  return record


def load_network(directory: str | os.PathLike
                 ) -> tuple[MultiTaskNet | branched.TreeNetwork, PyTree, dict]:
  """(network, variables, extra) from a folder written by `save_network`; needs nothing else.

  Returns:
    The network (run it at full width: `net.apply(variables, images)`), its variables as
    device arrays, and the `extra` metadata as JSON values.

  Raises:
    SavedNetworkError: (a ValueError; one sentence naming the path) a missing folder or file,
      a file that is corrupt or edited so that it no longer matches the other, or a definition
      with unknown or missing keys or unknown task kinds.
  """
  directory = os.fspath(directory)
  if not files_lib.is_dir(directory):
    raise SavedNetworkError(f"No saved network at {directory}: the folder does not exist.")
  json_path = os.path.join(directory, NETWORK_FILE)  # also gs://bucket/export/network.json
  vars_path = os.path.join(directory, VARIABLES_FILE)
  for path in (json_path, vars_path):
    if not files_lib.is_file(path):
      raise SavedNetworkError(f"The saved network in {directory} is incomplete: {path} is "
                              f"missing.")
  record = _read_record(json_path)
  try:
    model = network_from_json(record["network"])
  except ValueError as e:
    raise SavedNetworkError(f"{json_path} holds an invalid network definition: {e}") from None
  image_shape = tuple(record["image_shape"])
  data = files_lib.read_bytes(vars_path)
  if hashlib.sha256(data).hexdigest() != record["variables"]["sha256"]:
    raise SavedNetworkError(f"{vars_path} does not match the SHA-256 recorded in {json_path} "
                            f"(corrupt, or replaced after saving).")
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several ValueError/TypeError kinds on bad bytes
    raise SavedNetworkError(f"{vars_path} is not a readable msgpack file ({e}).") from None
  try:
    shapes = _variable_shapes(model, image_shape)
  except ValueError as e:
    raise SavedNetworkError(f"{json_path} describes a network that cannot be built for image "
                            f"shape {image_shape}: {e}") from None
  mismatch = _shape_mismatch(state, shapes)
  if mismatch:
    raise SavedNetworkError(f"{vars_path} does not fit the network in {json_path}: "
                            f"{mismatch}.")
  # The saved dtypes are kept; shapes were checked against the network's own init.
  variables = jax.device_put(jax.tree.map(np.asarray, state))
  return model, variables, record["extra"]
