"""The MLP backbone for feature vectors (tabular data): widths, slicing, the masked path, heads
on vectors, input-kind sentences, cost counts, CI-KD, and training (in process and via the CLI).

Sizes are tiny (a handful of features, hidden layers of 16-64 units) so that the file stays
fast on a shared CPU; variables are mostly numpy fills of the shapes `init` gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import data, methods
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import ecmt
from dymu_jax.models import BACKBONES, build_multitask, cost, layers, serialize
from dymu_jax.models import backbones as B
from dymu_jax.models.decoders import MLPHead
from dymu_jax.models.widths import DynamicWidths, WidthConfig, channels

import random_variables as test_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 6  # features


def random_variables(module, *args, seed=0, **kwargs):
  """Random variables with the shapes of `module.init(...)`, filled by numpy."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return test_variables.fill(shapes, seed)


def vectors(n, d=D, seed=0):
  return jax.device_put(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


# ---------------------------------------------------------------------------- the backbone

def test_mlp_shapes_widths_and_flattening():
  net = B.MLP(hidden=(64, 48, 32))
  assert BACKBONES["mlp"] is B.MLP and B.input_kind("mlp") == B.VECTORS
  assert B.input_kind("resnet_small") == B.IMAGES and B.backbones_for(B.VECTORS) == ("mlp",)
  assert B.MLP().stage_channels == (256, 256)  # default hidden widths
  x = vectors(4)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x))
  assert jax.tree.map(lambda a: a.shape, variables["params"]) == {
      "dense1": {"kernel": (D, 64), "bias": (64,)}, "dense2": {"kernel": (64, 48), "bias": (48,)},
      "dense3": {"kernel": (48, 32), "bias": (32,)}}
  assert net.num_stages == 3 and net.stage_channels == (64, 48, 32)
  full = jax.eval_shape(lambda v: net.apply(v, x), variables)
  assert [o.shape for o in full] == [(4, 64), (4, 48), (4, 32)]
  slim = (0.25, 0.5, 0.75)
  got = jax.eval_shape(lambda v: net.apply(v, x, widths=slim), variables)
  assert [o.shape for o in got] == [(4, channels(c, m)) for c, m in zip((64, 48, 32), slim)]
  assert [o.shape[-1] for o in got] == [16, 24, 24]
  # Initialising slimmed still creates full-size variables.
  slim_init = jax.eval_shape(lambda: net.init(jax.random.key(0), x, widths=slim))
  assert jax.tree.map(lambda a: a.shape, slim_init) == jax.tree.map(lambda a: a.shape, variables)
  # Any rank after the batch axis is flattened to (B, D).
  filled = random_variables(net, x)
  grid = np.asarray(x).reshape(4, 2, 3)
  for a, b in zip(net.apply(filled, grid), net.apply(filled, x)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # One hidden layer as an int; stage modules for GradSplit.
  assert B.MLP(hidden=32).stage_channels == (32,)
  assert B.MLP(batch_norm=True).stage_modules() == (("dense1", "bn1"), ("dense2", "bn2"))


def explicit_sliced(hidden, widths, batch_norm):
  """The physically smaller MLP written out by hand (not via `sliced`)."""
  return B.MLP(hidden=tuple(channels(h, m) for h, m in zip(hidden, widths)),
               batch_norm=batch_norm)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_mlp_slimmed_equals_sliced_and_masked_path(batch_norm):
  hidden, widths = (64, 32, 40), (0.5, 0.25, 0.75)
  net = B.MLP(hidden=hidden, batch_norm=batch_norm)
  x = vectors(5, seed=1)
  variables = random_variables(net, x)
  assert not batch_norm or "batch_stats" in variables
  slim_out = jax.jit(lambda v, x: net.apply(v, x, widths=widths))(variables, x)
  small = explicit_sliced(hidden, widths, batch_norm)
  assert small.stage_channels == net.sliced(widths).stage_channels == (32, 8, 32)
  cut = layers.slice_variables(variables,
                               jax.eval_shape(lambda: small.init(jax.random.key(0), x)))
  small_out = jax.jit(small.apply)(cut, x)
  # The masked path: full-width outputs, equal on the kept units and zero beyond them.
  dyn = DynamicWidths.from_config(WidthConfig(widths, ()))
  masked = jax.jit(lambda v, x, d: net.apply(v, x, widths=d.encoder_multipliers()))(
      variables, x, dyn)
  for s, p, m in zip(slim_out, small_out, masked):
    assert s.shape == p.shape and m.shape[-1] >= s.shape[-1]
    np.testing.assert_allclose(s, p, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(m[:, :s.shape[-1]], s, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(m[:, s.shape[-1]:], 0.0)
  if batch_norm:  # training mode updates only the running statistics of the used units
    _, state = net.apply(variables, x, widths=widths, train=True, mutable=["batch_stats"])
    old, new = variables["batch_stats"]["bn2"]["mean"], state["batch_stats"]["bn2"]["mean"]
    assert not np.allclose(new[:8], old[:8]) and np.array_equal(new[8:], old[8:])


def test_mlp_head_reads_vectors_without_pooling():
  head = MLPHead(3, hidden_features=16)
  features = vectors(4, 8, seed=2)
  variables = random_variables(head, features)
  out = head.apply(variables, [features])
  assert out.shape == (4, 3)
  p = variables["params"]
  by_hand = (np.maximum(np.asarray(features) @ p["hidden0"]["kernel"] + p["hidden0"]["bias"], 0)
             @ p["output"]["kernel"] + p["output"]["bias"])
  np.testing.assert_allclose(out, by_hand, atol=1e-5)


def test_multitask_mlp_sliced_and_masked_predictions():
  tasks = (tasks_lib.regression("price"), tasks_lib.classification("kind", 3))
  net = build_multitask(tasks, "mlp", head_width=32, backbone_kwargs={"hidden": (48, 32)})
  x = vectors(4, seed=3)
  variables = random_variables(net, x)
  cfg = WidthConfig((0.25, 0.75), (0.5, 1.0))
  preds, feats = jax.jit(lambda v: net.apply(v, x, widths=cfg, return_features=True))(variables)
  assert {k: v.shape for k, v in preds.items()} == {"price": (4, 1), "kind": (4, 3)}
  assert [f.shape for f in feats] == [(4, 16), (4, 24)]
  small = net.sliced(cfg)
  assert dict(small.backbone_kwargs)["hidden"] == (16, 24) and small.head_widths == (16, 32)
  cut = layers.slice_variables(variables,
                               jax.eval_shape(lambda: small.init(jax.random.key(0), x)))
  small_preds = jax.jit(small.apply)(cut, x)
  masked, masked_feats = jax.jit(lambda v, d: net.apply(v, x, widths=d, return_features=True))(
      variables, DynamicWidths.from_config(cfg))
  for name in preds:
    np.testing.assert_allclose(small_preds[name], preds[name], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(masked[name], preds[name], atol=1e-5, rtol=1e-5)
  for m, f in zip(masked_feats, feats):
    np.testing.assert_allclose(m[:, :f.shape[-1]], f, atol=1e-5, rtol=1e-5)
  # CI-KD on vector features: the masked layout gives the static path's distance.
  teacher = jax.jit(lambda v: net.apply(v, x, return_features=True)[1])(variables)
  active = [jnp.asarray(f.shape[-1], jnp.int32) for f in feats]
  static_kd = ecmt.ci_kd_loss(teacher, feats)
  assert float(static_kd) > 0
  np.testing.assert_allclose(ecmt.ci_kd_loss(teacher, masked_feats, active), static_kd,
                             rtol=1e-5)


def test_sliced_mlp_exports_and_loads_with_its_input_statistics(tmp_path):
  """An exported MLP SubNet (input shape (D,)) loads back with the same predictions, and the
  standardisation statistics ride along in `extra`."""
  tasks = (tasks_lib.regression("price"), tasks_lib.classification("kind", 3))
  net = build_multitask(tasks, "mlp", head_width=32, backbone_kwargs={"hidden": (48, 32)})
  x = vectors(4, seed=5)
  variables = random_variables(net, x)
  cfg = WidthConfig((0.5, 0.75), (0.5, 1.0))
  sub, sub_variables = ecmt.slice_subnet(net, variables, cfg, (x.shape[1],))
  stats = {"mean": [0.5] * x.shape[1], "std": [2.0] * x.shape[1]}
  serialize.save_network(tmp_path / "export", sub, sub_variables,
                         {"input_stats": stats}, image_shape=(x.shape[1],))
  loaded, loaded_variables, extra = serialize.load_network(tmp_path / "export")
  assert extra["input_stats"] == stats
  expected = jax.jit(lambda v: net.apply(v, x, widths=cfg))(variables)
  got = jax.jit(loaded.apply)(loaded_variables, x)
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_inputs_that_do_not_fit_the_backbone_stop_with_one_sentence():
  tasks = (tasks_lib.regression("y"),)
  init = lambda net, x: jax.eval_shape(lambda: net.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match=r"^MultiTaskNet with backbone 'mlp' expects feature "
                     r"vectors of shape \(B, D\), got images of shape \(2, 8, 8, 3\); images "
                     r"fit backbone lenet, resnet_small, resnet18, resnet34 or "
                     r"mobilenet_v2\."):
    init(build_multitask(tasks, "mlp"), jnp.zeros((2, 8, 8, 3)))
  for backbone in ("resnet_small", "lenet", "mobilenet_v2"):
    with pytest.raises(ValueError, match=rf"^MultiTaskNet with backbone '{backbone}' expects "
                       r"images of shape \(B, H, W, C\), got feature vectors of shape \(2, 6\); "
                       r"feature vectors \(B, D\) fit backbone mlp\."):
      init(build_multitask(tasks, backbone), jnp.zeros((2, D)))
  with pytest.raises(ValueError, match=r"Task 'seg' is dense .* backbone 'mlp' ends in a flat "
                     r"vector"):
    init(build_multitask((tasks_lib.segmentation("seg", 3),), "mlp"), jnp.zeros((2, D)))
  with pytest.raises(ValueError, match=r"pixel_mean and pixel_std of a network on inputs of "
                     r"shape \(2, 6\) must both hold one value per feature .* \(6\), or be "
                     r"unset \(inputs used as given\); got 1 and 1\."):
    init(build_multitask(tasks, "mlp", pixel_mean=(0.5,), pixel_std=(0.5,)), jnp.zeros((2, D)))
  with pytest.raises(ValueError, match=r"MLP got hidden=\(64, 0\); give the width of each "
                     r"hidden layer as positive whole numbers"):
    init(B.MLP(hidden=(64, 0)), jnp.zeros((2, D)))
  with pytest.raises(ValueError, match=r"MLP has 2 stages but widths has 1 multipliers"):
    jax.eval_shape(lambda: B.MLP().init(jax.random.key(0), jnp.zeros((2, D)), widths=(0.5,)))
  # Image-size checks pass for the MLP, so that the sentence above is the one users see.
  assert B.min_image_size("mlp", {"hidden": (8,)}) == 1


# ---------------------------------------------------------------------------- cost

def test_cost_counts_dense_layers_by_hand():
  tasks = (tasks_lib.regression("a"), tasks_lib.classification("b", 4))
  net = build_multitask(tasks, "mlp", head_width=16, backbone_kwargs={"hidden": (32, 24)})
  x = jax.ShapeDtypeStruct((3, D), jnp.float32)  # per example: divided by the batch
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(x.shape)))
  heads = 2 * 24 * 16 + 16 * 1 + 16 * 4
  full = cost.count(net, variables, x)
  assert full.macs == D * 32 + 32 * 24 + heads
  assert full.params == cost.num_params(variables["params"]) == (
      D * 32 + 32 + 32 * 24 + 24 + 2 * (24 * 16 + 16) + 16 * 1 + 1 + 16 * 4 + 4)
  cfg = WidthConfig((0.25, 0.5), (0.5, 1.0))  # encoder 8, 16 units; heads 8 and 16
  slim = cost.count(net, variables, x, widths=cfg)
  assert slim.macs == D * 8 + 8 * 16 + (16 * 8 + 8 * 1) + (16 * 16 + 16 * 4)
  sliced = net.sliced(cfg)
  sliced_vars = jax.eval_shape(lambda: sliced.init(jax.random.key(0), jnp.zeros(x.shape)))
  assert slim.params == cost.num_params(sliced_vars["params"])
  assert cost.count(sliced, sliced_vars, x) == slim
  # The masked path computes at full width, and XLA agrees on the dots.
  assert cost.count(net, variables, x, widths=DynamicWidths.from_config(cfg)) == full
  fn = lambda v, x_: net.apply(v, x_, widths=cfg)
  assert cost.xla_matmul_flops(fn, variables, x) == 2 * 3 * slim.macs


# ---------------------------------------------------------------------------- training

TASK_SPEC = "linear:regression,wave:regression,sign:classification"


def write_tabular(path, n=384, seed=0):
  """A tabular multi-task file: 6 features on very different scales, two regression targets
  (a linear one and a non-linear one) and a binary class, plus a little noise."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, D))
  scales = np.array([1.0, 100.0, 0.01, 5.0, 1000.0, 1.0])
  offsets = np.array([0.0, 50.0, -3.0, 10.0, 0.0, 2.0])
  inputs = z * scales + offsets  # what the user stores: raw units
  linear = z @ np.array([1.0, -0.5, 0.8, 0.0, 0.3, 0.0]) + 0.05 * rng.normal(size=n)
  wave = np.sin(2 * z[:, 0]) + z[:, 1] * z[:, 2] + 0.05 * rng.normal(size=n)
  sign = (z[:, 3] + z[:, 4] ** 2 > 1.0).astype(np.int64)
  np.savez(path, inputs=inputs.astype(np.float32), linear=linear.astype(np.float32),
           wave=wave.astype(np.float32), sign=sign)
  return path


def train_static_mlp(source, steps=150):
  """The static method on the MLP (hidden (64, 64), heads of 32) trained `steps` steps of 64
  with Adam 3e-3: (method, initial variables, trained variables, first step's loss aux)."""
  method = methods.build("static", source.tasks, model_options={
      "backbone": "mlp", "head_width": 32, "backbone_kwargs": {"hidden": (64, 64)}})
  batches = data.Batcher(source, 64, seed=0)
  initial = method.init(jax.random.PRNGKey(0), batches.batch(0))
  params, state = initial["params"], {k: v for k, v in initial.items() if k != "params"}
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, state, batch):
    (_, (aux, state)), grads = jax.value_and_grad(method.loss, has_aux=True)(
        params, state, batch, None, 0)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, aux

  first_aux = None
  for s in range(steps):
    params, opt_state, state, aux = step(params, opt_state, state, batches.batch(s))
    first_aux = aux if first_aux is None else first_aux
  return method, initial, {"params": params, **state}, first_aux


def test_static_training_on_tabular_data_lowers_the_loss(tmp_path):
  path = write_tabular(tmp_path / "table.npz")
  config = data.DataConfig(name="arrays", data_dir=str(path), task_spec=TASK_SPEC)
  source = data.load(config, "train")
  assert source.image_shape == (D,) and source.input_stats["mean"].shape == (D,)
  method, initial, trained, _ = train_static_mlp(source)
  whole = source.get(np.arange(len(source)))

  def evaluate(variables):
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    total, (aux, _) = jax.jit(method.loss)(params, state, whole, None, 0)
    return {"loss": float(total), **{k: float(v) for k, v in aux.items()}}

  before, after = evaluate(initial), evaluate(trained)
  print(f"train loss {before['loss']:.4f} -> {after['loss']:.4f}; "
        + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in sorted(before)
                    if k.startswith("loss/")))
  assert after["loss"] < 0.35 * before["loss"], (before, after)
  for task in ("linear", "wave", "sign"):
    assert after[f"loss/{task}"] < 0.6 * before[f"loss/{task}"], (task, before, after)


def run_cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("method", ["static", "ecmt"])
def test_cli_trains_the_mlp_on_a_tabular_file(tmp_path, method):
  """`--dataset=arrays` with feature vectors and `--backbone=mlp` end to end: the training loss
  falls and the summary holds every task's metrics."""
  path = write_tabular(tmp_path / "table.npz")
  workdir = tmp_path / "run"
  extra = ["--num_subnets=2"] if method == "ecmt" else []
  result = run_cli(
      "--dataset=arrays", f"--data_dir={path}", f"--task_spec={TASK_SPEC}", "--backbone=mlp",
      '--backbone_options="hidden=(32,32)"', "--head_width=16", f"--method={method}", *extra,
      "--steps=40", "--batch_size=32", "--learning_rate=3e-3", "--log_every=10",
      "--checkpoint_every=40", "--eval_every=0", "--noprogress", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in records if r.get("split", r.get("kind")) == "train"]
  assert len(losses) >= 3 and losses[-1] < losses[0], losses
  summary = json.load(open(workdir / "summary.json"))
  per_task = next(iter(summary["eval"].values()))
  assert {"linear", "wave", "sign"} <= set(per_task), summary


def test_cli_refuses_images_for_the_mlp_in_one_sentence(tmp_path):
  path = tmp_path / "images.npz"
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
           y=rng.normal(size=40).astype(np.float32))
  result = run_cli("--dataset=arrays", f"--data_dir={path}", "--task_spec=y:regression",
                   "--backbone=mlp", "--steps=2", "--batch_size=8", "--noprogress",
                   f"--workdir={tmp_path / 'run'}", timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "backbone 'mlp' expects feature vectors of shape (B, D), got " \
      "images of shape" in lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["single_task", "ecmt", "gradsplit", "pcgrad", "phn",
                                  "phn_bn"])
