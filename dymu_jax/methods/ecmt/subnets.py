"""ECMT's SubNets: physical slicing, batch-norm recalibration, the masked path that every
SubNet of a sweep shares one compiled program on, and the encoder scores of the search."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.methods import base
from dymu_jax.metrics import accumulate
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.models import layers
from dymu_jax.models.multitask import MultiTaskNet, kwargs_tuple
from dymu_jax.models.widths import DynamicWidths, WidthConfig, encoder_configs

if TYPE_CHECKING:
  from dymu_jax.methods.ecmt.method import ECMTMethod

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Slicing and batch-norm recalibration.


def slice_subnet(model: MultiTaskNet, variables: PyTree, widths: WidthConfig,
                 image_shape: Sequence[int]) -> tuple[MultiTaskNet, PyTree]:
  """(the SubNet as a network of its own, its physically sliced variables).

  `sub.apply(sub_variables, x)` equals `model.apply(variables, x, widths=widths)`. The image
  shape (H, W, C) is needed because some layers' kernels cover the spatial map (LeNet's fc).
  """
  sub = model.sliced(widths)
  dummy = jax.ShapeDtypeStruct((1, *tuple(image_shape)), jnp.float32)
  shapes = jax.eval_shape(lambda x: sub.init(jax.random.key(0), x, train=False), dummy)
  shapes = {k: shapes[k] for k in variables}
  return sub, layers.slice_variables(dict(variables), shapes)


def _batch_statistics_model(sub: MultiTaskNet) -> MultiTaskNet:
  """`sub` whose batch norms record exactly the last batch's statistics (momentum 0), unpooled."""
  options = dict(sub.backbone_kwargs)
  options.update(bn_momentum=0.0, bn_axis_name=None)
  return sub.clone(parent=None, bn_momentum=0.0, bn_axis_name=None,
                   backbone_kwargs=kwargs_tuple(options))


@functools.partial(jax.jit, static_argnums=0)
def _batch_statistics(model: MultiTaskNet, variables: PyTree, images: jax.Array) -> PyTree:
  """The "batch_stats" a momentum-0 model records for one batch: its batch statistics."""
  _, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  return state["batch_stats"]


def _images_of(batch) -> np.ndarray:
  if isinstance(batch, Mapping):
    images = np.asarray(batch["image"])
    if accumulate.VALID_KEY in batch:  # padded evaluation batches: drop the padding
      images = images[np.asarray(batch[accumulate.VALID_KEY], bool)]
    return images
  return np.asarray(batch)


def recalibrate_bn(method: ECMTMethod, variables: PyTree, config: WidthConfig,
                   batches: Iterable[Any]) -> PyTree:
  """Variables whose running statistics for the SubNet `config` are re-estimated from data.

  The SubNet runs on its static sliced path in training mode over `batches` (dicts with an
  "image" array, or image arrays; a few hundred training images in total). Every batch norm it
  uses gets, for its active channels, the cumulative average of the per-batch statistics:
  after n batches `ra = ra + (batch - ra) / n`, i.e. momentum (n - 1) / n at batch n, so the
  result is exactly the mean over batches of the batch means and of the (biased) batch
  variances, whatever the old values were (PyTorch's `momentum=None`). Use equal-sized batches:
  each batch counts once. Channels the SubNet does not use keep their statistics.

  Returns:
    Full-width variables (the input is not modified): predict with `{"widths": config}`, or
    slice them with `slice_subnet` for export.
  """
  config = method.resolve_controls({"widths": config})
  if "batch_stats" not in variables:
    return variables  # nothing to recalibrate (e.g. LeNet without batch norm)
  iterator = iter(batches)
  first = next(iterator, None)
  if first is None:
    raise ValueError("recalibrate_bn needs at least one batch of training images.")
  images = _images_of(first)
  sub, sub_variables = slice_subnet(method.model, variables, config, images.shape[1:])
  stats_model = _batch_statistics_model(sub)
  mean_stats, count = None, 0
  while images is not None:
    if images.shape[0]:
      stats = _batch_statistics(stats_model, sub_variables,
                                jax.device_put(images.astype(np.float32)))
      count += 1
      if mean_stats is None:
        mean_stats = stats
      else:
        mean_stats = jax.tree.map(lambda ra, b: ra + (b - ra) / count, mean_stats, stats)
    batch = next(iterator, None)
    images = None if batch is None else _images_of(batch)
  if mean_stats is None:
    raise ValueError("recalibrate_bn got only empty batches; give it training images.")

  def write_back(full, new):
    return jnp.asarray(full).at[tuple(slice(0, n) for n in new.shape)].set(new)

  out = dict(variables)
  out["batch_stats"] = jax.tree.map(write_back, variables["batch_stats"], mean_stats)
  return out


# ----------------------------------------------------------------------------------------------
# Preference-independent encoder scores for the search.


@functools.partial(jax.jit, static_argnums=0)
def _masked_statistics(model: MultiTaskNet, variables: PyTree, images: jax.Array,
                       encoder: jax.Array, decoders: jax.Array) -> PyTree:
  widths = DynamicWidths(encoder, decoders, tuple(model.width_choices))
  _, state = model.apply(variables, images, widths=widths, train=True, mutable=["batch_stats"])
  return state["batch_stats"]


@dataclasses.dataclass(frozen=True)
class MaskedSuperNet:
  """A SubNet run on the SuperNet's masked path: `apply(variables, images)` with the widths as
  arrays in `variables["masked_widths"]` ({"encoder", "decoders"}: `DynamicWidths` indices).

  It computes what the sliced SubNet computes (`slice_subnet`), and every configuration shares
  one compiled program, so a sweep over many SubNets costs compute, not compilations.
  """

  model: MultiTaskNet

  def apply(self, variables: PyTree, images: jax.Array, train: bool = False):
    variables = dict(variables)
    masked = variables.pop("masked_widths")
    widths = DynamicWidths(masked["encoder"], masked["decoders"], tuple(self.model.width_choices))
    return self.model.apply(variables, images, widths=widths, train=train)


