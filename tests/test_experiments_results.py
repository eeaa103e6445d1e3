"""The results page on fake run folders (summary.json, a checkpoint holding the saved flags, and
eval/results.json as `experiments.evaluate` writes them): seed groups with mean ± std and n,
Delta_m per seed against the single-task run of the same seed, the seed loop of the commands,
runs with another setting kept apart, and the cost-vs-hypervolume plot across methods."""

from __future__ import annotations

import json
import os

from absl import flags as absl_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import common
from experiments import results
from dymu_jax import results as results_lib
from dymu_jax.metrics import pareto
from dymu_jax.results import collect, plots, tables
from dymu_jax.train import checkpoint as checkpoint_lib


@pytest.fixture(scope="module", autouse=True)
def parsed_flags():
  absl_flags.FLAGS.unparse_flags()
  absl_flags.FLAGS(["results"])
  yield
  absl_flags.FLAGS.unparse_flags()


def flag_values(**changes):
  """The flags a training run saves, with `changes`."""
  own = ("workdirs", "output", "overwrite_tracked", "flags_dir", "copy_plots")  # the results page's, not training's
  values = {k: v for k, v in common.flag_values().items() if k not in own}
  return {**values, "dataset": "multi_mnist", "data_dir": "/data/mnist", **changes}


def write_run(root, name, values, summary, evaluation=None):
  """A finished run folder: its checkpoint (with the flags), summary.json, eval/results.json."""
  folder = root / name
  folder.mkdir(parents=True)
  values = {**values, "workdir": str(folder)}
  with checkpoint_lib.Checkpointer(folder, async_save=False) as checkpointer:
    checkpointer.manager.save(1, args=ocp.args.Composite(**{
        checkpoint_lib.STATE: ocp.args.StandardSave({"x": np.zeros(2, np.float32)}),
        checkpoint_lib.METADATA: ocp.args.JsonSave({"run": {"flags": values}, "step": 1})}))
    checkpointer.wait()
  with open(folder / "summary.json", "w") as f:
    json.dump({"method": values["method"], "dataset": values["dataset"], **summary}, f)
  if evaluation is not None:
    (folder / "eval").mkdir()
    with open(folder / "eval" / "results.json", "w") as f:
      json.dump({"workdir": str(folder), "step": 1, "tasks": ["left", "right"],
                 "primary_metric": {"left": "accuracy", "right": "accuracy"}, **evaluation}, f)
  return folder


def fixed_summary(left, right, seconds):
  return {"steps": 100, "seconds": seconds,
          "eval": {"full": {"left": {"accuracy": left, "loss": 1.0},
                            "right": {"accuracy": right, "loss": 1.0}}}}


FIXED_COST = {"inference_macs": 2_000_000, "params": 50_000,
              "training_macs_per_example": 6_000_000}


def sweep(losses, uniformity, variant, resource=None, fractions=None):
  points = [{"preference": [r, 1 - r], "metrics": {}} for r in np.linspace(0, 1, len(losses))]
  for point, fraction in zip(points, fractions or []):
    point["macs_fraction"] = fraction
  out = {"variant": variant, "resource": resource, "points": points, "losses": losses,
         "uniformity": uniformity, "rank_controllability": 0.5, "delta_m": -1.0}
  if fractions:
    out["mean_macs_fraction"] = float(np.mean(fractions))
    out["distinct_trees"] = len(set(fractions))
  return out


PHN_LOSSES = [[[0.2, 1.0], [0.5, 0.5], [1.0, 0.2]],
              [[0.3, 1.0], [0.5, 0.6], [1.0, 0.3]],
              [[0.4, 1.0], [0.6, 0.6], [1.0, 0.4]]]
