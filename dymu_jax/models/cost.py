"""Analytic MACs and parameters of any width configuration, and XLA's own count as a check.

`count(module, variables, *args, **call_kwargs)` traces `module.apply` abstractly
(`jax.eval_shape`, nothing is computed) with a `flax.linen.intercept_methods` hook that records
every slimmable layer call (`SlimConv`, `SlimDense`, `SlimBatchNorm`; plain `nn.Conv` /
`nn.Dense` are understood too) with its actual, sliced input and output shapes. From those:

- MACs (multiply-accumulates) of a convolution: `H_out * W_out * k_h * k_w * C_in / groups *
  C_out` per example; of a dense layer: `C_in * C_out` per row. Batch norm, biases, activations,
  pooling, residual additions and resizing are elementwise work and by convention are not
  counted as MACs (as in the papers' and torchvision's MAC counts).
- Used parameters: the sliced kernels and biases, and the scale/bias of the used batch-norm
  channels (running statistics are state, not parameters); parameters owned directly by any
  other module that runs (e.g. a hypernetwork's embeddings) are counted whole. Layers that do
  not run (an unused branch of a tree) cost nothing.

Figures are per example: the totals of the traced call divided by the batch size, the leading
dimension of the first positional argument (pass a batch of 1 for the exact cost of parts that
do not scale with the batch, such as a hypernetwork). A module wrapped in `nn.vmap` is seen once
per call (one stream), so count stacked streams by multiplying, or count the static tree.
A layer run on the masked path (widths given as arrays, e.g. `DynamicWidths`) computes, and
is counted, at full width: count the static `WidthConfig` for a SubNet's own cost.

`xla_cost(fn, *args)` is the compiler's count of the same program (`cost_analysis()` of the
jitted, compiled function), with XLA's count of only its convolutions and dots alongside
(`xla_matmul_flops` alone is cheaper). XLA counts a multiply-add as 2 flops and, for a padded convolution,
only the taps that land on the real input; `count(..., exclude_padding=True)` reproduces that
convention so the two can be compared layer-exactly, while the default keeps the usual
convention (padding taps included). XLA also counts as dots what is elementwise here, e.g. the
bilinear upsampling of `jax.image.resize`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

try:
  from jax.extend import core as jax_core  # jax >= 0.4.36
except ImportError:  # pragma: no cover
  from jax import core as jax_core

from dymu_jax.models import fast_ops
from dymu_jax.models import layers

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per-example multiply-accumulates and used parameters of one configuration."""

  macs: int
  params: int

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.macs + other.macs, self.params + other.params)


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One layer call: where it is, what kind, and its per-example MACs and used parameters."""

  path: str
  kind: str  # "conv", "dense", "norm" or "other" (parameters of any other module).
  macs: int
  params: int
  in_shape: tuple[int, ...] = ()
  out_shape: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------
# Analytic count.
# --------------------------------------------------------------------------------------------

def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def _pads(padding, in_size: Sequence[int], out_size: Sequence[int], kernel: Sequence[int],
          strides: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]] | None:
  """Low/high zero padding per spatial dim (as lax resolves it), None where unknown."""
  if isinstance(padding, str):
    padding = padding.upper()
    if padding == "VALID":
      return [(0, 0)] * len(in_size)
    if padding == "SAME":
      pads = []
      for n, o, k, s, d in zip(in_size, out_size, kernel, strides, dilation):
        total = max((o - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
      return pads
    return None  # CIRCULAR, CAUSAL...: every tap reads real data.
  if isinstance(padding, int):
    return [(padding, padding)] * len(in_size)
  pads = [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]
  return pads if len(pads) == len(in_size) else None


def _valid_taps(in_size: int, out_size: int, kernel: int, stride: int, dilation: int,
                pad_low: int) -> int:
  """Number of (output position, kernel tap) pairs of one spatial dim that read real input."""
  positions = (np.arange(out_size)[:, None] * stride - pad_low
               + np.arange(kernel)[None, :] * dilation)
  return int(np.sum((positions >= 0) & (positions < in_size)))


def _conv_macs(x_shape, y_shape, kernel_size, strides, dilation, padding, cin_per_group: int,
               cout: int, exclude_padding: bool) -> int:
  """Total MACs of one convolution call over its whole batch."""
  spatial_in, spatial_out = x_shape[1:-1], y_shape[1:-1]
  batch = int(np.prod(x_shape[:1]))
  pads = (_pads(padding, spatial_in, spatial_out, kernel_size, strides, dilation)
          if exclude_padding else None)
  if pads is not None:
    taps = math.prod(_valid_taps(n, o, k, s, d, p[0]) for n, o, k, s, d, p in zip(
        spatial_in, spatial_out, kernel_size, strides, dilation, pads))
  else:
    taps = math.prod(spatial_out) * math.prod(kernel_size)
  return batch * taps * cin_per_group * cout


def _record_layer(module: nn.Module, x, y, exclude_padding: bool) -> LayerCost | None:
  """The cost of one call of a layer this counter understands, else None."""
  path = "/".join(module.scope.path)
  x_shape, y_shape = tuple(x.shape), tuple(y.shape)
  if isinstance(module, layers.SlimConv):
    cin, cout = x_shape[-1], y_shape[-1]
    # A depthwise kernel is (kh, kw, 1, C) and runs with one group per used channel.
    cin_per_group = 1 if module.depthwise else cin // module.groups
    kernel_size = _pair(module.kernel_size)
    macs = _conv_macs(x_shape, y_shape, kernel_size, _pair(module.strides),
                      _pair(module.dilation), module.padding, cin_per_group, cout,
                      exclude_padding)
    used = math.prod(kernel_size) * cin_per_group * cout + (cout if module.use_bias else 0)
    return LayerCost(path, "conv", macs, used, x_shape, y_shape)
  if isinstance(module, nn.Conv):
    params = module.variables.get("params", {})
    kernel = params["kernel"]
    kernel_size = tuple(kernel.shape[:-2])
    ndim = len(kernel_size)
    strides = module.strides or 1
    strides = (strides,) * ndim if isinstance(strides, int) else tuple(strides)
    dilation = module.kernel_dilation or 1
    dilation = (dilation,) * ndim if isinstance(dilation, int) else tuple(dilation)
    macs = _conv_macs(x_shape, y_shape, kernel_size, strides, dilation, module.padding,
                      kernel.shape[-2], kernel.shape[-1], exclude_padding)
    used = sum(int(np.prod(v.shape)) for v in params.values() if hasattr(v, "shape"))
    return LayerCost(path, "conv", macs, used, x_shape, y_shape)
  if isinstance(module, (layers.SlimDense, nn.Dense)):
    cin, cout = x_shape[-1], y_shape[-1]
    rows = int(np.prod(y_shape[:-1]))
    has_bias = module.use_bias
    return LayerCost(path, "dense", rows * cin * cout, cin * cout + (cout if has_bias else 0),
                     x_shape, y_shape)
  if isinstance(module, layers.SlimBatchNorm):
    c = x_shape[-1]
    return LayerCost(path, "norm", 0, c * (int(module.use_scale) + int(module.use_bias)),
                     x_shape, y_shape)
  if isinstance(module, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)):
    params = module.variables.get("params", {})
    used = sum(int(np.prod(v.shape)) for v in params.values() if hasattr(v, "shape"))
    return LayerCost(path, "norm", 0, used, x_shape, y_shape)
  return None


def _first_array(args, kwargs):
  for value in list(args) + list(kwargs.values()):
    if hasattr(value, "shape"):
      return value
  return None


def count_layers(module: nn.Module, variables: PyTree | None, *args, method=None,
                 exclude_padding: bool = False, batch_size: int | None = None, rngs=None,
                 **call_kwargs) -> tuple[LayerCost, ...]:
  """Per-layer cost of `module.apply(variables, *args, method=method, **call_kwargs)`.

  The keyword names `method`, `exclude_padding`, `batch_size` and `rngs` belong to the counter;
  every other keyword goes to the module call.

  Args:
    module: any Flax Linen module built from the slimmable layers (a backbone, a multi-task
      net, a branched tree, a hypernetwork...).
    variables: its variables (arrays or `jax.ShapeDtypeStruct`s); None initialises abstractly.
    *args: the call's positional arguments (arrays or `jax.ShapeDtypeStruct`s are traced
      abstractly, anything else is passed as is).
    method: the module method to run (default `__call__`), as in `module.apply`.
    exclude_padding: count only convolution taps that read real input (XLA's convention).
    batch_size: what totals are divided by; None takes the leading dimension of the first
      array argument (give 1 when that argument has no batch axis, e.g. a preference vector).
    rngs: random keys the call needs (e.g. {"dropout": key}), as in `module.apply`.
    **call_kwargs: keyword arguments of the call (`widths=...`, `train=False`, ...).

  Returns:
    One `LayerCost` per call of a counted layer, in call order, per example.
  """
  if batch_size is None:
    first = _first_array(args, {})
    batch_size = int(first.shape[0]) if first is not None and len(first.shape) else 1
  if batch_size < 1:
    raise ValueError(f"batch_size must be a positive number of examples, got {batch_size}.")
  records: list[LayerCost] = []
  owners: dict[str, int] = {}  # path of another called module -> its direct parameter count.
  depth = [0]  # > 0 while inside a counted layer, so nested modules are not counted twice.

  def interceptor(next_fun, call_args, call_kwargs_, context):
    module_ = context.module
    counted = isinstance(module_, (layers.SlimConv, layers.SlimDense, layers.SlimBatchNorm,
                                   nn.Conv, nn.Dense, nn.BatchNorm, nn.LayerNorm, nn.GroupNorm))
    if depth[0] or not counted:
      out = next_fun(*call_args, **call_kwargs_)
      if not depth[0]:
        params = module_.variables.get("params", {}) if module_.scope else {}
        direct = sum(int(np.prod(v.shape)) for v in params.values() if hasattr(v, "shape"))
        if direct:
          owners["/".join(module_.scope.path)] = direct
      return out
    depth[0] += 1
    try:
      out = next_fun(*call_args, **call_kwargs_)
    finally:
      depth[0] -= 1
    if context.method_name == "__call__":
      x = _first_array(call_args, call_kwargs_)
      record = _record_layer(module_, x, out, exclude_padding)
      if record is not None:
        records.append(record)
    return out

  # Arrays are traced abstractly; anything else (flags, configurations) stays a Python value.
  is_array = [hasattr(a, "shape") and hasattr(a, "dtype") for a in args]
  arrays = [a for a, array in zip(args, is_array) if array]

  def merge(traced):
    traced = iter(traced)
    return [next(traced) if array else a for a, array in zip(args, is_array)]

  if variables is None:
    variables = jax.eval_shape(
        lambda *a: module.init(jax.random.key(0), *merge(a), method=method, **call_kwargs),
        *arrays)

  def run(variables_, rngs_, *arrays_):
    with nn.intercept_methods(interceptor):
      # Every collection mutable: a training-mode call may update batch statistics.
      return module.apply(variables_, *merge(arrays_), method=method, mutable=True, rngs=rngs_,
                          **call_kwargs)

  jax.eval_shape(run, variables, rngs, *arrays)
  per_example = [dataclasses.replace(r, macs=_per_example(r.macs, batch_size))
                 for r in records]
  per_example += [LayerCost(path, "other", 0, n) for path, n in owners.items()]
  return tuple(per_example)


def _per_example(total: int, batch: int) -> int:
  return total // batch if total % batch == 0 else round(total / batch)


def count(module: nn.Module, variables: PyTree | None, *args, method=None,
          exclude_padding: bool = False, batch_size: int | None = None, rngs=None,
          **call_kwargs) -> Cost:
  """Per-example MACs and used parameters of one call; see `count_layers` for the arguments.

  Example: `count(net, variables, jnp.zeros((1, 64, 64, 3)), widths=config, train=False)`.
  """
  layer_costs = count_layers(module, variables, *args, method=method,
                             exclude_padding=exclude_padding, batch_size=batch_size, rngs=rngs,
                             **call_kwargs)
  # A layer called more than once (a shared block) computes every time but owns its
  # parameters once; its calls use leading slices, so the widest call holds them all.
  params: dict[str, int] = {}
  for c in layer_costs:
    params[c.path] = max(params.get(c.path, 0), c.params)
  return Cost(sum(c.macs for c in layer_costs), sum(params.values()))


def num_params(tree: PyTree) -> int:
  """Number of scalars in a tree (e.g. `variables["params"]`)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------------
# XLA's count.
# --------------------------------------------------------------------------------------------

_COUNTED_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _cost_dict(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device program.
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compiled_flops(compiled) -> float:
  """XLA's flop count of a compiled (or lowered) program; a multiply-add counts 2 flops."""
  return float(_cost_dict(compiled).get("flops", 0.0))


@functools.lru_cache(maxsize=512)
def _primitive_flops(primitive, avals, params_items) -> float:
  """XLA's flops for one primitive applied to inputs of the given shapes."""
  params = dict(params_items)
  fn = lambda *xs: primitive.bind(*xs, **params)
  specs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]
  # One isolated op has the same count before and after optimisation; lowering is 3x faster.
  return compiled_flops(jax.jit(fn).lower(*specs))


def _subjaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (list, tuple)):
    for v in value:
      yield from _subjaxprs(v)


