"""Forward latency of exported ECMT SubNets next to their analytic MACs.

  python -m benchmarks.subnet_latency                                   # synthetic, 4 dense tasks
  python -m benchmarks.subnet_latency --dataset=utkface --data_dir=../shared/data/utkface
  python -m benchmarks.subnet_latency --dataset=multi_mnist --data_dir=../shared/data/mnist \
      --backbone=lenet --head_width=50 --batch=256

For every budget (a fraction of the SuperNet's MACs): `ecmt.search` picks the width
configuration for the preference (uniform unless `--preference`), `ecmt.slice_subnet` cuts it
out of the SuperNet, and `models.serialize` saves and loads it, so the timed network is the
exported one (a `MultiTaskNet` run at its own full widths, built from `network.json` alone).
Latency does not depend on the weights, so the SuperNet is randomly initialised (`--seed`).

Timing: every network's evaluation-mode forward is compiled first and run `--warmup` times;
then `--repeats` rounds each run every network once in turn (`block_until_ready`), so load from
other processes hits all of them alike, and the median per network is reported. Ratios are
against the SuperNet's own full-width forward. The last line checks that every SubNet with a
MAC ratio >= 0.25 has a latency ratio <= 1.3 x its MAC ratio (fixed costs that MACs do not
count, such as kernel launches, pooling, normalisation and the dense heads' bilinear
upsampling, make small SubNets relatively slower). "XLA ratio" is the ratio of XLA's whole-
program flop counts (elementwise work included), for telling such work from overheads.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from dymu_jax import controls
from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax.methods import ecmt
from dymu_jax.models import backbones, cost, serialize

_DATASET = flags.DEFINE_string("dataset", "synthetic", "Dataset whose tasks and images to use.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of the dataset (not for synthetic).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side length (0: the dataset's).")
_BACKBONE = flags.DEFINE_enum("backbone", "resnet_small", list(backbones.REGISTRY),
                              "Backbone of the SuperNet.")
_BACKBONE_OPTIONS = flags.DEFINE_list(
    "backbone_options", [], "Backbone options as name=value pairs, e.g. 'channel_divisor=2'.")
_HEAD_WIDTH = flags.DEFINE_integer("head_width", 64, "Full hidden width of every decoder.")
_HEAD_BN = flags.DEFINE_bool("head_batch_norm", False,
                             "Batch norm in the MLP heads' hidden layers (as utkface_ecmt.flags).")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size of the timed forward.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed rounds (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed runs per network after compilation.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.25", "0.5", "0.75", "1.0"],
                             "Budgets as fractions of the SuperNet's MACs.")
_PREFERENCE = flags.DEFINE_string(
    "preference", "uniform", "'uniform' or one comma-separated weight per task (on the simplex).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random SuperNet weights.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None, "Keep the exported SubNets here (one folder per budget); default: a "
    "temporary folder, removed afterwards.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the table as JSON to this file.")

# The check of the last line: SubNets at least this fraction of the SuperNet's MACs ...
MIN_MAC_RATIO = 0.25
# ... must have a latency ratio at most this multiple of their MAC ratio.
MAX_LATENCY_OVER_MACS = 1.3


def parse_value(text: str) -> Any:
  """A backbone option value: true/false, an int, a float, or the text itself."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
  options = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep or not name.strip():
      raise app.UsageError(f"--backbone_options entry {pair!r} is not name=value.")
    options[name.strip()] = parse_value(value.strip())
  return options


def parse_preference(text: str, num_tasks: int) -> tuple[float, ...]:
  if text.strip().lower() == "uniform":
    return (1.0 / num_tasks,) * num_tasks
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise app.UsageError(f"--preference must be 'uniform' or {num_tasks} comma-separated "
                         f"numbers, got {text!r}.") from None


def parse_budgets(texts: Sequence[str]) -> list[float]:
  try:
    return [float(t) for t in texts]
  except ValueError:
    raise app.UsageError(f"--budgets must be fractions in (0, 1], got {texts}.") from None


def compile_forward(net, variables, x):
  """(compiled evaluation forward, compile seconds, XLA flops of the program)."""
  start = time.perf_counter()
  compiled = jax.jit(lambda v, x_: net.apply(v, x_, train=False)).lower(variables, x).compile()
  return compiled, time.perf_counter() - start, cost.compiled_flops(compiled)


