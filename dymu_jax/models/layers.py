"""Slimmable layers: convolution, dense and batch norm that run on the first k channels.

Variables are always stored at FULL width. A slimmed call uses the leading slice of every
variable: a kernel's input channels are sliced to the width of the incoming activation, its
output channels to the requested `out_channels` (METHODS.md section 2, "a slimmed layer uses the
first k channels of the full kernel"). Running a slimmed layer therefore equals running a layer
whose variables were physically cut to the first k channels, which is what export relies on.

Layout is NHWC, kernels HWIO (as `flax.linen.Conv`). Variables are float32. Mixed precision
follows the activations: a bfloat16 (or float16) input makes a convolution or dense layer cast
its kernel and bias and compute in that dtype (XLA accumulates in float32), and batch norm
computes its statistics and normalisation in float32 and hands back the input's dtype; every
other input computes in float32. So casting the images once (`train.step`'s `compute_dtype`)
runs the network in bfloat16 while parameters, gradients and running statistics stay float32.
Variable names follow Flax
(`kernel`, `bias`; `scale`, `bias`, and `mean`, `var` in "batch_stats"), so the cost counter
(`models/cost.py`, which intercepts these three classes) and the PyTorch importer
(`models/pretrained.py`) can rely on them.

Dynamic (masked) path [ours option]: when a channel count is given as an array (a traced int32
scalar, see `widths.DynamicWidths`), the layer computes at full width and zeroes the output
channels from that count on; its inputs are then full-width tensors whose surplus channels are
already zero. Outputs equal the sliced path on the kept channels.

Every layer knows its full input width either from the `in_features` attribute (the backbones
always set it, so that initialising with a slimmed width configuration still creates full-size
variables) or, when that is None, from the incoming activation at initialisation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dymu_jax.models import fast_ops
from dymu_jax.models.widths import is_dynamic

Initializer = Callable[..., jax.Array]
Padding = str | int | Sequence[tuple[int, int]]

# He initialisation on fan-out, as torchvision initialises ResNet and MobileNetV2 convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f"Expected an int or a pair of ints, got {value!r}.")
  return value


def _padding(padding: Padding) -> str | tuple[tuple[int, int], tuple[int, int]]:
  """XLA's "SAME"/"VALID", an int p (p zeros on each side, as PyTorch) or ((t, b), (l, r))."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"Unknown padding {padding!r}; use 'SAME', 'VALID', an int or pairs.")
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"Padding pairs must be ((top, bottom), (left, right)), got {padding!r}.")
  return pads


def _check_fits(name: str, shape: Sequence[int], kernel: tuple[int, int],
                dilation: tuple[int, int], padding) -> None:
  """One sentence when a kernel is larger than its (padded) input, which would otherwise fail
  deep inside the convolution's lowering."""
  if isinstance(padding, str):
    if padding == "SAME":
      return
    padding = ((0, 0), (0, 0))
  for size, k, d, (low, high) in zip(shape[1:3], kernel, dilation, padding):
    if size + low + high < (k - 1) * d + 1:
      raise ValueError(f"SlimConv {name!r}: its {kernel[0]}x{kernel[1]} kernel does not fit its "
                       f"{shape[1]}x{shape[2]} input (padding {padding}); use larger images.")


def _full_in_features(module: nn.Module, in_features: int | None, x: jax.Array,
                      groups: int = 1) -> int:
  """The full input width: the attribute, else the stored kernel, else x (at init)."""
  if in_features is not None:
    return in_features
  if module.has_variable("params", "kernel"):
    return module.get_variable("params", "kernel").shape[-2] * groups
  return x.shape[-1]


def _channel_mask(count: jax.Array, size: int, dtype=jnp.float32) -> jax.Array:
  return (jnp.arange(size) < count).astype(dtype)


LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def compute_dtype(x: jax.Array):
  """The dtype a layer computes in for input `x`: its own if low precision, else float32."""
  return x.dtype if any(x.dtype == d for d in LOW_PRECISION) else jnp.float32


def _check_width(layer: str, name: str, width: int, full: int):
  if not 1 <= width <= full:
    raise ValueError(
        f"{layer} {name!r} got {width} channels but its full width is {full}; a slimmed layer "
        f"needs between 1 and {full}.")


