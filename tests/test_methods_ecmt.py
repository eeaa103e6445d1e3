"""ECMT: sandwich sampling, one compiled step, CI-KD, mutual learning, BN recalibration, search.

Networks are tiny (LeNet with batch norm on 28 px for the train step, a one-block ResNet with
8-32 channels on 16 px for the dense path) so that the file stays fast on a shared CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dymu_jax import data, methods, train
from dymu_jax import files as files_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax.methods import ecmt
from dymu_jax.models import DynamicWidths, WidthConfig, channels, cost
from dymu_jax.train import state as state_lib

import random_variables as test_variables

LENET = {"backbone": "lenet", "head_width": 16, "backbone_kwargs": {"batch_norm": True}}
RESNET = {"backbone": "resnet_small", "head_width": 16, "atrous_rates": (1,),
          "image_pooling": False,
          "backbone_kwargs": {"stage_channels": (8, 16, 16, 32), "stage_sizes": (1, 1, 1, 1)}}
DIGITS = (tasks_lib.classification("left", 10), tasks_lib.classification("right", 10))
LENET_SHAPE = (28, 28, 1)


def digits_batch(seed: int, size: int = 8) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(size=(size, *LENET_SHAPE)).astype(np.float32),
          "left": rng.integers(0, 10, size).astype(np.int32),
          "right": rng.integers(0, 10, size).astype(np.int32)}


def lenet_method(**options) -> ecmt.ECMTMethod:
  return methods.build("ecmt", DIGITS, model_options=LENET, method_options=options)


def random_variables(method, image_shape, seed: int = 0):
  """Variables with the shapes `method.init` gives, filled by numpy (nothing is compiled)."""
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda x: method.init(jax.random.key(0), {"image": x}), images)
  return test_variables.fill(shapes, seed)


def split(variables):
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


@pytest.fixture(scope="module")
def lenet_table():
  return ecmt.build_cost_table(lenet_method().model, LENET_SHAPE)


@pytest.fixture(scope="module")
def dense():
  """(method with mutual learning on segmentation + edges, a batch, variables)."""
  config = data.DataConfig(name="synthetic", image_size=16, num_train=8, num_test=8)
  source = data.load(config, "train").with_tasks("segmentation,edges")
  batch = source.get(np.arange(4))
  method = methods.build("ecmt", source.tasks, model_options=RESNET,
                         method_options={"kd": "mutual"})
  return method, batch, random_variables(method, (16, 16, 3))


# ----------------------------------------------------------------------------------------------
# Sampling and the compiled step.


def test_sandwich_has_max_and_min_every_step_and_random_rows_vary():
  method = lenet_method(num_subnets=4)
  key = jax.random.PRNGKey(3)
  top = len(method.width_choices) - 1
  rows = []
  sandwich = jax.jit(method.sandwich)
  for step in range(6):
    sampled = sandwich(jax.random.fold_in(key, step))
    assert sampled.encoder.shape == (4, 3) and sampled.decoders.shape == (4, 2)
    np.testing.assert_array_equal(sampled.encoder[0], top)
    np.testing.assert_array_equal(sampled.decoders[0], top)
    np.testing.assert_array_equal(sampled.encoder[1], 0)
    np.testing.assert_array_equal(sampled.decoders[1], 0)
    random = np.concatenate([sampled.encoder[2:], sampled.decoders[2:]], axis=1)
    assert random.min() >= 0 and random.max() <= top
    rows.append(random)
  assert len({r.tobytes() for r in rows}) > 1  # the random configurations change per step
  again = sandwich(jax.random.fold_in(key, 0))  # same key, same configurations
  np.testing.assert_array_equal(np.concatenate([again.encoder[2:], again.decoders[2:]], 1),
                                rows[0])


def test_train_step_compiles_once_whatever_configs_are_drawn():
  # One task and no batch norm: the cheapest network to compile on a shared CPU.
  method = methods.build("ecmt", DIGITS[:1], model_options={"backbone": "lenet",
                                                             "head_width": 16},
                         method_options={"num_subnets": 3})
  optimizer = optax.adam(1e-3)
  par = train.Parallel("mesh")
  run_key = np.asarray(jax.random.PRNGKey(7))  # a host copy: the step donates its state
  state = par.place_state(state_lib.create(random_variables(method, LENET_SHAPE), optimizer,
                                           jnp.asarray(run_key)))
  start_params = jax.tree.map(np.asarray, state.params)
  step_fn = par.compile_step(method, optimizer)
  batches = [par.shard_batch(digits_batch(s)) for s in range(4)]
  with train.CompileCounter() as compiles:
    for b in batches:
      state, metrics = step_fn(state, b)
  assert compiles.count == 1
  drawn = {np.asarray(method.sandwich(jax.random.fold_in(run_key, s)).encoder[2]).tobytes()
           for s in range(4)}
  assert len(drawn) > 1  # different SubNets ran through the same program
  metrics = {k: float(v) for k, v in metrics.items()}
  assert np.isfinite(metrics["loss"]) and metrics["kd"] > 0
  assert {"loss/left", "loss/max", "loss/min", "loss/random", "kd_distance"} <= set(metrics)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                       start_params)
  assert max(jax.tree.leaves(moved)) > 0


# ----------------------------------------------------------------------------------------------
# CI-KD and mutual learning.


def test_ci_kd_is_off_at_zero_weight_and_added_otherwise():
  batch = digits_batch(1)
  on, off, none = (lenet_method(num_subnets=2, **o)
                   for o in ({}, {"lambda_kd": 0.0}, {"kd": "none"}))
  params, state = split(random_variables(on, LENET_SHAPE))
  key = jax.random.PRNGKey(5)
  run = jax.jit(lambda p, s, b: [m.loss(p, s, b, key, 0) for m in (on, off, none)])
  (total_on, (aux_on, _)), (total_off, (aux_off, _)), (total_none, (aux_none, _)) = run(
      params, state, batch)
  assert float(aux_on["kd"]) > 0
  np.testing.assert_allclose(total_on, aux_on["task_loss"] + aux_on["kd_distance"], rtol=1e-6)
  for total, aux in ((total_off, aux_off), (total_none, aux_none)):
    assert float(aux["kd"]) == 0.0
    np.testing.assert_allclose(total, aux["task_loss"], rtol=1e-6)
    np.testing.assert_allclose(aux["task_loss"], aux_on["task_loss"], rtol=1e-6)
  # The task loss is the mean over the K = 2 configurations of the weighted task sums.
  mean = (aux_on["loss/max"] + aux_on["loss/min"]) / 2
  np.testing.assert_allclose(aux_on["task_loss"], mean, rtol=1e-5)


def test_ci_kd_gradient_never_reaches_the_teacher():
  rng = np.random.default_rng(0)
  teacher = [jnp.asarray(rng.normal(size=(2, 3, 3, 16)), jnp.float32),
             jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)]
  student = [jnp.asarray(rng.normal(size=(2, 3, 3, 8)), jnp.float32),
             jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)]
  g_teacher, g_student = jax.grad(ecmt.ci_kd_loss, argnums=(0, 1))(teacher, student)
  assert all(float(jnp.abs(g).max()) == 0 for g in g_teacher)
  assert all(float(jnp.abs(g).max()) > 0 for g in g_student)
  # By hand: mean of per-stage MSEs over the student's channels.
  expected = np.mean([np.mean((np.asarray(teacher[0])[..., :8] - np.asarray(student[0]))**2),
                      np.mean((np.asarray(teacher[1]) - np.asarray(student[1]))**2)])
  np.testing.assert_allclose(ecmt.ci_kd_loss(teacher, student), expected, rtol=1e-6)
  # Masked layout: full width, zeros beyond the active channels, which must not count.
  padded = [jnp.pad(student[0], ((0, 0), (0, 0), (0, 0), (0, 8))), student[1]]
  active = [jnp.asarray(8, jnp.int32), jnp.asarray(8, jnp.int32)]
  np.testing.assert_allclose(ecmt.ci_kd_loss(teacher, padded, active), expected, rtol=1e-6)


def test_ci_kd_spares_supernet_only_channels_and_mutual_learning_trains_them():
  """With K = 2 (max, min): the fc channels beyond the smallest width feed only the SuperNet.

  CI-KD's teacher is a stop-gradient, so its term leaves them untouched; mutual learning also
  makes the SuperNet match the SubNet, so its term trains them (knowledge flows both ways).
  """
  method = lenet_method(kd="mutual", num_subnets=2)
  batch = digits_batch(2)
  params, state = split(random_variables(method, LENET_SHAPE))

  def terms(p):
    aux = method.loss(p, state, batch, jax.random.PRNGKey(0), 0)[1][0]
    return jnp.stack([aux["kd"], aux["mutual"]])

  grads = jax.jit(jax.jacrev(terms))(params)
  fc = np.asarray(grads["encoder"]["fc"]["kernel"])  # (2, ..., 50): d kd, d mutual
  kept = channels(50, min(method.width_choices))
  assert np.abs(fc[0, ..., :kept]).max() > 0 and np.abs(fc[1, ..., :kept]).max() > 0
  assert np.abs(fc[0, ..., kept:]).max() == 0.0  # CI-KD: nothing reaches the teacher
  assert np.abs(fc[1, ..., kept:]).max() > 0.0  # mutual: the SuperNet learns from the SubNet


def test_mutual_loss_is_two_way_and_zero_for_equal_predictions():
  kinds = (tasks_lib.classification("c", 4), tasks_lib.segmentation("s", 3),
           tasks_lib.edges("e"), tasks_lib.depth("d"), tasks_lib.normals("n"),
           tasks_lib.regression("r"))
  rng = np.random.default_rng(1)
  shape = {"c": (2, 4), "s": (2, 3, 3, 3), "e": (2, 3, 3, 1), "d": (2, 3, 3, 1),
           "n": (2, 3, 3, 3), "r": (2, 1)}
  a = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shape.items()}
  b = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shape.items()}

  @jax.jit
  def check(a, b):
    same = {t.name: ecmt.prediction_distance(t, a[t.name], a[t.name], 2.0) for t in kinds}
    apart = {t.name: ecmt.prediction_distance(t, a[t.name], b[t.name], 2.0) for t in kinds}
    # One direction: the target is a stop-gradient.
    to_target = jax.grad(lambda y: sum(ecmt.prediction_distance(t, a[t.name], y[t.name])
                                       for t in kinds))(b)
    both = jax.grad(lambda x, y: ecmt.mutual_loss(kinds, x, y, 2.0), argnums=(0, 1))(a, b)
    return same, apart, to_target, both

  same, apart, to_target, (ga, gb) = check(a, b)
  for task in kinds:
    assert float(same[task.name]) == pytest.approx(0.0, abs=1e-6)
    assert float(apart[task.name]) > 0
    assert float(jnp.abs(to_target[task.name]).max()) == 0.0
    assert float(jnp.abs(ga[task.name]).max()) > 0 and float(jnp.abs(gb[task.name]).max()) > 0
  # Classification in numpy: T^2 KL(softmax(b/T) || softmax(a/T)), mean over examples.
  t = 2.0
  softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
  p, q = softmax(np.asarray(b["c"]) / t), softmax(np.asarray(a["c"]) / t)
  expected = t**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(ecmt.prediction_distance(kinds[0], a["c"], b["c"], t), expected,
                             rtol=1e-5)


def test_masked_subnet_terms_equal_the_static_sliced_subnet(dense):
  method, batch, variables = dense
  config = WidthConfig((1.0, 0.25, 1.0, 0.5), (0.5, 1.0))
  teacher_predictions, teacher_features = method.model.apply(
      variables, batch["image"], train=True, return_features=True, mutable=["batch_stats"])[0]

  def terms(widths):
    return method.subnet_terms(variables, batch, widths, teacher_features, teacher_predictions)

  static = jax.jit(lambda: terms(config))()
  masked = jax.jit(terms)(DynamicWidths.from_config(config, method.width_choices))
  assert set(static) == {"loss/segmentation", "loss/edges", "task_total", "kd", "mutual"}
  for key in static:
    np.testing.assert_allclose(masked[key], static[key], rtol=1e-5, atol=1e-6)
  assert float(static["kd"]) > 0 and float(static["mutual"]) > 0


# ----------------------------------------------------------------------------------------------
# Batch-norm recalibration.


def test_recalibration_sets_running_statistics_to_the_batch_statistics():
  method = lenet_method()
  b1, b2 = digits_batch(3), digits_batch(4)
  variables = random_variables(method, LENET_SHAPE)
  config = WidthConfig((0.25, 0.75, 0.5), (0.25, 1.0))
  new = ecmt.recalibrate_bn(method, variables, config, [b1])
  old_mean = np.asarray(variables["batch_stats"]["encoder"]["bn_fc"]["mean"])
  new_mean = np.asarray(new["batch_stats"]["encoder"]["bn_fc"]["mean"])
  used = channels(50, 0.5)
  assert np.abs(new_mean[:used] - old_mean[:used]).max() > 1e-3  # re-estimated
  np.testing.assert_array_equal(new_mean[used:], old_mean[used:])  # unused channels kept
  # One batch: eval-mode outputs (running statistics) equal train-mode outputs on that batch.
  evaluated = method.predict(new, b1["image"], {"widths": config})
  trained, _ = method.model.apply(new, b1["image"], widths=config, train=True,
                                  mutable=["batch_stats"])
  for name in ("left", "right"):
    np.testing.assert_allclose(evaluated[name], trained[name], rtol=1e-4, atol=1e-4)
  # Two batches: the exact mean of the per-batch statistics (cumulative average).
  second = ecmt.recalibrate_bn(method, variables, config, [b2])
  both = ecmt.recalibrate_bn(method, variables, config, iter([b1, b2]))
  expected = jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / 2,
                          new["batch_stats"], second["batch_stats"])
  for x, y in zip(jax.tree.leaves(both["batch_stats"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="recalibrate_bn needs at least one batch"):
    ecmt.recalibrate_bn(method, variables, config, [])


# ----------------------------------------------------------------------------------------------
# Cost table and search.


def test_cost_table_matches_direct_counts_and_round_trips(dense, lenet_table, tmp_path):
  method = dense[0]
  path = tmp_path / "cost_table.json"
  table = ecmt.cached_cost_table(method.model, (16, 16, 3), path=path)
  rng = np.random.default_rng(0)
  for model, shape, tab in ((method.model, (16, 16, 3), table),
                            (lenet_method().model, LENET_SHAPE, lenet_table)):
    images = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    configs = [WidthConfig.sample(rng, model.num_stages, len(model.tasks)) for _ in range(2)]
    for config in configs + [model.smallest_widths()]:
      counted = cost.count(model, None, images, widths=config, train=False)
      assert tab.cost(config) == counted == cost.count(model.sliced(config), None, images,
                                                       train=False)
  assert lenet_table.full_macs > lenet_table.smallest_macs > 0
  # The per-layer model agrees with counting every configuration (two choices: 8 encoders).
  small = methods.build("ecmt", DIGITS, model_options=LENET,
                        method_options={"width_choices": (0.5, 1.0)}).model
  fast, slow = (ecmt.build_cost_table(small, LENET_SHAPE, direct=d) for d in (False, True))
  np.testing.assert_array_equal(fast.encoder_macs, slow.encoder_macs)
  np.testing.assert_array_equal(fast.decoder_macs, slow.decoder_macs)
  np.testing.assert_array_equal(fast.encoder_params, slow.encoder_params)
  np.testing.assert_array_equal(fast.decoder_params, slow.decoder_params)
  assert path.exists()
  again = ecmt.CostTable.load(path)
  assert again.signature == table.signature
  np.testing.assert_array_equal(again.encoder_macs, table.encoder_macs)
  np.testing.assert_array_equal(again.decoder_macs, table.decoder_macs)
  assert again.encoder_configs == table.encoder_configs
  np.testing.assert_array_equal(again.decoder_params, table.decoder_params)
  # A file written before parameters were kept is rebuilt, with a message.
  record = again.to_json()
  del record["encoder_params"], record["decoder_params"]
  files_lib.write_json(path, record)
  assert ecmt.cached_cost_table(method.model, (16, 16, 3), path=path) is not None
  np.testing.assert_array_equal(ecmt.CostTable.load(path).encoder_params, table.encoder_params)
  # A file written for another network or image size is replaced.
  record = again.to_json()
  record["signature"] = "another network"
  ecmt.CostTable.from_json(record).save(path)
  ecmt.cached_cost_table(method.model, (16, 16, 3), path=path)
  assert ecmt.CostTable.load(path).signature == table.signature


@pytest.mark.parametrize("which", ["lenet", "dense"])
def test_search_stays_within_budget_from_smallest_to_full(which, lenet_table, dense):
  table = lenet_table if which == "lenet" else ecmt.cached_cost_table(dense[0].model,
                                                                      (16, 16, 3))
  rng = np.random.default_rng(1)
  fractions = np.linspace(table.smallest_macs / table.full_macs, 1.0, 9)
  budgets = [float(f) for f in fractions] + [table.smallest_macs, table.full_macs,
                                             (table.smallest_macs + table.full_macs) // 2]
  for budget in budgets:
    for preference in [(0.5, 0.5), (1.0, 0.0)] + [tuple(rng.dirichlet((1, 1)))
                                                  for _ in range(3)]:
      config = ecmt.search(preference, budget, cost_table=table)
      limit = ecmt.budget_macs(budget, table)
      assert table.macs(config) <= limit
  assert ecmt.budget_macs(0.5, table) == table.full_macs // 2  # even MAC counts here
  assert ecmt.budget_macs(table.smallest_macs / table.full_macs, table) == table.smallest_macs
  full = WidthConfig.full(table.num_stages, len(table.task_names))
  assert ecmt.search((0.5, 0.5), 1.0, cost_table=table) == full
  assert ecmt.search((0.3, 0.7), 1.0, cost_table=table, preference_cap=False) == full
  # With the preference cap (default), the full budget still narrows the less preferred decoder.
  capped = ecmt.search((0.3, 0.7), 1.0, cost_table=table)
  assert capped.encoder == full.encoder and capped.decoders[1] == 1.0
  assert capped.decoders[0] < 1.0


def test_search_reserves_room_for_the_decoders(lenet_table):
  table = lenet_table
  minimum = table.encoder_macs + table.decoder_macs[:, :, 0].sum(axis=1)
  span = table.decoder_macs[:, :, -1].sum(axis=1) - table.decoder_macs[:, :, 0].sum(axis=1)
  # A budget just below the full encoder with half of its decoder span: the full encoder fits
  # with the smallest decoders but would leave them less than the reserve.
  budget = int(minimum[-1] + 0.5 * span[-1]) - 1
  scores = {e: float(i) for i, e in enumerate(table.encoder_configs)}  # the full one is best
  chosen = ecmt.search((0.8, 0.2), budget, cost_table=table, scores=scores)
  assert chosen.encoder != table.encoder_configs[-1]
  e = table.encoder_index(chosen.encoder)
  assert budget - minimum[e] >= 0.5 * span[e]
  # Without a reserve the best-scored encoder wins and the decoders are squeezed.
  squeezed = ecmt.search((0.8, 0.2), budget, cost_table=table, scores=scores,
                         decoder_reserve=0.0)
  assert squeezed.encoder == table.encoder_configs[-1]
  with pytest.raises(ValueError, match=r"decoder_reserve must lie in \[0, 1\], got 1.5"):
    ecmt.search((0.5, 0.5), 1.0, cost_table=table, decoder_reserve=1.5)


def test_preference_cap_steers_decoders_when_the_budget_does_not_bind(lenet_table):
  table = lenet_table
  encoder = table.encoder_configs[-1]
  full_budget = table.full_macs
  widths = [ecmt.allocate_decoders((r, 1 - r), full_budget, encoder, cost_table=table)[0]
            for r in (0.05, 0.2, 0.35, 0.5, 0.8)]
  assert widths == sorted(widths) and widths[0] < widths[-1] == 1.0
  uncapped = [ecmt.allocate_decoders((r, 1 - r), full_budget, encoder, cost_table=table,
                                     preference_cap=False)[0] for r in (0.05, 0.5)]
  assert uncapped == [1.0, 1.0]


def test_search_gives_wider_decoders_to_preferred_tasks_monotonically(lenet_table):
  table = lenet_table
  rng = np.random.default_rng(2)
  encoders = [table.encoder_configs[i] for i in (0, 21, 42, len(table.encoder_configs) - 1)]
  for encoder in encoders:
    e = table.encoder_index(encoder)
    low = int(table.encoder_macs[e] + table.decoder_macs[e, :, 0].sum())
    high = int(table.encoder_macs[e] + table.decoder_macs[e, :, -1].sum())
    for budget in np.linspace(low, high, 6).astype(int).tolist():
      for _ in range(8):
        r = rng.dirichlet((0.7, 0.7))
        task = int(rng.integers(2))
        raised = r * (1 - 0.4)
        raised[task] += 0.4
        before = ecmt.allocate_decoders(r, budget, encoder, cost_table=table)
        after = ecmt.allocate_decoders(raised, budget, encoder, cost_table=table)
        assert after[task] >= before[task], (encoder, budget, r, raised)
  # Decoders compete for what the full encoder leaves: the preferred task gets the wider one.
  encoder = table.encoder_configs[-1]
  e = table.encoder_index(encoder)
  half = int(table.encoder_macs[e] + table.decoder_macs[e, :, 0].sum()
             + (table.decoder_macs[e, :, -1] - table.decoder_macs[e, :, 0]).sum() // 2)
  left = ecmt.allocate_decoders((0.9, 0.1), half, encoder, cost_table=table)
  right = ecmt.allocate_decoders((0.1, 0.9), half, encoder, cost_table=table)
  assert left[0] > left[1] and right[1] > right[0]


def test_search_picks_the_best_scored_encoder_that_fits(lenet_table):
  table = lenet_table
  budget = 0.8
  limit = ecmt.budget_macs(budget, table)
  minimum = table.encoder_macs + table.decoder_macs[:, :, 0].sum(axis=1)
  fits = [table.encoder_configs[i] for i in np.nonzero(minimum <= limit)[0]]
  too_big = table.encoder_configs[-1]
  assert too_big not in fits
  favourite = fits[len(fits) // 2]
  scores = {e: 0.1 for e in fits}
  scores[favourite], scores[too_big] = 0.9, 1.0
  assert ecmt.search((0.5, 0.5), budget, cost_table=table, scores=scores).encoder == favourite


def test_search_and_budget_messages(lenet_table):
  table = lenet_table
  smallest = table.smallest_macs
  below = (rf"is below the {smallest:,} MACs \(a fraction {smallest / table.full_macs:.4g} of "
           rf"the SuperNet\) of the smallest configuration\.$")
  with pytest.raises(ValueError, match=rf"^The budget of {smallest - 1:,} MACs {below}"):
    ecmt.search((0.5, 0.5), smallest - 1, cost_table=table)
  with pytest.raises(ValueError, match=rf"^The budget of 0\.01 of the SuperNet's "
                                       rf"{table.full_macs:,} MACs \([\d,]+ MACs\) {below}"):
    ecmt.search((0.5, 0.5), 0.01, cost_table=table)
  with pytest.raises(ValueError, match=r"^The preference \(0\.5, 0\.6\) is not on the simplex: "
                                       r"entries must be >= 0 and sum to 1 "
                                       r"\(they sum to 1\.1\)\.$"):
    ecmt.search((0.5, 0.6), 1.0, cost_table=table)
  with pytest.raises(ValueError, match=r"preference \(1\.2, -0\.2\) is not on the simplex"):
    ecmt.search((1.2, -0.2), 1.0, cost_table=table)
  with pytest.raises(ValueError, match=r"preference has 3 entries .* but there are 2 tasks "
                                       r"\(left, right\)"):
    ecmt.search((0.2, 0.3, 0.5), 1.0, cost_table=table)
  with pytest.raises(ValueError, match=r"fractional budget must lie in \(0, 1\]"):
    ecmt.search((0.5, 0.5), 1.5, cost_table=table)
  with pytest.raises(ValueError, match="A budget in MACs must be positive, got 0"):
    ecmt.search((0.5, 0.5), 0, cost_table=table)
  with pytest.raises(ValueError, match="budget must be MACs .* got True"):
    ecmt.search((0.5, 0.5), True, cost_table=table)
  encoder = table.encoder_configs[-1]
  with pytest.raises(ValueError, match=r"below the .* of encoder \(1\.0, 1\.0, 1\.0\) with "
                                       r"the smallest decoders"):
    ecmt.allocate_decoders((0.5, 0.5), smallest, encoder, cost_table=table)


# ----------------------------------------------------------------------------------------------
# Controls, prediction and construction.


def test_predict_runs_the_configuration_the_controls_select(lenet_table):
  method = dataclasses.replace(lenet_method(), cost_table=lenet_table)
  batch = digits_batch(5, size=2)
  variables = random_variables(method, LENET_SHAPE)
  controls = {"preference": (0.8, 0.2), "budget": 0.8}
  chosen = ecmt.search((0.8, 0.2), 0.8, cost_table=lenet_table)
  assert lenet_table.macs(chosen) <= 0.8 * lenet_table.full_macs
  # Under jit the controls are a static value (the Evaluator passes a hashable copy).
  got = jax.jit(method.predict, static_argnums=2)(variables, batch["image"],
                                                   tuple(controls.items()))
  want = method.model.apply(variables, batch["image"], widths=chosen)
  for name in ("left", "right"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
  assert method.resolve_controls({"encoder": chosen.encoder, "decoders": chosen.decoders}) == (
      chosen)
  assert method.resolve_controls(None) == method.full_widths()
  assert [method.resolve_controls(c) for c in method.eval_controls()] == [
      method.full_widths(), method.smallest_widths()]
  with pytest.raises(ValueError, match=r"ECMT controls must be .* got keys \['budget'\]"):
    method.resolve_controls({"budget": 0.5})
  with pytest.raises(ValueError, match="Width multiplier 0.3 of the encoder is not an allowed"):
    method.resolve_controls({"widths": WidthConfig((0.3, 1.0, 1.0), (1.0, 1.0))})


def test_build_options_and_messages():
  method = lenet_method(num_subnets=5, lambda_kd=0.5, kd="mutual", lambda_mutual=0.2,
                        width_choices=(1.0, 0.5))
  assert "ecmt" in methods.METHODS
  assert (method.num_subnets, method.lambda_kd, method.kd, method.lambda_mutual) == (
      5, 0.5, "mutual", 0.2)
  assert method.width_choices == method.model.width_choices == (0.5, 1.0)
  with pytest.raises(ValueError, match="Unknown ECMT option\\(s\\) lamda_kd; allowed: "):
    lenet_method(lamda_kd=1.0)
  # Checked by ecmt.Config through the registry, before anything is built.
  with pytest.raises(ValueError, match="ECMT options: num_subnets=1 must be a whole number >= 2"):
    lenet_method(num_subnets=1)
  with pytest.raises(ValueError, match="kd='both' is not allowed; choose one of ci_kd, mutual, "
                                       "none"):
    lenet_method(kd="both")
  with pytest.raises(ValueError, match="lambda_kd=-1.0 must be a finite number >= 0"):
    lenet_method(lambda_kd=-1.0)
  # And by the method itself when built directly.
  with pytest.raises(ValueError, match="num_subnets must be an integer >= 2"):
    ecmt.ECMTMethod(DIGITS, lenet_method().model, num_subnets=1,
                    width_choices=lenet_method().width_choices)
  with pytest.raises(ValueError, match="width_choices must be distinct multipliers"):
    lenet_method(width_choices=(0.5, 0.5))
  with pytest.raises(ValueError, match="Got 3 task weights for 2 tasks"):
    methods.build("ecmt", DIGITS, model_options=LENET, task_weights=(1, 1, 1))
  model = lenet_method().model
  with pytest.raises(ValueError, match="The model's width_choices .* must equal the method's"):
    ecmt.ECMTMethod(DIGITS, model, width_choices=(0.5, 1.0))
