"""Slimmable encoders: LeNet, ResNet (small, 18, 34), MobileNetV2, and an MLP for vectors.

Every backbone is a Linen module with

* `num_stages` and `stage_channels` (the full output width of every stage),
* `__call__(x, *, widths, train) -> list of stage outputs`, where `widths` holds one multiplier
  per stage (None: full width) and every layer of stage s keeps `channels(full, widths[s])` of
  its channels (METHODS.md section 2 [ours]); the input (image or vector) never slims,
* `sliced(widths)`: the same backbone whose FULL widths are those slimmed widths. Running it on
  variables cut with `layers.slice_variables` equals running this one slimmed (export).

The stage bodies (`resnet_stem`, `basic_stage`, `conv_pool_stage`, `dense_stage`) are functions
that create their layers inside the calling module under the names it gives: the backbones and
the branched streams (`models.branched_blocks`) run the same stages under their own names.
(Over 500 lines: the encoders share the slimming contract, these stage bodies and the
torchvision name tables below.)

Convolutions pad like PyTorch (`padding = dilation * (k - 1) // 2` zeros on each side), so
variables imported from torchvision give the same outputs (`models/pretrained.py`).

Variable names and their torchvision state-dict counterparts (kernels OIHW -> HWIO, i.e.
`w.transpose(2, 3, 1, 0)`; a depthwise (C, 1, kh, kw) kernel becomes (kh, kw, 1, C); for every
batch norm `scale, bias` in "params" and `mean, var` in "batch_stats" are torch's
`weight, bias, running_mean, running_var`):

ResNet (`ResNet18`, `ResNet34`; `ResNetSmall` has no torchvision twin):

| ours                                   | torchvision `resnet18/34`          |
|----------------------------------------|------------------------------------|
| stem_conv/kernel                       | conv1.weight                       |
| stem_bn                                | bn1                                |
| stage{s}_block{b}/conv1, bn1           | layer{s}.{b}.conv1, bn1  (s = 1..4)|
| stage{s}_block{b}/conv2, bn2           | layer{s}.{b}.conv2, bn2            |
| stage{s}_block{b}/downsample_conv      | layer{s}.{b}.downsample.0          |
| stage{s}_block{b}/downsample_bn        | layer{s}.{b}.downsample.1          |
| (none: the classifier is not encoder)  | fc                                 |

MobileNetV2 (`block{i}` carries torchvision's `features.{i}` index, i = 1..17):

| ours                          | torchvision `mobilenet_v2`                          |
|-------------------------------|-----------------------------------------------------|
| stem_conv, stem_bn            | features.0.0, features.0.1                          |
| block{i}/expand_conv, _bn     | features.{i}.conv.0.0, conv.0.1   (expansion t > 1) |
| block{i}/depthwise_conv, _bn  | features.{i}.conv.1.0, conv.1.1   (t = 1: conv.0.0, conv.0.1) |
| block{i}/project_conv         | features.{i}.conv.2               (t = 1: conv.1)   |
| block{i}/project_bn           | features.{i}.conv.3               (t = 1: conv.2)   |
| last_conv, last_bn            | features.18.0, features.18.1                        |
| (none)                        | classifier.1                                        |

LeNet (the PHN Multi-MNIST target network, no torch checkpoint): conv1, conv2 [, bn1, bn2],
fc [, bn_fc].

MLP (feature vectors, e.g. tabular data; no torch twin): dense{i} [, bn{i}] per hidden layer.

Inputs (`input_kind`): the convolutional backbones take images (B, H, W, C); `MLP` takes
feature vectors (B, D) (it flattens any rank after the batch axis). `MultiTaskNet` checks the
batch against the backbone's kind (`check_input_kind`) and stops with one sentence naming the
shape and the backbones that fit.

Smallest images (`min_image_size`): the ResNets and MobileNetV2 pad every convolution and pool,
so any image of at least 1 px runs (below the output stride the last stages see 1x1 maps);
LeNet's valid convolutions and 2x2 pools need 20 px with its default 9x9 and 5x5 kernels. Each
backbone checks its input against it before its first layer, in one sentence. The MLP takes no
images: its `min_image_size` is 1, so image-size checks pass and `check_input_kind` refuses.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax

from dymu_jax.models import layers
from dymu_jax.models.layers import SlimBatchNorm, SlimConv
from dymu_jax.models.widths import CHANNEL_DIVISOR, DynamicMultiplier, channels

# The smallest image side of the backbones whose every convolution and pool is padded.
PADDED_MIN_IMAGE_SIZE = 1
# What a backbone takes (`input_kind`): images (B, H, W, C) or feature vectors (B, D).
IMAGES, VECTORS = "images", "vectors"


def check_image_size(owner: str, minimum: int, shape: Sequence[int]) -> None:
  """Stops with one sentence when NHWC images of `shape` are smaller than `minimum` px (a
  convolution would otherwise fail deep inside its lowering)."""
  height, width = shape[1:3]
  if min(height, width) < minimum:
    raise ValueError(f"{owner} needs images of at least {minimum}x{minimum} px, got "
                     f"{height}x{width}; resize the images or choose another backbone.")


def stage_multipliers(widths: Sequence[float] | None, num_stages: int,
                      owner: str) -> tuple[float, ...]:
  """Validated per-stage multipliers (None: all 1.0)."""
  if widths is None:
    return (1.0,) * num_stages
  if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
    raise ValueError(
        f"{owner} takes widths as a sequence of per-stage multipliers (or None), got "
        f"{type(widths).__name__}.")
  widths = tuple(w if isinstance(w, DynamicMultiplier) else float(w) for w in widths)
  if len(widths) != num_stages:
    raise ValueError(
        f"{owner} has {num_stages} stages but widths has {len(widths)} multipliers {widths}.")
  for w in widths:
    if not isinstance(w, DynamicMultiplier) and not 0.0 < w <= 1.0:
      raise ValueError(f"{owner} got width multiplier {w}; multipliers must lie in (0, 1].")
  return widths


def dilation_schedule(stem_stride: int, strides: Sequence[int], output_stride: int | None,
                       owner: str) -> list[tuple[int, int, int]]:
  """(stride, dilation of the first conv, dilation after) per strided unit.

  Once the running stride would pass `output_stride`, strides become 1 and later convolutions
  dilate instead (DeepLab); the unit that gave up its stride keeps the previous dilation on its
  first convolution, as torchvision's `replace_stride_with_dilation`.
  """
  reachable = [stem_stride]
  for s in strides:
    reachable.append(reachable[-1] * s)
  if output_stride is None:
    output_stride = reachable[-1]
  if output_stride not in reachable:
    raise ValueError(
        f"{owner} cannot reach output_stride={output_stride}; possible values: "
        f"{', '.join(str(r) for r in sorted(set(reachable)))}.")
  current, dilation, schedule = stem_stride, 1, []
  for s in strides:
    if current * s > output_stride:
      schedule.append((1, dilation, dilation * s))
      dilation *= s
    else:
      current *= s
      schedule.append((s, dilation, dilation))
  return schedule


class BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convolutions) with slimmable width.

  Attributes:
    features: full output width.
    in_features: full input width.
    strides: stride of the first convolution and of the projection.
    dilation: (first conv, second conv) dilation.
    projection: use a 1x1 convolution + batch norm shortcut.
    zero_init_residual: start the last batch norm's scale at 0 (block starts as identity).
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  features: int
  in_features: int
  strides: int = 1
  dilation: tuple[int, int] = (1, 1)
  projection: bool = False
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, width: int, train: bool) -> jax.Array:
    bn = functools.partial(SlimBatchNorm, momentum=self.bn_momentum,
                           axis_name=self.bn_axis_name, features=self.features)
    d1, d2 = self.dilation
    y = SlimConv(self.features, 3, strides=self.strides, dilation=d1, padding=d1,
                 in_features=self.in_features, name="conv1")(x, width)
    y = nn.relu(bn(name="bn1")(y, train, width))
    y = SlimConv(self.features, 3, dilation=d2, padding=d2, in_features=self.features,
                 name="conv2")(y, width)
    scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = bn(scale_init=scale_init, name="bn2")(y, train, width)
    if self.projection:
      shortcut = SlimConv(self.features, 1, strides=self.strides, padding=0,
                          in_features=self.in_features, name="downsample_conv")(x, width)
      shortcut = bn(name="downsample_bn")(shortcut, train, width)
    else:
      shortcut = x
    return nn.relu(y + shortcut)


# ----------------------------------------------------------------------------------------------
# Stage bodies shared by the backbones and the branched streams (`branched_blocks`). Called
# inside a module's compact method, they create their layers in that module under the names
# given, so every caller keeps its own parameter paths.

RESNET_STEMS = ("imagenet", "small")


def resnet_stem(x: jax.Array, *, kind: str, features: int, width: int | None, train: bool,
                in_features: int | None = None, bn_momentum: float = 0.9,
                bn_axis_name: str | None = None) -> tuple[jax.Array, int]:
  """(stem output, its stride): "imagenet" is 7x7/2 conv + BN + ReLU + 3x3/2 max pool
  (torchvision), "small" 3x3/1 conv + BN + ReLU; layers "stem_conv" and "stem_bn"."""
  if kind not in RESNET_STEMS:
    raise ValueError(f"Unknown ResNet stem {kind!r}; use 'imagenet' or 'small'.")
  imagenet = kind == "imagenet"
  x = SlimConv(features, 7 if imagenet else 3, strides=2 if imagenet else 1,
               padding=3 if imagenet else 1, in_features=in_features, name="stem_conv")(x, width)
  x = nn.relu(SlimBatchNorm(momentum=bn_momentum, axis_name=bn_axis_name, features=features,
                            name="stem_bn")(x, train, width))
  return (layers.max_pool_3x3_s2(x), 4) if imagenet else (x, 1)


def basic_stage(x: jax.Array, *, features: int, in_features: int, num_blocks: int,
                strides: int, dilation: tuple[int, int], projection: bool, width: int | None,
                train: bool, name: str, zero_init_residual: bool = False,
                bn_momentum: float = 0.9, bn_axis_name: str | None = None) -> jax.Array:
  """One ResNet stage: `num_blocks` BasicBlocks named f"{name}{b}". The first takes the stride,
  the dilation (its first conv, every later conv; see `dilation_schedule`) and, with
  `projection`, a projection shortcut."""
  first, later = dilation
  for b in range(num_blocks):
    x = BasicBlock(features=features, in_features=in_features if b == 0 else features,
                   strides=strides if b == 0 else 1,
                   dilation=(first, later) if b == 0 else (later, later),
                   projection=projection and b == 0, zero_init_residual=zero_init_residual,
                   bn_momentum=bn_momentum, bn_axis_name=bn_axis_name,
                   name=f"{name}{b}")(x, width, train)
  return x


def conv_pool_stage(x: jax.Array, *, features: int, kernel_size: int | tuple[int, int],
                    in_features: int | None, batch_norm: bool, width: int | None, train: bool,
                    conv_name: str, bn_name: str, bn_momentum: float = 0.9,
                    bn_axis_name: str | None = None) -> jax.Array:
  """One LeNet stage: valid conv [+ BN] + ReLU + 2x2 max pool (no conv bias with BN)."""
  x = SlimConv(features, kernel_size, padding="VALID", use_bias=not batch_norm,
               in_features=in_features, name=conv_name)(x, width)
  if batch_norm:
    x = SlimBatchNorm(momentum=bn_momentum, axis_name=bn_axis_name, features=features,
                      name=bn_name)(x, train, width)
  if min(x.shape[1:3]) < 2:
    raise ValueError(f"The {conv_name} output of shape {tuple(x.shape)} is too small to pool; "
                     f"use larger images.")
  return layers.max_pool_2x2(nn.relu(x))


def dense_stage(x: jax.Array, *, features: int, in_features: int | None, batch_norm: bool,
                kernel_init, width: int | None, train: bool, dense_name: str, bn_name: str,
                bn_momentum: float = 0.9, bn_axis_name: str | None = None) -> jax.Array:
  """One hidden layer on vectors (B, D): dense [+ BN] + ReLU (no dense bias with BN)."""
  x = layers.SlimDense(features, use_bias=not batch_norm, in_features=in_features,
                       kernel_init=kernel_init, name=dense_name)(x, width)
  if batch_norm:
    x = SlimBatchNorm(momentum=bn_momentum, axis_name=bn_axis_name, features=features,
                      name=bn_name)(x, train, width)
  return nn.relu(x)


class ResNet(nn.Module):
  """ResNet with basic blocks; one slimmable stage per group of blocks.

  Stage 1 includes the stem (whose width follows stage 1, as in torchvision where both are 64),
  so a stage's multiplier sets every convolution in it. The first block of every stage after
  the first has a projection shortcut (torchvision's rule for ResNet-18/34); deciding it from
  the position rather than from channel counts keeps slimmed and physically sliced networks
  identical.

  Attributes:
    stage_sizes: blocks per stage.
    stage_channels: full output width of each stage.
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, torchvision) or "small" (3x3/1 conv, no
      pool, for 32-64 px inputs).
    output_stride: total stride of the last stage; smaller than the natural one (32 for
      "imagenet", 8 for "small" with 4 stages) dilates the last stages (for dense tasks).
    zero_init_residual: start each block's last batch-norm scale at 0.
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  stage_channels: tuple[int, ...] = (64, 128, 256, 512)
  stem: str = "imagenet"
  output_stride: int | None = None
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @property
  def num_stages(self) -> int:
    return len(self.stage_channels)

  @property
  def min_image_size(self) -> int:
    """Every convolution and pool is padded: any image of at least 1 px runs."""
    return PADDED_MIN_IMAGE_SIZE

  def sliced_kwargs(self, widths: Sequence[float]) -> dict[str, Any]:
    """Attribute overrides whose full widths are this network slimmed by `widths`."""
    widths = stage_multipliers(widths, self.num_stages, type(self).__name__)
    return {"stage_channels": tuple(channels(c, m)
                                    for c, m in zip(self.stage_channels, widths))}

  def sliced(self, widths: Sequence[float]) -> ResNet:
    """This backbone with the slimmed widths as its full widths."""
    return self.clone(parent=None, **self.sliced_kwargs(widths))

  @nn.compact
  def __call__(self, x: jax.Array, *, widths: Sequence[float] | None = None,
               train: bool = False) -> list[jax.Array]:
    owner = type(self).__name__
    if len(self.stage_sizes) != len(self.stage_channels):
      raise ValueError(
          f"{owner} has {len(self.stage_sizes)} stage_sizes but {len(self.stage_channels)} "
          f"stage_channels; give one width per stage.")
    if self.stem not in RESNET_STEMS:
      raise ValueError(f"{owner} got stem={self.stem!r}; use 'imagenet' or 'small'.")
    check_image_size(owner, self.min_image_size, x.shape)
    widths = stage_multipliers(widths, self.num_stages, owner)
    stem_features = self.stage_channels[0]
    x, stem_stride = resnet_stem(x, kind=self.stem, features=stem_features,
                                 width=channels(stem_features, widths[0]), train=train,
                                 bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
    strides = [1] + [2] * (self.num_stages - 1)
    schedule = dilation_schedule(stem_stride, strides, self.output_stride, owner)
    outputs = []
    in_features = stem_features
    for s, (num_blocks, features, multiplier) in enumerate(
        zip(self.stage_sizes, self.stage_channels, widths)):
      stride, first_dilation, dilation = schedule[s]
      x = basic_stage(x, features=features, in_features=in_features, num_blocks=num_blocks,
                      strides=stride, dilation=(first_dilation, dilation), projection=s > 0,
                      width=channels(features, multiplier), train=train,
                      name=f"stage{s + 1}_block", zero_init_residual=self.zero_init_residual,
                      bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
      in_features = features
      outputs.append(x)
    return outputs


class ResNet18(ResNet):
  """torchvision ResNet-18 layout (stages 64-128-256-512, 2 blocks each)."""

  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)


class ResNet34(ResNet):
  """torchvision ResNet-34 layout (stages 64-128-256-512, 3-4-6-3 blocks)."""

  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)


