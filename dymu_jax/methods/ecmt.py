"""ECMT: a slimmable SuperNet trained with sampled SubNets and CI-KD, and its budget search.

METHODS.md section 2. The model is a `MultiTaskNet` (shared encoder, one decoder per task) whose
encoder stages and decoders each slim by a multiplier from `width_choices`. What is known and
what is ours:

* **Sandwich rule [ours, as in universally slimmable networks].** Every step trains K =
  `num_subnets` configurations on the same batch: the SuperNet (max), the smallest
  configuration (min) and K - 2 random ones whose encoder stages and decoders are drawn
  independently and uniformly from the choices with the step's key (`sandwich`).
* **Bounded compilation [ours].** The max and min configurations are fixed, so they run on the
  static, sliced path (their real cost). The K - 2 random ones run on the masked path
  (`DynamicWidths`: arrays drawn inside jit, full-width compute with the surplus channels
  zeroed), unrolled in the program on CPU (a `jax.vmap` over them batched the convolution
  gradients, about 1.25x slower there: `benchmarks/method_speed.py`) and vmapped on
  accelerators (`execution.choices().passes`). The compiled step is therefore ONE
  program whatever configurations are drawn; its size grows linearly with K, its number does
  not. The price is compute: each
  random SubNet costs a full-width pass instead of its own. With the default choices and K = 4 a
  step costs about 1 + 1/16 + 2 = 3.1 SuperNet forward/backward passes, against about 2.0 if
  the random SubNets ran sliced (a random configuration has ~45% of the SuperNet's MACs on
  average). The alternative, a fixed seeded list of static configurations, would compile one
  program per distinct list entry (or one `lax.switch` branch each), trading compile time and
  sampling diversity for that compute.
* **Task loss [known: fixed task weights; ours: normalisation].** For every configuration k,
  `L^k = sum_t w_t L_t^k`; the training loss uses the mean over the K configurations,
  `(1/K) sum_k L^k`, so that its scale (and a learning rate tuned for the static baseline) does
  not depend on K.
* **CI-KD [known in intent; ours: form].** `lambda_kd * mean_k mean_s ||sg(F_max_s)[..., :C] -
  F_k_s||^2 / (elements of the slice)`: for each of the K - 1 SubNets and each encoder stage s,
  the mean squared difference between the SubNet's stage output (its C active channels) and the
  leading C channels of the SuperNet's, with the SuperNet's features as a stop-gradient teacher.
  On the masked path the zeroed channels are excluded (mean over the active channels only), so
  both paths give the same value. `lambda_kd = 0` or `kd="none"` turns it off (ablation).
  Use it on normalised features: on LeNet without batch norm the raw-activation MSE diverged
  (the SuperNet's features, pulled along by the SubNets sharing its weights, grew without
  bound), so the Multi-MNIST ECMT flag files turn LeNet's batch norm on.
* **Mutual learning [ours option, `kd="mutual"`].** In addition to CI-KD, the SuperNet and each
  SubNet match each other's task predictions in both directions, each direction against the
  other's stop-gradient prediction (`mutual_loss`): KL of temperature-softened softmaxes
  (classification, segmentation) or sigmoids (edges, saliency), times T^2 (T =
  `mutual_temperature`, default 2 [ours]); mean squared error
  for regression and depth, and for normals on unit vectors. Weighted by `lambda_mutual`, mean
  over the K - 1 (SuperNet, SubNet) pairs, task weights as for the task loss.
* **Batch norm [ours].** Training normalises with batch statistics for every configuration; the
  running statistics are updated by the SuperNet pass only (a SubNet's channels would otherwise
  mix statistics of different widths). Before evaluating or exporting a SubNet, re-estimate its
  statistics with `recalibrate_bn`.
* **Search [known rule, ours procedure].** `search(preference, budget, cost_table=...)`, from a
  `CostTable` of analytic MACs (`build_cost_table`, cacheable to JSON): for every encoder
  configuration that fits, the decoders share what is left in proportion to the preference
  (water-filling, then leftovers to the most preferred tasks first: `allocate_decoders`); the
  encoder is chosen by a preference-independent validation score when given
  (`score_encoders`), else the most expensive candidate wins. Two options of ours: an encoder
  must leave `decoder_reserve` of the decoders' MACs span free, and each decoder is capped at
  `r_t / max(r)` of its full extra MACs (`preference_cap`); without them the encoder tends to
  take the whole budget, and on datasets whose decoders are cheap (classification heads) every
  decoder ends at full width whatever the preference. The preference is checked, in float64
  and renormalised to sum 1, by `dymu_jax.controls.check_preference`.

`predict(variables, images, controls)` runs the static sliced path for `{"widths": WidthConfig}`,
`{"encoder": (...), "decoders": (...)}` or `{"preference": r, "budget": b}` (resolved by the
search), so an evaluated SubNet is the slimmed network itself.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import time
from typing import Any, Hashable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import controls as controls_lib
from dymu_jax import execution
from dymu_jax import files as files_lib
from dymu_jax import losses
from dymu_jax import tasks as tasks_lib
from dymu_jax.data import base as data_lib
from dymu_jax.methods import base
from dymu_jax.metrics import accumulate
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.models import cost as cost_lib
from dymu_jax.models import layers
from dymu_jax.models.multitask import MultiTaskNet, kwargs_tuple
from dymu_jax.models.widths import (WIDTH_CHOICES, DynamicWidths, WidthConfig, channels,
                                    encoder_configs)

PyTree = Any
KD_MODES = ("ci_kd", "mutual", "none")
# Fraction of the decoders' MACs span the search keeps free for the preference [ours].
DECODER_RESERVE = 0.5


# ----------------------------------------------------------------------------------------------
# Distillation terms.


def ci_kd_loss(teacher_features: Sequence[jax.Array], student_features: Sequence[jax.Array],
               active_channels: Sequence[jax.Array] | None = None) -> jax.Array:
  """Configuration-invariant distillation: mean over stages of the per-element squared error.

  Args:
    teacher_features: the SuperNet's stage outputs (full width); gradients never reach them.
    student_features: a SubNet's stage outputs: sliced (C_s channels, static path) or full
      width with zeros beyond the active channels (masked path).
    active_channels: for the masked path, the active channel count of each stage (int32
      scalars); None on the static path (the student's channel count is the active count).

  Returns:
    `mean_s sum((sg(F_max_s)[..., :C_s] - F_s)^2) / (elements of the C_s-channel slice)`.
  """
  if len(teacher_features) != len(student_features):
    raise ValueError(f"CI-KD needs one teacher feature map per student stage, got "
                     f"{len(teacher_features)} and {len(student_features)}.")
  per_stage = []
  for s, (teacher, student) in enumerate(zip(teacher_features, student_features)):
    width = student.shape[-1]
    teacher = jax.lax.stop_gradient(teacher)[..., :width]
    positions = math.prod(student.shape[:-1])
    if active_channels is None:
      per_stage.append(jnp.mean(jnp.square(teacher - student)))
    else:
      mask = (jnp.arange(width) < active_channels[s]).astype(student.dtype)
      squared = jnp.sum(jnp.square((teacher - student) * mask))
      per_stage.append(squared / (positions * active_channels[s].astype(student.dtype)))
  return jnp.mean(jnp.stack(per_stage))


def prediction_distance(task: tasks_lib.Task, student: jax.Array, teacher: jax.Array,
                        temperature: float = 1.0) -> jax.Array:
  """How far `student`'s prediction is from `teacher`'s (a stop-gradient target), per kind.

  Classification and segmentation: `T^2 KL(softmax(teacher/T) || softmax(student/T))`, mean
  over examples (and pixels); edges and saliency: the same with Bernoulli distributions of
  sigmoids; normals: mean squared error of the unit vectors; regression and depth: mean
  squared error. Zero when the predictions are equal.
  """
  teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  student = student.astype(jnp.float32)
  if task.kind in (tasks_lib.CLASSIFICATION, tasks_lib.SEGMENTATION):
    log_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    return temperature**2 * jnp.mean(kl)
  if task.kind in (tasks_lib.EDGES, tasks_lib.SALIENCY):
    t, s = teacher / temperature, student / temperature
    p = jax.nn.sigmoid(t)
    kl = (p * (jax.nn.log_sigmoid(t) - jax.nn.log_sigmoid(s))
          + (1.0 - p) * (jax.nn.log_sigmoid(-t) - jax.nn.log_sigmoid(-s)))
    return temperature**2 * jnp.mean(kl)
  if task.kind == tasks_lib.NORMALS:
    diff = losses.normalize(student) - losses.normalize(teacher)
    return jnp.mean(jnp.sum(jnp.square(diff), axis=-1))
  return jnp.mean(jnp.square(student - teacher))


def mutual_loss(tasks: Sequence[tasks_lib.Task], predictions_a: Mapping[str, jax.Array],
                predictions_b: Mapping[str, jax.Array], temperature: float = 1.0,
                weights: Sequence[float] | None = None) -> jax.Array:
  """Two-way distillation between two networks' predictions: both receive gradients.

  `sum_t w_t [d_t(a, sg(b)) + d_t(b, sg(a))]` with `d_t = prediction_distance`.
  """
  weights = weights or (1.0,) * len(tasks)
  total = jnp.zeros((), jnp.float32)
  for w, task in zip(weights, tasks):
    a, b = predictions_a[task.name], predictions_b[task.name]
    total += w * (prediction_distance(task, a, b, temperature)
                  + prediction_distance(task, b, a, temperature))
  return total


# ----------------------------------------------------------------------------------------------
# The method.


def _sorted_choices(choices: Sequence[float]) -> tuple[float, ...]:
  out = tuple(sorted(float(c) for c in choices))
  if not out or any(not 0.0 < c <= 1.0 for c in out) or len(set(out)) != len(out):
    raise ValueError(
        f"width_choices must be distinct multipliers in (0, 1], got {tuple(choices)!r}.")
  return out


@dataclasses.dataclass(frozen=True)
class ECMTMethod(base.MethodBase):
  """A slimmable SuperNet trained with sampled SubNets (see the module docstring).

  Attributes:
    tasks: the tasks, in decoder order.
    model: the `MultiTaskNet`; its `width_choices` must equal `width_choices`.
    task_weights: fixed loss weight per task (default 1 each).
    num_subnets: K, configurations per step (max, min and K - 2 random); at least 2.
    lambda_kd: weight of CI-KD (0 turns it off).
    kd: "ci_kd" (CI-KD only), "mutual" (CI-KD plus two-way prediction distillation) or "none".
    lambda_mutual: weight of the mutual term (kd="mutual").
    mutual_temperature: softening temperature T of the mutual term.
    width_choices: the multipliers configurations are drawn from.
    encoder_scores: optional preference-independent validation score per encoder
      configuration, as ((encoder multipliers, score), ...), for the search in `predict`.
    cost_table: optional precomputed `CostTable` for `predict`'s search (else built on first
      use for the image size and cached).
    name: the method name in logs.
    axis_name: the pmap axis the model's batch norms pool over (see `methods.base`).
    decoder_reserve: `search`'s share of the decoders' span an encoder must leave free
      (deployment only).
    preference_cap: `search`'s cap of each decoder at r_t / max(r) (deployment only).
  """

  # Fields a user may set when deploying a trained run (`experiments.export` flags).
  DEPLOY_OPTIONS = ("decoder_reserve", "preference_cap")
  PREPARE_USES_HELD_OUT = True

  tasks: tuple[tasks_lib.Task, ...]
  model: MultiTaskNet
  task_weights: tuple[float, ...] | None = None
  num_subnets: int = 4
  lambda_kd: float = 1.0
  kd: str = "ci_kd"
  lambda_mutual: float = 1.0
  mutual_temperature: float = 2.0
  width_choices: tuple[float, ...] = WIDTH_CHOICES
  encoder_scores: tuple[tuple[tuple[float, ...], float], ...] | None = None
  cost_table: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
  name: str = "ecmt"
  axis_name: str | None = None
  decoder_reserve: float = DECODER_RESERVE
  preference_cap: bool = True

  def __post_init__(self):
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "width_choices", _sorted_choices(self.width_choices))
    if not 0.0 <= self.decoder_reserve <= 1.0:
      raise ValueError(f"decoder_reserve must lie in [0, 1], got {self.decoder_reserve}.")
    if self.task_weights is not None:
      object.__setattr__(self, "task_weights", tuple(float(w) for w in self.task_weights))
      if len(self.task_weights) != len(self.tasks):
        raise ValueError(
            f"Got {len(self.task_weights)} task weights for {len(self.tasks)} tasks "
            f"({', '.join(t.name for t in self.tasks)}); give one weight per task.")
    if isinstance(self.num_subnets, bool) or not isinstance(self.num_subnets, int) or (
        self.num_subnets < 2):
      raise ValueError(f"num_subnets must be an integer >= 2 (the max and min configurations "
                       f"plus random ones), got {self.num_subnets!r}.")
    if self.kd not in KD_MODES:
      raise ValueError(f"Unknown kd mode {self.kd!r}; allowed: {', '.join(KD_MODES)}.")
    for field in ("lambda_kd", "lambda_mutual"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{field} must be a finite number >= 0, got {value!r}.")
    if not self.mutual_temperature > 0:
      raise ValueError(f"mutual_temperature must be > 0, got {self.mutual_temperature!r}.")
    model_choices = self.model.width_choices
    if model_choices is None or _sorted_choices(model_choices) != self.width_choices:
      raise ValueError(
          f"The model's width_choices {model_choices} must equal the method's "
          f"{self.width_choices}; build the model with width_choices={self.width_choices}.")
    if tuple(self.model.tasks) != self.tasks:
      raise ValueError("The model's tasks must be the method's tasks, in the same order.")

  # -- configurations ------------------------------------------------------------------------

  @property
  def num_stages(self) -> int:
    return self.model.num_stages

  def full_widths(self) -> WidthConfig:
    return WidthConfig.full(self.num_stages, len(self.tasks))

  def smallest_widths(self) -> WidthConfig:
    return WidthConfig.smallest(self.num_stages, len(self.tasks), self.width_choices)

  def sandwich(self, rng: jax.Array) -> DynamicWidths:
    """The K configurations of one step as choice indices, rows (max, min, random...).

    Returns a `DynamicWidths` whose `encoder` is int32 (K, stages) and `decoders` int32
    (K, tasks); row 0 is the SuperNet, row 1 the smallest configuration, rows 2.. are drawn
    independently and uniformly per stage and per decoder with `rng`.
    """
    k, stages, num_tasks = self.num_subnets, self.num_stages, len(self.tasks)
    top = len(self.width_choices) - 1
    enc_key, dec_key = jax.random.split(rng)
    encoder = jnp.concatenate([
        jnp.full((1, stages), top, jnp.int32), jnp.zeros((1, stages), jnp.int32),
        jax.random.randint(enc_key, (k - 2, stages), 0, top + 1, jnp.int32)])
    decoders = jnp.concatenate([
        jnp.full((1, num_tasks), top, jnp.int32), jnp.zeros((1, num_tasks), jnp.int32),
        jax.random.randint(dec_key, (k - 2, num_tasks), 0, top + 1, jnp.int32)])
    return DynamicWidths(encoder, decoders, self.width_choices)

  # -- the Method interface ------------------------------------------------------------------

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    return self.model.init(rng, batch["image"], train=False)

  def _weights(self) -> tuple[float, ...]:
    return self.task_weights or (1.0,) * len(self.tasks)

  def _weighted(self, task_losses: Mapping[str, jax.Array]) -> jax.Array:
    return sum(w * task_losses[t.name] for w, t in zip(self._weights(), self.tasks))

  def subnet_terms(self, variables: PyTree, batch: Mapping[str, jax.Array],
                   widths: WidthConfig | DynamicWidths, teacher_features=None,
                   teacher_predictions=None) -> dict[str, jax.Array]:
    """Losses of one SubNet in training mode (its batch-norm updates are discarded).

    Args:
      variables: full-width variables.
      batch: images and labels.
      widths: a `WidthConfig` (static, sliced compute) or a single `DynamicWidths` (masked).
      teacher_features: the SuperNet's stage outputs, for CI-KD (None: "kd" is 0).
      teacher_predictions: the SuperNet's predictions, for the mutual term (None: 0).

    Returns:
      {"loss/<task>": task loss, "task_total": weighted sum, "kd": CI-KD distance,
      "mutual": two-way distance to the teacher predictions}.
    """
    mutable = [k for k in variables if k != "params"]
    (predictions, features), _ = self.model.apply(
        variables, batch["image"], widths=widths, train=True, return_features=True,
        mutable=mutable)
    terms = {f"loss/{t.name}": t.loss(predictions[t.name], batch[t.name]) for t in self.tasks}
    terms["task_total"] = self._weighted({t.name: terms[f"loss/{t.name}"] for t in self.tasks})
    zero = jnp.zeros((), jnp.float32)
    terms["kd"] = zero
    if teacher_features is not None:
      active = None
      if isinstance(widths, DynamicWidths):
        full = self.model.make_encoder().stage_channels
        active = [m.channels(c) for m, c in zip(widths.encoder_multipliers(), full)]
      terms["kd"] = ci_kd_loss(teacher_features, features, active)
    terms["mutual"] = zero
    if teacher_predictions is not None:
      terms["mutual"] = mutual_loss(self.tasks, teacher_predictions, predictions,
                                    self.mutual_temperature, self._weights())
    return terms

  def loss(self, params, model_state, batch, rng, step):
    """Sandwich-rule loss: mean task loss over K configurations + CI-KD (+ mutual)."""
    del step  # the configurations come from the step's key
    variables = {"params": params, **model_state}
    (max_predictions, max_features), new_state = self.model.apply(
        variables, batch["image"], train=True, return_features=True,
        mutable=list(model_state))
    max_losses = {t.name: t.loss(max_predictions[t.name], batch[t.name]) for t in self.tasks}
    max_total = self._weighted(max_losses)

    use_kd = self.kd != "none" and self.lambda_kd > 0
    use_mutual = self.kd == "mutual" and self.lambda_mutual > 0
    teacher_features = [jax.lax.stop_gradient(f) for f in max_features]
    # Mutual learning needs the SuperNet's predictions with their gradient (two-way).
    teacher_predictions = max_predictions if use_mutual else None

    def terms(widths):
      return self.subnet_terms(variables, batch, widths, teacher_features, teacher_predictions)

    subnets = [terms(self.smallest_widths())]
    if self.num_subnets > 2:
      sampled = self.sandwich(rng)
      random_widths = DynamicWidths(sampled.encoder[2:], sampled.decoders[2:],
                                    self.width_choices)
      subnets.append(execution.map_stacked(terms, random_widths))  # (K - 2,) per term
    stacked = {k: jnp.concatenate([jnp.reshape(s[k], (-1,)) for s in subnets])
               for k in subnets[0]}  # (K - 1,) per term

    task_loss = (max_total + jnp.sum(stacked["task_total"])) / self.num_subnets
    kd_distance = jnp.mean(stacked["kd"])
    kd_term = self.lambda_kd * kd_distance if use_kd else jnp.zeros((), jnp.float32)
    mutual_term = (self.lambda_mutual * jnp.mean(stacked["mutual"]) if use_mutual
                   else jnp.zeros((), jnp.float32))
    total = task_loss + kd_term + mutual_term

    aux = {f"loss/{name}": value for name, value in max_losses.items()}
    aux.update({
        "task_loss": task_loss, "kd": kd_term, "kd_distance": jax.lax.stop_gradient(kd_distance),
        "mutual": mutual_term, "loss/max": max_total, "loss/min": stacked["task_total"][0],
    })
    if self.num_subnets > 2:
      aux["loss/random"] = jnp.mean(stacked["task_total"][1:])
    return total, (aux, new_state)

  def resolve_controls(self, controls, image_shape: Sequence[int] | None = None
                       ) -> WidthConfig:
    """The static width configuration that `controls` select (see `predict`)."""
    num_stages, num_tasks = self.num_stages, len(self.tasks)
    if not controls:
      return self.full_widths()
    controls = dict(controls)
    keys = set(controls)
    if keys == {"widths"}:
      widths = controls["widths"]
      if not isinstance(widths, WidthConfig):
        try:
          encoder, decoders = widths
          widths = WidthConfig(tuple(encoder), tuple(decoders))
        except (TypeError, ValueError):
          raise ValueError(f"controls['widths'] must be a WidthConfig or an (encoder, decoders) "
                           f"pair of multiplier tuples, got {widths!r}.") from None
    elif keys == {"encoder", "decoders"}:
      widths = WidthConfig(tuple(controls["encoder"]), tuple(controls["decoders"]))
    elif keys == {"preference", "budget"}:
      if image_shape is None:
        raise ValueError("Resolving a preference and budget needs the image shape (H, W, C).")
      table = self.get_cost_table(image_shape)
      scores = dict(self.encoder_scores) if self.encoder_scores else None
      return search(controls["preference"], controls["budget"], cost_table=table,
                    scores=scores)
    else:
      raise ValueError(
          f"ECMT controls must be {{'widths': WidthConfig}}, {{'encoder': ..., 'decoders': "
          f"...}} or {{'preference': ..., 'budget': ...}}, got keys {sorted(keys)}.")
    return widths.validate(num_stages, num_tasks, self.width_choices)

  def get_cost_table(self, image_shape: Sequence[int]) -> CostTable:
    """The cost table for images of shape (H, W, C): `cost_table` when it matches, else built
    once per model and image shape (and kept in memory)."""
    image_shape = tuple(int(d) for d in image_shape)
    table = self.cost_table
    if table is not None and table.signature == model_signature(
        self.model, image_shape, self.width_choices):
      return table
    return cached_cost_table(self.model, image_shape, self.width_choices)

  def predict(self, variables, images, controls=None):
    """Evaluation-mode predictions of the SubNet the controls select, on the sliced path."""
    widths = self.resolve_controls(controls, images.shape[1:])
    return self.model.apply(variables, images, widths=widths, train=False)

  def eval_controls(self):
    """The SuperNet and the smallest SubNet (as {"encoder": ..., "decoders": ...})."""
    return [{"encoder": c.encoder, "decoders": c.decoders}
            for c in (self.full_widths(), self.smallest_widths())]

  # -- deployment ------------------------------------------------------------------------------

  def control_space(self) -> base.ControlSpace:
    """A preference over the tasks and a budget (a fraction of the SuperNet's MACs in (0, 1],
    or MACs per example above 1)."""
    return base.ControlSpace(("preference", "budget"))

  def prepare(self, variables, held_out: base.HeldOut | None = None,
              cache_dir: str | os.PathLike | None = None) -> Prepared:
    """The cost table and the encoder scores on `held_out` (see `Prepared`), cached in
    `cache_dir`'s cost_table.json and encoder_scores.json when given. Without validation
    batches nothing is scored, and the search takes the most expensive encoder that fits."""
    if held_out is None or not held_out.calibration:
      raise ValueError("Deploying an ECMT SuperNet needs held-out training images: calibration "
                       "batches for batch-norm recalibration (and scoring batches for the "
                       "search's encoder scores).")
    image_shape = tuple(np.shape(held_out.calibration[0])[1:])
    folder = files_lib.run_path(cache_dir) if cache_dir is not None else None
    table = cached_cost_table(self.model, image_shape, self.width_choices,
                              path=folder / "cost_table.json" if folder else None)
    scores = {}
    if held_out.validation:
      scores = cached_encoder_scores(self, variables, held_out,
                                     f"{table.signature}|{held_out.signature}",
                                     path=folder / "encoder_scores.json" if folder else None)
    return Prepared(table, scores, tuple(held_out.calibration))

  def search(self, preference, budget, prepared: Prepared) -> WidthConfig:
    """`search` with the method's deployment options."""
    return search(preference, budget, cost_table=prepared.cost_table, scores=prepared.scores,
                  decoder_reserve=self.decoder_reserve, preference_cap=self.preference_cap)

  def recalibrate(self, variables, config: WidthConfig, prepared: Prepared):
    """`recalibrate_bn` on the prepared calibration images (full-width variables)."""
    return recalibrate_bn(self, variables, config, prepared.calibration)

  def describe(self, variables, controls=None, prepared: Prepared | None = None, *,
               image_shape: Sequence[int]):
    """The searched SubNet's widths and cost (no recalibration)."""
    del variables
    config = self._search_controls(controls, prepared)[0]
    return ({"encoder": list(config.encoder), "decoders": list(config.decoders)},
            _subnet_cost(self.model, config, tuple(int(d) for d in image_shape)))

  def _search_controls(self, controls, prepared):
    """(the searched WidthConfig, the controls as deployed)."""
    controls = self.control_space().check(controls)
    if prepared is None:
      raise ValueError("ECMT's deploy needs `prepare(variables, held_out)`'s result.")
    names = [t.name for t in self.tasks]
    preference = controls_lib.check_preference(
        controls.get("preference", np.full(len(names), 1 / len(names))), names)
    budget = controls.get("budget", 1.0)
    return (self.search(preference, budget, prepared),
            {"preference": tuple(float(x) for x in preference), "budget": budget})

  def full_network(self, variables, prepared: Prepared | None = None, *,
                   image_shape: Sequence[int], standalone: bool = True) -> base.Deployed:
    """The SuperNet (every width at its largest), recalibrated like every SubNet."""
    return self._deploy_config(variables, self.full_widths(), prepared, image_shape,
                               {}, standalone, name="supernet")

  def deploy(self, variables, controls=None, prepared: Prepared | None = None, *,
             image_shape: Sequence[int], standalone: bool = True) -> base.Deployed:
    """The SubNet the search picks for (preference, budget), its batch norms recalibrated on
    the prepared calibration images and its variables sliced: a network of its own. A missing
    preference is uniform, a missing budget 1.0 (the SuperNet's MACs).

    With `standalone=False` (a sweep over many SubNets), the same SubNet runs on the SuperNet's
    masked path (`MaskedSuperNet`, recalibrated there), which every SubNet shares one compiled
    program for; it computes the same outputs but cannot be exported.
    """
    config, controls = self._search_controls(controls, prepared)
    return self._deploy_config(variables, config, prepared, image_shape, controls, standalone)

  def _deploy_config(self, variables, config: WidthConfig, prepared: Prepared | None,
                     image_shape: Sequence[int], controls: Mapping[str, Any], standalone: bool,
                     name: str = "subnet") -> base.Deployed:
    if prepared is None:
      raise ValueError("ECMT's deploy needs `prepare(variables, held_out)`'s result.")
    image_shape = tuple(int(d) for d in image_shape)
    table = prepared.cost_table
    info = {"widths": {"encoder": list(config.encoder), "decoders": list(config.decoders)},
            "supernet_macs": table.full_macs, "macs_fraction": table.macs(config) / table.full_macs,
            "decoder_reserve": self.decoder_reserve, "preference_cap": self.preference_cap,
            "name": name}
    structure = {"encoder": list(config.encoder), "decoders": list(config.decoders)}
    if not standalone:
      masked = prepared.remember(("masked", config), variables, lambda: masked_variables(
          self, variables, config, prepared.calibration))
      cost = _subnet_cost(self.model, config, image_shape)
      return base.Deployed(MaskedSuperNet(self.model), masked, image_shape, controls,
                           key=config, info=info, known_cost=cost, structure=structure)
    recalibrated = self.recalibrate(variables, config, prepared)
    sub, sub_variables = slice_subnet(self.model, recalibrated, config, image_shape)
    return base.Deployed(sub, sub_variables, image_shape, controls, key=config, info=info,
                         structure=structure)


