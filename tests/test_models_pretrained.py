"""Tests of dymu_jax.models.pretrained: torchvision-layout .npz and hand-built .pth files."""

from __future__ import annotations

import functools
import json
import os
import pickle
import struct
import zipfile

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax.models import backbones, pretrained

from random_variables import torchvision_state

# A few names and shapes as torchvision's resnet18 / mobilenet_v2 state dicts have them.
KNOWN_RESNET18 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_mean": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn2.bias": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
}
KNOWN_MOBILENET_V2 = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_mean": (32,),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.1.conv.2.running_var": (16,),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.2.conv.3.bias": (24,),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "features.18.1.weight": (1280,),
}
# torchvision state dicts less the classifier and the `num_batches_tracked` counters.
NUM_ENTRIES = {"resnet18": 122 - 2 - 20, "resnet34": 218 - 2 - 36, "mobilenet_v2": 314 - 2 - 52}


@functools.lru_cache(maxsize=None)
def _zeros(name: str, size: int = 16):
  """Zero (numpy) variables of a backbone, built from shapes only: nothing is compiled."""
  net = backbones.get_backbone(name)()
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return net, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


class _Stop(Exception):
  pass


def _layer_io(net, variables, x, path: tuple[str, ...], **kwargs):
  """(input, output) of the first call of the layer at `path`, running eagerly only up to it."""
  def interceptor(next_fun, args, call_kwargs, context):
    out = next_fun(*args, **call_kwargs)
    if context.method_name == "__call__" and tuple(context.module.scope.path) == path:
      raise _Stop(args[0], out)
    return out

  with pytest.raises(_Stop) as stop, nn.intercept_methods(interceptor):
    net.apply(variables, x, **kwargs)
  return stop.value.args