class ResNetSmall(ResNet):
  """ResNet for 32-64 px inputs: 3x3 stem, no max-pool, stages 16-32-64-128 [ours default].

  Use `stage_channels` to change the widths (e.g. (32, 64, 128, 256)) and `stage_sizes` the
  depth; the natural output stride is 8 with four stages.
  """

  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  stage_channels: tuple[int, ...] = (16, 32, 64, 128)
  stem: str = "small"


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's `_make_divisible` (MobileNet channel rounding)."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


# torchvision MobileNetV2 inverted-residual rows: (expansion t, channels c, repeats n, stride s).
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection (+ residual).

  Attributes:
    features: full output width.
    in_features: full input width.
    hidden_features: full expanded width (equals in_features when `expand` is False).
    expand: has the 1x1 expansion convolution (expansion ratio t > 1).
    strides, dilation: of the depthwise convolution.
    residual: add the input (needs stride 1 and equal widths).
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  features: int
  in_features: int
  hidden_features: int
  expand: bool = True
  strides: int = 1
  dilation: int = 1
  residual: bool = False
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, hidden_width: int, width: int, train: bool) -> jax.Array:
    bn = functools.partial(SlimBatchNorm, momentum=self.bn_momentum,
                           axis_name=self.bn_axis_name)
    y = x
    if self.expand:
      y = SlimConv(self.hidden_features, 1, padding=0, in_features=self.in_features,
                   name="expand_conv")(y, hidden_width)
      y = nn.relu6(bn(features=self.hidden_features, name="expand_bn")(y, train, hidden_width))
    y = SlimConv(self.hidden_features, 3, strides=self.strides, dilation=self.dilation,
                 padding=self.dilation, groups=self.hidden_features,
                 name="depthwise_conv")(y, hidden_width)
    y = nn.relu6(bn(features=self.hidden_features, name="depthwise_bn")(y, train, hidden_width))
    y = SlimConv(self.features, 1, padding=0, in_features=self.hidden_features,
                 name="project_conv")(y, width)
    y = bn(features=self.features, name="project_bn")(y, train, width)
    return y + x if self.residual else y