@functools.lru_cache(maxsize=256)
def _subnet_cost(model: MultiTaskNet, config: WidthConfig,
                 image_shape: tuple[int, ...]) -> cost_lib.Cost:
  """The sliced SubNet's MACs and parameters (`models.cost.count`; traced, not run)."""
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return cost_lib.count(model.sliced(config), None, sample, train=False)


OPTIONS = ("num_subnets", "lambda_kd", "kd", "lambda_mutual", "mutual_temperature",
           "width_choices")


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """What deploying a trained SuperNet needs once (`ECMTMethod.prepare`).

  Attributes:
    cost_table: the `CostTable` of the network at the images' shape.
    scores: {encoder multipliers: score} of `score_encoders` on held-out training images.
    calibration: the held-out image batches batch norms are recalibrated on.
  """

  cost_table: "CostTable"
  scores: Mapping[tuple[float, ...], float]
  calibration: tuple[Any, ...]
  # Work done for one set of variables (the masked SubNets' recalibrated statistics), reused
  # while deploy gets those same variables again (`remember`).
  _memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def remember(self, key: Hashable, variables: PyTree, compute):
    """`compute()`, kept under `key` for these very `variables` (identity, not equality)."""
    held = self._memo.get(key)
    if held is None or held[0] is not variables:
      held = self._memo[key] = (variables, compute())
    return held[1]


