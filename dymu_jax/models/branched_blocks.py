"""The block stacks and task decoders of branched networks (`models.branched`, which lists them
and re-exports every name here).

A block is one stream's stage. The blocks run the stage bodies of `models.backbones`
(`resnet_stem`, `basic_stage`, `inverted_residual_stage`, `conv_pool_stage`, `dense_stage`),
so a stream computes what the static network's encoder computes, under the parameter names
each stack has always had:

* "lenet": `ConvPoolBlock` ("conv", "bn") per convolution, then `DenseBlock` ("dense", "bn").
  The last stage is a flatten + dense layer, not `backbones.LeNet`'s map-sized convolution
  ("fc": a (h, w, c, features) kernel), so its kernel has another shape and stays its own.
* "resnet_small": `ResNetStage` per stage, "stem_conv" and "stem_bn" in the first, then
  "block{b}" (torchvision has no twin, so the names stay those of the first checkpoints).
* "resnet18": `ResNetStage` per stage with `backbones.ResNet18`'s names, "stem_conv" and
  "stem_bn" in the first, then "stage{s}_block{b}", so the union of one stream's blocks is a
  `ResNet18` variable tree and torchvision weights load per stream (`load_pretrained_streams`
  in `branched`).
* "mobilenet_v2": `MobileNetV2Stage` per stage (`backbones.inverted_residual_stage`, the
  stage body of `backbones.MobileNetV2`) with its names: "stem_conv" and "stem_bn" in the
  first, "block{i}" (torchvision's `features.{i}`) in the stage that holds block i,
  "last_conv" and "last_bn" in the last, so one stream's blocks together are a `MobileNetV2`
  variable tree and torchvision MobileNetV2 weights load per stream too. Four stages by
  default (`MOBILENET_V2_STREAM_STAGE_ROWS`), at output strides 4, 8, 16 and 32 as the ResNet
  streams' (the backbone's own first stage, the stem and one block at stride 2, would be a
  node too cheap to be worth a tree layer); `stage_rows` chooses others.
* "mlp": `MLPBlock` ("dense", "bn") per hidden layer.

Decoders (`task_decoders`): a `decoders.DenseHead` for a dense task (its spatial map read from
the parent stream's last block, upsampled to the image size in `BranchedNet`), with
`build_multitask`'s defaults, so a stream and its head are the static network's encoder and
head; an `MLPHead` for classification and regression.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones
from dymu_jax.models.decoders import DEFAULT_ATROUS_RATES, DenseHead, MLPHead

BACKBONES = ("lenet", "resnet_small", "resnet18", "mobilenet_v2", "mlp")
# The stacks whose streams end in a spatial map (dense tasks read it).
DENSE_BACKBONES = ("resnet_small", "resnet18", "mobilenet_v2")
# The stages of a "mobilenet_v2" stream [ours]: block_setting rows per stage, by output stride
# (4, 8, 16, 32), as the ResNet streams' four stages.
MOBILENET_V2_STREAM_STAGE_ROWS = ((0, 1), (2,), (3, 4), (5, 6))
# Decoder defaults per backbone [ours]: PHN's linear heads on LeNet, one hidden layer on the
# ResNets and on the MLP (so that --head_batch_norm gives the decoders batch norms to shift).
DEFAULT_HEAD_HIDDEN_LAYERS = {"lenet": 0, "resnet_small": 1, "resnet18": 1, "mobilenet_v2": 1,
                              "mlp": 1}
# Hidden width of the MLP heads (the first anchors') and of the dense heads (`DenseHead`'s and
# `MultiTaskNet`'s), when head_width is not given.
DEFAULT_HEAD_WIDTH = 64
DEFAULT_DENSE_HEAD_WIDTH = 256


# ----------------------------------------------------------------------------------------------
# Blocks (one stream's block; the network stacks N of them).


class ConvPoolBlock(nn.Module):
  """One LeNet stage: conv (VALID) [+ BN] + ReLU + 2x2 max pool (`backbones.conv_pool_stage`).

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    in_features: input channels (None: inferred at initialisation).
    batch_norm: batch norm after the convolution (then the convolution has no bias).
    bn_momentum, bn_axis_name: passed to `SlimBatchNorm`.
  """

  features: int
  kernel_size: int
  in_features: int | None = None
  batch_norm: bool = True
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return backbones.conv_pool_stage(
        x, features=self.features, kernel_size=self.kernel_size, in_features=self.in_features,
        batch_norm=self.batch_norm, width=None, train=train, conv_name="conv", bn_name="bn",
        bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)


class DenseBlock(nn.Module):
  """Flatten + dense [+ BN] + ReLU (LeNet's fully connected stage; one hidden layer of the
  "mlp" stack), `backbones.dense_stage`.

  Attributes:
    features: output units.
    batch_norm: batch norm after the dense layer (then it has no bias).
    in_features: input width after flattening (None: inferred at initialisation).
    kernel_init: initialiser of the dense kernel (LeCun's, as `SlimDense`; `MLPBlock` takes
      He's, `backbones.mlp_kernel_init`).
    bn_momentum, bn_axis_name: passed to `SlimBatchNorm`.
  """

  features: int
  batch_norm: bool = True
  in_features: int | None = None
  kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return backbones.dense_stage(
        x.reshape(x.shape[0], -1), features=self.features, in_features=self.in_features,
        batch_norm=self.batch_norm, kernel_init=self.kernel_init, width=None, train=train,
        dense_name="dense", bn_name="bn", bn_momentum=self.bn_momentum,
        bn_axis_name=self.bn_axis_name)


class MLPBlock(DenseBlock):
  """One hidden layer of the "mlp" stack on feature vectors: a `DenseBlock` He-initialised like
  the `backbones.MLP` encoder (its own class so that `BranchedNet` knows its inputs are vectors,
  not images; a LeNet without convolutions stays an image network)."""

  kernel_init: Callable[..., jax.Array] = backbones.mlp_kernel_init


class ResNetStage(nn.Module):
  """One ResNet stage: [stem,] then `num_blocks` BasicBlocks (`backbones.basic_stage`).

  Attributes:
    features: output channels (the stem's too).
    in_features: input channels.
    num_blocks: basic blocks in the stage.
    strides: stride of the first block.
    dilation: (first conv of the first block, every later conv), `backbones.dilation_schedule`
      for an output stride below the natural one.
    stem: None, or the stem that starts the first stage: "small" (3x3/1 conv) or "imagenet"
      (7x7/2 conv + 3x3/2 max pool).
    projection: projection shortcut in the first block; None: when the stride or the width
      changes.
    block_name: the blocks are named f"{block_name}{b}".
    bn_momentum, bn_axis_name: passed to every batch norm.
  """

  features: int
  in_features: int
  num_blocks: int = 2
  strides: int = 1
  dilation: tuple[int, int] = (1, 1)
  stem: str | None = None
  projection: bool | None = None
  block_name: str = "block"
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = self.in_features
    if self.stem is not None:
      x, _ = backbones.resnet_stem(x, kind=self.stem, features=self.features, width=None,
                                   train=train, in_features=in_features,
                                   bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name)
      in_features = self.features
    projection = (self.strides > 1 or in_features != self.features
                  if self.projection is None else self.projection)
    return backbones.basic_stage(
        x, features=self.features, in_features=in_features, num_blocks=self.num_blocks,
        strides=self.strides, dilation=tuple(self.dilation), projection=projection, width=None,
        train=train, name=self.block_name, bn_momentum=self.bn_momentum,
        bn_axis_name=self.bn_axis_name)


class MobileNetV2Stage(nn.Module):
  """One MobileNetV2 stage of a "mobilenet_v2" stream (`backbones.inverted_residual_stage`):
  [stem,] the inverted-residual blocks of its `stage_rows` [, the last 1x1 conv], under
  `backbones.MobileNetV2`'s names ("stem_conv", "stem_bn", "block{i}" with torchvision's
  `features` index i, "last_conv", "last_bn").

  Attributes:
    stage: which stage of the network this block is.
    width_multiplier, block_setting, stem_channels, last_channels, output_stride: the whole
      network's, as `backbones.MobileNetV2`'s attributes.
    stage_rows: the block_setting rows of every stage (the stream's, not only this one's).
    bn_momentum, bn_axis_name: passed to every batch norm.
  """

  stage: int
  width_multiplier: float = 1.0
  block_setting: tuple[tuple[int, int, int, int], ...] = backbones.MOBILENET_V2_SETTING
  stem_channels: int = 32
  last_channels: int = 1280
  stage_rows: tuple[tuple[int, ...], ...] = MOBILENET_V2_STREAM_STAGE_ROWS
  output_stride: int | None = None
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  def architecture(self) -> tuple[int, list[dict[str, int]], int]:
    """The whole network's (stem width, blocks, last width), `backbones`' description."""
    return backbones.mobilenet_v2_architecture(
        "mobilenet_v2 streams", width_multiplier=self.width_multiplier,
        block_setting=self.block_setting, stem_channels=self.stem_channels,
        last_channels=self.last_channels, stage_rows=self.stage_rows,
        output_stride=self.output_stride)

  @property
  def features(self) -> int:
    """Output channels of this stage."""
    _, blocks, last = self.architecture()
    return backbones.mobilenet_v2_stage_channels(blocks, last, len(self.stage_rows))[self.stage]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    stem, blocks, last = self.architecture()
    return backbones.inverted_residual_stage(
        x, stage=self.stage, num_stages=len(self.stage_rows), stem=stem, blocks=blocks,
        last=last, multiplier=None, train=train, bn_momentum=self.bn_momentum,
        bn_axis_name=self.bn_axis_name)


# ----------------------------------------------------------------------------------------------
# Block stacks.


def lenet_blocks(conv_channels: Sequence[int] = (10, 20), kernel_sizes: Sequence[int] = (9, 5),
                 fc_features: int = 50, batch_norm: bool = True, bn_momentum: float = 0.9,
                 bn_axis_name: str | None = None) -> tuple[nn.Module, ...]:
  """LeNet (the PHN Multi-MNIST target network) as blocks: one per conv stage, then dense."""
  if len(conv_channels) != len(kernel_sizes):
    raise ValueError(f"Got {len(conv_channels)} conv_channels but {len(kernel_sizes)} "
                     f"kernel_sizes; give one kernel size per convolution.")
  blocks, in_features = [], None
  for features, k in zip(conv_channels, kernel_sizes):
    blocks.append(ConvPoolBlock(features=int(features), kernel_size=int(k),
                                in_features=in_features, batch_norm=batch_norm,
                                bn_momentum=bn_momentum, bn_axis_name=bn_axis_name))
    in_features = int(features)
  blocks.append(DenseBlock(features=int(fc_features), batch_norm=batch_norm,
                           bn_momentum=bn_momentum, bn_axis_name=bn_axis_name))
  return tuple(blocks)


def _resnet_blocks(owner: str, stem: str, block_names: Callable[[int], str],
                   stage_channels: Sequence[int], stage_sizes: Sequence[int], in_channels: int,
                   output_stride: int | None, bn_momentum: float, bn_axis_name: str | None
                   ) -> tuple[nn.Module, ...]:
  """One `ResNetStage` per stage, strided and dilated as `backbones.ResNet` with this stem."""
  if len(stage_channels) != len(stage_sizes):
    raise ValueError(f"Got {len(stage_channels)} stage_channels but {len(stage_sizes)} "
                     f"stage_sizes; give one block count per stage.")
  stem_stride = 4 if stem == "imagenet" else 1
  strides = [1] + [2] * (len(stage_channels) - 1)
  schedule = backbones.dilation_schedule(stem_stride, strides, output_stride, owner)
  blocks, in_features = [], int(in_channels)
  for s, (features, size) in enumerate(zip(stage_channels, stage_sizes)):
    stride, first_dilation, dilation = schedule[s]
    # The first block of every later stage projects (`backbones.ResNet`'s rule); for the
    # strided stages it is the old "stride or width changes" rule, so names stay as saved.
    blocks.append(ResNetStage(features=int(features), in_features=in_features,
                              num_blocks=int(size), strides=stride,
                              dilation=(first_dilation, dilation),
                              stem=stem if s == 0 else None, projection=s > 0,
                              block_name=block_names(s), bn_momentum=bn_momentum,
                              bn_axis_name=bn_axis_name))
    in_features = int(features)
  return tuple(blocks)


def resnet_small_blocks(stage_channels: Sequence[int] = (16, 32, 64, 128),
                        stage_sizes: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3,
                        output_stride: int | None = None, bn_momentum: float = 0.9,
                        bn_axis_name: str | None = None) -> tuple[nn.Module, ...]:
  """ResNet-small (3x3 stem, BasicBlocks, stride 2 from the second stage) as one block per
  stage; `output_stride` below the natural one (8 with four stages) dilates the last stages
  (`backbones.ResNetSmall`'s option, for dense tasks)."""
  return _resnet_blocks("resnet_small streams", "small", lambda s: "block", stage_channels,
                        stage_sizes, in_channels, output_stride, bn_momentum, bn_axis_name)


def resnet18_blocks(stage_channels: Sequence[int] = (64, 128, 256, 512),
                    stage_sizes: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3,
                    output_stride: int | None = None, bn_momentum: float = 0.9,
                    bn_axis_name: str | None = None) -> tuple[nn.Module, ...]:
  """ResNet-18 (7x7/2 stem + 3x3/2 max pool, BasicBlocks) as one block per stage, with
  `backbones.ResNet18`'s parameter names ("stage{s}_block{b}"); `output_stride` 8 or 16
  dilates the last stages (natural: 32)."""
  return _resnet_blocks("resnet18 streams", "imagenet", lambda s: f"stage{s + 1}_block",
                        stage_channels, stage_sizes, in_channels, output_stride, bn_momentum,
                        bn_axis_name)


def mobilenet_v2_blocks(width_multiplier: float = 1.0,
                        block_setting: Sequence[Sequence[int]] = backbones.MOBILENET_V2_SETTING,
                        stem_channels: int = 32, last_channels: int = 1280,
                        stage_rows: Sequence[Sequence[int]] = MOBILENET_V2_STREAM_STAGE_ROWS,
                        output_stride: int | None = None, bn_momentum: float = 0.9,
                        bn_axis_name: str | None = None) -> tuple[nn.Module, ...]:
  """torchvision MobileNetV2 (`backbones.MobileNetV2`'s options and parameter names) as one
  `MobileNetV2Stage` per group of `stage_rows` [ours]: by default four, as the ResNet streams,
  at output strides 4, 8, 16 and 32 (stem + rows 0-1: 24 ch; row 2: 32; rows 3-4: 96; rows
  5-6 + the last 1x1 conv: 1280); `output_stride` 8 or 16 dilates the last depthwise convs."""
  stage_rows = tuple(tuple(int(r) for r in rows) for rows in stage_rows)
  options = dict(width_multiplier=float(width_multiplier),
                 block_setting=tuple(tuple(int(v) for v in row) for row in block_setting),
                 stem_channels=int(stem_channels), last_channels=int(last_channels),
                 stage_rows=stage_rows,
                 output_stride=None if output_stride is None else int(output_stride),
                 bn_momentum=bn_momentum, bn_axis_name=bn_axis_name)
  MobileNetV2Stage(stage=0, **options).architecture()  # Bad options: one sentence, now.
  return tuple(MobileNetV2Stage(stage=s, **options) for s in range(len(stage_rows)))


def mlp_blocks(hidden: int | Sequence[int] = (256, 256), batch_norm: bool = True,
               bn_momentum: float = 0.9, bn_axis_name: str | None = None
               ) -> tuple[nn.Module, ...]:
  """The MLP for feature vectors (`backbones.MLP`) as blocks: one `MLPBlock` per hidden layer,
  dense [+ BN] + ReLU, He-initialised like the MLP encoder; an int `hidden` is one layer. Batch
  norm is on by default (unlike the encoder's) so that the weight hypernetwork has scales and
  biases to shift in every block."""
  widths = (hidden,) if isinstance(hidden, numbers.Integral) else tuple(hidden)
  whole = lambda h: isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1
  if not widths or not all(whole(h) for h in widths):
    raise ValueError(f"mlp_blocks got hidden={hidden!r}; give the width of each hidden layer "
                     f"as positive whole numbers, e.g. (256, 256).")
  blocks, in_features = [], None
  for features in widths:
    blocks.append(MLPBlock(features=int(features), batch_norm=bool(batch_norm),
                           in_features=in_features, bn_momentum=bn_momentum,
                           bn_axis_name=bn_axis_name))
    in_features = int(features)
  return tuple(blocks)


STACKS = {"lenet": lenet_blocks, "resnet_small": resnet_small_blocks,
          "resnet18": resnet18_blocks, "mobilenet_v2": mobilenet_v2_blocks, "mlp": mlp_blocks}


def stack_blocks(backbone: str, options: Mapping[str, Any], in_channels: int | None,
                 bn_momentum: float, bn_axis_name: str | None) -> tuple[nn.Module, ...]:
  """The blocks of the stack `backbone` with its `options` (`backbone_kwargs`)."""
  if backbone not in BACKBONES:
    raise ValueError(f"Unknown branched backbone {backbone!r}; available: "
                     f"{', '.join(BACKBONES)}.")
  options = dict(options)
  if backbone in ("resnet_small", "resnet18"):
    options.setdefault("in_channels", in_channels or 3)
  return STACKS[backbone](**options, bn_momentum=bn_momentum, bn_axis_name=bn_axis_name)


def stack_name(blocks: Sequence[nn.Module]) -> str:
  """Which stack (a name of `BACKBONES`) the blocks are."""
  if isinstance(blocks[0], MLPBlock):
    return "mlp"
  if any(isinstance(b, ConvPoolBlock) for b in blocks):
    return "lenet"
  if isinstance(blocks[0], MobileNetV2Stage):
    return "mobilenet_v2"
  if isinstance(blocks[0], ResNetStage) and blocks[0].stem == "imagenet":
    return "resnet18"
  return "resnet_small"


# ----------------------------------------------------------------------------------------------
# Decoders.


def task_decoders(tasks: Sequence[tasks_lib.Task], backbone: str, in_features: int, *,
                  head_width: int | None, head_hidden_layers: int | None,
                  head_batch_norm: bool, atrous_rates: Sequence[int] | None,
                  image_pooling: bool, bn_momentum: float, bn_axis_name: str | None
                  ) -> tuple[nn.Module, ...]:
  """One decoder per task: a `DenseHead` for dense tasks, an `MLPHead` for the others.

  Dense heads take `build_multitask`'s defaults: hidden width 256 (`head_width` when given, for
  every head as in `MultiTaskNet`), the backbone's `DEFAULT_ATROUS_RATES`, image pooling.
  """
  dense = [t.name for t in tasks if t.is_dense]
  if dense and backbone not in DENSE_BACKBONES:
    raise ValueError(f"Task(s) {', '.join(dense)} are dense, but the {backbone} streams end in a "
                     f"flat vector; dense tasks need {', '.join(DENSE_BACKBONES[:-1])} or "
                     f"{DENSE_BACKBONES[-1]} streams.")
  hidden_layers = (DEFAULT_HEAD_HIDDEN_LAYERS[backbone] if head_hidden_layers is None
                   else int(head_hidden_layers))
  if head_batch_norm and hidden_layers < 1 and len(dense) < len(tasks):
    raise ValueError(f"Decoder batch norm sits in the decoders' hidden layers, but the {backbone} "
                     f"decoders have {hidden_layers}; give head_hidden_layers >= 1 or drop "
                     f"head_batch_norm.")
  rates = tuple(int(r) for r in (DEFAULT_ATROUS_RATES.get(backbone, (6, 12, 18))
                                 if atrous_rates is None else atrous_rates))
  heads = []
  for t in tasks:
    if t.is_dense:
      heads.append(DenseHead(t.num_outputs, hidden_features=int(head_width or
                                                                 DEFAULT_DENSE_HEAD_WIDTH),
                             atrous_rates=rates, image_pooling=bool(image_pooling),
                             in_features=in_features, bn_momentum=bn_momentum,
                             bn_axis_name=bn_axis_name))
    else:
      heads.append(MLPHead(t.num_outputs, hidden_features=int(head_width or DEFAULT_HEAD_WIDTH),
                           num_hidden=hidden_layers, in_features=in_features,
                           batch_norm=bool(head_batch_norm), bn_momentum=bn_momentum,
                           bn_axis_name=bn_axis_name))
  return tuple(heads)