def time_round_robin(programs: Sequence[tuple[Any, tuple]], warmup: int, repeats: int
                     ) -> list[float]:
  """Median seconds per call of each (compiled, args), timed in interleaved rounds."""
  for compiled, args in programs:
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
  timings = [[] for _ in programs]
  for _ in range(repeats):
    for i, (compiled, args) in enumerate(programs):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      timings[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in timings]


def fmt_widths(config) -> str:
  return (f"{'/'.join(f'{m:g}' for m in config.encoder)} | "
          f"{'/'.join(f'{m:g}' for m in config.decoders)}")


def main(argv):
  del argv
  budgets = parse_budgets(_BUDGETS.value)
  config = data_lib.DataConfig(name=_DATASET.value, data_dir=_DATA_DIR.value,
                               image_size=_IMAGE_SIZE.value, num_train=_BATCH.value,
                               num_test=_BATCH.value)
  source = data_lib.load(config, "test")
  tasks, image_shape = source.tasks, tuple(source.image_shape)
  model_options = {"backbone": _BACKBONE.value, "head_width": _HEAD_WIDTH.value,
                   "head_batch_norm": _HEAD_BN.value}
  backbone_options = parse_options(_BACKBONE_OPTIONS.value)
  if backbone_options:
    model_options["backbone_kwargs"] = backbone_options
  method = methods_lib.build("ecmt", tasks, model_options=model_options)
  model = method.model
  preference = parse_preference(_PREFERENCE.value, len(tasks))
  controls.check_preference(preference, [t.name for t in tasks])  # one sentence if off the simplex

  # Real test images when there are enough (latency does not depend on them).
  images = np.asarray(source.get(np.arange(min(len(source), _BATCH.value)))["image"],
                      np.float32)
  if images.shape[0] < _BATCH.value:
    images = np.random.default_rng(_SEED.value).uniform(
        size=(_BATCH.value, *image_shape)).astype(np.float32)
  x = jax.device_put(images)
  variables = jax.jit(lambda k, im: model.init(k, im, train=False))(
      jax.random.key(_SEED.value), x[:1])
  table = ecmt.cached_cost_table(model, image_shape)
  full_macs = table.full_macs

  device = jax.devices()[0]
  print(f"Device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} "
        f"device(s), {os.cpu_count()} host CPUs, load average "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}).")
  print(f"{_DATASET.value}: tasks {', '.join(t.name for t in tasks)}; images "
        f"{'x'.join(map(str, image_shape))}; {_BACKBONE.value} SuperNet"
        f"{' ' + str(backbone_options) if backbone_options else ''}, head_width "
        f"{_HEAD_WIDTH.value}; batch "
        f"{_BATCH.value}; preference {tuple(round(p, 4) for p in preference)}; median of "
        f"{_REPEATS.value} interleaved rounds after {_WARMUP.value} warm-up runs.")

  rows: list[dict[str, Any]] = []
  programs = []
  compiled, compile_s, flops = compile_forward(model, variables, x)
  rows.append({"budget": None, "label": "SuperNet", "widths": model.full_widths(),
               "macs": full_macs, "compile_s": compile_s, "xla_flops": flops})
  programs.append((compiled, (variables, x)))
  with tempfile.TemporaryDirectory() as tmp:
    root = _EXPORT_DIR.value or tmp
    for budget in budgets:
      try:
        widths = ecmt.search(preference, budget, cost_table=table)
      except ValueError as e:  # below the smallest SubNet: reported, not timed
        rows.append({"budget": budget, "label": f"{budget:g}", "error": str(e)})
        continue
      sub, sub_variables = ecmt.slice_subnet(model, variables, widths, image_shape)
      directory = os.path.join(root, f"budget_{budget:g}")
      macs = table.macs(widths)
      serialize.save_network(directory, sub, sub_variables, image_shape=image_shape, extra={
          "widths": widths, "macs": macs, "mac_ratio": macs / full_macs,
          "preference": preference, "budget": budget, "dataset": _DATASET.value,
          "source": f"random SuperNet initialisation, seed {_SEED.value}"})
      del sub, sub_variables  # time what was loaded, nothing else
      net, net_variables, _ = serialize.load_network(directory)
      counted = cost.count(net, net_variables, x[:1], train=False).macs
      if counted != macs:
        raise AssertionError(f"The exported SubNet at budget {budget:g} counts {counted:,} MACs "
                             f"but the cost table says {macs:,}.")
      compiled, compile_s, flops = compile_forward(net, net_variables, x)
      rows.append({"budget": budget, "label": f"{budget:g}", "widths": widths, "macs": macs,
                   "compile_s": compile_s, "xla_flops": flops})
      programs.append((compiled, (net_variables, x)))
    medians = iter(time_round_robin(programs, _WARMUP.value, _REPEATS.value))
  timed = [r for r in rows if "error" not in r]
  for row in timed:
    row["latency_ms"] = next(medians) * 1e3
  full_ms, full_flops = timed[0]["latency_ms"], timed[0]["xla_flops"]
  for row in timed:
    row["mac_ratio"] = row["macs"] / full_macs
    row["latency_ratio"] = row["latency_ms"] / full_ms
    row["latency_over_macs"] = row["latency_ratio"] / row["mac_ratio"]
    row["xla_ratio"] = row["xla_flops"] / full_flops if full_flops else float("nan")

  header = (f"{'budget':<8} {'widths (encoder | decoders)':<40} {'MMACs/ex':>9} "
            f"{'MAC ratio':>9} {'ms/batch':>9} {'lat ratio':>9} {'lat/MAC':>8} "
            f"{'XLA ratio':>9} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  for row in rows:
    if "error" in row:
      print(f"{row['label']:<8} skipped: {row['error']}")
      continue
    print(f"{row['label']:<8} {fmt_widths(row['widths']):<40} {row['macs'] / 1e6:>9.3f} "
          f"{row['mac_ratio']:>9.3f} {row['latency_ms']:>9.2f} {row['latency_ratio']:>9.3f} "
          f"{row['latency_over_macs']:>8.2f} {row['xla_ratio']:>9.3f} {row['compile_s']:>9.2f}")
  checked = [r for r in timed[1:] if r["mac_ratio"] >= MIN_MAC_RATIO]
  failing = [r for r in checked if r["latency_ratio"] > MAX_LATENCY_OVER_MACS * r["mac_ratio"]]
  ok = not failing
  print(f"Every SubNet with MAC ratio >= {MIN_MAC_RATIO} ({len(checked)} of them) has latency "
        f"ratio <= {MAX_LATENCY_OVER_MACS} x MAC ratio: {'YES' if ok else 'NO'}"
        + ("" if ok else " (budgets " + ", ".join(r["label"] for r in failing) + " exceed it)")
        + ".")

  unchecked = [r for r in timed[1:] if r["mac_ratio"] < MIN_MAC_RATIO]
  if unchecked:
    print("Not checked (MAC ratio below " + str(MIN_MAC_RATIO) + "): " + "; ".join(
        f"budget {r['label']} (MAC ratio {r['mac_ratio']:.3f}, latency ratio "
        f"{r['latency_ratio']:.3f} = {r['latency_over_macs']:.2f} x MAC ratio)"
        for r in unchecked) + ".")

  if _JSON_OUT.value:
    record = {
        "device": {"kind": device.device_kind, "backend": jax.default_backend(),
                   "count": jax.device_count(), "host_cpus": os.cpu_count(),
                   "load_average": list(os.getloadavg())},
        "dataset": _DATASET.value, "image_shape": list(image_shape),
        "backbone": _BACKBONE.value, "backbone_options": backbone_options,
        "head_width": _HEAD_WIDTH.value, "batch": _BATCH.value, "repeats": _REPEATS.value,
        "warmup": _WARMUP.value, "preference": list(preference), "seed": _SEED.value,
        "full_macs": full_macs,
        "rows": [{**{k: v for k, v in r.items() if k != "widths"},
                  **({"encoder": list(r["widths"].encoder),
                      "decoders": list(r["widths"].decoders)} if "widths" in r else {})}
                 for r in rows],
        "check": {"min_mac_ratio": MIN_MAC_RATIO, "max_latency_over_macs": MAX_LATENCY_OVER_MACS,
                  "passed": ok, "failing_budgets": [r["budget"] for r in failing]},
    }
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)
    print(f"Wrote {_JSON_OUT.value}.")


if __name__ == "__main__":
  app.run(main)