def build(tasks: Sequence[tasks_lib.Task], make_net, *,
          task_weights: Sequence[float] | None = None, axis_name: str | None = None,
          **options) -> ECMTMethod:
  """An `ECMTMethod`; `make_net(tasks, width_choices=...)` builds the `MultiTaskNet`.

  `options` are `ECMTMethod` fields among `OPTIONS`.
  """
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"Unknown ECMT option(s) {', '.join(unknown)}; allowed: "
                     f"{', '.join(OPTIONS)}.")
  choices = _sorted_choices(options.pop("width_choices", None) or WIDTH_CHOICES)
  tasks = tuple(tasks)
  model = make_net(tasks, width_choices=choices)
  return ECMTMethod(tasks, model, tuple(task_weights) if task_weights else None,
                    width_choices=choices, axis_name=axis_name, **options)


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
    if data_lib.VALID_KEY in batch:  # padded evaluation batches: drop the padding
      images = images[np.asarray(batch[data_lib.VALID_KEY], bool)]
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
# Analytic cost table.


def model_signature(model: nn.Module, image_shape: Sequence[int],
                    choices: Sequence[float]) -> str:
  """A short hash of the network's definition, the image shape and the width choices."""
  text = f"{model!r}|{tuple(int(d) for d in image_shape)}|{tuple(choices)}"
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, eq=False)
class CostTable:
  """Per-example MACs of every encoder configuration and of every decoder width given it.

  Attributes:
    signature: `model_signature` of the network, image shape and choices it was built for.
    image_shape: (H, W, C).
    choices: the width choices, ascending.
    num_stages: encoder stages.
    task_names: the decoders, in order.
    encoder_configs: every encoder multiplier tuple (`widths.encoder_configs` order).
    encoder_macs: int64 (E,), MACs of the encoder (and anything outside the decoders).
    decoder_macs: int64 (E, T, C), MACs of decoder t at choice c given encoder e.
  """

  signature: str
  image_shape: tuple[int, ...]
  choices: tuple[float, ...]
  num_stages: int
  task_names: tuple[str, ...]
  encoder_configs: tuple[tuple[float, ...], ...]
  encoder_macs: np.ndarray
  decoder_macs: np.ndarray

  def __post_init__(self):
    index = {e: i for i, e in enumerate(self.encoder_configs)}
    object.__setattr__(self, "_index", index)

  def encoder_index(self, encoder: Sequence[float]) -> int:
    key = tuple(float(m) for m in encoder)
    if key not in self._index:
      raise ValueError(f"Encoder multipliers {key} are not a configuration of this cost table "
                       f"({self.num_stages} stages, choices {self.choices}).")
    return self._index[key]

  def macs(self, config: WidthConfig) -> int:
    """Per-example MACs of a full width configuration."""
    e = self.encoder_index(config.encoder)
    if len(config.decoders) != len(self.task_names):
      raise ValueError(f"WidthConfig has {len(config.decoders)} decoder multipliers but the "
                       f"cost table has {len(self.task_names)} tasks.")
    dec = [self.decoder_macs[e, t, self.choices.index(m)] for t, m in enumerate(config.decoders)]
    return int(self.encoder_macs[e] + sum(dec))

  @property
  def full_macs(self) -> int:
    return int(self.encoder_macs[-1] + self.decoder_macs[-1, :, -1].sum())

  @property
  def smallest_macs(self) -> int:
    return int(np.min(self.encoder_macs + self.decoder_macs[:, :, 0].sum(axis=1)))

  def to_json(self) -> dict:
    return {
        "signature": self.signature, "image_shape": list(self.image_shape),
        "choices": list(self.choices), "num_stages": self.num_stages,
        "task_names": list(self.task_names),
        "encoder_configs": [list(e) for e in self.encoder_configs],
        "encoder_macs": self.encoder_macs.tolist(), "decoder_macs": self.decoder_macs.tolist(),
    }

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> CostTable:
    return cls(
        signature=str(record["signature"]), image_shape=tuple(record["image_shape"]),
        choices=tuple(float(c) for c in record["choices"]),
        num_stages=int(record["num_stages"]), task_names=tuple(record["task_names"]),
        encoder_configs=tuple(tuple(float(m) for m in e) for e in record["encoder_configs"]),
        encoder_macs=np.asarray(record["encoder_macs"], np.int64),
        decoder_macs=np.asarray(record["decoder_macs"], np.int64))

  def save(self, path: str | os.PathLike) -> None:
    files_lib.write_json(path, self.to_json(), indent=None)

  @classmethod
  def load(cls, path: str | os.PathLike) -> CostTable:
    """The table saved in `path` (files_lib.DamagedFile when it does not parse)."""
    return cls.from_json(files_lib.read_json(path))