DYMU_LOSSES = [[0.1, 1.2], [0.4, 0.4], [1.2, 0.1]]
DYMU_FRACTIONS = [1.0, 0.5, 0.75]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
  root = tmp_path_factory.mktemp("workdirs")
  seconds = [60.0, 120.0, 180.0]
  # Single-task seeds 0, 1, 2 (the Delta_m reference) and static seeds 0, 1, 2: left accuracy
  # +10%, +20%, +30% over the single-task run of the same seed, right equal -> Delta_m 5, 10, 15.
  for seed, (single, static) in enumerate(zip([0.5, 0.6, 0.7], [0.55, 0.72, 0.91])):
    write_run(root, f"mm_single_s{seed}", flag_values(method="single_task", seed=seed),
              fixed_summary(single, 0.8, seconds[seed]), {"method": "single_task",
                                                         "cost": FIXED_COST})
    write_run(root, f"mm_static_s{seed}", flag_values(method="static", seed=seed),
              fixed_summary(static, 0.8, seconds[seed]), {"method": "static",
                                                         "cost": FIXED_COST})
  # Another learning rate: its own group; seed 5 has no single-task run -> their mean (0.6).
  write_run(root, "mm_static_lr", flag_values(method="static", seed=5, learning_rate=0.01),
            fixed_summary(0.66, 0.8, 30.0), {"method": "static", "cost": FIXED_COST})
  # PHN seeds 0, 1, 2: one network each.
  for seed, (losses, uniformity) in enumerate(zip(PHN_LOSSES, [0.8, 0.82, 0.84])):
    write_run(root, f"mm_phn_s{seed}", flag_values(method="phn", seed=seed),
              {"steps": 100, "seconds": 60.0, "eval": {}},
              {"method": "phn", "sweeps": [sweep(losses, uniformity, "phn")],
               "cost": {"inference_macs": 1_500_000, "params": 40_000}})
  # DYMU, one seed: edge at c = 0 and 1; c = 1 has a cost band of the points within 0.8.
  dymu_sweeps = [sweep(DYMU_LOSSES, 0.7, "edge", 0.0, [1.0, 1.0, 1.0]),
                 sweep(DYMU_LOSSES, 0.6, "edge", 1.0, DYMU_FRACTIONS)]
  dymu_sweeps[1]["cost_band"] = {"min_macs_fraction": 0.0, "max_macs_fraction": 0.8,
                                 "hypervolume": 0.123, "num_points": 2}
  write_run(root, "mm_dymu", flag_values(method="dymu", dymu_stage="all"),
            {"steps": 300, "seconds": 600.0, "eval": {}},
            {"method": "dymu", "sweeps": dymu_sweeps, "resources": [0.0, 1.0],
             "cost": {"full_macs": 4_000_000, "full_params": 100_000, "by_resource": [
                 {"resource": 0.0, "mean_macs_fraction": 1.0, "mean_params_fraction": 1.0,
                  "distinct_trees": 1},
                 {"resource": 1.0, "mean_macs_fraction": 0.7, "mean_params_fraction": 0.75,
                  "distinct_trees": 3}]}})
  # ECMT seeds 0 and 1: budgets 0.5 and 1.
  for seed in (0, 1):
    budgets = [{"budget": b, "max_macs": int(b * 3_000_000) - seed * 1000,
                "mean_macs": b * 2_900_000, "within_budget": True,
                "mean_metric": {"left": 0.8 + 0.02 * seed, "right": 0.7},
                "rank_controllability": 0.9, "delta_m": -2.0, "mean_normalised_metric": 0.95,
                "losses": [[0.3 + seed * 0.1, 0.9], [0.9, 0.3]], "uniformity": 0.7}
               for b in (0.5, 1.0)]
    write_run(root, f"mm_ecmt_s{seed}", flag_values(method="ecmt", seed=seed),
              {"steps": 100, "seconds": 60.0, "eval": {}},
              {"method": "ecmt", "budgets": budgets, "full_macs": 3_000_000,
               "reference": "the SuperNet", "mean_rank_controllability": 0.9,
               "budget_check": {"budgets": 4, "searches": 40, "over_budget": 0},
               "seconds": 30.0})
  defaults = results.training_defaults()
  found, notes = results_lib.load_runs([str(root / "*")], defaults)
  assert len(found) == 13 and not notes
  output = str(root.parent / "docs" / "results.md")
  text = results_lib.render(found, notes, output, results.FLAGS.flags_dir, plots=True,
                            defaults=defaults, reference_method="single_task")
  return text, output, found


