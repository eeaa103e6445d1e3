"""CPU-fast convolution, 2x2 max pool and batch norm for `models/layers.py`, same results.

XLA's CPU convolutions are slow for a few shapes that the project's small networks hit, above
all the weight gradient of a convolution with few input channels and a large kernel (LeNet's
first layer, 1 -> 10 channels, 9x9: over half of the Multi-MNIST train step). `conv2d` keeps
`lax.conv_general_dilated`'s meaning (NHWC input, HWIO kernel, NHWC output) and picks, per
call, one of these lowerings:

* "xla": `lax.conv_general_dilated` itself.
* "toeplitz" (row-Toeplitz GEMM): every output row needs `kh` input rows; those rows, cut into
  overlapping windows of `(block - 1) * stride + kw` columns, are one row of a patch matrix, and
  a banded ("Toeplitz") matrix built from the kernel maps it to `block` output columns at once.
  One matmul then does the convolution with `(block + kw - 1) / kw` times the direct MACs and a
  `(block + kw - 1) / (block * kw)` fraction of full im2col's memory, and its weight gradient
  is the transposed matmul: no reshuffling of the batch into the feature axis as XLA's does.
* "dense": a VALID kernel as large as its input (LeNet's last layer) is a matmul on the
  flattened input.

A `custom_jvp` wires the lowerings in, so forward mode, reverse mode and `vmap` all work, and a
gradient nobody asks for (the image's) is never computed:

* a differentiated call (the train step) computes its output and its weight tangent (whose
  transpose is the weight gradient) with the chosen lowering (a long weight-gradient GEMM split
  in two, see `TOEPLITZ_SPLIT_WEIGHT_GRAD_ROWS`), and its input tangent (so the
  input gradient) with XLA's convolution, which is the faster one for that, except for
  stride-1 kernels of at least `TOEPLITZ_INPUT_GRAD_MIN_TAPS` taps (5x5 and up): there the
  input tangent is a Toeplitz GEMM on patches built only from reshapes, slices and a
  concatenation, so that its transpose (the input gradient) is one transposed GEMM and an
  overlap-add of pads, which beats XLA's "full" convolution for large kernels;
* an undifferentiated call (inference, evaluation) runs the chosen lowering as well (XLA's
  convolution with one input channel costs about the same at every output width, which kept
  slimmed LeNets from running faster). `models.cost` traces what it counts within `plain()`,
  so its counts stay the convolutions' MACs.

Results equal XLA's up to the order of float32 additions (tests/test_speed_equivalence.py
checks 1e-5 on outputs and gradients).

`conv2d(..., lowering="auto")` chooses "dense" for full-window VALID kernels and "toeplitz" for
stride-1, undilated, ungrouped convolutions with at most `TOEPLITZ_MAX_IN_CHANNELS` input
channels and a kernel larger than 1x1; everything else stays on XLA.

The module also holds the 2x2 max pool (`max_pool_2x2`) and the batch-norm normalisation
(`batch_normalize`) of `models/layers.py`, each with the plain version's values and a faster
gradient.

The rewrites are on where `dymu_jax.execution` says so: by default on the CPU backend only (on
GPU and TPU the native ops are the usual winners), overridable with `--execution` /
`DYMU_JAX_EXECUTION` ("fast_ops=on|off"). `with plain():` (read while tracing) or the
environment variable `DYMU_JAX_PLAIN_OPS=1` (read at import) turns every rewrite off whatever
the backend, e.g. to compare against the plain versions.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import execution

LOWERINGS = ("auto", "xla", "toeplitz", "dense")
# At most this many input channels take the Toeplitz lowering under "auto". Measured on an
# idle 2-core CPU (`benchmarks.step_profile`, forward + backward): LeNet's 1-channel 9x9 about
# 6x faster than XLA's, its 10-channel 5x5 conv2 2.0x, ResNet-small's 3x3 convolutions 1.5x
# (16 channels), 1.55x (32) and 1.13x (64); whole train steps (`step_speed`) +26% (LeNet) and
# +5% (ResNet-small) against a limit of 4. (An earlier limit of 4 came from timings under heavy
# load, where conv2 looked slower.)
TOEPLITZ_MAX_IN_CHANNELS = 64
# Output columns per Toeplitz block: enough that the matmul's output width (block * cout)
# reaches about this many columns, which keeps the GEMM efficient without much banded waste.
TOEPLITZ_TARGET_COLUMNS = 64
# Stride-1 Toeplitz kernels with at least this many taps (kh * kw) also take their input
# gradient through the lowering (a transposed GEMM and an overlap-add) instead of XLA's "full"
# convolution. Measured on an idle 2-core CPU (input gradient alone): LeNet's conv2 (10 -> 20,
# 5x5, batch 256) 3.7 ms against XLA's 7.3 ms; ResNet-small's 3x3 convolutions 1.2x to 6x
# slower than XLA's (16 to 64 channels), hence the threshold.
TOEPLITZ_INPUT_GRAD_MIN_TAPS = 25
# A Toeplitz weight gradient is one GEMM contracting over all patch rows (batch x output rows
# x blocks); from this many rows on it runs as two half-length GEMMs and a sum, which XLA's CPU
# GEMM does faster than one long contraction. Measured on an idle 2-core CPU: LeNet's conv1
# (28,672 rows) 6.5 -> 3.6 ms alone, its whole step about +10%; ResNet-small's 16-channel 3x3
# (16,384 rows) 4.9 -> 3.9 ms alone but its step 2-4% slower, and 4,096 to 8,192 rows no gain
# alone: hence a threshold between the two.
TOEPLITZ_SPLIT_WEIGHT_GRAD_ROWS = 20000

_ENV_VAR = "DYMU_JAX_PLAIN_OPS"
# None: follow `execution.choices()`; True/False: forced by `plain` or the environment variable.
_plain: bool | None = (
    True if os.environ.get(_ENV_VAR, "0").strip().lower() not in ("", "0", "false", "no")
    else None)


def _is_plain() -> bool:
  return not execution.choices().fast_ops if _plain is None else _plain


def enabled() -> bool:
  """Whether the rewrites of this module are on now (backend choice, `plain`, env var)."""
  return not _is_plain()


@contextlib.contextmanager
def plain(active: bool = True) -> Iterator[None]:
  """Within the block, every op here traces as its plain version (`lax` conv, `jnp.max` pool,
  autodiff batch norm); `plain(False)` turns the rewrites on whatever the backend.

  Read while tracing: a function jitted before entering the block keeps what it compiled.
  """
  global _plain
  previous, _plain = _plain, bool(active)
  try:
    yield
  finally:
    _plain = previous


def _xla_conv(x, w, strides, pads, dilation, groups):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, rhs_dilation=dilation,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def toeplitz_block(out_width: int, out_channels: int) -> int:
  """Output columns per block of the Toeplitz lowering (see `TOEPLITZ_TARGET_COLUMNS`).

  The smallest divisor of the output width from the target on (no padded outputs) unless that
  is over twice the target; then the target, and the last block computes a few extra columns.
  """
  target = max(1, min(out_width, -(-TOEPLITZ_TARGET_COLUMNS // out_channels)))
  divisor = next(b for b in range(target, out_width + 1) if out_width % b == 0)
  return divisor if divisor <= 2 * target else target


def _toeplitz_conv(x, w, strides, pads, block: int | None = None, split_rows: bool = False):
  """Row-Toeplitz GEMM convolution of NHWC x with an HWIO kernel (no dilation, no groups).

  With `split_rows`, a patch matrix of at least `TOEPLITZ_SPLIT_WEIGHT_GRAD_ROWS` rows (and an
  even batch) is multiplied in two halves by the same band, broadcast: the same values up to
  float32 rounding,
  and the transpose with respect to the kernel (the weight gradient) becomes two half-length
  GEMMs and a sum instead of one long contraction.
  """
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, h, width, _ = x.shape
  oh, ow = (h - kh) // sh + 1, (width - kw) // sw + 1
  block = toeplitz_block(ow, cout) if block is None else min(block, ow)
  num_blocks = -(-ow // block)
  window = (block - 1) * sw + kw
  # Columns the blocks read; the last block may run past the input (zeros, outputs cut below).
  needed = (num_blocks * block - 1) * sw + kw
  x = x[:, :, :needed] if needed <= width else jnp.pad(
      x, ((0, 0), (0, 0), (0, needed - width), (0, 0)))
  # rows[n, r, i] = x[n, r * sh + i]: the kh input rows that output row r reads. A gather with
  # static indices is one pass on CPU, where a stack of kh strided slices is kh + 1 passes.
  row_index = (sh * np.arange(oh)[:, None] + np.arange(kh)[None, :]).reshape(-1)
  rows = jnp.take(x, row_index, axis=1, mode="clip").reshape(
      n, oh, kh, needed, cin)
  # patches[n, r, b, i, p, c] = rows[n, r, i, b * block * sw + p, c]: block b's column window.
  if num_blocks == 1:
    patches = rows[:, :, None]
  else:
    patches = jnp.stack([rows[:, :, :, b * block * sw:b * block * sw + window]
                         for b in range(num_blocks)], axis=2)
  band = _toeplitz_band(w, window, block, sw)
  rows = n * oh * num_blocks
  if split_rows and rows >= TOEPLITZ_SPLIT_WEIGHT_GRAD_ROWS and n % 2 == 0:
    y = jnp.einsum("skm,smn->skn", patches.reshape(2, rows // 2, band.shape[0]),
                   jnp.broadcast_to(band, (2,) + band.shape))
  else:
    y = jnp.dot(patches.reshape(rows, band.shape[0]), band)
  return y.reshape(n, oh, num_blocks * block, cout)[:, :, :ow]


def _toeplitz_band(w, window: int, block: int, sw: int):
  """The banded matrix (kh * window * cin, block * cout) that maps a patch row to `block`
  output columns: band[i, p, c, o, d] = w[i, p - o * sw, c, d] where 0 <= p - o * sw < kw."""
  kh, kw, cin, cout = w.shape
  tap = np.arange(window)[:, None] - sw * np.arange(block)[None, :]
  valid = (tap >= 0) & (tap < kw)
  band = jnp.take(w, np.where(valid, tap, 0), axis=1)  # (kh, window, block, cin, cout)
  band = jnp.where(valid[None, :, :, None, None], band, 0.0)
  return band.transpose(0, 1, 3, 2, 4).reshape(kh * window * cin, block * cout)


def _toeplitz_conv_transposable(x, w, pads):
  """`_toeplitz_conv` at stride 1 with patches built from reshapes, slices and one
  concatenation (no gather), so that JAX's transpose of it, the input gradient, is a
  transposed GEMM followed by an overlap-add of pads (one fused loop), not a scatter-add.

  Column window b of width `block + kw - 1` is the concatenation of `J` consecutive
  `block`-wide chunks of the row, cut to the window; chunk j of every window at once is a
  reshape of the row shifted by `j * block`.
  """
  kh, kw, cin, cout = w.shape
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, h, width, _ = x.shape
  oh, ow = h - kh + 1, width - kw + 1
  block = toeplitz_block(ow, cout)
  num_blocks, window = -(-ow // block), block + kw - 1
  chunks = -(-window // block)
  total = (num_blocks + chunks - 1) * block
  x = x[:, :, :total] if total <= width else jnp.pad(
      x, ((0, 0), (0, 0), (0, total - width), (0, 0)))
  shifted = [x[:, :, j * block:(j + num_blocks) * block].reshape(n, h, num_blocks, block, cin)
             for j in range(chunks)]
  windows = jnp.concatenate(shifted, axis=3)[:, :, :, :window]  # (n, h, blocks, window, cin)
  patches = jnp.stack([windows[:, i:i + oh] for i in range(kh)], axis=3)
  y = jnp.dot(patches.reshape(n * oh * num_blocks, kh * window * cin),
              _toeplitz_band(w, window, block, 1))
  return y.reshape(n, oh, num_blocks * block, cout)[:, :, :ow]


def toeplitz_input_gradient(kernel_shape: Sequence[int], strides: tuple[int, int]) -> bool:
  """Whether a Toeplitz-lowered convolution also takes its input gradient through a GEMM
  (see `TOEPLITZ_INPUT_GRAD_MIN_TAPS`) rather than XLA's convolution."""
  kh, kw = kernel_shape[:2]
  return tuple(strides) == (1, 1) and kh * kw >= TOEPLITZ_INPUT_GRAD_MIN_TAPS