def _count(model, variables, image_shape, config) -> list[cost_lib.LayerCost]:
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return [r for r in cost_lib.count_layers(model, variables, images, widths=config, train=False)
          if r.macs]


class _UnsupportedModel(Exception):
  """The per-layer cost model does not describe this network (use direct counting)."""


def _layer_model(model, variables, image_shape, choices, num_stages, num_tasks):
  """Per layer: (part, taps, in (full, var), exponent of in, out (full, var)).

  Every layer's MACs are `taps * cin^alpha * cout` (alpha 0 for depthwise), and its channel
  counts are `channels(full, multiplier of one variable)` (an encoder stage or a decoder) or
  constant. Which variable governs each count is found by slimming one variable at a time.
  """
  num_vars = num_stages + num_tasks
  low = min(choices)

  def config_of(multipliers):
    return WidthConfig(tuple(multipliers[:num_stages]), tuple(multipliers[num_stages:]))

  full = _count(model, variables, image_shape, config_of([1.0] * num_vars))
  probes = []
  for v in range(num_vars):
    multipliers = [1.0] * num_vars
    multipliers[v] = low
    probe = _count(model, variables, image_shape, config_of(multipliers))
    if [r.path for r in probe] != [r.path for r in full]:
      raise _UnsupportedModel("layer sequence changes with the widths")
    probes.append(probe)
  described = []
  for i, layer in enumerate(full):
    cin_full, cout_full = layer.in_shape[-1], layer.out_shape[-1]
    in_var = [v for v in range(num_vars) if probes[v][i].in_shape[-1] != cin_full]
    out_var = [v for v in range(num_vars) if probes[v][i].out_shape[-1] != cout_full]
    if len(in_var) > 1 or len(out_var) > 1:
      raise _UnsupportedModel(f"{layer.path} depends on several widths")
    in_var = in_var[0] if in_var else None
    out_var = out_var[0] if out_var else None

    def predict(multipliers, alpha, taps, in_var=in_var, out_var=out_var, cin_full=cin_full,
                cout_full=cout_full):
      cin = cin_full if in_var is None else channels(cin_full, multipliers[in_var])
      cout = cout_full if out_var is None else channels(cout_full, multipliers[out_var])
      return taps * cin**alpha * cout

    chosen = None
    for alpha in (1, 0):
      taps, rest = divmod(layer.macs, cin_full**alpha * cout_full)
      if rest:
        continue
      ok = True
      for v in range(num_vars):
        multipliers = [1.0] * num_vars
        multipliers[v] = low
        if predict(multipliers, alpha, taps) != probes[v][i].macs:
          ok = False
          break
      if ok:
        chosen = (alpha, taps)
        break
    if chosen is None:
      raise _UnsupportedModel(f"{layer.path} MACs are not taps * cin * cout")
    described.append((layer.path, chosen, predict))
  return described