# The default stages of `MobileNetV2` [ours]: block_setting rows per stage, by output stride.
MOBILENET_V2_STAGE_ROWS = ((0,), (1,), (2,), (3, 4), (5, 6))


def mobilenet_v2_width(value: float, width_multiplier: float) -> int:
  """A channel count under torchvision's `width_mult` (`make_divisible`; as given at 1.0)."""
  return int(value) if width_multiplier == 1.0 else make_divisible(value * width_multiplier)


def mobilenet_v2_architecture(owner: str, *, width_multiplier: float = 1.0,
                              block_setting: Sequence[Sequence[int]] = MOBILENET_V2_SETTING,
                              stem_channels: int = 32, last_channels: int = 1280,
                              expanded_channels: Sequence[int] | None = None,
                              stage_rows: Sequence[Sequence[int]] = MOBILENET_V2_STAGE_ROWS,
                              output_stride: int | None = None
                              ) -> tuple[int, list[dict[str, int]], int]:
  """(stem width, one dict per block, last width) of a MobileNetV2 with `MobileNetV2`'s
  attributes: full widths after `width_multiplier`. A block's dict holds its row, stage,
  expansion t, in_features, features, hidden (expanded) width, first_of_row, and the strides and
  dilation of its depthwise convolution (`dilation_schedule` for `output_stride`)."""
  rows = [r for stage in stage_rows for r in stage]
  if rows != list(range(len(block_setting))) or not all(stage_rows):
    raise ValueError(
        f"{owner} stage_rows {tuple(stage_rows)} must list the block_setting rows "
        f"0..{len(block_setting) - 1} once each, in order, at least one per stage.")
  stage_of_row = {r: s for s, stage in enumerate(stage_rows) for r in stage}
  stem = mobilenet_v2_width(stem_channels, width_multiplier)
  last = (last_channels if width_multiplier == 1.0
          else make_divisible(last_channels * max(1.0, width_multiplier)))
  blocks, in_features = [], stem
  for row, (t, c, n, s) in enumerate(block_setting):
    features = mobilenet_v2_width(c, width_multiplier)
    for i in range(n):
      blocks.append(dict(row=row, stage=stage_of_row[row], t=t, in_features=in_features,
                         features=features, stride=s if i == 0 else 1, first_of_row=i == 0))
      in_features = features
  if expanded_channels is not None and len(expanded_channels) != len(blocks):
    raise ValueError(
        f"{owner} expanded_channels has {len(expanded_channels)} entries but the "
        f"network has {len(blocks)} blocks.")
  schedule = dilation_schedule(2, [b["stride"] for b in blocks], output_stride, owner)
  for k, block in enumerate(blocks):
    if block["t"] == 1:
      block["hidden"] = block["in_features"]
    elif expanded_channels is not None:
      block["hidden"] = expanded_channels[k]
    else:
      block["hidden"] = int(round(block["in_features"] * block["t"]))
    block["strides"], block["dilation"], _ = schedule[k]
  return stem, blocks, last