class SlimConv(nn.Module):
  """A 2-D convolution that can run on the first channels of its full kernel.

  Attributes:
    features: full number of output channels.
    kernel_size: int or (kh, kw).
    strides: int or pair.
    dilation: int or pair (kernel dilation, for atrous convolutions).
    groups: 1 for a dense convolution; equal to `features` (and to the input width) for a
      depthwise convolution, whose kernel is (kh, kw, 1, features) and whose single channel axis
      is sliced consistently. Other group counts run at full width only.
    use_bias: add a bias (sliced like the output channels).
    padding: "SAME", "VALID", an int p (p zeros on each side, as PyTorch's `padding=p`) or
      ((top, bottom), (left, right)). The backbones use ints so that strided convolutions align
      with PyTorch (needed for imported checkpoints).
    in_features: full input width; None infers it from the input at initialisation.
    kernel_init, bias_init: initialisers of the full-size variables.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  dilation: int | Sequence[int] = 1
  groups: int = 1
  use_bias: bool = False
  padding: Padding = "SAME"
  in_features: int | None = None
  kernel_init: Initializer = conv_kernel_init
  bias_init: Initializer = nn.initializers.zeros

  @property
  def depthwise(self) -> bool:
    return self.groups > 1 and self.groups == self.features

  @nn.compact
  def __call__(self, x: jax.Array, out_channels: int | jax.Array | None = None) -> jax.Array:
    """Convolves x (N, H, W, cin) into (N, H', W', out_channels).

    Args:
      x: NHWC input whose channel count is at most the full input width.
      out_channels: output channels to compute (the first ones of the full kernel); None keeps
        the full width for a dense convolution and the input width for a depthwise one. An
        array (traced int scalar) takes the masked path: full-width output, channels from
        `out_channels` on set to zero.
    """
    dynamic = out_channels is not None and is_dynamic(out_channels)
    kh, kw = _pair(self.kernel_size)
    if self.depthwise:
      full_in = self.features if self.in_features is None else self.in_features
    else:
      full_in = _full_in_features(self, self.in_features, x, self.groups)
    cin = x.shape[-1]
    _check_width("SlimConv", self.name, cin, full_in)
    if self.depthwise:
      if full_in != self.features:
        raise ValueError(
            f"Depthwise SlimConv {self.name!r} needs in_features == features == groups, got "
            f"{full_in} inputs and {self.features} features.")
      kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, self.features), jnp.float32)
      cout = cin if out_channels is None or dynamic else out_channels
      if cout != cin:
        raise ValueError(
            f"Depthwise SlimConv {self.name!r} maps each channel to itself, so out_channels "
            f"must equal its input width {cin}, got {cout}.")
      kernel = kernel[..., :cout]
      group_count = cout
    else:
      if full_in % self.groups or self.features % self.groups:
        raise ValueError(
            f"SlimConv {self.name!r}: groups={self.groups} must divide both the input width "
            f"{full_in} and features {self.features}.")
      kernel = self.param("kernel", self.kernel_init,
                          (kh, kw, full_in // self.groups, self.features), jnp.float32)
      cout = self.features if out_channels is None or dynamic else out_channels
      if self.groups > 1 and (cin != full_in or cout != self.features or dynamic):
        raise ValueError(
            f"Grouped SlimConv {self.name!r} (groups={self.groups}) cannot be slimmed; only "
            f"dense (groups=1) and depthwise convolutions can.")
      _check_width("SlimConv", self.name, cout, self.features)
      kernel = kernel[:, :, :cin // self.groups, :cout]
      group_count = self.groups
    _check_fits(self.name, x.shape, (kh, kw), _pair(self.dilation), _padding(self.padding))
    dtype = compute_dtype(x)
    # fast_ops picks a CPU-friendly lowering with lax.conv_general_dilated's results.
    y = fast_ops.conv2d(
        x.astype(dtype), kernel.astype(dtype),
        strides=_pair(self.strides),
        padding=_padding(self.padding),
        dilation=_pair(self.dilation),
        groups=group_count)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias[:cout].astype(dtype)
    if dynamic:
      y = y * _channel_mask(out_channels, cout, dtype)
    return y


class SlimDense(nn.Module):
  """A dense layer that can run on the first rows and columns of its full kernel.

  Attributes:
    features: full number of outputs.
    use_bias: add a bias (sliced like the outputs).
    in_features: full input width; None infers it from the input at initialisation.
    kernel_init, bias_init: initialisers of the full-size variables.
  """

  features: int
  use_bias: bool = True
  in_features: int | None = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, out_channels: int | jax.Array | None = None) -> jax.Array:
    """Maps x (..., cin) to (..., out_channels); None keeps the full output width.

    An array `out_channels` takes the masked path (full width, later outputs zero).
    """
    dynamic = out_channels is not None and is_dynamic(out_channels)
    full_in = _full_in_features(self, self.in_features, x)
    cin = x.shape[-1]
    _check_width("SlimDense", self.name, cin, full_in)
    cout = self.features if out_channels is None or dynamic else out_channels
    _check_width("SlimDense", self.name, cout, self.features)
    kernel = self.param("kernel", self.kernel_init, (full_in, self.features), jnp.float32)
    dtype = compute_dtype(x)
    y = jnp.dot(x.astype(dtype), kernel[:cin, :cout].astype(dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias[:cout].astype(dtype)
    if dynamic:
      y = y * _channel_mask(out_channels, cout, dtype)
    return y


class SlimBatchNorm(nn.Module):
  """Batch norm over the last axis with full-size variables sliced to the input's channels.

  In training mode (`train=True`) it normalises with the batch statistics (mean and biased
  variance over every axis but the last, pooled over `axis_name` with `jax.lax.pmean` so that a
  data-parallel pmap equals one big batch) and moves the running statistics of the sliced
  channels towards them: `ra = momentum * ra + (1 - momentum) * batch` (Flax convention; the
  other channels stay unchanged). In evaluation mode it uses the running statistics. Running
  statistics are not updated while initialising. With an array `width` (masked path) only the
  first `width` channels are normalised and updated; the others come out zero.

  Attributes:
    momentum: decay of the running statistics.
    epsilon: added to the variance.
    axis_name: the pmap/shard_map axis to pool batch statistics over, or None.
    features: full width; None infers it from the input at initialisation.
    use_scale, use_bias: learn a scale (init 1) and a bias (init 0).
    scale_init: initialiser of the scale (zeros lets a residual branch start as identity).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  axis_name: str | None = None
  features: int | None = None
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               width: int | jax.Array | None = None) -> jax.Array:
    """Normalises x (..., c), c at most the full width.

    Args:
      x: input; its channel count selects the leading slice of the variables.
      train: use (and record) batch statistics.
      width: None or x's channel count (static path), or an array (masked path).
    """
    dynamic = width is not None and is_dynamic(width)
    if self.features is not None:
      full = self.features
    elif self.has_variable("batch_stats", "mean"):
      full = self.get_variable("batch_stats", "mean").shape[0]
    else:
      full = x.shape[-1]
    c = x.shape[-1]
    _check_width("SlimBatchNorm", self.name, c, full)
    if width is not None and not dynamic and width != c:
      raise ValueError(
          f"SlimBatchNorm {self.name!r} was told width {width} but its input has {c} channels.")
    mask = _channel_mask(width, c) if dynamic else None
    out_dtype = compute_dtype(x)  # statistics and normalisation in float32 whatever the input
    x = x.astype(jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((full,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((full,), jnp.float32))
    normalized = None
    if train:
      if self.axis_name is None:
        # Same values; a closed-form gradient that is faster on CPU (fast_ops).
        normalized, mean, var = fast_ops.batch_normalize(x, self.epsilon)
      else:
        axes = tuple(range(x.ndim - 1))
        mean = jax.lax.pmean(jnp.mean(x, axis=axes), self.axis_name)
        # Two passes (centre, then square) for accuracy; pmean of equal-size shards is exact.
        var = jax.lax.pmean(jnp.mean(jnp.square(x - mean), axis=axes), self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        old_mean, old_var = jnp.asarray(ra_mean.value), jnp.asarray(ra_var.value)
        new_mean = m * old_mean[:c] + (1.0 - m) * mean
        new_var = m * old_var[:c] + (1.0 - m) * var
        if dynamic:
          new_mean = jnp.where(mask > 0, new_mean, old_mean[:c])
          new_var = jnp.where(mask > 0, new_var, old_var[:c])
        ra_mean.value = old_mean.at[:c].set(new_mean)
        ra_var.value = old_var.at[:c].set(new_var)
    else:
      mean = ra_mean.value[:c]
      var = ra_var.value[:c]
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) if normalized is None else normalized
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (full,), jnp.float32)[:c]
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (full,), jnp.float32)[:c]
    if dynamic:
      y = y * mask
    return y.astype(out_dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pool with stride 2 as reshape-and-max (odd trailing rows/columns are dropped).

  Faster to differentiate on CPU than `nn.max_pool`, whose reduce-window gradient is slow. The
  gradient splits evenly between tied maxima, as `jnp.max`'s (see `fast_ops.max_pool_2x2`).
  """
  return fast_ops.max_pool_2x2(x)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 max pool, stride 2, padding 1 (torchvision's ResNet stem pool) from 9 strided slices.

  Padding is -inf, as in PyTorch. The max of shifted slices differentiates quickly on CPU.
  """
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  out = None
  for i in range(3):
    for j in range(3):
      window = jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c),
                             (1, 2, 2, 1))
      out = window if out is None else jnp.maximum(out, window)
  return out


def slice_variables(variables, target):
  """Cuts full-width variables to the leading block of each leaf's shape in `target`.

  `target` is a pytree of the same structure with smaller shapes (arrays or
  `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape` of a network built with the slimmed widths
  as its full widths). Because every slimmable layer uses the first channels of its variables,
  the result run at full width equals the original run slimmed: this is the physical export.
  """
  full_leaves, treedef = jax.tree.flatten(variables)
  small_leaves = treedef.flatten_up_to(target)
  for full, small in zip(full_leaves, small_leaves):
    if len(full.shape) != len(small.shape) or any(
        s > f for s, f in zip(small.shape, full.shape)):
      raise ValueError(
          f"Cannot slice a variable of shape {tuple(full.shape)} to {tuple(small.shape)}; "
          f"target shapes must be no larger in every axis.")
  index = [tuple(slice(0, n) for n in small.shape) for small in small_leaves]
  # One compiled program for the whole tree (eager slicing would compile once per shape).
  cut = jax.jit(lambda leaves: [leaf[i] for leaf, i in zip(leaves, index)])
  return jax.tree.unflatten(treedef, cut(full_leaves))