def _part_of(path: str, task_names: Sequence[str]) -> int:
  """-1 for the encoder (and anything outside a decoder), else the task index."""
  for t, name in enumerate(task_names):
    if path.startswith(f"head_{name}/") or path == f"head_{name}":
      return t
  return -1


def build_cost_table(model: MultiTaskNet, image_shape: Sequence[int],
                     choices: Sequence[float] | None = None, *, direct: bool = False
                     ) -> CostTable:
  """The `CostTable` of `model` on images of shape (H, W, C), analytic (`models.cost`).

  A few abstract traces (the full network, then one per stage and decoder slimmed alone) give a
  per-layer model of MACs as a function of the multipliers, from which every configuration is
  computed in numpy; it is checked against direct counts of three configurations. Networks it
  does not describe (or `direct=True`) are counted configuration by configuration (slow:
  encoder configurations x choices traces).
  """
  image_shape = tuple(int(d) for d in image_shape)
  choices = _sorted_choices(choices or model.width_choices or WIDTH_CHOICES)
  num_stages, task_names = model.num_stages, tuple(t.name for t in model.tasks)
  num_tasks = len(task_names)
  encoders = tuple(tuple(float(m) for m in e) for e in encoder_configs(num_stages, choices))
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  enc = np.zeros((len(encoders),), np.int64)
  dec = np.zeros((len(encoders), num_tasks, len(choices)), np.int64)
  described = None
  if not direct:
    try:
      described = _layer_model(model, variables, image_shape, choices, num_stages, num_tasks)
    except _UnsupportedModel:
      described = None
  if described is not None:
    parts = [_part_of(path, task_names) for path, _, _ in described]
    encoder_layers = [d for p, d in zip(parts, described) if p < 0]
    decoder_layers = [(p, d) for p, d in zip(parts, described) if p >= 0]
    for e, encoder in enumerate(encoders):
      multipliers = list(encoder) + [1.0] * num_tasks
      enc[e] = sum(predict(multipliers, alpha, taps)
                   for _, (alpha, taps), predict in encoder_layers)
      for c, m in enumerate(choices):
        multipliers = list(encoder) + [m] * num_tasks
        for part, (_, (alpha, taps), predict) in decoder_layers:
          dec[e, part, c] += predict(multipliers, alpha, taps)
  else:
    for e, encoder in enumerate(encoders):
      for c, m in enumerate(choices):
        for record in _count(model, variables, image_shape,
                             WidthConfig(encoder, (m,) * num_tasks)):
          part = _part_of(record.path, task_names)
          if part < 0:
            if c == 0:
              enc[e] += record.macs
          else:
            dec[e, part, c] += record.macs
  table = CostTable(model_signature(model, image_shape, choices), image_shape, choices,
                    num_stages, task_names, encoders, enc, dec)
  if described is not None:
    # Guard the per-layer model with direct counts of a few configurations.
    mixed = WidthConfig(tuple(choices[i % len(choices)] for i in range(num_stages)),
                        tuple(choices[(i + 1) % len(choices)] for i in range(num_tasks)))
    for config in (WidthConfig.full(num_stages, num_tasks),
                   WidthConfig.smallest(num_stages, num_tasks, choices), mixed):
      counted = sum(r.macs for r in _count(model, variables, image_shape, config))
      if counted != table.macs(config):
        return build_cost_table(model, image_shape, choices, direct=True)
  return table


