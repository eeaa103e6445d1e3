"""DYMU on dense prediction: the anchor and edge stages on the synthetic scenes' four dense tasks.

One loss and gradient per stage on a 16 px batch of two scenes, with 4- and 8-channel
resnet_small streams and dense heads of width 4 (one atrous rate), so that the file stays fast
on a shared CPU; variables are filled by numpy (nothing but the steps is compiled).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dymu_jax import methods
from dymu_jax.methods import dymu
from dymu_jax.data import synthetic
from dymu_jax.models.decoders import DenseHead

import random_variables as test_variables

TASKS = synthetic.tasks()  # segmentation, depth, normals, edges
MODEL = {"backbone": "resnet_small", "head_width": 4, "atrous_rates": (1,),
         "backbone_kwargs": {"stage_channels": (4, 8), "stage_sizes": (1, 1)}}
HYPER = {"edge_hidden": (8,), "embedding_features": 4}


@functools.lru_cache(maxsize=None)
def scenes() -> dict:
  return synthetic.SyntheticScenes("train", num_examples=2, image_size=16).get(np.arange(2))


def shapes_of(batch):
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def loss_and_grads(method, variables, batch):
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  step = jax.jit(jax.value_and_grad(method.loss, has_aux=True))
  (loss, (aux, _)), grads = step(params, state, batch, jax.random.key(1), 0)
  return float(loss), aux, grads


def assert_finite_and_moving(grads):
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in leaves)


def test_anchor_and_edge_stages_train_and_predict_on_dense_tasks():
  batch = scenes()
  anchor = methods.build("dymu", TASKS, model_options=MODEL,
                         method_options={"stage": "anchor", "anchor_init": "shared"})
  assert all(isinstance(h, DenseHead) for h in anchor.net.heads)
  variables = test_variables.fill(jax.eval_shape(anchor.init, jax.random.key(0),
                                                 shapes_of(batch)), seed=1)
  loss, aux, grads = loss_and_grads(anchor, variables, batch)
  assert np.isfinite(loss) and set(aux) == {f"loss/{t.name}" for t in TASKS}
  assert_finite_and_moving(grads["head_normals"])
  assert_finite_and_moving(grads["block0"])
  predictions = anchor.predict(variables, batch["image"])
  assert {k: v.shape for k, v in predictions.items()} == {
      "segmentation": (2, 16, 16, 5), "depth": (2, 16, 16, 1), "normals": (2, 16, 16, 3),
      "edges": (2, 16, 16, 1)}

  edge = methods.build("dymu", TASKS, model_options=MODEL, method_options={
      "stage": "edge", "affinity": np.eye(len(TASKS)), **HYPER})
  shapes = jax.eval_shape(edge.init, jax.random.key(0), shapes_of(batch))
  edge_variables = {"params": test_variables.fill(shapes["params"], seed=3),
                    **dymu.stage_variables(anchor=variables)}
  loss, aux, grads = loss_and_grads(edge, edge_variables, batch)
  assert np.isfinite(loss) and np.isfinite(float(aux["omega"]))
  assert_finite_and_moving(grads["edge_hypernet"])
  tree = edge.controller(edge_variables).tree((0.25,) * 4, 0.5)
  cost = edge.net.tree_cost(tree, (16, 16, 3))
  assert 0 < cost.macs <= cost.full_macs


def test_anchor_on_the_nyud_and_pascal_context_layouts(tmp_path):
  """The readers' layouts (fixture folders as `test_data_nyud` / `test_data_pascal_context`
  write them) feed DYMU's dense anchor: every task of each dataset gets a dense head, and
  one loss and gradient is finite and reaches every head."""
  from dymu_jax import data as data_lib
  import test_data_nyud
  import test_data_pascal_context
  for name, write in (("nyud", test_data_nyud.write_nyud),
                      ("pascal_context", test_data_pascal_context.write_pascal)):
    folder = write(tmp_path / name)
    source = data_lib.load(data_lib.DataConfig(name=name, data_dir=folder, image_size=16),
                           "train")
    batch = source.get(np.arange(2))
    batch[data_lib.base.VALID_KEY] = np.ones(2, bool)
    anchor = methods.build("dymu", source.tasks, model_options=MODEL,
                           method_options={"stage": "anchor", "anchor_init": "shared"})
    assert len(anchor.net.heads) == len(source.tasks) >= 4
    assert all(isinstance(h, DenseHead) for h in anchor.net.heads), name
    variables = test_variables.fill(jax.eval_shape(anchor.init, jax.random.key(0),
                                                   shapes_of(batch)), seed=1)
    loss, aux, grads = loss_and_grads(anchor, variables, batch)
    assert np.isfinite(loss), name
    for task in source.tasks:
      assert np.isfinite(float(aux[f"loss/{task.name}"])), (name, task.name)
      assert_finite_and_moving(grads[f"head_{task.name}"])
