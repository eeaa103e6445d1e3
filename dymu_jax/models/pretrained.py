"""ImageNet-pretrained backbones from a local file in the common PyTorch (torchvision) layout.

Three file formats are read, none needs torch:

- `.safetensors` (recommended: data only, nothing in it can run), e.g. written by
  `safetensors.torch.save_file(model.state_dict(), path)`; every tensor's byte range and size
  are checked against the file before it is read;
- `.npz`: arrays keyed by torchvision names (`conv1.weight`, `bn1.running_mean`,
  `layer1.0.conv1.weight`, `features.0.0.weight`, ...), e.g. written by
  `np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})`;
- `.pth` / `.pt`: a checkpoint written by `torch.save(state_dict, path)` (the zip format of
  torch >= 1.6). Its pickle is read with an unpickler that only knows the handful of classes a
  state dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the storage
  types), so a file cannot run code on load.

Names are mapped to our Flax variables (see the tables in `models/backbones.py`: kernels
OIHW -> HWIO, batch-norm weight and bias into "params", running statistics into "batch_stats");
the classifier head (`fc.*`, `classifier.*`) and
`num_batches_tracked` counters are skipped. A file whose names or shapes do not match our model
is rejected with one sentence naming the first offending key.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

PyTree = Any

# --------------------------------------------------------------------------------------------
# Reading a PyTorch zip checkpoint without torch.
# --------------------------------------------------------------------------------------------

# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for `torch.<X>Storage` inside the pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _is_count(value) -> bool:
  """A plain non-negative int small enough for numpy's strides (bool excluded)."""
  return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 40


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  """`torch._utils._rebuild_tensor_v2`: a strided view into a flat storage, copied.

  Every number of the view is checked before `as_strided` sees it: a crafted file with a
  negative or oversized stride, offset or size would otherwise read memory outside the storage.
  """
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise ValueError(f"a tensor must be rebuilt from a torch storage, got "
                     f"{type(storage).__name__}.")
  if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
          and len(size) == len(stride)
          and all(_is_count(v) for v in (storage_offset, *size, *stride))):
    raise ValueError(f"tensor of size {size!r}, stride {stride!r} and offset "
                     f"{storage_offset!r}: sizes, strides and the offset must be non-negative "
                     f"integers, one stride per dimension.")
  size, stride = tuple(size), tuple(stride)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
  if needed > storage.size:
    raise ValueError(f"tensor of size {size} and stride {stride} at offset {storage_offset} "
                     f"reads past its storage of {storage.size} elements.")
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=[s * itemsize for s in stride]).copy()


def _rebuild_parameter(data, *unused_args):
  """`torch._utils._rebuild_parameter`: a Parameter is its data here."""
  return data


# (module, name) -> the object the unpickler may build; everything else is refused.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a torch.save'd state dict; storages come from the zip's `data/<key>` records."""

  def __init__(self, file, path: str, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._path = path
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ValueError(
          f"{self._path} refers to {module}.{name}, which a state dict never needs; only "
          "tensors in (ordered) dicts are loaded.") from None

  def persistent_load(self, pid):
    # torch.save writes ("storage", storage_type, key, location, numel) for each storage.
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f"{self._path} has an unknown persistent id {pid!r}; expected torch "
                       "storages ('storage', type, key, location, numel).")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      raw = self._archive.read(record)
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      if len(raw) < numel * dtype.itemsize:
        raise ValueError(f"{self._path} record {record} has {len(raw)} bytes but its storage "
                         f"needs {numel} x {dtype.itemsize}.")
      array = np.frombuffer(raw, dtype=dtype, count=numel)
      self._storages[key] = array.astype(storage_type.dtype, copy=False)
    return self._storages[key]


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads a `torch.save` zip checkpoint into {name: numpy array}, without torch.

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    The pickled object: usually an ordered dict of numpy arrays.

  Raises:
    ValueError: the file is not a zip checkpoint (e.g. the legacy pre-1.6 format), or its pickle
      refers to anything beyond dicts and tensors (nothing else is ever built or run).
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a PyTorch zip checkpoint; re-save it with torch>=1.6 "
                     "`torch.save(state_dict, path)` or convert it to .npz.")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path} holds {len(pickles)} data.pkl records; a torch.save checkpoint "
                       "holds exactly one (<archive>/data.pkl).")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    unpickler = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), path, archive, prefix,
                                byteorder)
    return unpickler.load()


# --------------------------------------------------------------------------------------------
# Our variable names <-> torchvision state-dict names (tables in `models/backbones.py`).
# --------------------------------------------------------------------------------------------

PRETRAINED_BACKBONES = ("resnet18", "resnet34", "mobilenet_v2")
# The file formats `read_state_dict` reads.
FILE_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")
# State-dict entries that are not encoder weights: the ImageNet classifier and BN step counters.
_HEAD_PREFIXES = {"resnet18": ("fc.",), "resnet34": ("fc.",), "mobilenet_v2": ("classifier.",)}
_SKIPPED_SUFFIXES = (".num_batches_tracked",)

