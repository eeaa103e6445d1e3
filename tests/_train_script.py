"""Subprocess entry points of the engine tests (a fresh process sets its own device count).

    python tests/_train_script.py train --workdir W --steps 30 --checkpoint_every 3 --out P.npz
    python tests/_train_script.py parallel --workdir W --out R.npz    # needs 8 host devices

"train" trains the toy method (optionally slowed down so a test can kill it mid-run) and saves
the final parameters. "parallel" runs the same steps on one device and on eight, in both
parallel modes, and saves every run's parameters and per-step losses.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # toy_method
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dymu_jax

import jax
import numpy as np

import toy_method
from dymu_jax import train as train_lib
from dymu_jax.data import base as data_lib
from dymu_jax.train import parallel as parallel_lib
from dymu_jax.train import state as state_lib

BATCH_SIZE = 16
LEARNING_RATE = 1e-2


def flat_params(params) -> dict[str, np.ndarray]:
  """{"Dense_0/kernel": array, ...} on host."""
  flat = jax.tree_util.tree_flatten_with_path(parallel_lib.to_host(params))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in flat}


def run_train(args) -> None:
  source = toy_method.make_source("train")
  if args.delay:
    source = toy_method.SlowSource(source, args.delay)
  config = train_lib.TrainConfig(
      steps=args.steps, batch_size=BATCH_SIZE, seed=args.seed, learning_rate=LEARNING_RATE,
      checkpoint_every=args.checkpoint_every, keep_checkpoints=2, log_every=5,
      progress=False, prefetch=2)
  result = train_lib.train(toy_method.ToyMethod(), source, None, config, args.workdir,
                           run_metadata={"script": "train"})
  np.savez(args.out, **flat_params(result.state.params))
  print(json.dumps({"resumed_from": result.resumed_from, "step_compiles": result.step_compiles}))


def initial_state(devices):
  """The toy's initial canonical state as `train` builds it (seed 0), on host."""
  par = parallel_lib.Parallel("mesh", devices)
  method = toy_method.ToyMethod()
  optimizer = train_lib.make_optimizer("adam", LEARNING_RATE)
  batcher = data_lib.Batcher(toy_method.make_source("train"), BATCH_SIZE, seed=0)
  sample = {k: np.zeros_like(v) for k, v in batcher.batch(0).items()}
  return parallel_lib.to_host(par.init_state(state_lib.init_fn(method, optimizer),
                                             jax.random.PRNGKey(0), sample))


def step_level_run(initial, mode: str, devices, steps: int):
  """The engine's own pieces (placement, compiled step) for `steps` steps of the toy."""
  par = parallel_lib.Parallel(mode, devices)
  method = toy_method.ToyMethod(axis_name=par.axis_name)
  optimizer = train_lib.make_optimizer("adam", LEARNING_RATE)
  batcher = data_lib.Batcher(toy_method.make_source("train"), BATCH_SIZE, seed=0)
  state = par.place_state(initial)
  step_fn = par.compile_step(method, optimizer)
  losses = []
  for batch in batcher(0, steps):
    state, metrics = step_fn(state, par.shard_batch(batch))
    metrics = par.read(metrics)
    losses.append([metrics["loss"], metrics["loss/third"], metrics["loss/brightness"]])
  canonical = par.canonical_state(state)
  return flat_params(canonical.params), np.asarray(losses)


def unpooled_difference(initial, devices) -> float:
  """How far per-device batch statistics move the toy's outputs on the first batch (so the
  comparison of one device with eight can only pass when the statistics are pooled)."""
  par = parallel_lib.Parallel("pmap", devices)
  batch = data_lib.Batcher(toy_method.make_source("train"), BATCH_SIZE, seed=0).batch(0)
  images = par.shard_batch({"image": batch["image"]})["image"]
  variables = {"params": initial.params, **initial.model_state}
  outputs = []
  for axis_name in (parallel_lib.AXIS_NAME, None):
    net = toy_method.ToyNet(axis_name=axis_name)
    forward = lambda v, x, net=net: net.apply(v, x, train=True,
                                              mutable=["batch_stats"])[0]["brightness"]
    outputs.append(np.asarray(jax.pmap(forward, axis_name=parallel_lib.AXIS_NAME,
                                       in_axes=(None, 0))(variables, images)))
  return float(np.max(np.abs(outputs[0] - outputs[1])))


def run_parallel(args) -> None:
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 host devices, got {len(devices)}"
  initial = initial_state(devices)
  out = {}
  for name, devs in {"mesh1": devices[:1], "mesh8": devices}.items():
    params, losses = step_level_run(initial, "mesh", devs, args.steps)
    out.update({f"{name}/params/{k}": v for k, v in params.items()})
    out[f"{name}/losses"] = losses
  # pmap on 8 devices through the whole loop, interrupted after half the steps and resumed
  # (a restore into the pmap layout); its per-step losses come from metrics.jsonl.
  method = toy_method.ToyMethod(axis_name=parallel_lib.AXIS_NAME)
  config = train_lib.TrainConfig(steps=args.steps // 2, batch_size=BATCH_SIZE, seed=0,
                                 learning_rate=LEARNING_RATE, checkpoint_every=2,
                                 log_every=1, progress=False, parallel="pmap",
                                 eval_batch_size=16)
  first = train_lib.train(method, toy_method.make_source("train"), None, config, args.workdir)
  config = dataclasses.replace(config, steps=args.steps)
  second = train_lib.train(method, toy_method.make_source("train"),
                           toy_method.make_source("test", n=40), config, args.workdir)
  out.update({f"pmap8/params/{k}": v for k, v in flat_params(second.state.params).items()})
  with open(os.path.join(args.workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  out["pmap8/losses"] = np.asarray([[r["loss"], r["loss/third"], r["loss/brightness"]]
                                    for r in records if r["split"] == "train"])
  np.savez(args.out, **out)
  print(json.dumps({"first_compiles": first.step_compiles, "resumed_from": second.resumed_from,
                    "eval": second.eval_metrics, "devices": len(devices),
                    "unpooled_difference": unpooled_difference(initial, devices)}))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=["train", "parallel"])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--checkpoint_every", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--delay", type=float, default=0.0)
  args = parser.parse_args(argv)
  run_train(args) if args.command == "train" else run_parallel(args)


if __name__ == "__main__":
  main()
