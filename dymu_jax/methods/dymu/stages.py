"""DYMU's stages for the stage runner (`dymu_jax.train.stages`): what each starts from, what it
leaves next to its checkpoints, and the checks of a finished one.

* anchor (from a trunk): its streams are copies of the finished pretrain stage's trunk
  (`streams_from_trunk`);
* edge: the frozen anchor, with the task affinity A (RSA on the anchor) and the task weights
  w = 1 / the anchor's losses, computed once and written next to the stage (`AFFINITY_FILE`,
  heat map `AFFINITY_PLOT`); a finished or resumed edge stage must keep them;
* weight: the frozen anchor and edge hypernetwork of the finished edge stage, with A and w
  copied from its folder;
* after the anchor stage, the anchor report (`ANCHOR_REPORT`, `ANCHOR_REPORT_MD`): how far the
  streams drifted apart per block, and what the cheapest moves away from the separate tree cost
  in quality, on held-out examples (can sharing work on this anchor?).

`Config.plan` (config.py) attaches these hooks to the stages it plans.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dymu_jax import files as files_lib
from dymu_jax.data import base as data_base
from dymu_jax.methods import affinity as affinity_lib
from dymu_jax.methods.dymu.anchor import (anchor_task_losses, probe_trees, stream_divergence,
                                          streams_from_trunk, task_weights_from_losses)
from dymu_jax.metrics import tasks as metrics_lib
from dymu_jax.train import stages as stages_lib

AFFINITY_FILE = affinity_lib.RECORD_FILE
AFFINITY_PLOT = affinity_lib.RECORD_PLOT
read_affinity = affinity_lib.read_record
ANCHOR_REPORT = "anchor_report.json"
ANCHOR_REPORT_MD = "anchor_report.md"


# ----------------------------------------------------------------------------------------------
# The task affinity and task weights of the edge and weight stages.


def record_options(record: Mapping[str, Any]) -> dict:
  """The method options of an affinity record: A, and w where it has them (a record written
  by `DymuMethod.artefacts` for a method without task weights has none)."""
  options = {"affinity": record["affinity"]}
  if record.get("task_weights") is not None:
    options["task_weights"] = tuple(record["task_weights"])
  return options


def restored_options(folder: str, num_tasks: int) -> dict:
  """The options an edge or weight stage in `folder` was built with besides its config: A and w
  of its affinity record (the identity affinity where it has none)."""
  record = read_affinity(folder)
  if record is None:
    return {"affinity": np.eye(num_tasks).tolist()}
  return record_options(record)


def affinity_signature(config, seed: int, anchor_dir: str, anchor_step: int) -> dict:
  """What the edge stage's affinity record depends on: the anchor and the affinity options."""
  return {"anchor_dir": anchor_dir, "anchor_step": anchor_step,
          "num_images": int(config.affinity_images),
          "normalisation": config.affinity_normalisation,
          "task_weight_examples": int(config.task_weight_examples),
          "task_weights": config.task_weights,
          "task_weight_normalise": bool(config.task_weight_normalise),
          "validation_examples": int(config.validation_examples),
          "seed": int(seed)}


def check_affinity(folder: str, signature: Mapping[str, Any]) -> None:
  """One sentence when the edge stage in `folder` was trained with another affinity."""
  record = read_affinity(folder) or {}
  saved = record.get("signature") or {}
  if saved == dict(signature):
    return
  changes = ", ".join(f"{k} {saved.get(k)!r} then and {v!r} now"
                      for k, v in signature.items() if saved.get(k) != v)
  raise ValueError(f"The edge stage in {folder} was trained with another task affinity "
                   f"({changes}); resume with the same anchor and affinity flags, or use a "
                   f"new workdir.")


def _training_subset(source, count: int, seed: int) -> dict:
  order = np.random.default_rng(seed).permutation(len(source))
  return source.get(np.sort(order[:count]))