def _dense_conv(x, w):
  """A VALID convolution whose kernel covers the whole input: one matmul."""
  n = x.shape[0]
  y = jnp.dot(x.reshape(n, -1), w.reshape(-1, w.shape[-1]))
  return y.reshape(n, 1, 1, w.shape[-1])


def _lowered(x, w, lowering, strides, pads, split_rows=False):
  if lowering == "toeplitz":
    return _toeplitz_conv(x, w, strides, pads, split_rows=split_rows)
  return _dense_conv(x, w)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _rewritten_conv(x, w, lowering: str, strides, pads):
  # Undifferentiated calls (inference, evaluation) run the lowering too: XLA's CPU convolution
  # with one input channel takes about the same time whatever the output width, so without it
  # a slimmed LeNet is hardly faster than the full one. `models.cost` traces within `plain()`,
  # so the MACs it counts are the convolution's, not the lowering's.
  return _lowered(x, w, lowering, strides, pads)


@functools.partial(_rewritten_conv.defjvp, symbolic_zeros=True)
def _rewritten_conv_jvp(lowering, strides, pads, primals, tangents):
  x, w = primals
  dx, dw = tangents
  # The primal takes the same (split) patch matrix as the weight tangent: one copy of it.
  y = _lowered(x, w, lowering, strides, pads, split_rows=True)
  dy = None
  if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
    # The input tangent's transpose is the input gradient: a matmul for "dense"; for
    # "toeplitz", a transposed GEMM and overlap-add for large stride-1 kernels, else XLA's.
    if lowering == "dense":
      dy = _dense_conv(dx, w)
    elif toeplitz_input_gradient(w.shape, strides):
      dy = _toeplitz_conv_transposable(dx, w, pads)
    else:
      dy = _xla_conv(dx, w, strides, pads, (1, 1), 1)
  if not isinstance(dw, jax.custom_derivatives.SymbolicZero):
    # Linear in dw: its transpose is the transposed matmul (the fast weight gradient).
    dyw = _lowered(x, dw, lowering, strides, pads, split_rows=True)
    dy = dyw if dy is None else dy + dyw
  if dy is None:
    dy = jnp.zeros_like(y)
  return y, dy