def _conv_nchw(x_nhwc, weight_oihw, stride, padding, groups=1):
  """A convolution as PyTorch computes it, in its own layouts."""
  y = jax.lax.conv_general_dilated(
      jnp.transpose(x_nhwc, (0, 3, 1, 2)), jnp.asarray(weight_oihw), (stride, stride),
      ((padding, padding), (padding, padding)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
      feature_group_count=groups)
  return jnp.transpose(y, (0, 2, 3, 1))


# --- a torch.save zip written by hand ------------------------------------------------------

class _PickleWriter:
  """Emits the protocol-2 pickle opcodes torch.save writes for a state dict."""

  def __init__(self):
    self.out = bytearray(b"\x80\x02")  # PROTO 2
    self.memo: dict[tuple[str, str], int] = {}

  def global_(self, module: str, name: str):
    if (module, name) in self.memo:
      self.out += b"h" + bytes([self.memo[(module, name)]])  # BINGET
      return
    self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL
    self.memo[(module, name)] = len(self.memo)
    self.out += b"q" + bytes([self.memo[(module, name)]])  # BINPUT

  def str_(self, text: str):
    data = text.encode()
    self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

  def int_(self, value: int):
    self.out += b"J" + struct.pack("<i", value)  # BININT

  def tuple_(self, values):
    self.out += b"("  # MARK
    for v in values:
      self.int_(v)
    self.out += b"t"  # TUPLE

  def ordered_dict(self):
    self.global_("collections", "OrderedDict")
    self.out += b")R"  # EMPTY_TUPLE, REDUCE


def _write_pth(path: str, state: dict[str, np.ndarray], *, archive: str = "archive",
               shared_storage: tuple[str, str] | None = None,
               transposed: str | None = None, extra_global: tuple[str, str] | None = None,
               hostile_view: tuple[str, int, tuple, tuple] | None = None):
  """Writes `state` the way `torch.save(state, path)` lays it out (zip of data.pkl + storages).

  `shared_storage` puts two 1-D tensors in one storage (the second at an offset, as views of one
  tensor are saved); `transposed` stores one 4-D tensor as a non-contiguous (permuted) view.
  `extra_global` appends a reference to another global, as a malicious file would;
  `hostile_view` = (name, offset, shape, stride) writes that tensor's view as given.
  """
  storage_type = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
  records: dict[str, bytes] = {}
  tensors = []  # (name, storage key, offset, numel, shape, stride, dtype)
  for name, value in state.items():
    if shared_storage and name == shared_storage[1]:
      continue
    key = str(len(records))
    data = value
    stride = tuple(int(np.prod(value.shape[k + 1:])) for k in range(value.ndim))
    if name == transposed:
      # The storage holds the tensor with its last two axes swapped; strides read it back.
      data = np.ascontiguousarray(np.swapaxes(value, 2, 3))
      _, i, h, w = value.shape
      stride = (i * h * w, h * w, 1, h)
    if shared_storage and name == shared_storage[0]:
      other = state[shared_storage[1]]
      data = np.concatenate([value, other])
      tensors.append((shared_storage[1], key, value.size, data.size, other.shape, (1,),
                      other.dtype))
    records[key] = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()
    tensors.append((name, key, 0, data.size, value.shape, stride, value.dtype))
  tensors.sort(key=lambda t: list(state).index(t[0]))
  if hostile_view:
    tensors = [(n, k, hostile_view[1], num, hostile_view[2], hostile_view[3], d)
               if n == hostile_view[0] else (n, k, o, num, shp, st, d)
               for n, k, o, num, shp, st, d in tensors]

  writer = _PickleWriter()
  writer.ordered_dict()
  writer.out += b"("  # MARK for SETITEMS
  for name, key, offset, numel, shape, stride, dtype in tensors:
    writer.str_(name)
    writer.global_("torch._utils", "_rebuild_tensor_v2")
    writer.out += b"(("  # MARK of the arguments, MARK of the persistent id
    writer.str_("storage")
    writer.global_("torch", storage_type[np.dtype(dtype)])
    writer.str_(key)
    writer.str_("cpu")
    writer.int_(numel)
    writer.out += b"tQ"  # TUPLE, BINPERSID
    writer.int_(offset)
    writer.tuple_(shape)
    writer.tuple_(stride)
    writer.out += b"\x89"  # NEWFALSE (requires_grad)
    writer.ordered_dict()  # backward hooks
    writer.out += b"tR"  # TUPLE, REDUCE
  writer.out += b"u"  # SETITEMS
  # state_dict()._metadata, pickled as the OrderedDict's instance state.
  writer.out += b"}"
  writer.str_("_metadata")
  writer.ordered_dict()
  writer.out += b"sb"  # SETITEM, BUILD
  if extra_global:
    writer.out += b"0"  # POP the dict, then a reference to something dangerous.
    writer.global_(*extra_global)
  writer.out += b"."  # STOP
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{archive}/data.pkl", bytes(writer.out))
    zf.writestr(f"{archive}/byteorder", "little")
    for key, data in records.items():
      zf.writestr(f"{archive}/data/{key}", data)
    zf.writestr(f"{archive}/version", "3\n")


# --- tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, known", [("resnet18", KNOWN_RESNET18),
                                         ("resnet34", {"layer3.5.conv2.weight": (256, 256, 3, 3)}),
                                         ("mobilenet_v2", KNOWN_MOBILENET_V2)])
def test_layout_has_torchvision_names_and_shapes(name, known):
  _, variables = _zeros(name)
  layout = pretrained.torchvision_layout(name, variables)
  assert len(layout) == NUM_ENTRIES[name]
  for key, shape in known.items():
    assert layout[key][1] == shape, key
  assert layout["layer1.0.conv1.weight" if name != "mobilenet_v2" else
                "features.1.conv.0.0.weight"][0][0] == "params"


