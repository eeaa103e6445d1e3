"""CPU train-step speed of the project against the same model and step in PyTorch (eager).

  python -m benchmarks.step_speed                       # both models, synthetic batches
  python -m benchmarks.step_speed --models=lenet --repeats=5 --steps=20
  python -m benchmarks.step_speed --cpus=1              # both frameworks on one core
  python -m benchmarks.step_speed --data=real --mnist_dir=../shared/data/mnist \
      --utkface_dir=../shared/data/utkface

Models (the static multi-task baseline, Adam at 1e-3, one optimizer step per batch):

* `lenet`: Multi-MNIST LeNet (`--backbone=lenet --head_width=50`): conv 10@9x9, max-pool,
  conv 20@5x5, max-pool, dense 50, two 10-way MLP heads; 36x36x1 images, batch 256.
* `resnet_small`: UTKFace ResNet-small (stages 16-32-64-128, two blocks each, batch norm),
  32x32x3 images, three MLP heads (age L1 regression, gender 2-way, race 5-way), batch
  `--resnet_batch` (64 as the UTKFace experiments).

Timed steps ("frameworks"):

* `project`: the compiled, state-donating step that `dymu_jax.train.train` runs
  (`methods.build` + `Parallel.compile_step`), fed device batches;
* `plain`: the same step traced within `models.fast_ops.plain()`, i.e. without the library's
  CPU rewrites (the "before" of the speed work, measured under the same load);
* `torch`: the same network, losses and Adam in plain eager PyTorch (NCHW, float32,
  `torch.optim.Adam`), with the faster of 1 thread and one per core (`--torch_threads`): on a
  loaded machine OpenMP's spinning threads can make two threads several times slower than one.

Each model is timed in `--repeats` rounds that ALTERNATE the frameworks (plain, project, torch,
plain, project, torch, ...) so that load from other processes hits all alike; each run is
`--steps` steps after the warm-up. The table shows samples/s as the median over rounds, the
speed-up project / plain and the ratio project / torch of the medians (> 1: the project is
faster), and every run's figure.

Synthetic batches (uniform [0, 1) images, uniform labels; default) are used unless
`--data=real`, which reads the first batches of the real training sets. Batches are placed on
the device before timing in both frameworks, so the figures are the step alone.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import numpy as np

from dymu_jax import data as data_lib
from dymu_jax import methods as methods_lib
from dymu_jax import tasks as tasks_lib
from dymu_jax import train as train_lib
from dymu_jax.data import multi_mnist, utkface
from dymu_jax.models import fast_ops
from dymu_jax.train import state as state_lib

_MODELS = flags.DEFINE_list("models", ["lenet", "resnet_small"], "Models to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Alternating rounds (the median is reported).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps before the first round.")
_LENET_BATCH = flags.DEFINE_integer("lenet_batch", 256, "LeNet batch size.")
_RESNET_BATCH = flags.DEFINE_integer("resnet_batch", 64, "ResNet-small batch size.")
_RESNET_HEAD = flags.DEFINE_integer("resnet_head_width", 64, "ResNet-small head width.")
_DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"], "Batches to feed.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", "../shared/data/mnist", "MNIST IDX folder.")
_UTKFACE_DIR = flags.DEFINE_string("utkface_dir", "../shared/data/utkface", "UTKFace folder.")
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", ["plain", "project", "torch"],
    "What to time, in this order within a round: plain (the project's step without the CPU "
    "rewrites of models/fast_ops.py), project, torch (needs `torch`).")
_CPUS = flags.DEFINE_integer(
    "cpus", 0, "Pin the process to this many cores before XLA starts (0: all); with 1 both "
    "frameworks run single-threaded, which is robust to other load on the machine.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0,
    "PyTorch intra-op threads; 0 picks the faster of 1 and one per usable core, per model.")
nan = float("nan")
_NUM_BATCHES = 4  # distinct batches cycled through (the same ones in both frameworks)


# -- models and batches ----------------------------------------------------------------------

SPECS = {
    "lenet": dict(tasks=multi_mnist.TASKS, image_shape=(36, 36, 1), backbone="lenet",
                  head_width=50, dataset="multi_mnist"),
    "resnet_small": dict(tasks=utkface.TASKS, image_shape=(32, 32, 3), backbone="resnet_small",
                         head_width=None, dataset="utkface"),
}


def batch_size(model: str) -> int:
  return _LENET_BATCH.value if model == "lenet" else _RESNET_BATCH.value


def head_width(model: str) -> int:
  return SPECS[model]["head_width"] or _RESNET_HEAD.value


def make_batches(model: str, size: int) -> list[dict[str, np.ndarray]]:
  """`_NUM_BATCHES` host batches in the project's batch layout (NHWC images in [0, 1])."""
  spec = SPECS[model]
  if _DATA.value == "real":
    data_dir = _MNIST_DIR.value if model == "lenet" else _UTKFACE_DIR.value
    config = data_lib.DataConfig(name=spec["dataset"], data_dir=data_dir,
                                 num_train=size * _NUM_BATCHES, num_test=16)
    batcher = data_lib.Batcher(data_lib.load(config, "train"), size, seed=0)
    return [batcher.batch(i) for i in range(_NUM_BATCHES)]
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(_NUM_BATCHES):
    batch = {"image": rng.random((size,) + spec["image_shape"], dtype=np.float32)}
    for task in spec["tasks"]:
      if task.kind == tasks_lib.CLASSIFICATION:
        batch[task.name] = rng.integers(0, task.num_outputs, size).astype(np.int32)
      else:  # age in years
        batch[task.name] = rng.uniform(1, 90, size).astype(np.float32)
    batches.append(batch)
  return batches