def row_of(text, name):
  (row,) = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
  return row


def test_seed_group_shows_mean_std_and_n(page):
  text, _, _ = page
  row = row_of(text, "mm_static_s{0,1,2}")
  # left accuracy 0.55, 0.72, 0.91: mean 0.72667, sample std 0.18009.
  assert "left accuracy 0.7267 ± 0.18 (n=3)" in row
  assert "right accuracy 0.8 (n=3)" in row  # equal in every run: no ±
  # Delta_m per seed against the single-task run of the same seed: 5, 10, 15.
  assert "| +10.00 ± 5.00 (n=3) |" in row
  assert "| 2.00 M (n=3) |" in row  # inference MACs, the same in every run
  assert "| 2.0 min ± 1.0 min (n=3) |" in row  # 60, 120, 180 s
  assert row.endswith("| 0, 1, 2 (n=3) |")
  single = row_of(text, "mm_single_s{0,1,2}")
  assert "left accuracy 0.6 ± 0.1 (n=3)" in single and "| +0.00 (n=3) |" in single
  assert "the same seed (seeds 0, 1, 2)" in text
  # PHN: uniformity 0.8, 0.82, 0.84; HV against the page's one reference point.
  phn = row_of(text, "mm_phn_s{0,1,2}")
  assert "| 0.82 ± 0.02 (n=3) |" in phn and phn.endswith("| 0, 1, 2 (n=3) |")
  reference = pareto.default_reference(np.concatenate([np.asarray(l) for l in PHN_LOSSES]
                                                      + [np.asarray(DYMU_LOSSES)] * 2))
  hvs = [pareto.hypervolume(np.asarray(l), reference) for l in PHN_LOSSES]
  assert f"| {np.mean(hvs):.4g} ± {np.std(hvs, ddof=1):.2g} (n=3) |" in phn
  # ECMT seeds 0 and 1: left 0.8 and 0.82 -> 0.81 ± 0.014.
  assert "### ECMT: `mm_ecmt_s{0,1}` (seeds 0, 1)" in text
  (half,) = [line for line in text.splitlines() if line.startswith("| 0.5 |")]
  assert "| yes |" in half and "| 0.81 ± 0.014 (n=2) |" in half
  assert "80 searches over 4 budgets (all runs)" in text and "Seeds: 0, 1 (n=2)." in text


def test_a_lone_run_shows_its_value_and_n_1(page):
  text, _, _ = page
  # Seed 5 has no single-task run: against the single-task mean, left 0.66 vs 0.6 -> +5.
  row = row_of(text, "mm_static_lr")
  assert "left accuracy 0.66," in row and "| +5.00 |" in row and "| 0.5 min |" in row
  assert row.endswith("| 5 (n=1) |")
  dymu = [line for line in text.splitlines() if line.startswith("| `mm_dymu` |")]
  assert len(dymu) == 2 and all(line.endswith("| 0 (n=1) |") for line in dymu)
  assert "| 2.80 M (0.700) |" in dymu[1]  # the cost of c = 1: 0.7 of the anchor's MACs


def test_commands_loop_over_the_seeds(page):
  text, _, _ = page
  lines = text.splitlines()
  (loop,) = [l for l in lines if l.startswith("for seed in 0 1 2; do python -m experiments."
                                              "train") and "/mm_static_s${seed}; done" in l]
  assert "--seed=${seed}" in loop and "--learning_rate" not in loop
  assert "# mm_static_s{0,1,2}: seeds 0, 1, 2" in lines
  assert any(l.startswith("for seed in 0 1 2; do python -m experiments.evaluate --workdir=")
             and l.endswith("/mm_phn_s${seed}; done") for l in lines)
  (lone,) = [l for l in lines if l.startswith("python -m experiments.train")
             and "mm_static_lr" in l]
  assert "--learning_rate=0.01" in lone and "--seed=5" in lone
  assert "--data_dir" in lone  # per machine: kept in the command, not in the grouping


