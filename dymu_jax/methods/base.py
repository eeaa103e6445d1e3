"""The interface between a method and the training engine, the evaluator and the exporter.

A method owns its model(s), its training loss, its sampling of controls and the controls a user
may set after training. The protocol has two halves:

* training (`init`, `loss`, `predict`, `eval_controls`): the engine (`dymu_jax.train`) speaks
  only these, so a new method is one new module under `dymu_jax.methods`;
* deployment (`control_space`, `prepare`, `deploy`): steer a trained model with the controls a
  user sets after training and get a `Deployed` network, with its cost, that runs on its own and
  exports to a folder `models.serialize.load_network` reads without the method.
  `MethodBase` gives the defaults of a method with one fixed network (no controls, nothing to
  prepare, `deploy` returns `model` with the trained variables), so simple methods add nothing.

Optional members besides: `loss_and_grad` (a method's own gradient), `load_pretrained` (a fresh
run's backbone from a torchvision checkpoint; `MethodBase` handles a `MultiTaskNet` or
`SingleTaskNets` in `self.model`) and `required_variables` (collections an earlier stage gives).

Variables follow Flax: `{"params": ..., <other collections, e.g. "batch_stats">: ...}`. The
engine differentiates with respect to `params` only; every other collection is the "model
state" that the loss returns updated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Hashable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp

from dymu_jax import tasks as tasks_lib
from dymu_jax.models import branched
from dymu_jax.models import cost as cost_lib
from dymu_jax.models import pretrained
from dymu_jax.models import serialize
from dymu_jax.models.multitask import MultiTaskNet, SingleTaskNets

PyTree = Any
Controls = Mapping[str, Any] | None  # e.g. {"preference": (0.7, 0.3), "budget": 0.5}

# The controls a user may set after training, in the order a control space lists them.
CONTROL_NAMES = ("preference", "budget", "resource")

# How `MethodBase.training_cost` counts a training step.
TRAINING_MACS_CONVENTION = (
    "training MACs per example = forward MACs x (1 + 2 x backward passes per step) + gradient "
    "arithmetic per step / batch size; a backward pass costs two forward passes (input and "
    "weight gradients); gradsplit and pcgrad make one backward pass per task (T), the other "
    "methods one; the gradient arithmetic is pcgrad's projections and gradsplit's weighted sum "
    "and cosine statistics; batch norm, activations and the optimizer update are not counted")


class Method(Protocol):
  """What every method module provides (see `static.StaticMethod` for the simplest one)."""

  name: str
  tasks: tuple[tasks_lib.Task, ...]
  # The pmap axis over which batch statistics are pooled: `train.method_axis_name(mode)`,
  # "batch" under --parallel=pmap and None under the default mesh mode (where jit sees the
  # global batch). `train.train` rejects a method built for the other mode.
  axis_name: str | None

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    """Initial variables `{"params": ..., ...}` for a sample batch (shapes only matter)."""

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
    """(scalar training loss, (aux scalars, updated model_state)), traced inside jit.

    Aux scalars use the keys "loss/<task name>" for each task's loss; methods may add more.
    """

  def predict(self, variables: PyTree, images: jax.Array, controls: Controls = None
              ) -> dict[str, jax.Array]:
    """Evaluation-mode predictions, one array per task name, for the given controls."""

  # Optional: `loss_and_grad(params, model_state, batch, rng, step)` returning what
  # `jax.value_and_grad(loss, has_aux=True)` would; the train step then applies this gradient
  # (for methods that route or project per-task gradients: GradSplit, PCGrad).

  def eval_controls(self) -> Sequence[Controls]:
    """The controls the training loop evaluates at each evaluation (default: `[None]`)."""

  def required_variables(self) -> tuple[str, ...]:
    """Variable collections `init` only stands in for (right shapes, no trained values): a
    stage of a multi-stage method starts from an earlier stage's variables, restored from its
    checkpoint and given to `train.train(..., initial_variables=...)`, which refuses to start
    without them (DYMU's edge stage: ("anchor",)). Default ()."""

  def load_pretrained(self, variables: PyTree, path: str) -> PyTree:
    """Optional: the variables with the backbone's weights from a torchvision checkpoint
    (`models.pretrained.load_pretrained`: a .safetensors, .npz or .pth/.pt state dict), other
    variables unchanged; `train.train(..., pretrained=path)` passes a fresh run's initial
    variables (host numpy) through it. `MethodBase` loads the encoder of a `MultiTaskNet` or
    of each `SingleTaskNets` network in `self.model`; a method that cannot start from one
    (PHN generates its weights) raises a one-sentence ValueError."""

  # Deployment half (defaults for a fixed network in `MethodBase`).

  def control_space(self) -> ControlSpace:
    """The controls a user may set after training."""

  def prepare(self, variables: PyTree, held_out: HeldOut | None = None,
              cache_dir: str | os.PathLike | None = None) -> Any:
    """One-off work on held-out training images that `deploy` needs (ECMT: its cost table and
    encoder scores), cached in `cache_dir` when given; None when there is nothing to do."""

  def deploy(self, variables: PyTree, controls: Controls = None, prepared: Any = None, *,
             image_shape: Sequence[int], standalone: bool = True) -> Deployed:
    """The network steered by `controls` (missing ones take the method's defaults), with
    its variables and cost; `Deployed.export` writes it as a standalone network.

    `standalone=False` lets a method return an equivalent network that many deployments share
    one compiled program for (ECMT: its SubNets on the SuperNet's masked path), which a sweep
    evaluates; it need not export. Methods with one form ignore it."""

  def evaluation_variants(self, variables: PyTree) -> dict[str, PyTree]:
    """{label: variables} of the variants a sweep evaluates (default: the run itself)."""

  def full_network(self, variables: PyTree, prepared: Any = None, *,
                   image_shape: Sequence[int], standalone: bool = True) -> Deployed | None:
    """The largest network the controls steer within (ECMT's SuperNet, DYMU's anchor), or
    None; a sweep sets its points' metrics and costs against it."""

  def describe(self, variables: PyTree, controls: Controls = None, prepared: Any = None, *,
               image_shape: Sequence[int]) -> tuple[dict[str, Any], cost_lib.Cost]:
    """(structure, cost) of `deploy(variables, controls, prepared)`'s network, cheaply."""

  def cost_range(self, variables: PyTree, prepared: Any = None, *,
                 image_shape: Sequence[int]) -> tuple[cost_lib.Cost, cost_lib.Cost]:
    """(the cheapest, the most expensive) network the controls can deploy."""

  def training_cost(self, variables: PyTree, image_shape: Sequence[int],
                    batch_size: int) -> dict[str, Any]:
    """Per-example inference and training MACs and parameters (`TRAINING_MACS_CONVENTION`)."""

  def artefacts(self, variables: PyTree, directory: str, *, step: int | None = None,
                plot: bool = True) -> dict[str, dict]:
    """Writes the learned structure a trained run leaves (GradSplit: its routing matrices and
    heat map; DYMU's edge and weight stages: the task affinity and weights they trained with,
    kept as the stage wrote them where `directory` holds that record) to `directory`; returns
    {name: JSON-able record with its "file" and "heatmap" (its plot's file name in
    `directory`, None without `plot`)} ({}: none)."""


# ----------------------------------------------------------------------------------------------
# The deployment half.


@dataclasses.dataclass(frozen=True)
class ControlSpace:
  """The controls a method accepts after training.

  Attributes:
    names: a subset of `CONTROL_NAMES`, in that order: () for a fixed network; ("preference",)
      for PHN; ("preference", "budget") for ECMT (budget: a fraction of the full network's MACs
      in (0, 1], or MACs per example above 1); ("preference", "resource") for DYMU (resource c
      in [0, 1], larger is more frugal).
  """

  names: tuple[str, ...] = ()

  def __post_init__(self):
    names = tuple(self.names)
    unknown = [n for n in names if n not in CONTROL_NAMES]
    if unknown or list(names) != [n for n in CONTROL_NAMES if n in names]:
      raise ValueError(f"A control space lists controls among {', '.join(CONTROL_NAMES)} in "
                       f"that order, got {', '.join(names) or 'none'}.")
    object.__setattr__(self, "names", names)

  def check(self, controls: Controls) -> dict[str, Any]:
    """`controls` as a dict, refusing a control the method does not take (None: {})."""
    controls = dict(controls or {})
    extra = sorted(set(controls) - set(self.names))
    if extra:
      allowed = ", ".join(self.names) if self.names else "none (its network is fixed)"
      raise ValueError(f"This method takes the controls {allowed}; {', '.join(extra)} "
                       f"cannot be set.")
    return controls


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out training images a method's `prepare` may use (never test images).

  Attributes:
    calibration: image batches (arrays (B, H, W, C) or (B, D)) of equal size, e.g. for batch-norm
      recalibration.
    validation: labelled batches (dicts with "image", the task labels and `data.VALID_KEY`),
      e.g. for scoring configurations.
    signature: a string that identifies these images (sizes, seed, batch size), part of any
      cache key built on them.
  """

  calibration: tuple[Any, ...]
  validation: tuple[Mapping[str, Any], ...]
  signature: str


@dataclasses.dataclass(frozen=True, eq=False)
class Deployed:
  """One steered network: runs on its own, knows its cost, exports to a folder.

  Attributes:
    network: `network.apply(variables, images, train=False) -> {task: output}`: a Linen module
      (a `MultiTaskNet` exports) or another network with that `apply` (DYMU's tree).
    variables: its variables.
    image_shape: (H, W, C) of its input images, or (D,) for feature vectors.
    controls: the controls it was deployed for ({} for a fixed network).
    key: a hashable value that identifies the deployed structure (widths, tree, preference),
      equal for two deployments that compute the same function.
    info: JSON-able facts of the deployment (widths, tree, MACs of the full network...), kept in
      the export's `extra`.
    known_cost: the network's cost when the method counts it itself (DYMU's tree cost), else
      None (counted by `models.cost.count`).
    structure: the JSON-able structure a sweep records for each point (DYMU: {"tree"}; ECMT:
      {"encoder", "decoders"}; {} for a network whose structure the controls do not change).
  """

  network: Any
  variables: PyTree
  image_shape: tuple[int, ...]
  controls: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  key: Hashable = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  known_cost: cost_lib.Cost | None = None
  structure: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def apply(self, images: jax.Array) -> dict[str, jax.Array]:
    """Evaluation-mode predictions of the deployed network."""
    return self.network.apply(self.variables, images, train=False)

  def cost(self) -> cost_lib.Cost:
    """Per-example MACs and used parameters (`models.cost.count`, nothing computed)."""
    if self.known_cost is not None:
      return self.known_cost
    sample = jnp.zeros((1, *self.image_shape), jnp.float32)
    return cost_lib.count(self.network, self.variables, sample, train=False)

  @property
  def exportable(self) -> bool:
    """Whether `export` can write the network: a `MultiTaskNet`, the single-task baselines'
    `SingleTaskNets`, or a DYMU tree whose `BranchedNet` came from `branched.build_branched`."""
    if isinstance(self.network, branched.TreeNetwork):
      return bool(self.network.net.build_options)
    return isinstance(self.network, (MultiTaskNet, SingleTaskNets))

  def with_input_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> Deployed:
    """The same deployment whose network standardises its inputs itself with (mean, std) per
    channel or feature (a tabular run's training statistics), so that it takes raw rows."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    network = self.network
    if isinstance(network, branched.TreeNetwork):
      net = dataclasses.replace(network.net, pixel_mean=mean, pixel_std=std)
      network = branched.TreeNetwork(net, network.tree)
    elif isinstance(network, MultiTaskNet):
      network = dataclasses.replace(network, pixel_mean=mean, pixel_std=std)
    elif isinstance(network, SingleTaskNets):
      network = SingleTaskNets(tuple(dataclasses.replace(net, pixel_mean=mean, pixel_std=std)
                                     for net in network.networks))
    else:
      raise ValueError(f"A {type(network).__name__} has no input normalisation to set.")
    return dataclasses.replace(self, network=network)

  def export(self, directory: str | os.PathLike, extra: Mapping[str, Any] | None = None
             ) -> str:
    """Writes the network to `directory` (`models.serialize`); returns the folder.

    `extra` joins `info`, the controls and the cost in the folder's metadata.
    """
    if not self.exportable:
      raise ValueError(f"A deployed {type(self.network).__name__} cannot be exported yet: the "
                       f"saved-network format holds one multi-task network (a MultiTaskNet, "
                       f"or a DYMU tree of a BranchedNet made by build_branched).")
    cost = self.cost()
    record = {**dict(self.info), "controls": _jsonable_controls(self.controls),
              "macs": int(cost.macs), "params": int(cost.params), **dict(extra or {})}
    serialize.save_network(directory, self.network, self.variables, extra=record,
                           image_shape=self.image_shape)
    return os.fspath(directory)


def _jsonable_controls(controls: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for name, value in controls.items():
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
      out[name] = [float(v) for v in list(getattr(value, "tolist", lambda: value)())]
    else:
      out[name] = float(value)
  return out


class MethodBase:
  """Defaults of the protocol's optional members for a method with one fixed network in
  `self.model`: the deployment half, the training cost and the (empty) artefacts.

  A method overrides what differs: `control_space` (the controls it takes), `prepare` (one-off
  work on held-out images, e.g. ECMT's cost table and encoder scores), `deploy`,
  `backward_passes` / `gradient_macs_per_step` (per-task gradient methods) and `artefacts`
  (GradSplit's routing, DYMU's task affinity). DYMU, whose network is a `BranchedNet`
  (`self.net`), overrides `deploy`; it has no `training_cost` yet (its evaluation reports
  inference cost per tree).
  `DEPLOY_OPTIONS` names the method's fields a user may change when deploying a trained run
  (e.g. ECMT's search options), declared with their help and range by its config's
  `MethodConfig.DEPLOY` (evaluate and export take them as flags of the same names).
  """

  DEPLOY_OPTIONS = ()
  # Whether `prepare` reads held-out training images (ECMT); callers load them only then.
  PREPARE_USES_HELD_OUT = False

  def replace_options(self, **options):
    """The method with deployment options (`DEPLOY_OPTIONS`) changed; others are refused."""
    unknown = sorted(set(options) - set(self.DEPLOY_OPTIONS))
    if unknown:
      allowed = ", ".join(self.DEPLOY_OPTIONS) or "none"
      raise ValueError(f"{', '.join(unknown)} cannot be set when deploying {self.name}; its "
                       f"deployment options are {allowed}.")
    return dataclasses.replace(self, **options) if options else self

  def required_variables(self) -> tuple[str, ...]:
    """No earlier stage: `init` makes every variable."""
    return ()

  def load_pretrained(self, variables: PyTree, path: str) -> PyTree:
    """`variables` whose backbone starts from the torchvision checkpoint `path`: the encoder of
    the `MultiTaskNet` in `self.model` (under "encoder"), or each single-task network's encoder
    of `SingleTaskNets` (under "net_<task>/encoder"); decoders and other collections unchanged.
    Names, shapes and the backbone are checked by `pretrained.load_pretrained` (one sentence)."""
    model = getattr(self, "model", None)
    if isinstance(model, MultiTaskNet):
      places = [(model.backbone, ("encoder",))]
    elif isinstance(model, SingleTaskNets):
      places = [(net.backbone, (f"net_{net.tasks[0].name}", "encoder"))
                for net in model.networks]
    else:
      raise ValueError(f"The {self.name} method has no MultiTaskNet encoder to load "
                       f"pretrained weights into; it starts from random initialisation only.")
    for backbone, prefix in places:
      variables = pretrained.load_pretrained(backbone, variables, path, prefix=prefix)
    return variables

  def control_space(self) -> ControlSpace:
    """No controls: the trained network is the deployed one."""
    return ControlSpace()

  def prepare(self, variables: PyTree, held_out: HeldOut | None = None,
              cache_dir: str | os.PathLike | None = None) -> Any:
    """One-off work `deploy` needs (None: nothing). `cache_dir` may keep it between calls."""
    del variables, held_out, cache_dir
    return None

  # -- training cost and artefacts ------------------------------------------------------------

  @property
  def backward_passes(self) -> int:
    """Backward passes per training step (one; per-task gradient methods: one per task)."""
    return 1

  def gradient_macs_per_step(self, params: PyTree) -> int:
    """Gradient arithmetic per step besides the backward passes (none by default)."""
    del params
    return 0

  def training_cost(self, variables: PyTree, image_shape: Sequence[int],
                    batch_size: int) -> dict[str, Any]:
    """Inference MACs of `self.model` at full width (`models.cost.count`), its parameters, and
    training MACs per example by `TRAINING_MACS_CONVENTION`."""
    images = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in image_shape)), jnp.float32)
    forward = int(cost_lib.count(self.model, None, images, train=False).macs)
    params = variables["params"]
    passes = int(self.backward_passes)
    gradient_macs = int(self.gradient_macs_per_step(params))
    return {"inference_macs": forward, "params": cost_lib.num_params(params),
            "backward_passes": passes, "gradient_macs_per_step": gradient_macs,
            "batch_size": int(batch_size),
            "training_macs_per_example": int(round(forward * (1 + 2 * passes)
                                                   + gradient_macs / batch_size)),
            "convention": TRAINING_MACS_CONVENTION}

  def artefacts(self, variables: PyTree, directory: str, *, step: int | None = None,
                plot: bool = True) -> dict[str, dict]:
    """No learned structure besides the weights."""
    del variables, directory, step, plot
    return {}

  # -- deployment ------------------------------------------------------------------------------

  def deployed_variables(self, variables: PyTree) -> PyTree:
    """The variables the deployed network runs with (default: all of them)."""
    return variables

  def evaluation_variants(self, variables: PyTree) -> dict[str, PyTree]:
    """The variants of a trained run a sweep evaluates, {label: variables}: the run itself
    under the method's name (DYMU's weight stage adds "edge": its trees without the weight
    hypernetwork's batch-norm shifts)."""
    return {self.name: variables}

  def describe(self, variables: PyTree, controls: Controls = None, prepared: Any = None, *,
               image_shape: Sequence[int]) -> tuple[dict[str, Any], cost_lib.Cost]:
    """(`Deployed.structure`, cost) of the network `deploy` would return, without building
    what only running it needs (ECMT: no recalibration; DYMU: no batch-norm shifts), so that
    a cost sweep over many controls stays cheap. Default: `deploy(...)`'s."""
    deployed = self.deploy(variables, controls, prepared, image_shape=image_shape,
                           standalone=False)
    return dict(deployed.structure), deployed.cost()

  def cost_range(self, variables: PyTree, prepared: Any = None, *,
                 image_shape: Sequence[int]) -> tuple[cost_lib.Cost, cost_lib.Cost]:
    """(the cheapest, the most expensive) network the controls can deploy (ECMT: its smallest
    SubNet and its SuperNet; DYMU: one shared trunk and the separate streams); a fixed
    network's cost twice by default. A budget check sweeps budgets between the two."""
    _, cost = self.describe(variables, None, prepared, image_shape=image_shape)
    return cost, cost

  def full_network(self, variables: PyTree, prepared: Any = None, *,
                   image_shape: Sequence[int], standalone: bool = True) -> Deployed | None:
    """The largest network the controls steer within, whose metrics a sweep's points are set
    against (ECMT: its SuperNet; DYMU: its anchor's separate streams), with `info["name"]`
    naming it; None where no such network exists (PHN: one network, its weights generated)."""
    del variables, prepared, image_shape, standalone
    return None

  def deploy(self, variables: PyTree, controls: Controls = None, prepared: Any = None, *,
             image_shape: Sequence[int], standalone: bool = True) -> Deployed:
    """The trained network itself (a fixed network takes no controls)."""
    del prepared, standalone  # one form: the trained network exports as it is
    controls = self.control_space().check(controls)
    return Deployed(self.model, self.deployed_variables(variables),
                    tuple(int(d) for d in image_shape), controls, key=self.name)