# -- the project's step ----------------------------------------------------------------------


def project_runner(model: str, batches, plain: bool = False, with_hlo: bool = False):
  """`run(num_steps) -> seconds` of the project's compiled train step.

  With `plain`, the step is traced within `fast_ops.plain()`: the project's step without its
  CPU rewrites (XLA convolutions, `jnp.max` pooling, autodiff batch norm), i.e. "before".
  With `with_hlo`, returns `(run, optimised HLO text of the step)`.
  """
  spec = SPECS[model]
  method = methods_lib.build(
      "static", spec["tasks"],
      model_options={"backbone": spec["backbone"], "head_width": head_width(model)})
  return step_runner(method, batches, plain, with_hlo)


def step_runner(method, batches, plain: bool = False, with_hlo: bool = False,
                with_compiled: bool = False):
  """`run(num_steps) -> seconds` of `method`'s compiled, state-donating train step (the one
  `dymu_jax.train.train` runs), fed device batches; compiled and run once here. With
  `with_compiled`, returns `(run, the compiled step)` (for XLA's cost and memory analyses)."""
  par = train_lib.Parallel("mesh")
  optimizer = train_lib.TrainConfig().make_optimizer()  # Adam, 1e-3
  device_batches = [par.shard_batch(b) for b in batches]
  with fast_ops.plain(plain):  # read while tracing: compile the step inside
    state = par.place_state(par.init_state(
        state_lib.init_fn(method, optimizer), jax.random.PRNGKey(0), batches[0]))
    step_fn = par.compile_step(method, optimizer, method.tasks)
    compiled = (step_fn.lower(state, device_batches[0]).compile()
                if with_hlo or with_compiled else None)
    hlo = compiled.as_text() if with_hlo else None
    state, metrics = step_fn(state, device_batches[0])
    jax.block_until_ready(metrics)
  holder = {"state": state}

  def run(num_steps: int) -> float:
    state, metrics = holder["state"], None
    start = time.perf_counter()
    for i in range(num_steps):
      state, metrics = step_fn(state, device_batches[i % len(device_batches)])
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    holder["state"] = state
    return seconds

  if with_compiled:
    return run, compiled
  return (run, hlo) if with_hlo else run


# -- the same model and step in PyTorch -------------------------------------------------------


def torch_runner(model: str, batches) -> Callable[[int], float]:
  """`run(num_steps) -> seconds` of the equivalent eager PyTorch step."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  spec = SPECS[model]
  tasks = spec["tasks"]
  width = head_width(model)

  def mlp_head(in_features, out):
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out))

  if model == "lenet":
    mean, std = [0.5], [0.5]

    class Net(nn.Module):

      def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 9)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.fc = nn.Conv2d(20, 50, 5)  # the project's dense layer over the 5x5x20 map
        self.heads = nn.ModuleList(mlp_head(50, t.num_outputs) for t in tasks)

      def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc(x)).flatten(1)
        return [head(x) for head in self.heads]
  else:
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def bn(c):
      return nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)  # = Flax momentum 0.9

    class Block(nn.Module):

      def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.down = None
        if stride != 1 or cin != cout:
          self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

      def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))

    class Net(nn.Module):

      def __init__(self):
        super().__init__()
        chans = (16, 32, 64, 128)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), bn(16), nn.ReLU())
        blocks, cin = [], 16
        for s, c in enumerate(chans):
          for b in range(2):
            blocks.append(Block(cin, c, 2 if (b == 0 and s > 0) else 1))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.heads = nn.ModuleList(mlp_head(128, t.num_outputs) for t in tasks)

      def forward(self, x):
        x = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return [head(x) for head in self.heads]

  net = Net().train()
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  mean_t = torch.tensor(mean).view(1, -1, 1, 1)
  std_t = torch.tensor(std).view(1, -1, 1, 1)
  torch_batches = []
  for b in batches:
    tb = {"image": torch.from_numpy(np.ascontiguousarray(b["image"].transpose(0, 3, 1, 2)))}
    for task in tasks:
      dtype = torch.long if task.kind == tasks_lib.CLASSIFICATION else torch.float32
      tb[task.name] = torch.from_numpy(np.asarray(b[task.name])).to(dtype)
    torch_batches.append(tb)

  def step(tb):
    optimizer.zero_grad(set_to_none=True)
    outputs = net((tb["image"] - mean_t) / std_t)
    loss = 0.0
    for task, out in zip(tasks, outputs):
      if task.kind == tasks_lib.CLASSIFICATION:
        loss = loss + F.cross_entropy(out, tb[task.name])
      else:
        loss = loss + (out[:, 0] - tb[task.name] / task.label_scale).abs().mean()
    loss.backward()
    optimizer.step()
    return loss

  def run(num_steps: int) -> float:
    start = time.perf_counter()
    for i in range(num_steps):
      loss = step(torch_batches[i % len(torch_batches)])
    loss.item()
    return time.perf_counter() - start

  return run


# -- the comparison ---------------------------------------------------------------------------


def pick_torch_threads(run: Callable[[int], float]) -> int:
  """The faster of 1 thread and one per core for this model (`--torch_threads=0`).

  On a loaded machine OpenMP's spinning threads can make several threads much slower than
  one; comparing against PyTorch's better setting keeps the ratio conservative.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if _TORCH_THREADS.value:
    return _TORCH_THREADS.value
  timings = {}
  for threads in sorted({1, len(os.sched_getaffinity(0))}):
    torch.set_num_threads(threads)
    run(1)
    timings[threads] = min(run(_WARMUP.value) for _ in range(2))
  return min(timings, key=timings.get)