# (collection, our leaf name) -> torch suffix, for convolutions and batch norms.
_CONV_LEAVES = {("params", "kernel"): "weight", ("params", "bias"): "bias"}
_NORM_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
                ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _resnet_module(path: tuple[str, ...], unused_block_params) -> str | None:
  """torchvision module name of one of our ResNet modules, e.g. stage1_block0/conv1."""
  if path == ("stem_conv",):
    return "conv1"
  if path == ("stem_bn",):
    return "bn1"
  if len(path) == 2:
    match = re.fullmatch(r"stage(\d+)_block(\d+)", path[0])
    if match:
      layer = f"layer{match.group(1)}.{match.group(2)}"
      renamed = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
      if path[1] in ("conv1", "bn1", "conv2", "bn2"):
        return f"{layer}.{path[1]}"
      if path[1] in renamed:
        return f"{layer}.{renamed[path[1]]}"
  return None


def _mobilenet_module(path: tuple[str, ...], block_params) -> str | None:
  """torchvision module name of one of our MobileNetV2 modules, e.g. block3/depthwise_conv."""
  if path[0] in ("stem_conv", "stem_bn") and len(path) == 1:
    return f"features.0.{int(path[0] == 'stem_bn')}"
  if path[0] in ("last_conv", "last_bn") and len(path) == 1:
    num_blocks = sum(1 for name in block_params if re.fullmatch(r"block\d+", name))
    return f"features.{num_blocks + 1}.{int(path[0] == 'last_bn')}"
  match = re.fullmatch(r"block(\d+)", path[0])
  if match and len(path) == 2:
    # Without expansion (t = 1) torchvision's `conv` Sequential starts at the depthwise conv.
    first = 1 if "expand_conv" in block_params[path[0]] else 0
    index = {"expand_conv": "0.0", "expand_bn": "0.1",
             "depthwise_conv": f"{first}.0", "depthwise_bn": f"{first}.1",
             "project_conv": f"{first + 1}", "project_bn": f"{first + 2}"}.get(path[1])
    if index is not None:
      return f"features.{match.group(1)}.conv.{index}"
  return None


_MODULE_NAMERS = {"resnet18": _resnet_module, "resnet34": _resnet_module,
                  "mobilenet_v2": _mobilenet_module}


def _check_backbone(backbone_name: str) -> None:
  if backbone_name not in PRETRAINED_BACKBONES:
    raise ValueError(
        f"No torchvision checkpoint layout is known for backbone {backbone_name!r}; pretrained "
        f"weights can be loaded for {', '.join(PRETRAINED_BACKBONES)}.")


def _subtree(tree: Mapping[str, Any], prefix: tuple[str, ...], what: str) -> Mapping[str, Any]:
  for name in prefix:
    if not isinstance(tree, Mapping) or name not in tree:
      raise ValueError(f"variables[{what!r}] has no module {'/'.join(prefix)!r}; pass the "
                       "prefix under which the backbone's variables live.")
    tree = tree[name]
  return tree


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()):
  for name, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, path + (name,))
    else:
      yield path + (name,), value


def torchvision_layout(backbone_name: str, variables: PyTree, prefix: Sequence[str] = ()
                       ) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """The torchvision state-dict entries our backbone's variables correspond to.

  Args:
    backbone_name: one of `PRETRAINED_BACKBONES`.
    variables: Flax variables holding the backbone (e.g. from `backbone.init` or
      `jax.eval_shape` of it) with "params" and "batch_stats".
    prefix: module path of the backbone inside `variables` (e.g. ("encoder",)); () when the
      variables are the backbone's own.

  Returns:
    {torch name: ((collection, *our path), torch shape)}, e.g.
    `"layer1.0.conv1.weight": (("params", "stage1_block0", "conv1", "kernel"), (64, 64, 3, 3))`.
  """
  _check_backbone(backbone_name)
  prefix = tuple(prefix)
  params = _subtree(variables.get("params", {}), prefix, "params")
  namer = _MODULE_NAMERS[backbone_name]
  layout = {}
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      continue
    for path, leaf in _leaves(_subtree(variables[collection], prefix, collection)):
      module_path, leaf_name = path[:-1], path[-1]
      module = namer(module_path, params) if module_path else None
      is_norm = bool(module_path) and re.search(r"bn\d*$", module_path[-1]) is not None
      kind = _NORM_LEAVES if is_norm else _CONV_LEAVES
      suffix = kind.get((collection, leaf_name))
      if module is None or suffix is None:
        raise ValueError(
            f"Our {backbone_name} variable {collection}/{'/'.join(path)} has no torchvision "
            "counterpart; is this the default-width backbone?")
      shape = tuple(leaf.shape)
      if len(shape) == 4:  # HWIO -> OIHW (a depthwise (kh, kw, 1, C) -> (C, 1, kh, kw)).
        shape = (shape[3], shape[2], shape[0], shape[1])
      layout[f"{module}.{suffix}"] = ((collection,) + prefix + path, shape)
  return layout


def _to_ours(array: np.ndarray) -> np.ndarray:
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array