_COST_TABLES: dict[str, CostTable] = {}


def cached_cost_table(model: MultiTaskNet, image_shape: Sequence[int],
                      choices: Sequence[float] | None = None,
                      path: str | os.PathLike | None = None) -> CostTable:
  """`build_cost_table`, computed once per model, image shape and choices.

  Kept in memory, and in the JSON file `path` when given (a file built for another network or
  image shape is rebuilt and overwritten).
  """
  choices = _sorted_choices(choices or model.width_choices or WIDTH_CHOICES)
  signature = model_signature(model, image_shape, choices)
  on_disk = None
  if path is not None and files_lib.exists(path):
    try:
      on_disk = CostTable.load(path)
    except (files_lib.DamagedFile, KeyError, TypeError, ValueError) as error:
      print(f"{error}; rebuilding the cost table.", flush=True)
  if on_disk is not None and on_disk.signature != signature:
    on_disk = None  # built for another network, image size or choice set
  table = _COST_TABLES.get(signature) or on_disk or build_cost_table(model, image_shape, choices)
  _COST_TABLES[signature] = table
  if path is not None and on_disk is None:
    table.save(path)
  return table


# ----------------------------------------------------------------------------------------------
# The search.


def budget_macs(budget, cost_table: CostTable) -> int:
  """A budget as MACs: an int is MACs, a float in (0, 1] a fraction of the SuperNet's MACs."""
  full = cost_table.full_macs
  if isinstance(budget, (bool, np.bool_)):
    raise ValueError(f"The budget must be MACs (an int) or a fraction of the SuperNet's MACs "
                     f"(a float in (0, 1]), got {budget!r}.")
  if isinstance(budget, (int, np.integer)):
    if budget <= 0:
      raise ValueError(f"A budget in MACs must be positive, got {budget}.")
    return int(budget)
  if isinstance(budget, (float, np.floating)):
    if not 0.0 < budget <= 1.0:
      raise ValueError(f"A fractional budget must lie in (0, 1] (give MACs as an int), got "
                       f"{budget}.")
    # The relative slack absorbs float error (a fraction computed as macs / full), < 1 MAC.
    return int(math.floor(float(budget) * full * (1.0 + 1e-12)))
  raise ValueError(f"The budget must be MACs (an int) or a fraction of the SuperNet's MACs "
                   f"(a float in (0, 1]), got {budget!r}.")