def mobilenet_v2_stage_channels(blocks: Sequence[dict[str, int]], last: int,
                                num_stages: int) -> tuple[int, ...]:
  """Full output width of every stage: its last block's; the last 1x1 conv's for the last."""
  out = [[b["features"] for b in blocks if b["stage"] == s][-1] for s in range(num_stages)]
  out[-1] = last
  return tuple(out)


def inverted_residual_stage(x: jax.Array, *, stage: int, num_stages: int, stem: int,
                            blocks: Sequence[dict[str, int]], last: int,
                            multiplier: float | DynamicMultiplier | None, train: bool,
                            bn_momentum: float = 0.9, bn_axis_name: str | None = None
                            ) -> jax.Array:
  """One MobileNetV2 stage of `mobilenet_v2_architecture`'s (stem, blocks, last): the stem
  ("stem_conv", "stem_bn": 3x3/2 conv + BN + ReLU6) when `stage` is 0, the stage's blocks
  ("block{k + 1}", k the block's index in the network: torchvision's `features` index), then
  the last 1x1 conv ("last_conv", "last_bn", + ReLU6) in the last stage. Every layer slims with
  `multiplier` (None: full width)."""
  width = lambda full: None if multiplier is None else channels(full, multiplier)
  bn = functools.partial(SlimBatchNorm, momentum=bn_momentum, axis_name=bn_axis_name)
  if stage == 0:
    x = SlimConv(stem, 3, strides=2, padding=1, name="stem_conv")(x, width(stem))
    x = nn.relu6(bn(features=stem, name="stem_bn")(x, train, width(stem)))
  for k, block in enumerate(blocks):
    if block["stage"] == stage:
      x = InvertedResidual(
          features=block["features"], in_features=block["in_features"],
          hidden_features=block["hidden"], expand=block["t"] != 1, strides=block["strides"],
          dilation=block["dilation"], residual=not block["first_of_row"],
          bn_momentum=bn_momentum, bn_axis_name=bn_axis_name, name=f"block{k + 1}")(
              x, width(block["hidden"]), width(block["features"]), train)
  if stage == num_stages - 1:
    x = SlimConv(last, 1, padding=0, in_features=blocks[-1]["features"], name="last_conv")(
        x, width(last))
    x = nn.relu6(bn(features=last, name="last_bn")(x, train, width(last)))
  return x


