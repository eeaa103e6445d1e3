"""The library's static MLP on generated tabular multi-task data, against ridge regression and
the same MLP written in a few lines of plain JAX (same data, same split, same steps).

  python -m benchmarks.tabular_baselines                 # 3 seeds, about a minute per seed
  python -m benchmarks.tabular_baselines --seeds=1 --steps=500

The data (`make_table`, written to an `.npz` in `--workdir_root` and read back through
`--dataset=arrays`'s loader, so every model sees the library's split and standardisation):
`--rows` rows of `--features` Gaussian features whose scales span 1e-2 to 1e2 (so unscaled
inputs would hurt), and three regression targets of known structure on the unscaled features
z: `linear` = z @ w, `wave` = sin(z @ a) + 0.5 (z @ b)^2 / d, `interact` = z0 z1 + tanh(z2 z3)
+ 0.5 |z4|, each plus 0.1 Gaussian noise, then times its `--target_scales` entry.

Models (test-split mean absolute error per target, and its mean over targets):

* `ridge`: closed-form ridge regression per target on the standardised features (a bias,
  `--ridge_alpha`), the linear baseline a tabular user would try first;
* `plain JAX MLP`: hidden layers `--hidden` (ReLU) shared by the targets, a `--head_width`
  ReLU layer and one output per target, L1 loss summed over targets, Adam at
  `--learning_rate`, `--steps` steps of `--batch_size` drawn from per-epoch permutations,
  on the targets standardised as the library does (`--standardise_targets`, on by default);
* `library static MLP`: `methods.build("static", ..., backbone "mlp")` trained by
  `dymu_jax.train.train` with the same sizes, loss, optimiser, steps and batch size.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax import train as train_lib

_ROWS = flags.DEFINE_integer("rows", 6000, "Rows of the generated table.", lower_bound=100)
_FEATURES = flags.DEFINE_integer("features", 24, "Features per row.", lower_bound=5)
_STEPS = flags.DEFINE_integer("steps", 3000, "Optimizer steps of both MLPs.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size of both MLPs.", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate of both MLPs.")
_HIDDEN = flags.DEFINE_list("hidden", ["256", "256"], "Hidden widths of the shared MLP.")
_HEAD = flags.DEFINE_integer("head_width", 64, "Hidden width of each task head.")
_RIDGE_ALPHA = flags.DEFINE_float("ridge_alpha", 1.0, "Ridge penalty.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds (the data stays the same).",
                              lower_bound=1)
_TARGET_SCALES = flags.DEFINE_list(
    "target_scales", ["1", "1", "1"], "Multipliers of the three targets (linear, wave, "
    "interact), e.g. 1000,1,0.01 for targets in very different units.")
_STANDARDISE_TARGETS = flags.DEFINE_bool(
    "standardise_targets", True, "Train both MLPs on targets standardised with the training "
    "split's mean and std (the library's default for feature vectors); MAE stays in the "
    "targets' units.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "", "Where the table and the library's "
                                    "runs go; empty = a temporary folder.")

TARGETS = ("linear", "wave", "interact")


def make_table(rows: int, features: int, seed: int = 0,
               target_scales=(1.0, 1.0, 1.0)) -> dict[str, np.ndarray]:
  """Feature vectors (rows, features) on scales 1e-2..1e2 and the three targets (each times
  its entry of `target_scales`)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(rows, features))
  scales = np.logspace(-2, 2, features)
  w, a, b = (rng.normal(size=features) / np.sqrt(features) for _ in range(3))
  noise = lambda: 0.1 * rng.normal(size=rows)
  targets = {
      "linear": z @ w + noise(),
      "wave": np.sin(z @ a) + 0.5 * (z @ b) ** 2 + noise(),
      "interact": z[:, 0] * z[:, 1] + np.tanh(z[:, 2] * z[:, 3]) + 0.5 * np.abs(z[:, 4])
                  + noise(),
  }
  return {"inputs": (z * scales).astype(np.float32),
          **{k: (v * scale).astype(np.float32)
             for (k, v), scale in zip(targets.items(), target_scales)}}


def ridge_mae(train, test, alpha: float) -> dict[str, float]:
  x = np.concatenate([train.images, np.ones((len(train), 1), np.float32)], axis=1)
  xt = np.concatenate([test.images, np.ones((len(test), 1), np.float32)], axis=1)
  penalty = alpha * np.eye(x.shape[1])
  penalty[-1, -1] = 0.0  # no penalty on the bias
  out = {}
  for name in TARGETS:
    coef = np.linalg.solve(x.T @ x + penalty, x.T @ train.labels[name])
    out[name] = float(np.mean(np.abs(xt @ coef - test.labels[name])))
  return out