def _widest(extra_row: np.ndarray, allowance: float) -> int:
  """Index of the widest choice whose extra MACs fit `allowance` (ties: the wider)."""
  fits = np.nonzero(extra_row <= allowance * (1 + 1e-12) + 1e-9)[0]
  return int(fits[-1])


def _allocate(r: np.ndarray, remaining: int, decoder_macs: np.ndarray,
              preference_cap: bool = True) -> list[int]:
  """Choice index per decoder within `remaining` MACs (>= every decoder at its minimum).

  Shares in proportion to r: each decoder's extra MACs over its minimum is at most
  `r_t * lam`, with lam the largest value whose allocation fits (water-filling; lam >= the
  budget left after the minimums, so every decoder gets at least its proportional share).
  What is left then goes to the most preferred tasks first, each taking the widest choice it
  can afford. With `preference_cap` [ours], decoder t's extra MACs are also capped at
  `r_t / max(r)` of its full extra, so the preference shapes the decoders even when the budget
  would let every one be at full width (the most preferred task's cap is its full width; a
  uniform preference caps nothing). Raising r_t (the others scaled down) never narrows
  decoder t.
  """
  base = decoder_macs[:, 0]
  extra = decoder_macs - base[:, None]
  budget = int(remaining - base.sum())
  num_tasks = len(r)
  if preference_cap:
    cap = r / r.max() * extra[:, -1]
  else:
    cap = np.full(num_tasks, np.inf)

  def allocation(lam):
    return [_widest(extra[t], min(r[t] * lam, cap[t])) for t in range(num_tasks)]

  def used(idx):
    return int(sum(extra[t, i] for t, i in enumerate(idx)))

  best = allocation(0.0)
  breakpoints = sorted({float(extra[t, c]) / r[t] for t in range(num_tasks) if r[t] > 0
                        for c in range(extra.shape[1])})
  for lam in breakpoints:
    idx = allocation(lam)
    if used(idx) > budget:
      break
    best = idx
  left = budget - used(best)
  for t in sorted(range(num_tasks), key=lambda t: (-r[t], t)):
    best[t] = _widest(extra[t], min(extra[t, best[t]] + left, cap[t]))
    left = budget - used(best)
  return best