def _matmul_flops(jaxpr) -> float:
  """XLA flops of every convolution and dot in a jaxpr, each op analysed on its own."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _COUNTED_PRIMITIVES:
      avals = tuple((tuple(v.aval.shape), v.aval.dtype) for v in eqn.invars)
      items = tuple(sorted(eqn.params.items()))
      try:
        hash(items)
      except TypeError:  # an unhashable parameter: compile without the cache.
        total += _primitive_flops.__wrapped__(eqn.primitive, avals, items)
      else:
        total += _primitive_flops(eqn.primitive, avals, items)
      continue
    branches = [_matmul_flops(sub) for value in eqn.params.values()
                for sub in _subjaxprs(value)]
    if not branches:
      continue
    if name == "cond":
      total += max(branches)  # one branch runs.
    elif name == "scan":
      total += eqn.params["length"] * sum(branches)
    else:  # pjit, custom_jvp/vjp, remat, while (body counted once)...
      total += sum(branches)
  return total


def xla_matmul_flops(fn: Callable[..., Any], *args) -> float:
  """XLA's flops of only the convolutions and dots of `fn(*args)`, each op analysed alone.

  Cheaper than `xla_cost` (nothing is compiled, the whole program is not even lowered); equals
  its `matmul_flops`.
  """
  with fast_ops.plain():  # count the convolutions, not their CPU lowerings
    return _matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_cost(fn: Callable[..., Any], *args, optimized: bool = True) -> dict[str, float]:
  """XLA's cost analysis of `jax.jit(fn)(*args)` (args may be `jax.ShapeDtypeStruct`s).

  Args:
    fn: the function to analyse, e.g. `lambda v, x: net.apply(v, x, widths=w, train=False)`.
    *args: its arguments.
    optimized: analyse the compiled program (`lower(...).compile().cost_analysis()`; traced
      within `fast_ops.plain()`, so with XLA's convolutions rather than their CPU lowerings);
      False analyses the lowered, not yet optimised program (`lower(...).cost_analysis()`,
      much faster to get, with more elementwise flops since nothing is fused or simplified).

  Returns:
    A dict with XLA's whole-program `flops`, `transcendentals` and `bytes accessed`, `macs`
    (= flops / 2: XLA counts a multiply-add as two flops, and also counts elementwise work such
    as batch norm and activations), and `matmul_flops` / `matmul_macs`: XLA's flops of only the
    program's convolutions and dot products, each analysed alone from the traced jaxpr. The
    latter is what `count(..., exclude_padding=True)` predicts. Figures are totals for the
    arguments given (not per example).
  """
  with fast_ops.plain():  # count the convolutions, not their CPU lowerings
    traced = jax.jit(fn).trace(*args)
  lowered = traced.lower()
  cost = _cost_dict(lowered.compile() if optimized else lowered)
  flops = float(cost.get("flops", 0.0))
  matmul = _matmul_flops(traced.jaxpr.jaxpr)
  return {
      "flops": flops,
      "macs": flops / 2,
      "transcendentals": float(cost.get("transcendentals", 0.0)),
      "bytes accessed": float(cost.get("bytes accessed", 0.0)),
      "matmul_flops": matmul,
      "matmul_macs": matmul / 2,
  }