def test_other_settings_are_not_grouped(page):
  _, _, found = page
  static = [r for r in found if r["values"]["method"] == "static"]
  groups = collect.group_runs(static)
  assert [g["name"] for g in groups] == ["mm_static_lr", "mm_static_s{0,1,2}"]
  assert [g["seeds"] for g in groups] == [[5], [0, 1, 2]]
  a, b = static[1]["values"], static[2]["values"]  # seeds 0 and 1
  assert collect.same_config(a, {**b, "data_dir": "/elsewhere"})
  assert not collect.same_config(a, {**b, "learning_rate": 0.02})
  assert not collect.same_config({**a, "dymu_anchor_dir": ""}, {**a, "dymu_anchor_dir": "/x"})
  assert collect.same_config({**a, "dymu_anchor_dir": "/x/a"}, {**a, "dymu_anchor_dir": "/y/a"})
  assert collect.brace_name(["a_s0", "a_s1", "a_s10"]) == "a_s{0,1,10}"
  assert collect.seed_loop(["x --seed=10 --w=r10", "x --seed=11 --w=r11"], [10, 11]) == (
      "for seed in 10 11; do x --seed=${seed} --w=r${seed}; done")
  assert collect.seed_loop(["x --seed=0 --w=a", "x --seed=1 --w=b"], [0, 1]) is None


def test_cost_vs_hypervolume_plot(page):
  text, output, found = page
  path = os.path.join(os.path.splitext(output)[0], "multi_mnist_cost_vs_hv.png")
  assert os.path.getsize(path) > 1000
  assert "![cost_vs_hv](results/multi_mnist_cost_vs_hv.png)" in text
  groups = collect.group_runs(found)
  controllable = [g for g in groups if g["kind"] != "fixed"]
  reference = tables.shared_hv_reference(tables.runs_of(controllable))
  series = {s["label"]: s for s in plots.cost_hv_series(controllable, reference)}
  assert set(series) == {"PHN: mm_phn_s{0,1,2}", "DYMU edge: mm_dymu", "ECMT: mm_ecmt_s{0,1}"}
  (phn,) = series["PHN: mm_phn_s{0,1,2}"]["points"]
  hvs = [pareto.hypervolume(np.asarray(l), reference) for l in PHN_LOSSES]
  assert phn["n"] == 3 and phn["x"] == 1_500_000 and phn["x_std"] == 0
  assert phn["y"] == pytest.approx(np.mean(hvs)) and phn["y_std"] == pytest.approx(
      np.std(hvs, ddof=1))
  dymu = {p["label"]: p for p in series["DYMU edge: mm_dymu"]["points"]}
  assert set(dymu) == {"c=0", "c=1", "c=1 band <= 0.80"}
  assert dymu["c=1"]["x"] == pytest.approx(np.mean(DYMU_FRACTIONS) * 4_000_000)
  # The band: the points at fractions 0.5 and 0.75, at the page's reference.
  band = dymu["c=1 band <= 0.80"]
  assert band["band"] and band["x"] == pytest.approx(0.8 * 4_000_000)
  assert band["y"] == pytest.approx(pareto.hypervolume(np.asarray(DYMU_LOSSES[1:]), reference))
  ecmt = series["ECMT: mm_ecmt_s{0,1}"]["points"]
  assert [p["label"] for p in ecmt] == ["b=0.5", "b=1"] and all(p["n"] == 2 for p in ecmt)


def test_point_labels_at_one_spot_do_not_cover_each_other():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots()
  ax.plot([0, 100], [0, 100])
  # Two bands of one run at the same cost and nearly the same HV, and a label far from both.
  plots._annotate_apart(ax, [(95, 50.0, "c=0 band <= 0.60", "C0"),
                             (95, 50.2, "c=1 band <= 0.60", "C0"),
                             (10, 90.0, "n=3", "C1")])
  offsets = {a.get_text(): a.xyann[1] for a in ax.texts}
  plt.close(fig)
  assert offsets["n=3"] == 4 and offsets["c=1 band <= 0.60"] == 4  # the higher one stays
  assert offsets["c=0 band <= 0.60"] <= 4 - 1.3 * 7  # moved down a whole line