def _too_small(budget, macs: int, smallest: int, full: int, what: str) -> ValueError:
  given = (f"{budget} of the SuperNet's {full:,} MACs ({macs:,} MACs)"
           if isinstance(budget, (float, np.floating)) else f"{macs:,} MACs")
  return ValueError(f"The budget of {given} is below the {smallest:,} MACs (a fraction "
                    f"{smallest / full:.4g} of the SuperNet) of {what}.")


def allocate_decoders(preference, budget, encoder: Sequence[float], *,
                      cost_table: CostTable, preference_cap: bool = True) -> tuple[float, ...]:
  """Decoder multipliers for a fixed encoder configuration (the inner step of `search`)."""
  r = controls_lib.check_preference(preference, cost_table.task_names)
  macs = budget_macs(budget, cost_table)
  e = cost_table.encoder_index(encoder)
  smallest = int(cost_table.encoder_macs[e] + cost_table.decoder_macs[e, :, 0].sum())
  if macs < smallest:
    raise _too_small(budget, macs, smallest, cost_table.full_macs,
                     f"encoder {tuple(encoder)} with the smallest decoders")
  idx = _allocate(r, macs - int(cost_table.encoder_macs[e]), cost_table.decoder_macs[e],
                  preference_cap)
  return tuple(cost_table.choices[i] for i in idx)


def search(preference, budget, *, cost_table: CostTable,
           scores: Mapping[Sequence[float], float] | None = None,
           decoder_reserve: float = DECODER_RESERVE,
           preference_cap: bool = True) -> WidthConfig:
  """The width configuration for a task preference and a compute budget.

  Candidates are the encoder configurations that leave the decoders room to follow the
  preference: the smallest decoders plus `decoder_reserve` of the span between the smallest
  and the widest decoders must fit after the encoder [ours; without a reserve, the
  best-scoring encoder is usually the one that eats the whole budget and every decoder is left
  at its minimum whatever the preference]. When no encoder leaves that room (budgets near the
  smallest configuration), every encoder that fits with the smallest decoders is a candidate.
  For each candidate, the decoders get the budget left after the encoder, in proportion to the
  preference (`allocate_decoders`). Among the candidates the one with the best
  `scores[encoder]` wins (a preference-independent validation score, higher is better, see
  `score_encoders`; encoders without a score rank below every scored one); ties, and the case
  `scores=None`, go to the most expensive candidate (then the larger encoder). The encoder
  therefore depends on the budget only, never on the preference.

  Args:
    preference: T numbers on the simplex, in task order.
    budget: MACs per example (int) or a fraction of the SuperNet's MACs (float in (0, 1]).
    cost_table: from `build_cost_table` / `cached_cost_table` for the network and image size.
    scores: optional {encoder multipliers: score}.
    decoder_reserve: fraction in [0, 1] of the decoders' span an encoder must leave free.
    preference_cap: cap each decoder at r_t / max(r) of its full extra MACs (see
      `_allocate`), so that the preference matters when the budget does not bind.

  Returns:
    A `WidthConfig` whose MACs (`cost_table.macs`) are within the budget.

  Raises:
    ValueError: a preference of the wrong length or off the simplex, a malformed budget, or a
      budget below the smallest configuration's MACs (one sentence each).
  """
  r = controls_lib.check_preference(preference, cost_table.task_names)
  macs = budget_macs(budget, cost_table)
  smallest = cost_table.smallest_macs
  if macs < smallest:
    raise _too_small(budget, macs, smallest, cost_table.full_macs, "the smallest configuration")
  if not 0.0 <= decoder_reserve <= 1.0:
    raise ValueError(f"decoder_reserve must lie in [0, 1], got {decoder_reserve}.")
  minimum = cost_table.encoder_macs + cost_table.decoder_macs[:, :, 0].sum(axis=1)
  span = cost_table.decoder_macs[:, :, -1].sum(axis=1) - cost_table.decoder_macs[:, :, 0].sum(
      axis=1)
  fitting = np.nonzero(minimum + decoder_reserve * span <= macs * (1 + 1e-12))[0]
  if not len(fitting):
    fitting = np.nonzero(minimum <= macs)[0]
  score_of = {}
  if scores:
    score_of = {tuple(float(m) for m in k): float(v) for k, v in scores.items()}
  best_key, best = None, None
  for e in fitting:
    encoder = cost_table.encoder_configs[e]
    idx = _allocate(r, macs - int(cost_table.encoder_macs[e]), cost_table.decoder_macs[e],
                    preference_cap)
    total = int(cost_table.encoder_macs[e]) + int(
        sum(cost_table.decoder_macs[e, t, i] for t, i in enumerate(idx)))
    score = score_of.get(encoder)
    key = (score is not None, score if score is not None else 0.0, total,
           int(cost_table.encoder_macs[e]), int(e))
    if best_key is None or key > best_key:
      best_key, best = key, WidthConfig(encoder, tuple(cost_table.choices[i] for i in idx))
  return best


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