def test_every_method_steps_on_the_mlp(name):
  """Each method that builds a `MultiTaskNet` (or PHN's target network) trains on vectors
  (DYMU's branched MLP streams: tests/test_dymu_mlp.py)."""
  from dymu_jax.train import state as state_lib
  from dymu_jax.train import step as step_lib
  tasks = (tasks_lib.regression("a"), tasks_lib.regression("b"),
           tasks_lib.classification("c", 3))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 6)).astype(np.float32),
           "a": rng.normal(size=16).astype(np.float32),
           "b": rng.normal(size=16).astype(np.float32),
           "c": rng.integers(0, 3, 16).astype(np.int32)}
  method = methods.build(name, tasks, model_options={
      "backbone": "mlp", "head_width": 16,
      "backbone_kwargs": {"hidden": (32, 32), "batch_norm": name == "phn_bn"}})
  variables = method.init(jax.random.key(0), {"image": batch["image"][:1]})
  optimizer = optax.adam(1e-2)
  state = state_lib.create(variables, optimizer, jnp.asarray(np.asarray(jax.random.PRNGKey(0))))
  step = jax.jit(step_lib.make_train_step(method, optimizer))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  if not name.startswith("phn"):  # PHN draws a preference ray per step: its loss is not monotone
    assert losses[-1] < losses[0], losses


