"""Task decoders with a slimmable hidden width: a DeepLab-style dense head and an MLP head.

A decoder's input width follows the encoder output (its kernels are sliced to the incoming
channels); its hidden layers keep `channels(hidden_features, width)` channels; its output layer
never slims (METHODS.md section 2 [ours]).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dymu_jax.models.layers import SlimBatchNorm, SlimConv, SlimDense
from dymu_jax.models.widths import channels

Features = jax.Array | Sequence[jax.Array]

# Context rates of the dense heads per backbone [ours]: DeepLab's (6, 12, 18) for ImageNet-size
# encoders (any backbone not listed), smaller rates for the small maps of resnet_small (8x8 on
# 64 px inputs). `build_multitask` and `branched.build_branched` both take them.
DEFAULT_ATROUS_RATES = {"resnet_small": (1, 2, 3)}


def _last(features: Features) -> jax.Array:
  return features[-1] if isinstance(features, (list, tuple)) else features


class DenseHead(nn.Module):
  """DeepLabv3-style head: atrous spatial pyramid, a 3x3 conv, a 1x1 classifier, upsampling.

  Context branches: a 1x1 conv, one 3x3 conv per rate in `atrous_rates`, and (optionally) an
  image-pooling branch (global mean, 1x1 conv, broadcast back), each with batch norm + ReLU.
  The projection of their concatenation is written as a sum of one 1x1 conv per branch (the
  same function as DeepLab's concat + 1x1 conv, which splits the kernel by branch): it keeps
  every kernel's leading channels meaningful when the branches are slimmed, so a slimmed head
  equals a physically sliced one. Then batch norm + ReLU, a 3x3 conv + batch norm + ReLU, the
  1x1 classifier (with bias; never slims) and bilinear upsampling (half-pixel centres, as
  PyTorch's `align_corners=False`) to `out_size`. No dropout.

  Attributes:
    num_outputs: output channels (classes, 1 for depth/edges, 3 for normals).
    hidden_features: full hidden width (DeepLab: 256).
    atrous_rates: dilation rates of the 3x3 context branches (DeepLab at stride 16: 6, 12, 18).
    image_pooling: include the global-pooling branch.
    in_features: full width of the encoder output; None infers it at initialisation.
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  num_outputs: int
  hidden_features: int = 256
  atrous_rates: tuple[int, ...] = (6, 12, 18)
  image_pooling: bool = True
  in_features: int | None = None
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features: Features, *, width: float = 1.0,
               out_size: tuple[int, int] | None = None, train: bool = False) -> jax.Array:
    """Predicts (B, H, W, num_outputs) from the last encoder map (B, h, w, c).

    Args:
      features: the encoder's stage outputs (the last is used) or the last map itself.
      width: hidden width multiplier (a `DynamicMultiplier` takes the masked path).
      out_size: (H, W) to upsample to; None keeps the encoder's resolution.
      train: batch statistics in batch norm.
    """
    x = _last(features)
    if x.ndim != 4:
      raise ValueError(
          f"DenseHead needs a (B, H, W, C) feature map but got shape {tuple(x.shape)}; use a "
          f"backbone with spatial outputs for dense tasks.")
    hidden = channels(self.hidden_features, width)
    conv = functools.partial(SlimConv, self.hidden_features)
    bn = functools.partial(SlimBatchNorm, momentum=self.bn_momentum,
                           axis_name=self.bn_axis_name, features=self.hidden_features)

    def branch(y, name, **conv_kwargs):
      y = conv(name=f"{name}_conv", in_features=self.in_features, **conv_kwargs)(y, hidden)
      return nn.relu(bn(name=f"{name}_bn")(y, train, hidden))

    branches = [branch(x, "aspp0", kernel_size=1, padding=0)]
    for i, rate in enumerate(self.atrous_rates, start=1):
      branches.append(branch(x, f"aspp{i}", kernel_size=3, dilation=rate, padding=rate))
    if self.image_pooling:
      pooled = branch(jnp.mean(x, axis=(1, 2), keepdims=True), "pool", kernel_size=1, padding=0)
      branches.append(jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[-1:]))
    y = sum(conv(1, padding=0, in_features=self.hidden_features, name=f"project{i}")(b, hidden)
            for i, b in enumerate(branches))
    y = nn.relu(bn(name="project_bn")(y, train, hidden))
    y = conv(3, padding=1, in_features=self.hidden_features, name="conv")(y, hidden)
    y = nn.relu(bn(name="bn")(y, train, hidden))
    y = SlimConv(self.num_outputs, 1, padding=0, use_bias=True,
                 in_features=self.hidden_features, name="classifier")(y)
    if out_size is not None and tuple(out_size) != tuple(y.shape[1:3]):
      y = jax.image.resize(y, (y.shape[0], *out_size, y.shape[-1]), "bilinear", antialias=False)
    return y


class MLPHead(nn.Module):
  """Classification / regression head: global average pool (for maps), hidden ReLU layers, output.

  Encoder outputs that are already vectors (B, C) (LeNet's dense stage, the MLP backbone) are
  read as they are; only (B, H, W, C) maps are pooled.

  Attributes:
    num_outputs: output units (classes, or 1 for regression); never slims.
    hidden_features: full width of every hidden layer.
    num_hidden: number of hidden layers (0: a linear read-out, whose width has no effect).
    in_features: full width of the encoder output; None infers it at initialisation.
    batch_norm: batch norm between each hidden layer and its ReLU [ours, default off]. A
      slimmed encoder feeds a hidden unit only part of the inputs it was trained on, which
      shifts its pre-activation; batch norm (recalibrated per SubNet, as ECMT does) undoes the
      shift, so narrow-encoder SubNets gain from wider heads instead of losing.
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm` (with `batch_norm`).
  """

  num_outputs: int
  hidden_features: int = 256
  num_hidden: int = 1
  in_features: int | None = None
  batch_norm: bool = False
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, features: Features, *, width: float = 1.0,
               train: bool = False) -> jax.Array:
    """Predicts (B, num_outputs) from the last encoder output ((B, h, w, c) or (B, c))."""
    x = _last(features)
    if x.ndim == 4:
      x = jnp.mean(x, axis=(1, 2))
    elif x.ndim != 2:
      raise ValueError(
          f"MLPHead needs a (B, H, W, C) or (B, C) input but got shape {tuple(x.shape)}.")
    hidden = channels(self.hidden_features, width)
    in_features = self.in_features
    for i in range(self.num_hidden):
      x = SlimDense(self.hidden_features, in_features=in_features, name=f"hidden{i}")(x, hidden)
      if self.batch_norm:
        x = SlimBatchNorm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                          features=self.hidden_features, name=f"hidden{i}_bn")(x, train, hidden)
      x = nn.relu(x)
      in_features = self.hidden_features
    return SlimDense(self.num_outputs, in_features=in_features, name="output")(x)