class MobileNetV2(nn.Module):
  """torchvision MobileNetV2 features, grouped into slimmable stages.

  Default stages [ours], by output stride: 1 = stem + row 0 (16 ch, /2), 2 = row 1 (24, /4),
  3 = row 2 (32, /8), 4 = rows 3-4 (96, /16), 5 = rows 5-6 + the last 1x1 conv (1280, /32).
  Every layer of a stage slims with that stage's multiplier. Every block but the first of its
  row is residual (torchvision's `stride == 1 and in == out` for its settings); deciding it by
  position keeps slimmed and physically sliced networks identical. Each stage runs
  `inverted_residual_stage`, as the branched "mobilenet_v2" streams do.

  Attributes:
    width_multiplier: torchvision's static `width_mult` (rounded by `make_divisible`); 1.0
      takes the channel counts below as given.
    block_setting: rows (t, c, n, s) as torchvision's `inverted_residual_setting`.
    stem_channels: width of the first 3x3/2 convolution.
    last_channels: width of the last 1x1 convolution.
    expanded_channels: full expanded width of every block (None: round(in * t), torchvision);
      `sliced` sets it, since slimmed expanded widths need not follow that rule.
    stage_rows: the block_setting rows of each stage, in order (at least one per stage).
    output_stride: total stride of the output (None: 32); smaller dilates the depthwise convs.
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  width_multiplier: float = 1.0
  block_setting: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_SETTING
  stem_channels: int = 32
  last_channels: int = 1280
  expanded_channels: tuple[int, ...] | None = None
  stage_rows: tuple[tuple[int, ...], ...] = MOBILENET_V2_STAGE_ROWS
  output_stride: int | None = None
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  def _architecture(self) -> tuple[int, list[dict[str, int]], int]:
    """(stem width, one dict per block, last width), full widths, after `width_multiplier`."""
    return mobilenet_v2_architecture(
        type(self).__name__, width_multiplier=self.width_multiplier,
        block_setting=self.block_setting, stem_channels=self.stem_channels,
        last_channels=self.last_channels, expanded_channels=self.expanded_channels,
        stage_rows=self.stage_rows, output_stride=self.output_stride)

  @property
  def num_stages(self) -> int:
    return len(self.stage_rows)

  @property
  def min_image_size(self) -> int:
    """Every convolution is padded: any image of at least 1 px runs."""
    return PADDED_MIN_IMAGE_SIZE

  @property
  def stage_channels(self) -> tuple[int, ...]:
    _, blocks, last = self._architecture()
    return mobilenet_v2_stage_channels(blocks, last, self.num_stages)

  def sliced_kwargs(self, widths: Sequence[float]) -> dict[str, Any]:
    """Attribute overrides whose full widths are this network slimmed by `widths`."""
    widths = stage_multipliers(widths, self.num_stages, type(self).__name__)
    stem, blocks, last = self._architecture()
    stage_of_row = {r: s for s, stage in enumerate(self.stage_rows) for r in stage}
    setting = tuple((t, channels(mobilenet_v2_width(c, self.width_multiplier),
                                 widths[stage_of_row[row]]), n, s)
                    for row, (t, c, n, s) in enumerate(self.block_setting))
    return {
        "width_multiplier": 1.0,
        "block_setting": setting,
        "stem_channels": channels(stem, widths[0]),
        "last_channels": channels(last, widths[-1]),
        "expanded_channels": tuple(channels(b["hidden"], widths[b["stage"]]) for b in blocks),
    }

  def sliced(self, widths: Sequence[float]) -> MobileNetV2:
    """This backbone with the slimmed widths as its full widths."""
    return self.clone(parent=None, **self.sliced_kwargs(widths))

  @nn.compact
  def __call__(self, x: jax.Array, *, widths: Sequence[float] | None = None,
               train: bool = False) -> list[jax.Array]:
    owner = type(self).__name__
    check_image_size(owner, self.min_image_size, x.shape)
    widths = stage_multipliers(widths, self.num_stages, owner)
    stem, blocks, last = self._architecture()
    outputs = []
    for stage, multiplier in enumerate(widths):
      x = inverted_residual_stage(x, stage=stage, num_stages=self.num_stages, stem=stem,
                                  blocks=blocks, last=last, multiplier=multiplier, train=train,
                                  bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
      outputs.append(x)
    return outputs


class LeNet(nn.Module):
  """The PHN Multi-MNIST target network: conv 10@9x9, pool, conv 20@5x5, pool, dense 50.

  Stages are [conv1, conv2, fc]; each conv is followed by [batch norm,] ReLU and a 2x2 max pool
  (PHN pools before the ReLU; the two commute). `fc` is a `SlimConv` whose kernel covers the
  whole remaining map: a dense layer on the flattened features whose input channels can still
  be sliced. Stage outputs: (B, h1, w1, 10), (B, h2, w2, 20), (B, 50).

  Attributes:
    conv_channels: full width of each convolution.
    kernel_sizes: kernel size of each convolution ("VALID" padding).
    fc_features: full width of the dense layer.
    batch_norm: add batch norm after every layer (PHN has none); layers then have no bias.
    channel_divisor: slimmed channel counts are multiples of this (`widths.channels`). The
      default 8 leaves LeNet's 10-channel first convolution (over half of its MACs) nearly
      unslimmable; 2 lets the smallest configuration fall to about a fifth of the full MACs.
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm`.
  """

  conv_channels: tuple[int, ...] = (10, 20)
  kernel_sizes: tuple[int, ...] = (9, 5)
  fc_features: int = 50
  batch_norm: bool = False
  channel_divisor: int = CHANNEL_DIVISOR
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @property
  def num_stages(self) -> int:
    return len(self.conv_channels) + 1

  @property
  def min_image_size(self) -> int:
    """The smallest image side: each valid k x k convolution takes k - 1 px and each 2x2 pool
    halves, and the last pool must keep 1 px (20 px for the 9x9 and 5x5 kernels)."""
    return lenet_min_image_size(self.kernel_sizes)

  @property
  def stage_channels(self) -> tuple[int, ...]:
    return tuple(self.conv_channels) + (self.fc_features,)

  def sliced_kwargs(self, widths: Sequence[float]) -> dict[str, Any]:
    """Attribute overrides whose full widths are this network slimmed by `widths`."""
    widths = stage_multipliers(widths, self.num_stages, type(self).__name__)
    sliced = tuple(channels(c, m, self.channel_divisor)
                   for c, m in zip(self.stage_channels, widths))
    return {"conv_channels": sliced[:-1], "fc_features": sliced[-1]}

  def sliced(self, widths: Sequence[float]) -> LeNet:
    """This backbone with the slimmed widths as its full widths."""
    return self.clone(parent=None, **self.sliced_kwargs(widths))

  @nn.compact
  def __call__(self, x: jax.Array, *, widths: Sequence[float] | None = None,
               train: bool = False) -> list[jax.Array]:
    owner = type(self).__name__
    if len(self.kernel_sizes) != len(self.conv_channels):
      raise ValueError(
          f"{owner} has {len(self.conv_channels)} conv_channels but {len(self.kernel_sizes)} "
          f"kernel_sizes; give one kernel size per convolution.")
    check_image_size(owner, self.min_image_size, x.shape)
    widths = stage_multipliers(widths, self.num_stages, owner)
    outputs, in_features = [], None
    for i, (features, k) in enumerate(zip(self.conv_channels, self.kernel_sizes)):
      x = conv_pool_stage(x, features=features, kernel_size=k, in_features=in_features,
                          batch_norm=self.batch_norm,
                          width=channels(features, widths[i], self.channel_divisor),
                          train=train, conv_name=f"conv{i + 1}", bn_name=f"bn{i + 1}",
                          bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
      outputs.append(x)
      in_features = features
    if min(x.shape[1:3]) < 1:
      raise ValueError(f"{owner} input of shape {x.shape} is too small for its convolutions.")
    width = channels(self.fc_features, widths[-1], self.channel_divisor)
    x = SlimConv(self.fc_features, tuple(x.shape[1:3]), padding="VALID",
                 use_bias=not self.batch_norm, in_features=in_features, name="fc")(x, width)
    if self.batch_norm:
      x = SlimBatchNorm(momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                        features=self.fc_features, name="bn_fc")(x, train, width)
    x = nn.relu(x).reshape(x.shape[0], x.shape[-1])
    outputs.append(x)
    return outputs


# He initialisation on fan-in for the ReLU layers of the MLP (LeCun's default halves the
# variance at every layer).
mlp_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class MLP(nn.Module):
  """Slimmable multi-layer perceptron for feature vectors (tabular data) [ours].

  Every hidden layer is one stage: a dense layer [, batch norm] and a ReLU, keeping
  `channels(hidden[s], widths[s], channel_divisor)` units. The input is flattened to (B, D)
  (any rank after the batch axis) and never slims; the first layer's full input width is D,
  taken from the input at initialisation. Stage outputs are (B, units) vectors, which the MLP
  heads read without pooling. Inputs are expected standardised (the arrays source does it).

  Attributes:
    hidden: full width of each hidden layer (one stage each); an int is one layer. Through the
      CLI, quote the tuple: `--backbone_options='"hidden=(128,64)",batch_norm=true'`.
    batch_norm: batch norm between each dense layer and its ReLU; the dense layers then have
      no bias.
    channel_divisor: slimmed unit counts are multiples of this (`widths.channels`).
    bn_momentum, bn_axis_name: passed to every `SlimBatchNorm` (with `batch_norm`).
  """

  hidden: tuple[int, ...] = (256, 256)
  batch_norm: bool = False
  channel_divisor: int = CHANNEL_DIVISOR
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  input_kind: ClassVar[str] = VECTORS

  @property
  def num_stages(self) -> int:
    return len(self.stage_channels)

  @property
  def min_image_size(self) -> int:
    """No images: 1, so that image-size checks pass and `check_input_kind` says why not."""
    return PADDED_MIN_IMAGE_SIZE

  @property
  def stage_channels(self) -> tuple[int, ...]:
    hidden = ((self.hidden,) if isinstance(self.hidden, numbers.Integral)
              else tuple(self.hidden))
    whole = lambda h: isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1
    if not hidden or not all(whole(h) for h in hidden):
      raise ValueError(f"{type(self).__name__} got hidden={self.hidden!r}; give the width of "
                       f"each hidden layer as positive whole numbers, e.g. (256, 256).")
    return tuple(int(h) for h in hidden)

  def stage_modules(self) -> tuple[tuple[str, ...], ...]:
    """Submodule names per stage (for GradSplit)."""
    return tuple((f"dense{i + 1}",) + ((f"bn{i + 1}",) if self.batch_norm else ())
                 for i in range(self.num_stages))

  def sliced_kwargs(self, widths: Sequence[float]) -> dict[str, Any]:
    """Attribute overrides whose full widths are this network slimmed by `widths`."""
    widths = stage_multipliers(widths, self.num_stages, type(self).__name__)
    return {"hidden": tuple(channels(c, m, self.channel_divisor)
                            for c, m in zip(self.stage_channels, widths))}

  def sliced(self, widths: Sequence[float]) -> MLP:
    """This backbone with the slimmed widths as its full widths."""
    return self.clone(parent=None, **self.sliced_kwargs(widths))

  @nn.compact
  def __call__(self, x: jax.Array, *, widths: Sequence[float] | None = None,
               train: bool = False) -> list[jax.Array]:
    owner = type(self).__name__
    hidden = self.stage_channels
    if x.ndim < 2 or not all(x.shape[1:]):
      raise ValueError(f"{owner} needs inputs of shape (B, D) with D >= 1, got "
                       f"{tuple(x.shape)}.")
    widths = stage_multipliers(widths, self.num_stages, owner)
    x = x.reshape(x.shape[0], -1)
    outputs, in_features = [], None
    for i, (features, multiplier) in enumerate(zip(hidden, widths)):
      x = dense_stage(x, features=features, in_features=in_features, batch_norm=self.batch_norm,
                      kernel_init=mlp_kernel_init,
                      width=channels(features, multiplier, self.channel_divisor), train=train,
                      dense_name=f"dense{i + 1}", bn_name=f"bn{i + 1}",
                      bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
      outputs.append(x)
      in_features = features
    return outputs


def lenet_min_image_size(kernel_sizes: Sequence[int]) -> int:
  """The smallest input side of valid k x k convolutions, each followed by a 2x2 pool, whose
  last pool keeps at least 1 px (going backwards: a pool needs twice its output, a
  convolution k - 1 more)."""
  size = 1
  for k in reversed(tuple(kernel_sizes)):
    size = 2 * size + int(k) - 1
  return size


REGISTRY: dict[str, type[nn.Module]] = {
    "lenet": LeNet,
    "resnet_small": ResNetSmall,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "mobilenet_v2": MobileNetV2,
    "mlp": MLP,
}


def get_backbone(name: str) -> type[nn.Module]:
  """The backbone class registered under `name`."""
  if name not in REGISTRY:
    raise ValueError(f"Unknown backbone {name!r}; available: {', '.join(REGISTRY)}.")
  return REGISTRY[name]


def min_image_size(name: str, options: dict[str, Any] | None = None) -> int:
  """The smallest image side the backbone `name` accepts with its `options` (options it does
  not take are ignored here), so that callers can check data before building or tracing."""
  cls = get_backbone(name)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in (options or {}).items() if k in fields}
  return cls(**kwargs).min_image_size


def input_kind(backbone: str | type[nn.Module] | nn.Module) -> str:
  """What a backbone (a registered name, class or module) takes: `IMAGES` or `VECTORS`."""
  cls = get_backbone(backbone) if isinstance(backbone, str) else backbone
  cls = cls if isinstance(cls, type) else type(cls)
  return getattr(cls, "input_kind", IMAGES)


def backbones_for(kind: str) -> tuple[str, ...]:
  """The registered backbone names that take `kind` (`IMAGES` or `VECTORS`)."""
  return tuple(name for name, cls in REGISTRY.items() if input_kind(cls) == kind)


def _either(names: Sequence[str]) -> str:
  names = list(names)
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_input_kind(owner: str, backbone: str, shape: Sequence[int]) -> None:
  """Stops with one sentence when inputs of `shape` do not fit backbone `backbone`: image
  backbones take (B, H, W, C) images, vector backbones (B, D) feature vectors (any rank but
  the image rank 4, flattened). Without it, vectors would fail deep inside a convolution and
  images would be flattened into an MLP by accident."""
  shape = tuple(int(d) for d in shape)
  if input_kind(backbone) == VECTORS:
    if len(shape) >= 2 and len(shape) != 4:
      return
    got = f"images of shape {shape}" if len(shape) == 4 else f"inputs of shape {shape}"
    raise ValueError(f"{owner} with backbone {backbone!r} expects feature vectors of shape "
                     f"(B, D), got {got}; images fit backbone {_either(backbones_for(IMAGES))}.")
  if len(shape) == 4:
    return
  got = f"feature vectors of shape {shape}" if len(shape) == 2 else f"{shape}"
  raise ValueError(f"{owner} with backbone {backbone!r} expects images of shape (B, H, W, C), "
                   f"got {got}; feature vectors (B, D) fit backbone "
                   f"{_either(backbones_for(VECTORS))}.")