def test_resnet18_npz_loads_and_stem_matches_torch_computation(tmp_path):
  net, variables = _zeros("resnet18")
  state = torchvision_state("resnet18", variables)
  path = os.path.join(tmp_path, "resnet18.npz")
  np.savez(path, **state)
  loaded = pretrained.load_pretrained("resnet18", variables, path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  np.testing.assert_array_equal(loaded["params"]["stage1_block0"]["conv1"]["kernel"],
                                state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["stage2_block0"]["downsample_bn"]["var"],
                                state["layer2.0.downsample.1.running_var"])
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  conv_in, conv_out = _layer_io(net, loaded, x, ("stem_conv",))
  np.testing.assert_allclose(conv_out, _conv_nchw(conv_in, state["conv1.weight"], 2, 3),
                             rtol=1e-5, atol=1e-4)
  bn_in, bn_out = _layer_io(net, loaded, x, ("stem_bn",))
  expected = ((bn_in - state["bn1.running_mean"]) / np.sqrt(state["bn1.running_var"] + 1e-5)
              * state["bn1.weight"] + state["bn1.bias"])
  np.testing.assert_allclose(bn_out, expected, rtol=1e-5, atol=1e-5)


def test_mobilenet_v2_npz_depthwise_matches_torch_computation(tmp_path):
  net, variables = _zeros("mobilenet_v2")
  state = torchvision_state("mobilenet_v2", variables)
  path = os.path.join(tmp_path, "mobilenet_v2.npz")
  np.savez(path, **state)
  loaded = pretrained.load_pretrained("mobilenet_v2", variables, path)
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
  conv_in, conv_out = _layer_io(net, loaded, x, ("block1", "depthwise_conv"))
  expected = _conv_nchw(conv_in, state["features.1.conv.0.0.weight"], 1, 1, groups=32)
  np.testing.assert_allclose(conv_out, expected, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(loaded["params"]["block2"]["project_conv"]["kernel"],
                                state["features.2.conv.2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["params"]["last_bn"]["scale"],
                                state["features.18.1.weight"])


def test_pth_written_like_torch_save_loads_identically(tmp_path):
  _, variables = _zeros("resnet18")
  state = torchvision_state("resnet18", variables, seed=3)
  npz, pth = os.path.join(tmp_path, "w.npz"), os.path.join(tmp_path, "resnet18-abc.pth")
  np.savez(npz, **state)
  _write_pth(pth, state, archive="resnet18-abc", shared_storage=("bn1.weight", "bn1.bias"),
             transposed="layer1.0.conv2.weight")
  read = pretrained.read_torch_checkpoint(pth)
  assert list(read) == list(state)
  for key, value in state.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key)
    assert read[key].dtype == value.dtype
  from_npz = pretrained.load_pretrained("resnet18", variables, npz)
  from_pth = pretrained.load_pretrained("resnet18", variables, pth)
  chex.assert_trees_all_equal(from_npz, from_pth)


def _write_safetensors(path, state: dict[str, np.ndarray], header_edit=None) -> None:
  """The .safetensors layout (8-byte header length, JSON header, tensor bytes), by hand."""
  names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, value in state.items():
    raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": names[value.dtype], "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  if header_edit:
    header_edit(header)
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def test_safetensors_loads_identically(tmp_path):
  _, variables = _zeros("resnet18")
  state = torchvision_state("resnet18", variables, seed=4)
  npz, st = os.path.join(tmp_path, "w.npz"), os.path.join(tmp_path, "w.safetensors")
  np.savez(npz, **state)
  _write_safetensors(st, state)
  read = pretrained.read_safetensors(st)
  chex.assert_trees_all_equal(read, state)
  chex.assert_trees_all_equal(pretrained.load_pretrained("resnet18", variables, npz),
                              pretrained.load_pretrained("resnet18", variables, st))


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["bn1.bias"].update(data_offsets=[0, 10 ** 9]), "claims bytes"),
    (lambda h: h["bn1.bias"].update(data_offsets=[-8, 248]), "negative or non-integer"),
    (lambda h: h["bn1.bias"].update(shape=[-64]), "negative or non-integer"),
    (lambda h: h["bn1.bias"].update(shape=[65]), "claims bytes"),
    (lambda h: h["bn1.bias"].update(dtype="OBJ"), "needs a known dtype"),
])
def test_hostile_safetensors_headers_are_refused(tmp_path, edit, message):
  path = os.path.join(tmp_path, "w.safetensors")
  _write_safetensors(path, {"bn1.bias": np.zeros(64, np.float32)}, header_edit=edit)
  with pytest.raises(ValueError, match=message):
    pretrained.read_safetensors(path)


def test_prefix_loads_the_backbone_inside_a_bigger_model(tmp_path):
  _, backbone = _zeros("resnet18")
  variables = {"params": {"encoder": backbone["params"], "head": {"kernel": jnp.ones((3, 2))}},
               "batch_stats": {"encoder": backbone["batch_stats"]}}
  state = torchvision_state("resnet18", backbone)
  path = os.path.join(tmp_path, "w.npz")
  np.savez(path, **state)
  loaded = pretrained.load_pretrained("resnet18", variables, path, prefix=("encoder",))
  np.testing.assert_array_equal(loaded["params"]["encoder"]["stem_bn"]["bias"], state["bn1.bias"])
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="has no module 'backbone'; pass the prefix"):
    pretrained.load_pretrained("resnet18", variables, path, prefix=("backbone",))


