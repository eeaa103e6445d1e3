"""DYMU on tabular data: branched anchor streams of MLP blocks on feature vectors (B, D).

The branched MLP's tree forward against one-hot soft mixing (only used nodes compute), its tree
cost against XLA's count, batch-norm shifts of its blocks and decoders, the affinity on
vectors and its record as the edge and weight stages' artefact, the CLI's block options, and a whole DYMU run (pretrain, anchor, edge, weight) on a
tabular .npz through `experiments.train` and `experiments.evaluate`.

Sizes are tiny (6 features, hidden layers of 16-24 units, a few steps) so that the file stays
short on a shared CPU; variables are numpy fills of the shapes `init` gives.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import affinity
from dymu_jax.models import backbones, branched, cost, serialize
from dymu_jax.models.branched import Tree

import random_variables as test_variables
from test_models_mlp import TASK_SPEC, write_tabular

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 6  # features
TASKS = (tasks_lib.regression("linear"), tasks_lib.regression("wave"),
         tasks_lib.classification("sign", 2))
HIDDEN = (16, 24)


@functools.lru_cache(maxsize=None)
def setup(head_batch_norm: bool = True):
  """(net, variables filled by numpy, vectors (5, D))."""
  net = branched.build_branched(TASKS, "mlp", backbone_kwargs={"hidden": HIDDEN}, head_width=8,
                                head_batch_norm=head_batch_norm)
  shapes = jax.eval_shape(net.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, D), jnp.float32))
  variables = test_variables.fill(shapes, seed=1)
  x = np.random.default_rng(0).normal(size=(5, D)).astype(np.float32)
  return net, variables, x


def trees(num_layers: int, num_tasks: int):
  """The separate tree, a shared trunk and two random trees."""
  rng = np.random.default_rng(3)
  out = [Tree.separate(num_layers, num_tasks), Tree.shared(num_layers, num_tasks, 1)]
  out += [Tree(tuple(tuple(int(p) for p in rng.integers(0, num_tasks, num_tasks))
                     for _ in range(num_layers))) for _ in range(2)]
  return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def tree_forward(net, variables, x, tree):
  return net.apply_tree(variables, x, tree, return_features=True)


def assert_close(a, b, atol=1e-5):
  chex.assert_trees_all_close(dict(a), {key: b[key] for key in a}, atol=atol, rtol=1e-5)


def test_mlp_blocks_and_their_variables():
  net, variables, x = setup()
  assert "mlp" in branched.BACKBONES and branched.DEFAULT_HEAD_HIDDEN_LAYERS["mlp"] == 1
  assert net.stack == "mlp" and net.input_kind == backbones.VECTORS
  assert net.num_layers == 2 and net.min_image_size == 1
  assert all(isinstance(b, branched.DenseBlock) for b in net.blocks)
  assert [b.features for b in branched.mlp_blocks()] == [256, 256]
  assert [b.features for b in branched.mlp_blocks(hidden=32)] == [32]
  assert not any(b.batch_norm for b in branched.mlp_blocks((8, 8), batch_norm=False))
  shapes = jax.tree.map(lambda a: a.shape, variables["params"])
  assert shapes["block0"]["dense"] == {"kernel": (3, D, 16)}  # batch norm: no bias
  assert shapes["block1"]["bn"] == {"scale": (3, 24), "bias": (3, 24)}
  assert shapes["head_sign"]["hidden0"]["kernel"] == (24, 8)
  assert shapes["head_sign"]["output"]["kernel"] == (8, 2)
  assert net.layer_input_shapes((D,)) == ((D,), (16,), (24,))
  # He initialisation like the MLP encoder; independent streams draw their own kernels.
  drawn = jax.jit(net.init, static_argnums=2)(jax.random.key(0), jnp.asarray(x), "independent")
  kernel = drawn["params"]["block0"]["dense"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])
  assert 0.5 < float(np.std(kernel)) * np.sqrt(D / 2.0) < 1.5
  # Images do not fit vector streams (and vectors not image streams): one sentence each.
  with pytest.raises(ValueError, match=r"BranchedNet with backbone 'mlp' expects feature "
                                       r"vectors of shape \(B, D\), got images"):
    net.apply_tree(variables, np.zeros((2, 4, 4, 1), np.float32), net.separate_tree())
  with pytest.raises(ValueError, match="leave them unset"):
    branched.build_branched(TASKS, "mlp", pixel_mean=(0.5,), pixel_std=(0.5,))
  with pytest.raises(ValueError, match="positive whole numbers"):
    branched.mlp_blocks(hidden=(16, 0))


def test_one_hot_soft_forward_equals_the_tree_forward_on_used_nodes_only():
  net, variables, x = setup()
  soft = jax.jit(lambda v, x_, nu: net.apply_soft(v, x_, nu, return_features=True))
  for tree in trees(net.num_layers, net.num_tasks):
    tree_predictions, tree_features = tree_forward(net, variables, x, tree)
    soft_predictions, soft_features = soft(variables, x, tree.one_hot())
    assert_close(tree_predictions, soft_predictions)
    for used, got, full in zip(tree.used_nodes(), tree_features, soft_features):
      assert got.shape == (len(used), 5, full.shape[-1])  # only the used nodes computed
      np.testing.assert_allclose(got, np.asarray(full)[list(used)], atol=1e-5)
  # Each stream alone is the plain MLP of its unstacked variables (stream 2, task "sign").
  h = x
  for l, block in enumerate(net.blocks):
    v = {col: jax.tree.map(lambda a: a[2], tree[f"block{l}"]) for col, tree in variables.items()
         if f"block{l}" in tree}
    h = block.apply(v, h)
  head = {col: tree["head_sign"] for col, tree in variables.items() if "head_sign" in tree}
  separate, _ = tree_forward(net, variables, x, net.separate_tree())
  np.testing.assert_allclose(separate["sign"], net.heads[2].apply(head, h), atol=1e-5)


def test_tree_cost_is_exact_and_matches_xla_cost_analysis():
  net, variables, x = setup()
  # Per example: blocks D*16 and 16*24 MACs; decoders 24*8 + 8*outputs (batch norm: no MACs).
  node_macs, head_macs = D * 16 + 16 * 24, 3 * 24 * 8 + 8 * (1 + 1 + 2)
  node_params = (D * 16 + 2 * 16) + (16 * 24 + 2 * 24)
  separate = net.tree_cost(net.separate_tree(), (D,))
  shared = net.tree_cost(net.shared_tree(1), (D,))
  assert separate.macs == 3 * node_macs + head_macs and shared.macs == node_macs + head_macs
  assert separate.params == cost.num_params(variables["params"])
  assert separate.params - shared.params == 2 * node_params
  flops = {}
  for tree in trees(net.num_layers, net.num_tasks):
    analytic = net.tree_cost(tree, (D,), exclude_padding=True)
    assert analytic == net.tree_cost(tree, (D,))  # no padding on vectors
    fn = lambda v, x_, t=tree: net.apply_tree(v, x_, t)
    flops[tree] = cost.xla_matmul_flops(fn, variables, x)
    assert analytic.macs * x.shape[0] == flops[tree] / 2, tree
  # The program of a shared trunk holds only the used nodes' work.
  assert flops[net.shared_tree(1)] < flops[net.separate_tree()]


def test_batch_norm_shifts_reach_mlp_blocks_and_decoder_hidden_layers():
  net, variables, x = setup()
  template = branched.batch_norm_shift_template(variables)
  assert set(template) == {"block0", "block1", "head_linear", "head_wave", "head_sign"}
  assert template["block1"]["bn"]["bias"].shape == (3, 24)
  assert template["head_wave"]["hidden0_bn"]["scale"].shape == (8,)
  run = jax.jit(lambda v, x_: net.apply_tree(v, x_, net.separate_tree()))
  anchor = run(variables, x)
  assert_close(anchor, run(branched.apply_batch_norm_shifts(variables, template), x), atol=0.0)
  # A shift of stream 2's block batch norm moves task "sign" only.
  delta = jax.tree.map(jnp.zeros_like, template)
  delta["block1"]["bn"]["bias"] = delta["block1"]["bn"]["bias"].at[2].set(1.0)
  moved = run(branched.apply_batch_norm_shifts(variables, delta), x)
  assert_close({k: anchor[k] for k in ("linear", "wave")}, moved)
  assert not np.allclose(anchor["sign"], moved["sign"])
  # A shift of a decoder's hidden batch norm moves its task only.
  delta = jax.tree.map(jnp.zeros_like, template)
  delta["head_wave"]["hidden0_bn"]["scale"] = jnp.full((8,), 0.5)
  moved = run(branched.apply_batch_norm_shifts(variables, delta), x)
  assert_close({k: anchor[k] for k in ("linear", "sign")}, moved)
  assert not np.allclose(anchor["wave"], moved["wave"])
  # Without batch norm in the blocks only the decoders have shifts.
  plain = branched.build_branched(TASKS, "mlp", head_width=8, head_batch_norm=True,
                                  backbone_kwargs={"hidden": (8,), "batch_norm": False})
  shapes = jax.eval_shape(plain.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, D), jnp.float32))
  assert set(branched.batch_norm_shift_template(shapes)) == {"head_linear", "head_wave",
                                                             "head_sign"}


def test_affinity_on_feature_vectors():
  net, variables, _ = setup()
  x = np.random.default_rng(1).normal(size=(12, D)).astype(np.float32)
  a = affinity.task_affinity(net, variables, x, num_images=12, normalisation="pair")
  assert a.shape == (3, 3)
  np.testing.assert_allclose(np.diag(a), 1.0, atol=1e-6)
  assert np.all((a >= 0) & (a <= 1 + 1e-6))
  with pytest.raises(ValueError, match=r"needs at least num_images=12 feature vectors"):
    affinity.task_affinity(net, variables, x.reshape(12, 2, 3, 1), num_images=12)


def dymu_method(stage: str, **options):
  """A DYMU method of the tiny MLP streams (nothing initialised)."""
  from dymu_jax.methods import dymu  # pylint: disable=g-import-not-at-top
  return dymu.build(TASKS, model_options={"backbone": "mlp", "backbone_kwargs": {"hidden": HIDDEN},
                                          "head_width": 8}, stage=stage, **options)


def test_affinity_is_the_artefact_of_the_edge_and_weight_stages(tmp_path):
  from dymu_jax.methods.dymu import stages as dymu_stages  # pylint: disable=g-import-not-at-top
  names = [t.name for t in TASKS]
  a = [[1.0, 0.25, 0.5], [0.3, 1.0, 0.125], [0.5, 0.2, 1.0]]
  edge = dymu_method("edge", affinity=a)
  # An empty folder (an evaluation's output): the method's A and w (none given), and the heat
  # map, whose title leaves out the normalisation and K the method does not know.
  out = tmp_path / "out"
  records = edge.artefacts({}, str(out), step=3)
  written = json.load(open(out / affinity.RECORD_FILE))
  assert written == {"tasks": names, "affinity": a, "task_weights": None}
  assert records == {"affinity": {**written, "file": str(out / affinity.RECORD_FILE),
                                  "heatmap": affinity.RECORD_PLOT}}
  assert (out / affinity.RECORD_PLOT).stat().st_size > 1000
  # Read back, it builds the same method; a second call rewrites nothing.
  assert dymu_method("edge", **dymu_stages.restored_options(str(out), 3)) == edge
  inodes = [(out / name).stat().st_ino for name in (affinity.RECORD_FILE, affinity.RECORD_PLOT)]
  assert edge.artefacts({}, str(out)) == records
  assert inodes == [(out / name).stat().st_ino
                    for name in (affinity.RECORD_FILE, affinity.RECORD_PLOT)]

  # The stage's own record (the edge hook's, signed): kept byte for byte and returned as it
  # is, for the weight stage built from it as for a method of another A; without `plot` no
  # heat map, with it the missing one drawn.
  stage = tmp_path / "weight"
  stage.mkdir()
  signed = {"tasks": names, "affinity": [[1.0, 0.5, 0.75], [0.5, 1.0, 0.25], [0.75, 0.25, 1.0]],
            "normalisation": "pair", "num_images": 16, "anchor_task_losses": [2.0, 1.0, 0.5],
            "task_weight_source": "held-out", "task_weights": [0.5, 1.0, 2.0],
            "signature": {"anchor_step": 3, "seed": 0}}
  (stage / affinity.RECORD_FILE).write_text(json.dumps(signed, indent=1))
  before = (stage / affinity.RECORD_FILE).read_bytes()
  options = dymu_stages.restored_options(str(stage), 3)
  assert options == {"affinity": signed["affinity"], "task_weights": (0.5, 1.0, 2.0)}
  weight = dymu_method("weight", **options)
  for method in (weight, edge):
    record = method.artefacts({}, str(stage), plot=False)["affinity"]
    assert record == {**signed, "file": str(stage / affinity.RECORD_FILE), "heatmap": None}
    assert (stage / affinity.RECORD_FILE).read_bytes() == before
  assert not (stage / affinity.RECORD_PLOT).exists()
  assert weight.artefacts({}, str(stage))["affinity"]["heatmap"] == affinity.RECORD_PLOT
  assert (stage / affinity.RECORD_PLOT).stat().st_size > 1000
  assert (stage / affinity.RECORD_FILE).read_bytes() == before
  # An unsigned record of other values (another run's evaluation) is replaced.
  record = weight.artefacts({}, str(out))["affinity"]
  assert json.load(open(out / affinity.RECORD_FILE)) == {
      "tasks": names, "affinity": signed["affinity"], "task_weights": [0.5, 1.0, 2.0]}
  assert record["affinity"] == signed["affinity"]
  with pytest.raises(ValueError, match=r"The affinity record in .* is for the tasks linear, "
                                       r"wave, sign, not a, b\."):
    affinity.write_artefact(str(stage), ["a", "b"], np.eye(2))

  # The trunk and the anchor have no affinity: nothing written.
  empty = tmp_path / "anchor"
  for stage_name in ("pretrain", "anchor"):
    assert dymu_method(stage_name).artefacts({}, str(empty)) == {}
  assert not empty.exists()


def test_cli_block_options_map_to_mlp_blocks():
  from dymu_jax.runs import settings  # pylint: disable=g-import-not-at-top
  values = {"method": "dymu", "backbone": "mlp", "head_width": 16, "head_batch_norm": True,
            "backbone_options": ["hidden=(16,16)", "batch_norm=false"], "task_weights": []}
  options = settings.model_options(values)
  assert options == {"backbone": "mlp", "head_width": 16, "head_batch_norm": True,
                     "backbone_kwargs": {"hidden": (16, 16), "batch_norm": False}}
  method = settings.build_method(values, TASKS)
  net = method.net
  assert [b.features for b in net.blocks] == [16, 16] and not net.blocks[0].batch_norm
  with pytest.raises(ValueError, match="which DYMU's mlp streams do not take; they take "
                                       "batch_norm, hidden"):
    settings.build_method({**values, "backbone_options": ["channel_divisor=2"]}, TASKS)


def run_cli(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_trains_and_evaluates_dymu_on_a_tabular_file(tmp_path):
  """Every DYMU stage on feature vectors, then the evaluation sweeps: the plumbing, not the
  learning."""
  path = write_tabular(tmp_path / "table.npz", n=160)
  workdir = tmp_path / "run"
  result = run_cli(
      "train", "--dataset=arrays", f"--data_dir={path}", f"--task_spec={TASK_SPEC}",
      "--backbone=mlp", '--backbone_options="hidden=(16,16)"', "--head_width=8",
      "--head_batch_norm", "--method=dymu", "--dymu_stage=all", "--dymu_anchor_init=trunk",
      "--dymu_pretrain_steps=2", "--dymu_stage_steps=2,2,2", "--dymu_validation_examples=16",
      "--dymu_task_weights=validation", "--dymu_edge_hidden=8", "--dymu_weight_hidden=8",
      "--dymu_embedding_features=4", "--dymu_affinity_images=16",
      "--dymu_affinity_normalisation=pair", "--dymu_temperature_every=1", "--batch_size=16",
      "--noprogress", "--log_every=1", "--checkpoint_every=2", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  summary = json.load(open(workdir / "summary.json"))
  assert set(summary["stages"]) == {"pretrain", "anchor", "edge", "weight"}
  record = json.load(open(workdir / "edge" / "dymu_affinity.json"))
  assert np.asarray(record["affinity"]).shape == (3, 3)
  # The edge and weight stages (only they) name the affinity as their artefact, the hook's
  # signed record kept (the weight stage's copy equal to it).
  for stage in ("edge", "weight"):
    assert f"wrote {workdir / stage / 'dymu_affinity.json'} (affinity)" in result.stdout
    assert json.load(open(workdir / stage / "dymu_affinity.json")) == record
  assert "signature" in record and result.stdout.count(" (affinity)") == 2
  result = run_cli("evaluate", f"--workdir={workdir}", "--eval_batch_size=16",
                   "--num_preferences=2", "--cost_preferences=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  results = json.load(open(workdir / "eval" / "results.json"))
  assert results["method"] == "dymu" and results["stage"] == "weight"
  for sweep in results["sweeps"]:
    for point in sweep["points"]:
      assert 0 < point["macs_fraction"] <= 1
      assert set(point["metrics"]) == {"linear", "wave", "sign"}

  # Export the tree for (r, c): a standalone network that takes raw rows and computes only the
  # tree's nodes; the anchor stage exports its separate streams.
  out = tmp_path / "tree"
  result = run_cli("export", f"--workdir={workdir}", "--preference=0.6,0.2,0.2",
                   "--resource=1", "--eval_batch_size=16", f"--output_dir={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "exported the dymu network: " in result.stdout
  network, variables, info = serialize.load_network(out)
  assert isinstance(network, branched.TreeNetwork)
  assert info["resource"] == 1.0 and info["tree"] == [list(p) for p in network.tree.parents]
  assert 0 < info["macs_fraction"] <= 1 and info["method"] == "dymu"
  rows = np.load(path)["inputs"][:4].astype(np.float32)
  predictions = network.apply(variables, rows)
  assert {k: v.shape for k, v in predictions.items()} == {"linear": (4, 1), "wave": (4, 1),
                                                          "sign": (4, 2)}
  stats = {k: np.asarray(v, np.float32) for k, v in info["input_stats"].items()}
  bare = branched.TreeNetwork(dataclasses.replace(network.net, pixel_mean=None,
                                                  pixel_std=None), network.tree)
  expected = bare.apply(variables, (rows - stats["mean"]) / stats["std"])
  for name in predictions:
    np.testing.assert_allclose(predictions[name], expected[name], rtol=1e-4, atol=1e-5)
  result = run_cli("export", f"--workdir={workdir / 'anchor'}", f"--output_dir={out}_anchor",
                   "--eval_batch_size=16")
  assert result.returncode == 0, result.stderr[-3000:]
  network, _, _ = serialize.load_network(f"{out}_anchor")
  assert network.tree == network.net.separate_tree()


def test_anchor_report_metrics_of_a_tree_equal_its_tree_forward():
  """The anchor report runs every probe tree as one-hot soft mixing (one compiled program for
  all of them): its metrics and losses equal those of the tree's own forward."""
  from dymu_jax.data import base as data_base  # pylint: disable=g-import-not-at-top
  from dymu_jax.methods.dymu import stages as dymu_stages  # pylint: disable=g-import-not-at-top
  from dymu_jax.metrics import tasks as metrics_lib  # pylint: disable=g-import-not-at-top
  net, variables, _ = setup()
  rng = np.random.default_rng(5)
  x = rng.normal(size=(12, D)).astype(np.float32)
  labels = {"linear": rng.normal(size=(12,)).astype(np.float32),
            "wave": rng.normal(size=(12,)).astype(np.float32),
            "sign": rng.integers(0, 2, 12).astype(np.int32)}
  batch = {"image": x, data_base.VALID_KEY: np.ones(12, bool), **labels}
  for tree in trees(net.num_layers, net.num_tasks):
    got = dymu_stages.tree_metrics(net, variables, tree, [batch])
    predictions = net.apply_tree(variables, x, tree)
    states = metrics_lib.update_all(metrics_lib.init_all(net.tasks), predictions, batch,
                                    net.tasks)
    expected = metrics_lib.compute_all(jax.device_get(states), net.tasks)
    for task in net.tasks:
      loss = float(task.loss(predictions[task.name], labels[task.name]))
      assert got[task.name]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), str(tree)
      for name, value in expected[task.name].items():
        assert got[task.name][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (str(tree), name)