def test_cost_band_is_optional(page):
  _, _, found = page
  (dymu,) = [r for r in found if r["name"] == "mm_dymu"]
  evaluation = {**dymu["eval"], "sweeps": [{k: v for k, v in s.items() if k != "cost_band"}
                                           for s in dymu["eval"]["sweeps"]]}
  run = {**dymu, "eval": evaluation}
  group = {"runs": [run], "name": "mm_dymu"}
  reference = tables.shared_hv_reference([run])
  (series,) = plots.cost_hv_series([group], reference)
  assert [p["label"] for p in series["points"]] == ["c=0", "c=1"]
  # A band whose points cannot be picked again, at another reference point: left out; at the
  # page's reference point: its own hypervolume.
  band = {"min_macs_fraction": 0.0, "max_macs_fraction": 0.8, "hypervolume": 0.123,
          "num_points": 3}
  sweeps = [dict(s, cost_band=band) for s in evaluation["sweeps"]]
  for own, expected in (([9.0, 9.0], []), (reference, [0.123, 0.123])):
    run = {**dymu, "eval": {**evaluation, "sweeps": sweeps, "hypervolume_reference": own}}
    (series,) = plots.cost_hv_series([{"runs": [run], "name": "mm_dymu"}], reference)
    assert [p["y"] for p in series["points"] if p["band"]] == expected


def test_one_reference_point_when_the_evaluations_agree(page):
  _, _, found = page
  controllable = [r for r in found if collect.run_kind(r) != "fixed"]
  source = "the 2-task Multi-MNIST default (2, 2)"
  agreed = [{**r, "eval": {**r["eval"], "hypervolume_reference": [2.0, 2.0],
                           "hypervolume_reference_source": source}} for r in controllable]
  assert tables.shared_hv_reference(agreed) == [2.0, 2.0]
  assert tables.hv_reference_text(agreed, [2.0, 2.0], "loss") == (
      f"[2.0, 2.0] (the point every evaluation here used: {source})")
  agreed[0]["eval"]["hypervolume_reference"] = [3.0, 2.0]  # one disagrees: just worse than all
  reference = tables.shared_hv_reference(agreed)
  assert reference == tables.shared_hv_reference(controllable) != [2.0, 2.0]
  assert "(just worse than every loss)" in tables.hv_reference_text(agreed, reference, "loss")


def test_delta_m_takes_the_evaluation_only_against_the_same_seed(page):
  _, _, found = page
  groups = {g["name"]: g for g in collect.group_runs(found)}
  single = groups["mm_single_s{0,1,2}"]
  run = next(r for r in found if r["name"] == "mm_static_s1")
  for reference_run, expected in (("mm_single_s1", 3.0), ("mm_single_s0", 10.0)):
    workdir = next(r["workdir"] for r in found if r["name"] == reference_run)
    measured = {**run, "eval": {**run["eval"], "delta_m": 3.0, "reference_workdir": workdir}}
    assert tables.run_delta_m(measured, single) == pytest.approx(expected)
  assert tables.run_delta_m({**run, "eval": {"delta_m": 3.0}}, None) == 3.0


def test_output_defaults_beside_the_runs_and_tracked_pages_need_consent(tmp_path):
  runs_root = tmp_path / "workdirs"
  assert results.output_path(None, [str(runs_root / "a"), str(runs_root / "b")]) == str(
      runs_root / "results.md")
  assert results.output_path("x/page.md", []) == os.path.abspath("x/page.md")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if os.path.isdir(os.path.join(root, ".git")):  # a clone: README.md is committed
    assert results.is_tracked(os.path.join(root, "README.md"))
  page = tmp_path / "page.md"
  page.write_text("untracked")
  assert not results.is_tracked(str(page)) and not results.is_tracked(str(tmp_path / "none.md"))