def test_mismatching_files_are_rejected_naming_the_key(tmp_path):
  _, variables = _zeros("resnet18")
  state = torchvision_state("resnet18", variables)
  path = os.path.join(tmp_path, "w.npz")

  def load(modified):
    np.savez(path, **modified)
    return pretrained.load_pretrained("resnet18", variables, path)

  wrong = dict(state, **{"layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight' of shape \(64, 64, 1, 1\) "
                     r"but resnet18 expects shape \(64, 64, 3, 3\)"):
    load(wrong)
  missing = {k: v for k, v in state.items() if k not in ("bn1.running_var", "conv1.weight")}
  with pytest.raises(ValueError, match=r"lacks 2 of the 100 resnet18 weights: "
                     r"(conv1\.weight, bn1\.running_var|bn1\.running_var, conv1\.weight)\."):
    load(missing)
  unknown = dict(state, **{"layer5.0.conv1.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"has weight 'layer5\.0\.conv1\.weight' of shape "
                     r"\(3, 3\), which a torchvision resnet18 does not have"):
    load(unknown)
  # A MobileNetV2 file is not a ResNet-18 one.
  _, mobilenet = _zeros("mobilenet_v2")
  with pytest.raises(ValueError, match="has weight 'features"):
    load(torchvision_state("mobilenet_v2", mobilenet))


def test_unsupported_backbones_and_files(tmp_path):
  _, variables = _zeros("resnet18")
  with pytest.raises(ValueError, match="No torchvision checkpoint layout is known for backbone "
                     "'resnet_small'; pretrained weights can be loaded for resnet18, resnet34, "
                     "mobilenet_v2"):
    pretrained.load_pretrained("resnet_small", variables, "unused.npz")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_pretrained("resnet18", variables, os.path.join(tmp_path, "none.npz"))
  legacy = os.path.join(tmp_path, "legacy.pth")
  with open(legacy, "wb") as f:
    pickle.dump({"conv1.weight": 1}, f)
  with pytest.raises(ValueError, match="is not a PyTorch zip checkpoint"):
    pretrained.load_pretrained("resnet18", variables, legacy)
  # A checkpoint that names anything beyond tensors in dicts is refused before it can run.
  evil = os.path.join(tmp_path, "evil.pth")
  _write_pth(evil, {"bn1.bias": np.zeros(64, np.float32)}, extra_global=("os", "system"))
  with pytest.raises(ValueError, match=r"evil\.pth refers to os\.system, which a state dict "
                     "never needs"):
    pretrained.read_torch_checkpoint(evil)
  other = os.path.join(tmp_path, "w.h5")
  open(other, "wb").close()
  with pytest.raises(ValueError, match=r"must end in \.safetensors, \.npz, \.pth or \.pt"):
    pretrained.load_pretrained("resnet18", variables, other)


@pytest.mark.parametrize("offset, shape, stride", [
    (0, (8,), (-1,)),          # negative stride: would read before the storage
    (0, (2, 8), (8, -1)),
    (0, (8,), ((1 << 31) - 1,)),  # a stride far past the storage
    (-4, (8,), (1,)),          # negative offset
    (0, (-3,), (1,)),          # negative size
    (60, (8,), (1,)),          # past the end of a 64-element storage
    (0, (8, 8), (1,)),         # fewer strides than dimensions
])
def test_hostile_tensor_views_are_refused(tmp_path, offset, shape, stride):
  """A .pth whose tensor view leaves its storage is refused before any view is made."""
  path = os.path.join(tmp_path, "hostile.pth")
  _write_pth(path, {"bn1.bias": np.zeros(64, np.float32)},
             hostile_view=("bn1.bias", offset, shape, stride))
  with pytest.raises(ValueError, match="must be non-negative integers|reads past its storage"):
    pretrained.read_torch_checkpoint(path)


def test_slimmed_backbone_is_rejected(tmp_path):
  net = backbones.ResNet18().sliced((0.5, 1.0, 1.0, 1.0))
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  _, full = _zeros("resnet18")
  path = os.path.join(tmp_path, "w.npz")
  np.savez(path, **torchvision_state("resnet18", full))
  with pytest.raises(ValueError, match=r"'layer1\.0\.bn1\.bias' of shape \(64,\) but resnet18 "
                     r"expects shape \(32,\) \(our variable params/stage1_block0/bn1/bias\)"):
    pretrained.load_pretrained("resnet18", shapes, path)