def affinity_record(context: stages_lib.StageContext) -> dict:
  """A and w for the edge stage: read from its folder when computed for this anchor, else
  computed on the frozen anchor and written there (JSON, and on the chief the heat map)."""
  stage, anchor, config = context.stage, context.earlier, context.stage.config
  train_source, seed = context.train_source, context.seed
  num_images = int(config.affinity_images)
  examples = int(config.task_weight_examples)
  signature = affinity_signature(config, seed, anchor.folder, anchor.step)
  record = read_affinity(stage.folder)
  if record is not None:
    if record.get("signature") == signature:
      return record
    if stages_lib.latest_step(stage.folder) is not None:
      check_affinity(stage.folder, signature)
  if num_images < 2 or num_images > len(train_source):
    raise ValueError(f"--dymu_affinity_images={num_images} must lie in [2, "
                     f"{len(train_source)}] (the training examples).")
  net = anchor.method.net
  images = _training_subset(train_source, num_images, seed)["image"]
  matrix = affinity_lib.task_affinity(net, anchor.variables, images, num_images=num_images,
                                      normalisation=signature["normalisation"])
  mode = signature["task_weights"]
  _, validation = data_base.holdout_split(train_source, config.validation_examples, seed)
  if mode == "validation" and validation is None:
    raise ValueError("--dymu_task_weights=validation needs held-out examples; set "
                     "--dymu_validation_examples > 0 or use --dymu_task_weights=train.")
  weight_source = validation if mode == "validation" else train_source
  batch = _training_subset(weight_source, min(examples, len(weight_source)), seed)
  batches = [{k: v[i:i + 256] for k, v in batch.items()}
             for i in range(0, len(batch["image"]), 256)]
  losses = anchor_task_losses(net, anchor.variables, batches)
  if mode == "uniform":
    weights = (1.0,) * len(losses)
  else:
    weights = task_weights_from_losses(losses, signature["task_weight_normalise"])
  record = {"tasks": [t.name for t in anchor.method.tasks],
            "affinity": np.asarray(matrix, float).tolist(),
            "normalisation": signature["normalisation"], "num_images": num_images,
            "anchor_task_losses": list(losses),
            "task_weight_source": ("held-out" if mode == "validation" else mode),
            "task_weights": list(weights),
            "signature": signature}
  folder = files_lib.makedirs(files_lib.run_path(stage.folder))
  files_lib.write_json(folder / AFFINITY_FILE, record, indent=1)
  if context.is_chief:
    affinity_lib.plot_record(record, folder / AFFINITY_PLOT)
  return record


# ----------------------------------------------------------------------------------------------
# What a stage starts from, and the stage hooks.


def stage_variables(*, trunk: Mapping[str, Any] | None = None,
                    anchor: Mapping[str, Any] | None = None,
                    edge_params: Any = None) -> dict:
  """The variable collections a stage starts from, out of its earlier stages' variables
  (`DymuMethod.required_variables` names those a stage needs):

  * trunk: a finished pretrain stage's variables; the anchor from a trunk starts its streams as
    their copies ("params" and "batch_stats", `streams_from_trunk`);
  * anchor: the trained anchor's variables (edge and weight stages: "anchor");
  * edge_params: the trained edge hypernetwork's params (weight stage: "edge_hypernet").

  Give them to `train.train(..., initial_variables=...)`, or, calling the method directly, put
  them over its stand-ins: `{**method.init(rng, batch), **stage_variables(anchor=...)}`.
  """
  variables = dict(streams_from_trunk(trunk)) if trunk is not None else {}
  if anchor is not None:
    variables["anchor"] = anchor
  if edge_params is not None:
    variables["edge_hypernet"] = {"params": edge_params}
  return variables


def start_anchor(context: stages_lib.StageContext) -> stages_lib.StageStart:
  """The anchor's streams start as copies of the finished pretrain stage's trunk."""
  return stages_lib.StageStart(variables=stage_variables(trunk=context.earlier.variables))


def start_edge(context: stages_lib.StageContext) -> stages_lib.StageStart:
  """The frozen anchor, with A and w measured on it."""
  record = affinity_record(context)
  if context.is_chief:
    print(f"task affinity A = {record['affinity']}; task weights w = "
          f"{record['task_weights']} (wrote "
          f"{files_lib.run_path(context.stage.folder) / AFFINITY_FILE})", flush=True)
  return stages_lib.StageStart(
      options={"affinity": record["affinity"], "task_weights": tuple(record["task_weights"])},
      variables=stage_variables(anchor=context.earlier.variables))


def start_weight(context: stages_lib.StageContext) -> stages_lib.StageStart:
  """The frozen anchor and edge hypernetwork of the finished edge stage; A and w (and their
  heat map) copied from its folder."""
  edge = context.earlier
  record = read_affinity(edge.folder)
  if record is None:
    raise ValueError(f"The edge stage in {edge.folder} has no {AFFINITY_FILE}; it was not "
                     f"trained by experiments.train.")
  target = files_lib.makedirs(files_lib.run_path(context.stage.folder))
  for name in (AFFINITY_FILE, AFFINITY_PLOT):
    source = files_lib.run_path(edge.folder) / name
    if files_lib.is_file(source) and os.fspath(target) != edge.folder:
      files_lib.copy_file(source, target / name)
  variables = edge.variables
  return stages_lib.StageStart(
      options=record_options(record),
      variables=stage_variables(anchor=variables["anchor"],
                                edge_params=variables["params"]["edge_hypernet"]))


def check_finished_edge(context: stages_lib.StageContext) -> None:
  """A finished edge stage must have been trained with this run's affinity options."""
  source = stages_lib.source_of(context.stage)
  check_affinity(context.stage.folder, affinity_signature(
      context.stage.config, context.seed, source["anchor_dir"], source["anchor_step"]))


def finish_anchor(context: stages_lib.StageContext, anchor: stages_lib.Finished) -> str:
  """Writes the anchor report, on the held-out examples (else the test set); returns it."""
  source = context.held_out if context.held_out is not None else context.test_source
  return write_anchor_report(anchor, source, context.train_source.image_shape)


# ----------------------------------------------------------------------------------------------
# The anchor report: can sharing work on this anchor?