def masked_variables(method: ECMTMethod, variables: PyTree, config: WidthConfig,
                     calibration: Sequence[np.ndarray]) -> PyTree:
  """`MaskedSuperNet` variables of SubNet `config`, its batch norms recalibrated on the masked
  path exactly as `recalibrate_bn` does on the sliced one (mean over the `calibration` image
  batches of the batch statistics; the active channels' statistics equal the sliced SubNet's).
  """
  dynamic = DynamicWidths.from_config(config, method.width_choices)
  variables = dict(variables)
  if "batch_stats" in variables and calibration:
    stats_model = _batch_statistics_model(method.model)
    mean_stats = None
    for count, images in enumerate(calibration, start=1):
      stats = _masked_statistics(stats_model, variables, jnp.asarray(images, jnp.float32),
                                 dynamic.encoder, dynamic.decoders)
      mean_stats = stats if mean_stats is None else jax.tree.map(
          lambda ra, b, n=count: ra + (b - ra) / n, mean_stats, stats)
    variables["batch_stats"] = mean_stats
  variables["masked_widths"] = {"encoder": dynamic.encoder, "decoders": dynamic.decoders}
  return variables


def masked_evaluate(method: ECMTMethod, variables: PyTree, config: WidthConfig,
                    calibration: Sequence[np.ndarray], batches: Sequence[Mapping[str, Any]]
                    ) -> dict[str, dict[str, float]]:
  """Task metrics and mean test losses of SubNet `config` after recalibrating its batch norms
  (`masked_variables`), on the masked path through the one evaluation loop
  (`metrics.accumulate.evaluate`: one compiled program for every configuration).

  Args:
    method: the ECMT method.
    variables: the SuperNet's variables.
    config: the SubNet.
    calibration: image batches (N, H, W, C) for the batch-norm statistics (equal sizes).
    batches: labelled batches (dicts with "image", the task labels and optionally "_valid").

  Returns:
    {task: {metric: value}}, with each task's mean test loss under "loss".
  """
  return accumulate.evaluate(MaskedSuperNet(method.model),
                             masked_variables(method, variables, config, calibration),
                             method.tasks, batches)


def score_encoders(method: ECMTMethod, variables: PyTree, calibration: Sequence[np.ndarray],
                   batches: Sequence[Mapping[str, Any]], *,
                   encoders: Sequence[Sequence[float]] | None = None,
                   progress=None) -> dict[tuple[float, ...], float]:
  """The search's preference-independent validation score of every encoder configuration.

  Score [ours, METHODS.md "mean normalised task metric"]: each encoder configuration runs with
  the widest decoders, its batch norms recalibrated on `calibration`, and is evaluated on
  `batches` (held-out training images: the test split stays unseen); the score is the mean
  over tasks of the primary metric relative to the SuperNet's on the same images
  (`metrics.tasks.normalised_metric`; 1.0 for the SuperNet, higher is better).

  Args:
    method, variables: the trained ECMT SuperNet.
    calibration: image batches for batch-norm recalibration.
    batches: labelled validation batches.
    encoders: the encoder configurations to score (default: all).
    progress: optional callable(done, total) called after each configuration.

  Returns:
    {encoder multipliers: score}.
  """
  encoders = [tuple(float(m) for m in e) for e in
              (encoders if encoders is not None else
               encoder_configs(method.num_stages, method.width_choices))]
  widest = (method.width_choices[-1],) * len(method.tasks)
  full = masked_evaluate(method, variables, method.full_widths(), calibration, batches)
  scores = {}
  for i, encoder in enumerate(encoders):
    per_task = (full if encoder == method.full_widths().encoder else
                masked_evaluate(method, variables, WidthConfig(encoder, widest), calibration,
                                batches))
    scores[encoder] = metrics_lib.mean_normalised_metric(method.tasks, per_task, full)
    if progress is not None:
      progress(i + 1, len(encoders))
  return scores


def cached_encoder_scores(method: ECMTMethod, variables: PyTree, held_out: base.HeldOut,
                          signature: str, path: str | os.PathLike | None = None
                          ) -> dict[tuple[float, ...], float]:
  """`score_encoders` on `held_out`, kept in the JSON file `path` under `signature` (the cost
  table's, the checkpoint's and the images'); a file for another signature is scored again."""
  if path is not None and files_lib.is_file(path):
    try:
      record = files_lib.read_json(path)
      if record.get("signature") == signature:
        return {tuple(e): float(s) for e, s in record["scores"]}
    except (files_lib.DamagedFile, AttributeError, KeyError, TypeError, ValueError) as error:
      print(f"{error if isinstance(error, files_lib.DamagedFile) else f'{path} is damaged'}; "
            f"scoring again.", flush=True)
  started = time.time()
  total = len(encoder_configs(method.num_stages, method.width_choices))
  count = sum(len(b["image"]) for b in held_out.validation)
  where = f"; cached in {path}" if path is not None else ""
  print(f"scoring {total} encoder configurations on {count} held-out training images "
        f"(once{where})...", flush=True)

  def progress(done, count):
    if done % max(count // 8, 1) == 0 or done == count:
      print(f"  {done}/{count} encoders scored ({time.time() - started:.0f} s)", flush=True)

  scores = score_encoders(method, variables, held_out.calibration, held_out.validation,
                          progress=progress)
  if path is not None:
    files_lib.write_json(path, {"signature": signature,
                                "scores": [[list(e), s] for e, s in scores.items()]},
                         indent=None)
  return scores
