"""A shared slimmable encoder with one slimmable decoder per task (the ECMT SuperNet).

`MultiTaskNet(tasks, backbone, ...)` is a Linen module; its width configuration is a static
call argument:

  variables = net.init(rng, images)                       # full-width variables
  preds = net.apply(variables, images, widths=cfg)        # cfg: WidthConfig or None (full)
  preds, feats = net.apply(..., return_features=True)     # + encoder stage outputs (CI-KD)
  preds, state = net.apply(..., train=True, mutable=["batch_stats"])
  preds = net.apply(variables, images, widths=DynamicWidths.from_config(cfg))  # masked path

The masked path (`DynamicWidths`, arrays, not static) runs every configuration in one compiled
program at full-width cost; its predictions equal the static path's.

Inputs follow the backbone (`backbones.input_kind`): images (B, H, W, C) in [0, 1], normalised
inside (`pixel_mean`, `pixel_std`), or, for the MLP, feature vectors (B, D), used as given (the
arrays source standardises them with training-split statistics; an export sets `pixel_mean` and
`pixel_std` to those statistics, one per feature, so it takes raw rows). Both come from the batch key
"image". A mismatch stops with one sentence naming the shape and the backbones that fit.

Predictions are a dict task name -> array with the layouts of `dymu_jax.tasks`. Variables:
`params/encoder/...` (names in `backbones`), `params/head_<task name>/...`. A single-task
network is a `MultiTaskNet` with one task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones
from dymu_jax.models import layers
from dymu_jax.models.decoders import DenseHead, MLPHead
from dymu_jax.models.widths import WIDTH_CHOICES, DynamicWidths, WidthConfig, channels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_images(images: jax.Array, pixel_mean=None, pixel_std=None) -> jax.Array:
  """Per-channel normalisation of [0, 1] images; None takes the ImageNet statistics for
  3-channel images and 0.5 / 0.5 otherwise [ours]. Computed in float32; bfloat16 images come
  back in bfloat16 (mixed precision, see `models.layers`).

  Feature vectors (B, D) come back as given (the data source standardised them), unless
  `pixel_mean` and `pixel_std` hold one value per feature: then they are standardised here,
  (x - mean) / std. That is how an exported tabular network carries the training split's
  statistics, so that it takes raw feature vectors. Other ranks are returned as given."""
  if images.ndim != 4:
    if pixel_mean is None and pixel_std is None:
      return images
    d = images.shape[-1]
    if images.ndim != 2 or pixel_mean is None or pixel_std is None or (
        len(pixel_mean) != d or len(pixel_std) != d):
      raise ValueError(
          f"pixel_mean and pixel_std of a network on inputs of shape {tuple(images.shape)} "
          f"must both hold one value per feature of (B, D) feature vectors ({d}), or be unset "
          f"(inputs used as given); got {len(pixel_mean or ())} and {len(pixel_std or ())}.")
  c = images.shape[-1]
  mean = pixel_mean if pixel_mean is not None else (
      IMAGENET_MEAN if c == 3 else (0.5,) * c)
  std = pixel_std if pixel_std is not None else (IMAGENET_STD if c == 3 else (0.5,) * c)
  if len(mean) != c or len(std) != c:
    raise ValueError(
        f"pixel_mean {tuple(mean)} and pixel_std {tuple(std)} need one value per image "
        f"channel ({c}).")
  normalised = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)
  return normalised.astype(layers.compute_dtype(images))


def kwargs_tuple(kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """A mapping of options as a sorted tuple of pairs (hashable, a valid module attribute)."""
  if not kwargs:
    return ()
  return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                      for k, v in kwargs.items()))


class MultiTaskNet(nn.Module):
  """Shared encoder + one decoder per task, with stage-wise and per-decoder slimmable widths.

  Attributes:
    tasks: the tasks, in decoder order (`WidthConfig.decoders` follows it).
    backbone: a name in `backbones.REGISTRY`.
    backbone_kwargs: options of the backbone, as a tuple of (name, value) pairs (see
      `kwargs_tuple`) or a frozen dataclass.
    head_width: full hidden width of every decoder.
    head_widths: per-task full hidden widths (overrides `head_width`; `sliced` sets it).
    head_hidden_layers: hidden layers of the MLP heads (classification, regression).
    head_batch_norm: batch norm in the MLP heads' hidden layers (see `decoders.MLPHead`).
    atrous_rates: dilation rates of the dense heads' context branches.
    image_pooling: dense heads include the global-pooling branch.
    pixel_mean, pixel_std: per-channel normalisation of the [0, 1] images; None takes the
      ImageNet statistics for 3-channel images and 0.5 / 0.5 otherwise [ours].
    width_choices: multipliers a WidthConfig may use; None accepts any in (0, 1].
    bn_momentum, bn_axis_name: passed to every batch norm (the backbone's unless set in
      backbone_kwargs).
  """

  tasks: tuple[tasks_lib.Task, ...]
  backbone: str = "resnet_small"
  backbone_kwargs: Any = ()
  head_width: int = 256
  head_widths: tuple[int, ...] | None = None
  head_hidden_layers: int = 1
  head_batch_norm: bool = False
  atrous_rates: tuple[int, ...] = (6, 12, 18)
  image_pooling: bool = True
  pixel_mean: tuple[float, ...] | None = None
  pixel_std: tuple[float, ...] | None = None
  width_choices: tuple[float, ...] | None = WIDTH_CHOICES
  bn_momentum: float = 0.9
  bn_axis_name: str | None = None

  def _backbone_kwargs(self) -> dict[str, Any]:
    options = self.backbone_kwargs
    if dataclasses.is_dataclass(options):
      options = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    else:
      options = dict(options)
    options.setdefault("bn_momentum", self.bn_momentum)
    options.setdefault("bn_axis_name", self.bn_axis_name)
    return options

  def make_encoder(self, **module_kwargs) -> nn.Module:
    """The backbone module (unbound unless a parent/name is given)."""
    cls = backbones.get_backbone(self.backbone)
    module_kwargs.setdefault("parent", None)
    return cls(**self._backbone_kwargs(), **module_kwargs)

  @property
  def num_stages(self) -> int:
    return self.make_encoder().num_stages

  @property
  def num_tasks(self) -> int:
    return len(self.tasks)

  def full_widths(self) -> WidthConfig:
    return WidthConfig.full(self.num_stages, self.num_tasks)

  def smallest_widths(self) -> WidthConfig:
    return WidthConfig.smallest(self.num_stages, self.num_tasks,
                                self.width_choices or WIDTH_CHOICES)

  def decoder_widths(self) -> tuple[int, ...]:
    """Full hidden width of each task's decoder."""
    if self.head_widths is None:
      return (self.head_width,) * self.num_tasks
    if len(self.head_widths) != self.num_tasks:
      raise ValueError(
          f"head_widths has {len(self.head_widths)} entries {self.head_widths} but there are "
          f"{self.num_tasks} tasks.")
    return tuple(self.head_widths)

  def sliced(self, widths: WidthConfig) -> MultiTaskNet:
    """This network with the widths of `widths` as its full widths (physical export).

    `net.sliced(cfg).apply(layers.slice_variables(variables, shapes), x)` equals
    `net.apply(variables, x, widths=cfg)`, where `shapes` come from initialising the sliced
    network (e.g. with `jax.eval_shape`).
    """
    widths.validate(self.num_stages, self.num_tasks, self.width_choices)
    options = self._backbone_kwargs()
    options.update(self.make_encoder().sliced_kwargs(widths.encoder))
    head_widths = tuple(channels(h, m) for h, m in zip(self.decoder_widths(), widths.decoders))
    return self.clone(parent=None, backbone_kwargs=kwargs_tuple(options),
                      head_widths=head_widths)

  def _normalise(self, images: jax.Array) -> jax.Array:
    return normalise_images(images, self.pixel_mean, self.pixel_std)

  @nn.compact
  def __call__(self, images: jax.Array, *, widths: WidthConfig | DynamicWidths | None = None,
               train: bool = False, return_features: bool = False):
    """Predictions for images (B, H, W, C) in [0, 1], or feature vectors (B, D) for the MLP.

    Args:
      images: float images in [0, 1], NHWC; or, for a vector backbone (`backbones.input_kind`),
        float feature vectors (B, D), used as given.
      widths: the SubNet to run: a static `WidthConfig` (sliced compute), `DynamicWidths`
        (masked full-width compute, encoder features zero beyond the slimmed widths), or None
        (the full network).
      train: batch statistics in batch norm (pass `mutable=["batch_stats"]` to `apply`).
      return_features: also return the list of encoder stage outputs.

    Returns:
      {task name: prediction}, or (that dict, stage outputs) when `return_features`.
    """
    if not self.tasks:
      raise ValueError("MultiTaskNet needs at least one task.")
    backbones.check_input_kind("MultiTaskNet", self.backbone, images.shape)
    if widths is None:
      widths = self.full_widths()
    if isinstance(widths, WidthConfig):
      widths.validate(self.num_stages, self.num_tasks, self.width_choices)
      encoder_widths, decoder_widths = widths.encoder, widths.decoders
    elif isinstance(widths, DynamicWidths):
      widths.validate(self.num_stages, self.num_tasks, self.width_choices or WIDTH_CHOICES)
      encoder_widths = widths.encoder_multipliers()
      decoder_widths = widths.decoder_multipliers()
    else:
      raise ValueError(
          f"widths must be a WidthConfig, DynamicWidths or None, got {type(widths).__name__}.")
    encoder = self.make_encoder(parent=self, name="encoder")
    features = encoder(self._normalise(images), widths=encoder_widths, train=train)
    in_features = encoder.stage_channels[-1]
    predictions = {}
    for task, multiplier, hidden in zip(self.tasks, decoder_widths, self.decoder_widths()):
      if task.is_dense:
        if features[-1].ndim != 4:
          raise ValueError(
              f"Task {task.name!r} is dense ({task.kind}) but backbone {self.backbone!r} ends "
              f"in a flat vector; use a convolutional backbone.")
        head = DenseHead(task.num_outputs, hidden_features=hidden,
                         atrous_rates=tuple(self.atrous_rates),
                         image_pooling=self.image_pooling, in_features=in_features,
                         bn_momentum=self.bn_momentum, bn_axis_name=self.bn_axis_name,
                         name=f"head_{task.name}")
        predictions[task.name] = head(features, width=multiplier,
                                      out_size=tuple(images.shape[1:3]), train=train)
      else:
        head = MLPHead(task.num_outputs, hidden_features=hidden,
                       num_hidden=self.head_hidden_layers, in_features=in_features,
                       batch_norm=self.head_batch_norm, bn_momentum=self.bn_momentum,
                       bn_axis_name=self.bn_axis_name, name=f"head_{task.name}")
        predictions[task.name] = head(features, width=multiplier, train=train)
    return (predictions, features) if return_features else predictions


class SingleTaskNets(nn.Module):
  """N independent networks, one per task (no shared weights): the single-task baselines.

  Attributes:
    networks: one `MultiTaskNet` per task, each for a 1-tuple of tasks (e.g.
      `build_multitask((task,), ...)`); network t runs as the submodule `net_<task name>`, so
      its variables live under that name.
  """

  networks: tuple[MultiTaskNet, ...]

  @property
  def tasks(self) -> tuple[tasks_lib.Task, ...]:
    return tuple(net.tasks[0] for net in self.networks)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    outputs = {}
    for net in self.networks:
      if len(net.tasks) != 1:
        raise ValueError(f"Each single-task network has one task, got "
                         f"{', '.join(t.name for t in net.tasks)}.")
      outputs.update(net.clone(parent=self, name=f"net_{net.tasks[0].name}")(images,
                                                                          train=train))
    return outputs