def choose_lowering(in_shape: Sequence[int], kernel_shape: Sequence[int],
                    strides: tuple[int, int], pads: Pads, dilation: tuple[int, int],
                    groups: int) -> str:
  """The lowering "auto" picks for these static shapes ("xla", "toeplitz" or "dense")."""
  kh, kw, cin, _ = kernel_shape
  if groups != 1 or dilation != (1, 1):
    return "xla"
  if pads == ((0, 0), (0, 0)) and (kh, kw) == tuple(in_shape[1:3]):
    return "dense"
  if strides == (1, 1) and cin <= TOEPLITZ_MAX_IN_CHANNELS and kh * kw > 1:
    return "toeplitz"
  return "xla"


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: tuple[int, int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "VALID",
           dilation: tuple[int, int] = (1, 1), groups: int = 1,
           lowering: str = "auto") -> jax.Array:
  """`lax.conv_general_dilated` on NHWC x and an HWIO kernel, lowered for CPU speed.

  Args:
    x: (N, H, W, cin) input.
    kernel: (kh, kw, cin // groups, cout).
    strides: window strides.
    padding: "SAME", "VALID" or ((top, bottom), (left, right)).
    dilation: kernel (rhs) dilation.
    groups: feature group count.
    lowering: "auto" (`choose_lowering`, or "xla" within `plain()`), or force "xla", "toeplitz"
      (stride and padding allowed; no dilation or groups) or "dense" (full-window VALID only).

  Returns:
    (N, H', W', cout), equal to XLA's convolution up to float32 rounding.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f"Unknown conv lowering {lowering!r}; allowed: {', '.join(LOWERINGS)}.")
  strides, dilation = tuple(strides), tuple(dilation)
  if isinstance(padding, str):
    pads = tuple(jax.lax.padtype_to_pads(
        x.shape[1:3], [(k - 1) * d + 1 for k, d in zip(kernel.shape[:2], dilation)],
        strides, padding))
  else:
    pads = tuple(tuple(p) for p in padding)
  pads = tuple((int(a), int(b)) for a, b in pads)
  if lowering == "auto":
    lowering = "xla" if _is_plain() else choose_lowering(x.shape, kernel.shape, strides, pads,
                                                     dilation, groups)
  if lowering == "xla":
    return _xla_conv(x, kernel, strides, pads, dilation, groups)
  if groups != 1 or dilation != (1, 1):
    raise ValueError(f"The {lowering!r} conv lowering needs groups=1 and no dilation, got "
                     f"groups={groups}, dilation={dilation}.")
  if lowering == "dense" and (pads != ((0, 0), (0, 0)) or
                              tuple(kernel.shape[:2]) != tuple(x.shape[1:3])):
    raise ValueError(f"The 'dense' conv lowering needs a VALID kernel as large as its input, "
                     f"got kernel {tuple(kernel.shape[:2])} on input {tuple(x.shape[1:3])} "
                     f"with padding {pads}.")
  return _rewritten_conv(x, kernel, lowering, strides, pads)


# --------------------------------------------------------------------------------------------
# Pooling.


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pool with stride 2 of NHWC x (odd trailing rows/columns dropped).

  Value and gradient are those of `jnp.max` over the reshaped 2x2 windows: each input equal to
  its window's maximum gets the output gradient divided by the number of such inputs (ties are
  common, e.g. over blank image borders). The forward pass is `jnp.max`'s; the backward pass
  is elementwise over the four strided corners of the windows: it recomputes the tie mask and
  counts from x and the output, where `jnp.max`'s rule writes a float mask and reduces the
  counts in the forward pass and reads them back.
  """
  if _is_plain():
    return jnp.max(_pool_windows(x), axis=(2, 4))
  return _max_pool_2x2(x)