def test_standardised_targets_train_in_their_units_and_round_trip_through_export(tmp_path):
  """A regression target in large units (mean 5000, std about 1000) trains on its standardised
  labels; the evaluator's MAE is in the label's units; an exported network that carries the
  input statistics, fed the raw feature vectors and mapped back with `Task.label_units`, gives
  the same MAE."""
  path = write_tabular(tmp_path / "raw.npz")
  arrays = dict(np.load(path))
  arrays["linear"] = (arrays["linear"] * 1000.0 + 5000.0).astype(np.float32)
  path = tmp_path / "table.npz"
  np.savez(path, **arrays)
  config = data.DataConfig(name="arrays", data_dir=str(path), task_spec=TASK_SPEC)
  source, test = data.load(config, "train"), data.load(config, "test")
  linear = source.tasks[0]
  labels = source.get(np.arange(len(source)))["linear"].astype(np.float64)
  assert linear.label_offset == pytest.approx(labels.mean(), rel=1e-6)
  assert linear.label_scale == pytest.approx(labels.std(), rel=1e-6)
  method, _, variables, first_aux = train_static_mlp(source)
  first = float(first_aux["loss/linear"])
  assert first < 3.0, first  # standardised units: the raw L1 would be about 5000
  whole = test.get(np.arange(len(test)))
  predictions = method.model.apply(variables, whole["image"])
  metric = linear.metric()
  mae = metric.compute(metric.update(metric.init(), predictions["linear"], whole["linear"]))["mae"]
  assert mae < 0.5 * linear.label_scale, mae  # learned, in the label's units
  # As `experiments.export` does: the input statistics become the network's own.
  stats = source.input_stats
  network = dataclasses.replace(method.model, pixel_mean=tuple(map(float, stats["mean"])),
                                pixel_std=tuple(map(float, stats["std"])))
  serialize.save_network(tmp_path / "export", network, variables,
                         image_shape=source.image_shape)
  loaded, loaded_variables, _ = serialize.load_network(tmp_path / "export")
  assert loaded.tasks == source.tasks  # offset and scale ride in the network definition
  raw = data.load(dataclasses.replace(config, standardise_inputs=False), "test")
  raw_inputs = raw.get(np.arange(len(raw)))["image"]  # the user's rows, in their own units
  exported = loaded.tasks[0].label_units(loaded.apply(loaded_variables, raw_inputs)["linear"])
  np.testing.assert_allclose(np.mean(np.abs(np.asarray(exported)[:, 0] - whole["linear"])), mae,
                             rtol=1e-4)
