"""Slimmable networks: widths, layers, backbones, decoders and the multi-task network.

`build_multitask(tasks, backbone="resnet_small", **options)` is the usual entry point; see
`multitask.MultiTaskNet` for the options and `widths.WidthConfig` for width configurations.
"""

from __future__ import annotations

from typing import Any, Sequence

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import backbones, decoders, layers, multitask, widths
from dymu_jax.models.backbones import REGISTRY as BACKBONES
from dymu_jax.models.decoders import DEFAULT_ATROUS_RATES
from dymu_jax.models.multitask import MultiTaskNet, SingleTaskNets
from dymu_jax.models.widths import WIDTH_CHOICES, DynamicWidths, WidthConfig, channels


def build_multitask(tasks: Sequence[tasks_lib.Task], backbone: str = "resnet_small",
                    backbone_kwargs: dict[str, Any] | None = None, **options) -> MultiTaskNet:
  """A `MultiTaskNet` for `tasks` on the named backbone.

  Args:
    tasks: the tasks, in decoder order.
    backbone: one of `BACKBONES` ("lenet", "resnet_small", "resnet18", "resnet34",
      "mobilenet_v2" for images; "mlp" for feature vectors (B, D)).
    backbone_kwargs: options of the backbone class (e.g. {"output_stride": 8}, or
      {"hidden": (128, 64)} for the MLP).
    **options: other `MultiTaskNet` attributes (head_width, atrous_rates, ...).
  """
  backbones.get_backbone(backbone)  # Unknown name: one sentence listing the names.
  options.setdefault("atrous_rates", DEFAULT_ATROUS_RATES.get(backbone, (6, 12, 18)))
  return MultiTaskNet(tasks=tuple(tasks), backbone=backbone,
                      backbone_kwargs=multitask.kwargs_tuple(backbone_kwargs), **options)


__all__ = [
    "BACKBONES", "DEFAULT_ATROUS_RATES", "DynamicWidths", "MultiTaskNet", "SingleTaskNets",
    "WIDTH_CHOICES",
    "WidthConfig",
    "backbones", "build_multitask", "channels", "decoders", "layers", "multitask", "widths",
]