@functools.partial(jax.jit, static_argnums=(0,))
def _tree_step(net, nu, variables, states, batch):
  # The tree as one-hot soft mixing (equal predictions, every node computed): one compiled
  # program for every probe tree, where a static tree compiled one each (65 programs for four
  # MobileNetV2 streams ran the compiler out of memory).
  predictions = net.apply_soft(variables, batch["image"], nu, train=False)
  valid = jnp.asarray(batch[data_base.VALID_KEY], jnp.float32)
  metric_states = metrics_lib.update_all(states["metrics"], predictions, batch, net.tasks)
  losses = {}
  for task in net.tasks:
    per_example = jax.vmap(lambda p, y, t=task: t.loss(p[None], y[None]))(
        predictions[task.name], batch[task.name])
    total, count = states["loss"][task.name]
    losses[task.name] = (total + jnp.sum(per_example * valid), count + jnp.sum(valid))
  return {"metrics": metric_states, "loss": losses}


def tree_metrics(net, variables, tree, batches) -> dict:
  """{task: {metric: value, "loss": mean loss}} of `tree` on `batches` (evaluation mode)."""
  zero = np.zeros((), np.float32)
  states = {"metrics": metrics_lib.init_all(net.tasks),
            "loss": {t.name: (zero, zero) for t in net.tasks}}
  nu = jnp.asarray(tree.one_hot())
  for batch in batches:
    states = _tree_step(net, nu, variables, states, batch)
  states = jax.device_get(states)
  results = metrics_lib.compute_all(states["metrics"], net.tasks)
  for name, (total, count) in states["loss"].items():
    results[name]["loss"] = float(total) / max(float(count), 1.0)
  return results


def anchor_report(method, variables, source, image_shape, batch_size: int = 256) -> dict:
  """Stream divergence per block and the quality and cost of `probe_trees` on `source`.

  Every probe row gives each task's primary metric and loss, its change against the separate
  tree (the anchor itself), and the tree's MACs fraction of the anchor.
  """
  net = method.net
  keep = {"image", data_base.VALID_KEY, *(t.name for t in net.tasks)}
  batches = [{k: v for k, v in b.items() if k in keep}
             for b in data_base.eval_batches(source, batch_size)]
  primary = {t.name: metrics_lib.metric_for(t).primary for t in net.tasks}
  separate = tree_metrics(net, variables, net.separate_tree(), batches)
  rows = []
  for label, tree in probe_trees(net.num_layers, net.num_tasks):
    result = tree_metrics(net, variables, tree, batches)
    rows.append({"tree": label, "parents": [list(p) for p in tree.parents],
                 "macs_fraction": net.tree_cost(tree, image_shape).macs_fraction,
                 "tasks": {name: {"metric": result[name][primary[name]],
                                  "loss": result[name]["loss"],
                                  "metric_change": result[name][primary[name]]
                                  - separate[name][primary[name]]}
                           for name in primary}})
  return {"examples": len(source), "primary_metrics": primary,
          "divergence": stream_divergence(variables, net.num_layers),
          "anchor": {name: {"metric": separate[name][primary[name]],
                            "loss": separate[name]["loss"]} for name in primary},
          "probes": rows}


def anchor_report_markdown(report: Mapping[str, Any]) -> str:
  """The anchor report as Markdown (what `write_anchor_report` saves and returns)."""
  names = list(report["primary_metrics"])
  lines = [f"# DYMU anchor report ({report['examples']} held-out examples)", "",
           "Relative distance between the streams' parameters per block "
           "(||a - b|| / mean norm; 0 = copies, about 1.4 = independent draws):", ""]
  for l, d in enumerate(report["divergence"]):
    pairs = [f"{i}-{j}: {d[i][j]:.3f}" for i in range(len(d)) for j in range(i + 1, len(d))]
    lines.append(f"- block {l}: " + ", ".join(pairs))
  lines += ["", "Quality of the cheapest moves away from the separate tree (a cross edge can "
            "only be cheap when the streams still correspond):", "",
            "| tree | MACs fraction | " + " | ".join(
                f"{n} {report['primary_metrics'][n]} (change)" for n in names) + " |",
            "|---|---|" + "---|" * len(names)]
  lines.append("| separate (the anchor) | 1.000 | " + " | ".join(
      f"{report['anchor'][n]['metric']:.4f}" for n in names) + " |")
  for row in report["probes"]:
    lines.append(f"| {row['tree']} | {row['macs_fraction']:.3f} | " + " | ".join(
        f"{row['tasks'][n]['metric']:.4f} ({row['tasks'][n]['metric_change']:+.4f})"
        for n in names) + " |")
  return "\n".join(lines) + "\n"


def write_anchor_report(anchor: stages_lib.Finished, source, image_shape) -> str:
  """Computes the anchor report of a finished anchor stage on `source`; writes JSON and
  Markdown into its folder and returns the Markdown."""
  report = anchor_report(anchor.method, anchor.variables, source, image_shape)
  folder = files_lib.run_path(anchor.folder)
  files_lib.write_json(folder / ANCHOR_REPORT, report, indent=1)
  text = anchor_report_markdown(report)
  files_lib.atomic_write(folder / ANCHOR_REPORT_MD, text)
  return text
