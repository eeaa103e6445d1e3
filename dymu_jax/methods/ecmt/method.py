"""The ECMT method: the SuperNet's training loss (sandwich rule, CI-KD) and its deployment
(prepare, search, deploy). See the package docstring."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, ClassVar, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import controls as controls_lib
from dymu_jax import execution
from dymu_jax import files as files_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import base
from dymu_jax.methods import options as options_lib
from dymu_jax.models import cost as cost_lib
from dymu_jax.models.multitask import MultiTaskNet
from dymu_jax.models.widths import WIDTH_CHOICES, DynamicWidths, WidthConfig
from dymu_jax.methods.ecmt.budget_search import DECODER_RESERVE, search
from dymu_jax.methods.ecmt.cost_table import (CostTable, _sorted_choices, cached_cost_table,
                                              model_signature)
from dymu_jax.methods.ecmt.distill import KD_MODES, ci_kd_loss, mutual_loss
from dymu_jax.methods.ecmt.subnets import (MaskedSuperNet, cached_encoder_scores,
                                           masked_variables, recalibrate_bn, slice_subnet)

PyTree = Any


# ----------------------------------------------------------------------------------------------
# The method.


@dataclasses.dataclass(frozen=True)
class DeployConfig(options_lib.DeployOptions):
  """ECMT's deployment options: how `search` maps (preference, budget) to widths."""

  TITLE: ClassVar[str] = "ECMT search"

  decoder_reserve: float = options_lib.option(
      DECODER_RESERVE, "Fraction of the decoders' MACs span an encoder must leave free for the "
      "preference.", low=0, high=1)
  preference_cap: bool = options_lib.option(
      True, "Cap each decoder's extra MACs at r_t / max(r) (`ecmt.search(preference_cap=...)`); "
      "--nopreference_cap measures rank controllability without it.",
      former=("ecmt_preference_cap",))


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

  # Fields a user may set when deploying a trained run.
  DEPLOY_OPTIONS = tuple(f.name for f in DeployConfig.fields())
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
            _config_cost(self.model, config, prepared, image_shape))

  def cost_range(self, variables, prepared: Prepared | None = None, *,
                 image_shape: Sequence[int]):
    """The smallest SubNet's and the SuperNet's cost."""
    del variables
    return (_config_cost(self.model, self.smallest_widths(), prepared, image_shape),
            _config_cost(self.model, self.full_widths(), prepared, image_shape))

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
      cost = _config_cost(self.model, config, prepared, image_shape)
      return base.Deployed(MaskedSuperNet(self.model), masked, image_shape, controls,
                           key=config, info=info, known_cost=cost, structure=structure)
    recalibrated = self.recalibrate(variables, config, prepared)
    sub, sub_variables = slice_subnet(self.model, recalibrated, config, image_shape)
    return base.Deployed(sub, sub_variables, image_shape, controls, key=config, info=info,
                         structure=structure)


def _config_cost(model: MultiTaskNet, config: WidthConfig, prepared: Prepared | None,
                 image_shape: Sequence[int]) -> cost_lib.Cost:
  """A SubNet's MACs and parameters: from the prepared cost table (nothing traced), else
  counted (`_subnet_cost`)."""
  image_shape = tuple(int(d) for d in image_shape)
  if prepared is not None and tuple(prepared.cost_table.image_shape) == image_shape:
    return prepared.cost_table.cost(config)
  return _subnet_cost(model, config, image_shape)


@functools.lru_cache(maxsize=256)
def _subnet_cost(model: MultiTaskNet, config: WidthConfig,
                 image_shape: tuple[int, ...]) -> cost_lib.Cost:
  """The sliced SubNet's MACs and parameters (`models.cost.count`; traced, not run)."""
  sample = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return cost_lib.count(model.sliced(config), None, sample, train=False)


@dataclasses.dataclass(frozen=True)
class Config(options_lib.MethodConfig):
  """ECMT's training options (METHODS.md section 2); flags `--ecmt_<field>`."""

  PREFIX: ClassVar[str] = "ecmt"
  TITLE: ClassVar[str] = "ECMT"
  DEPLOY: ClassVar[type] = DeployConfig

  num_subnets: int = options_lib.option(
      4, "Configurations per step by the sandwich rule (max, min and num_subnets-2 random).",
      low=2, former=("num_subnets",), meaning="the largest and smallest SubNets plus random ones")
  lambda_kd: float = options_lib.option(1.0, "Weight of the CI-KD loss; 0 turns it off.", low=0,
                                        former=("lambda_kd",))
  kd: str = options_lib.option(
      "ci_kd", "Distillation: ci_kd (SuperNet features -> SubNets), mutual (CI-KD plus two-way "
      "prediction matching) or none.", choices=KD_MODES, former=("kd",))
  lambda_mutual: float = options_lib.option(1.0, "Weight of the mutual-learning loss.", low=0,
                                            former=("lambda_mutual",))
  mutual_temperature: float = options_lib.option(
      2.0, "Softening temperature of mutual learning.", low=0, open_low=True,
      former=("mutual_temperature",))
  width_choices: tuple[float, ...] = options_lib.option(
      (), "Width multipliers in (0, 1]; empty = 0.25,0.5,0.75,1.0.", low=0, high=1,
      open_low=True, former=("width_choices",))


OPTIONS = tuple(f.name for f in Config.fields())


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
  options = Config.from_options(options).options()
  choices = _sorted_choices(options.pop("width_choices", None) or WIDTH_CHOICES)
  tasks = tuple(tasks)
  model = make_net(tasks, width_choices=choices)
  return ECMTMethod(tasks, model, tuple(task_weights) if task_weights else None,
                    width_choices=choices, axis_name=axis_name, **options)