# safetensors dtype names -> numpy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} from a `.safetensors` file, without the safetensors package.

  Layout: an 8-byte little-endian header length n, n bytes of JSON ({name: {"dtype", "shape",
  "data_offsets": [begin, end]}}, plus an optional "__metadata__"), then the tensors' bytes.
  Every range must lie inside the file and match its dtype and shape.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path} is too short to be a .safetensors file.")
    header_size = int.from_bytes(head, "little")
    if header_size > min(size - 8, 100_000_000):
      raise ValueError(f"{path} declares a {header_size}-byte header in a {size}-byte file; "
                       "it is not a valid .safetensors file.")
    try:
      header = json.loads(f.read(header_size))
    except ValueError as error:
      raise ValueError(f"{path} has an unreadable .safetensors header ({error}).") from None
    data = f.read()
  if not isinstance(header, dict):
    raise ValueError(f"{path}: the .safetensors header must be a JSON object.")
  state = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
      shape = tuple(entry["shape"])
      begin, end = entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: tensor {name!r} needs a known dtype ("
                       f"{', '.join(_SAFETENSORS_DTYPES)}), a shape and data_offsets; got "
                       f"{entry!r}.") from None
    counts = (begin, end, *shape)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
      raise ValueError(f"{path}: tensor {name!r} has a negative or non-integer shape or offset "
                       f"({entry!r}).")
    if not begin <= end <= len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name!r} of shape {shape} ({dtype}) claims bytes "
                       f"{begin}..{end} of a {len(data)}-byte data section.")
    state[name] = np.frombuffer(data, dtype.newbyteorder("<"), int(np.prod(shape)),
                                begin).astype(dtype).reshape(shape)
  return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{torch name: numpy array} from a `.safetensors`, `.npz` or `.pth`/`.pt` checkpoint."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Pretrained weights file {path} does not exist.")
  if path.endswith(".safetensors"):
    state = read_safetensors(path)
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      state = {name: data[name] for name in data.files}
  elif path.endswith((".pth", ".pt")):
    state = read_torch_checkpoint(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(
        state["state_dict"], Mapping):
      state = state["state_dict"]  # a training checkpoint {"state_dict": ..., ...}.
  else:
    raise ValueError(f"Pretrained weights file {path} must end in .safetensors, .npz, .pth or "
                     ".pt.")
  if not isinstance(state, Mapping) or not all(isinstance(v, np.ndarray) or np.isscalar(v)
                                               for v in state.values()):
    raise ValueError(f"{path} does not hold a state dict of tensors keyed by name.")
  # Checkpoints saved from nn.DataParallel prefix every name with "module.".
  if state and all(name.startswith("module.") for name in state):
    state = {name[len("module."):]: value for name, value in state.items()}
  return {name: np.asarray(value) for name, value in state.items()}


def load_pretrained(backbone_name: str, variables: PyTree, path: str,
                    prefix: Sequence[str] = ()) -> PyTree:
  """Returns `variables` with the backbone's weights replaced by a torchvision checkpoint's.

  Args:
    backbone_name: "resnet18", "resnet34" or "mobilenet_v2" (full width, as torchvision).
    variables: Flax variables {"params": ..., "batch_stats": ...} of the backbone, or of a
      model holding it under `prefix`; other variables (decoders...) are returned unchanged.
    path: a `.safetensors` or `.npz` of arrays keyed by torchvision names, or a `.pth`/`.pt`
      torch.save file.
    prefix: module path of the backbone inside `variables`, e.g. ("encoder",).

  Returns:
    New variables of the same structure and dtypes; kernels OIHW -> HWIO, batch-norm weight,
    bias into "params" and running mean, variance into "batch_stats". The classifier head and
    `num_batches_tracked` are skipped.

  Raises:
    ValueError: a name that our backbone does not have, a shape that differs from ours, or
      names of ours that the file lacks (one sentence naming the key).
  """
  layout = torchvision_layout(backbone_name, variables, prefix)
  state = read_state_dict(path)
  heads = _HEAD_PREFIXES[backbone_name]
  by_path = {}
  for name, array in state.items():
    if name.startswith(heads) or name.endswith(_SKIPPED_SUFFIXES):
      continue
    if name not in layout:
      raise ValueError(
          f"{path} has weight {name!r} of shape {tuple(array.shape)}, which a torchvision "
          f"{backbone_name} does not have (expected names such as {next(iter(layout))!r}).")
    ours, expected = layout[name]
    if tuple(array.shape) != expected:
      raise ValueError(
          f"{path} has {name!r} of shape {tuple(array.shape)} but {backbone_name} expects "
          f"shape {expected} (our variable {'/'.join(ours)}).")
    by_path[ours] = _to_ours(array)
  missing = [name for name, (ours, _) in layout.items() if ours not in by_path]
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise ValueError(f"{path} lacks {len(missing)} of the {len(layout)} {backbone_name} "
                     f"weights: {shown}.")

  def replace(key_path, leaf):
    ours = tuple(str(getattr(k, "key", k)) for k in key_path)
    if ours not in by_path:
      return leaf
    return jnp.asarray(by_path[ours], dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(replace, variables)