def compare(model: str) -> dict[str, Any]:
  size = batch_size(model)
  batches = make_batches(model, size)
  makers = {"plain": functools.partial(project_runner, plain=True),
            "project": project_runner, "torch": torch_runner}
  runners = {name: makers[name](model, batches) for name in _FRAMEWORKS.value}
  for run in runners.values():  # compilation, allocator and cache warm-up
    run(_WARMUP.value)
  threads = None
  if "torch" in runners:
    import torch  # pylint: disable=g-import-not-at-top
    threads = pick_torch_threads(runners["torch"])
    torch.set_num_threads(threads)
  rates = {name: [] for name in runners}
  for _ in range(_REPEATS.value):
    for name, run in runners.items():  # alternating: project, torch, project, torch, ...
      rates[name].append(_STEPS.value * size / run(_STEPS.value))
  return {"model": model, "batch": size, "rates": rates, "torch_threads": threads}


def main(argv):
  del argv
  unknown = [m for m in _MODELS.value if m not in SPECS]
  if unknown:
    raise app.UsageError(f"Unknown models {unknown}; choose from {', '.join(SPECS)}.")
  if set(_FRAMEWORKS.value) - {"plain", "project", "torch"}:
    raise app.UsageError(
        f"--frameworks takes plain, project and/or torch, got {_FRAMEWORKS.value}.")
  if _CPUS.value:
    # Before the first jax call: XLA sizes its thread pool from the cores it may use.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_CPUS.value])
  cores = len(os.sched_getaffinity(0))
  if "torch" in _FRAMEWORKS.value:
    import torch  # pylint: disable=g-import-not-at-top
    print(f"torch {torch.__version__}, threads: "
          f"{_TORCH_THREADS.value or 'the faster of 1 and one per core, per model'}")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {cores} of {os.cpu_count()} "
        f"cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"{_DATA.value} batches, {_STEPS.value} steps per run, median of {_REPEATS.value} "
        f"alternating runs ({', '.join(_FRAMEWORKS.value)})")
  rows = [compare(model) for model in _MODELS.value]
  print(f"{'model':<14}{'batch':>6}{'plain/s':>9}{'project/s':>11}{'torch/s':>10}"
        f"{'speed-up':>10}{'ratio':>7}{'thr':>5}   runs (plain | project | torch)")
  for row in rows:
    medians = {name: statistics.median(r) for name, r in row["rates"].items()}
    plain_med = medians.get("plain", nan)
    project, torch_med = medians.get("project", nan), medians.get("torch", nan)
    runs = " | ".join(" ".join(f"{r:.0f}" for r in row["rates"].get(name, []))
                      for name in ("plain", "project", "torch"))
    print(f"{row['model']:<14}{row['batch']:>6}{plain_med:>9.0f}{project:>11.0f}"
          f"{torch_med:>10.0f}{project / plain_med:>10.2f}{project / torch_med:>7.2f}"
          f"{row['torch_threads'] or '-':>5}   {runs}")
  print(f"load average at the end {os.getloadavg()[0]:.1f}; speed-up = project / plain, "
        f"ratio = project / torch (medians)")

if __name__ == "__main__":
  app.run(main)