def plain_mlp_mae(train, test, seed: int, hidden, head_width: int, steps: int, batch: int,
                  lr: float) -> dict[str, float]:
  """The same network, loss and optimiser in plain JAX."""
  key = jax.random.PRNGKey(seed)
  sizes = [train.images.shape[1], *hidden]

  def dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) * np.sqrt(2.0 / n_in),
            "b": jnp.zeros((n_out,))}

  keys = iter(jax.random.split(key, 64))
  params = {"trunk": [dense(next(keys), i, o) for i, o in zip(sizes[:-1], sizes[1:])],
            "heads": {t: [dense(next(keys), sizes[-1], head_width),
                          dense(next(keys), head_width, 1)] for t in TARGETS}}

  def predict(params, x):
    for layer in params["trunk"]:
      x = jax.nn.relu(x @ layer["w"] + layer["b"])
    out = {}
    for t, (h, o) in params["heads"].items():
      out[t] = (jax.nn.relu(x @ h["w"] + h["b"]) @ o["w"] + o["b"])[:, 0]
    return out

  # The targets in the units the library trains in: (label - label_offset) / label_scale,
  # the training split's mean and std with --standardise_targets (the default), else 0 and 1.
  units = {t.name: (t.label_offset, t.label_scale) for t in train.tasks}

  def loss(params, x, y):
    pred = predict(params, x)
    return sum(jnp.mean(jnp.abs(pred[t] - (y[t] - units[t][0]) / units[t][1])) for t in TARGETS)

  tx = optax.adam(lr)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  order, position = rng.permutation(len(train)), 0
  for _ in range(steps):
    if position + batch > len(order):
      order, position = rng.permutation(len(train)), 0
    idx = order[position:position + batch]
    position += batch
    params, opt_state = step(params, opt_state, train.images[idx],
                             {t: train.labels[t][idx] for t in TARGETS})
  pred = jax.jit(predict)(params, test.images)
  return {t: float(np.mean(np.abs(np.asarray(pred[t]) * units[t][1] + units[t][0]
                                 - test.labels[t]))) for t in TARGETS}


def library_mae(train, test, seed: int, hidden, head_width: int, steps: int, batch: int,
                lr: float, workdir: str) -> dict[str, float]:
  method = methods_lib.build("static", train.tasks, model_options={
      "backbone": "mlp", "head_width": head_width, "backbone_kwargs": {"hidden": tuple(hidden)}})
  config = train_lib.TrainConfig(steps=steps, batch_size=batch, seed=seed, learning_rate=lr,
                                 eval_every=0, checkpoint_every=0, progress=False,
                                 log_every=max(1, steps // 4))
  result = train_lib.train(method, train, test, config, workdir)
  metrics = next(iter(result.eval_metrics.values()))
  return {t: float(metrics[t]["mae"]) for t in TARGETS}


def _summary(runs: list[dict[str, float]]) -> str:
  cells = []
  for t in (*TARGETS, "mean"):
    values = [r[t] if t != "mean" else statistics.mean(r.values()) for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    cells.append(f"{statistics.mean(values):.4f} +- {spread:.4f}")
  return "".join(f"{c:>20}" for c in cells)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix="tabular_")
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "table.npz")
  scales = [float(x) for x in _TARGET_SCALES.value]
  if len(scales) != len(TARGETS):
    raise app.UsageError(f"--target_scales needs {len(TARGETS)} numbers (one per target: "
                         f"{', '.join(TARGETS)}), got {_TARGET_SCALES.value}.")
  np.savez(path, **make_table(_ROWS.value, _FEATURES.value, target_scales=scales))
  config = data_lib.DataConfig(name="arrays", data_dir=path,
                               task_spec=",".join(f"{t}:regression" for t in TARGETS),
                               standardise_targets=_STANDARDISE_TARGETS.value)
  train, test = data_lib.load(config, "train"), data_lib.load(config, "test")
  hidden = [int(h) for h in _HIDDEN.value]
  print(f"{len(train)} train / {len(test)} test rows, {_FEATURES.value} features; MLP "
        f"{hidden} + heads of {_HEAD.value}, {_STEPS.value} steps of {_BATCH.value}, Adam "
        f"{_LR.value:g}, L1 loss on "
        f"{'standardised' if _STANDARDISE_TARGETS.value else 'raw'} targets", flush=True)
  results = {"ridge": [ridge_mae(train, test, _RIDGE_ALPHA.value)],
             "plain JAX MLP": [], "library static MLP": []}
  for seed in range(_SEEDS.value):
    start = time.perf_counter()
    results["plain JAX MLP"].append(plain_mlp_mae(
        train, test, seed, hidden, _HEAD.value, _STEPS.value, _BATCH.value, _LR.value))
    middle = time.perf_counter()
    results["library static MLP"].append(library_mae(
        train, test, seed, hidden, _HEAD.value, _STEPS.value, _BATCH.value, _LR.value,
        os.path.join(root, f"static_s{seed}")))
    print(f"seed {seed}: plain {middle - start:.0f} s, library "
          f"{time.perf_counter() - middle:.0f} s", flush=True)
  print(f"\ntest MAE (mean +- std over {_SEEDS.value} training seeds; ridge is deterministic)")
  print(f"{'model':<20}" + "".join(f"{t:>20}" for t in (*TARGETS, "mean")))
  for name, runs in results.items():
    print(f"{name:<20}{_summary(runs)}")


if __name__ == "__main__":
  app.run(main)