@jax.custom_vjp
def _max_pool_2x2(x):
  return _pool_forward(x)


def _pool_windows(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _pool_forward(x):
  # A reduction over the reshaped windows, as the plain version. XLA counts a reduction as
  # expensive and so computes it once; an elementwise max of the four strided corners (faster
  # alone) counts as cheap, and XLA then recomputed it, with the bias and ReLU in front, inside
  # every consumer: the next convolution's Toeplitz patches (which read each value about nine
  # times) and the four tie masks of the backward pass. In the LeNet step that cost 5.5 ms of
  # patches instead of 0.8 ms (`benchmarks.step_profile --trace`).
  return jnp.max(_pool_windows(x), axis=(2, 4))


def _pool_fwd(x):
  y = _pool_forward(x)
  return y, (x, y)


def _pool_bwd(residuals, g):
  x, y = residuals
  n, h, w, c = x.shape
  even = x[:, :h - h % 2, :w - w % 2, :]
  corners = ((0, 0), (0, 1), (1, 0), (1, 1))
  hits = [even[:, i::2, j::2] == y for i, j in corners]
  ones = [hit.astype(x.dtype) for hit in hits]
  # Tie count per window from four elementwise compares (no reduction pass); small integers,
  # so the sum is exact in any order and equals jnp.max's count.
  share = g / ((ones[0] + ones[1]) + (ones[2] + ones[3]))
  zero = jnp.zeros((), x.dtype)
  dx = None
  for (i, j), hit in zip(corners, hits):
    # Interior padding puts corner (i, j) of every window back in place; each position of dx
    # receives exactly one corner (or the dropped odd row/column: zero), so the sum is exact.
    part = jax.lax.pad(jnp.where(hit, share, zero), zero,
                       ((0, 0, 0), (i, 1 - i + h % 2, 1), (j, 1 - j + w % 2, 1), (0, 0, 0)))
    dx = part if dx is None else dx + part
  return (dx,)


_max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


# --------------------------------------------------------------------------------------------
# Batch normalisation.


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  # Two passes (centre, then square), as `layers.SlimBatchNorm` always computed them.
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  return mean, jnp.mean(jnp.square(x - mean), axis=axes)


def batch_normalize(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x - mean) / sqrt(var + epsilon) over every axis but the last, with mean and var.

  The values are exactly those of the plain computation (mean, then the mean square of the
  centred input). The gradient is the closed form `rsqrt(var + eps) * (g - mean(g) - xhat *
  mean(g * xhat))` (plus the terms of the mean and var cotangents): two reductions and one
  elementwise pass, where autodiff of the plain computation makes XLA run several more passes
  over the activation. It equals that autodiff gradient up to float32 rounding.
  """
  if _is_plain():
    return _plain_batch_normalize(x, epsilon)
  return _batch_normalize(x, epsilon)


def _plain_batch_normalize(x, epsilon):
  mean, var = _moments(x)
  return (x - mean) * jax.lax.rsqrt(var + epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _batch_normalize(x, epsilon):
  return _plain_batch_normalize(x, epsilon)


def _bn_fwd(x, epsilon):
  out = _plain_batch_normalize(x, epsilon)
  return out, (x, out[1], out[2])


def _bn_bwd(epsilon, residuals, cotangents):
  x, mean, var = residuals
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  count = float(np.prod(x.shape[:-1]))
  rstd = jax.lax.rsqrt(var + epsilon)
  centred = x - mean
  xhat = centred * rstd
  dx = rstd * (g - jnp.mean(g, axis=axes) - xhat * jnp.mean(g * xhat, axis=axes))
  # d mean / dx = 1 / count; d var / dx = 2 (x - mean) / count. Zero in the train step (the
  # running statistics are not differentiated), and then fused away.
  dx = dx + g_mean / count + g_var * (2.0 / count) * centred
  return (dx,)


_batch_normalize.defvjp(_bn_fwd, _bn_bwd)
