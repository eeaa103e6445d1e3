"""Data parallelism: `jax.jit` over a device mesh (default) or `jax.pmap`; multi-host start-up.

Mode "mesh" (big_vision style): one `Mesh` with a "data" axis over every device of every
process; the batch is sharded along it, the state is replicated, and `jax.jit` partitions the
step (batch statistics and the loss mean see the global batch without any collective in the
model code). Each process feeds only its own slice of the batch
(`jax.make_array_from_process_local_data`).

Mode "pmap": `jax.pmap` with axis name `AXIS_NAME` ("batch") over the same devices, each
process feeding its own; the step averages gradients and metrics with `lax.pmean`, and a
method must pool its batch statistics over the same axis name, so build it with
`axis_name=method_axis_name("pmap")`. With missing labels the two modes differ: a task's loss
is the mean over its labelled examples, which the mesh mode takes over the global batch while
the pmap mode averages the devices' own means (a device with one labelled example weighs as
much as one with fifty); use the mesh mode for sparse labels.

Both modes keep the same *canonical* state for checkpoints: one copy replicated on the mesh.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax import monitoring
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dymu_jax.train import state as state_lib
from dymu_jax.train import step as step_lib

PyTree = Any
MODES = ("mesh", "pmap")
DATA_AXIS = "data"
AXIS_NAME = "batch"  # the pmap axis name that methods pool batch statistics over

_distributed_started = False


def initialize_distributed(multi_host: bool = False, **kwargs) -> None:
  """Starts `jax.distributed` for a multi-host run (cluster settings from the environment).

  A single-host run (the default) needs nothing. Call this before anything touches a device.
  `kwargs` (coordinator_address, num_processes, process_id, ...) go to
  `jax.distributed.initialize` for clusters it cannot detect by itself.
  """
  global _distributed_started
  if multi_host and not _distributed_started:
    jax.distributed.initialize(**kwargs)
    _distributed_started = True


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"Unknown parallel mode {mode!r}; allowed modes are {', '.join(MODES)}.")
  return mode


def method_axis_name(mode: str) -> str | None:
  """The axis name a method must pool batch statistics over in this mode (None for "mesh")."""
  return AXIS_NAME if check_mode(mode) == "pmap" else None


def to_host(tree: PyTree) -> PyTree:
  """A numpy copy of a tree of replicated (possibly multi-host) arrays."""

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


class Parallel:
  """How a run spreads over devices: batch placement, state placement, the compiled step.

  Args:
    mode: "mesh" or "pmap".
    devices: the devices to use (default: all devices of all processes); in mode "pmap" this
      process runs on its own devices among them.
  """

  def __init__(self, mode: str = "mesh", devices: Sequence[jax.Device] | None = None):
    self.mode = check_mode(mode)
    devices = list(jax.devices() if devices is None else devices)
    self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
    self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
    # pmap's own layout: a leading axis over this process's devices.
    self.pmap_sharding = NamedSharding(Mesh(np.asarray(self.local_devices), (AXIS_NAME,)),
                                       P(AXIS_NAME))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def num_local_devices(self) -> int:
    return len(self.local_devices)

  @property
  def axis_name(self) -> str | None:
    return method_axis_name(self.mode)

  def check_batch_size(self, global_batch_size: int, what: str = "batch size") -> None:
    if global_batch_size % self.num_devices:
      raise ValueError(f"The {what} {global_batch_size} must be a multiple of the "
                       f"{self.num_devices} devices it is split over.")

  def check_method(self, method) -> None:
    """Stops when the method pools batch statistics over the wrong axis for this mode."""
    have = getattr(method, "axis_name", self.axis_name)
    if have != self.axis_name:
      raise ValueError(
          f"Parallel mode {self.mode!r} needs a method built with axis_name="
          f"{self.axis_name!r} (see parallel.method_axis_name), got {have!r}.")

  # -- batches ---------------------------------------------------------------------------------

  def shard_global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """This process's slice of a batch -> one global array per key, sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """This process's slice of a batch -> device arrays in the layout the step takes."""
    if self.mode == "mesh":
      return self.shard_global_batch(local_batch)
    n = self.num_local_devices
    out = {}
    for k, v in local_batch.items():
      v = np.asarray(v)
      out[k] = jax.device_put(v.reshape((n, v.shape[0] // n) + v.shape[1:]),
                              self.pmap_sharding)
    return out

  def shard_batches(self, batches: Iterator[Mapping[str, np.ndarray]]) -> Iterator[dict]:
    for batch in batches:
      yield self.shard_batch(batch)

  # -- state -----------------------------------------------------------------------------------

  def init_state(self, init_fn: Callable[..., state_lib.TrainState], seed_key: jax.Array,
                 sample_batch: Mapping[str, np.ndarray],
                 initial: Mapping[str, Any] | None = None) -> state_lib.TrainState:
    """The canonical state, built directly on the devices (replicated); `initial`: collections
    that replace the initialised ones (`state.init_fn`)."""
    return jax.jit(init_fn, out_shardings=self.replicated)(seed_key, dict(sample_batch),
                                                           dict(initial) if initial else None)

  def abstract_state(self, init_fn, seed_key, sample_batch) -> PyTree:
    """Shapes, dtypes and shardings of the canonical state, without allocating it."""
    shapes = jax.eval_shape(init_fn, seed_key, dict(sample_batch))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated), shapes)

  def place_state(self, canonical: state_lib.TrainState) -> state_lib.TrainState:
    """Canonical state -> the layout the compiled step takes."""
    if self.mode == "mesh":
      return jax.device_put(canonical, self.replicated)
    n = self.num_local_devices
    host = to_host(canonical)
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (n,) + x.shape), self.pmap_sharding), host)

  def canonical_state(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """The step's state -> one replicated copy on the mesh (for checkpoints and evaluation)."""
    if self.mode == "mesh":
      return state

    def unreplicate(x):
      local = np.asarray(x.addressable_data(0))[0]
      return jax.make_array_from_process_local_data(self.replicated, local, local.shape)

    return jax.tree.map(unreplicate, state)

  def read(self, tree: PyTree) -> PyTree:
    """Host copy of replicated values of the step's layout (metrics, guard fields)."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
    return to_host(tree)

  # -- the step --------------------------------------------------------------------------------

  def compile_step(self, method, optimizer, tasks=None,
                   compute_dtype: str = "float32") -> Callable:
    """The compiled `fn(state, batch) -> (state, metrics)`; the input state is donated.

    `compute_dtype`: see `step.make_train_step` ("bfloat16": mixed precision).
    """
    train_step = step_lib.make_train_step(method, optimizer, tasks, axis_name=self.axis_name,
                                          compute_dtype=compute_dtype)
    if self.mode == "mesh":
      return jax.jit(train_step, in_shardings=(self.replicated, self.batch_sharding),
                     out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    # pmap wants the same (global) device list on every process; each maps over its own.
    return jax.pmap(train_step, axis_name=AXIS_NAME, devices=list(self.mesh.devices.flat),
                    donate_argnums=0)


class CompileCounter:
  """Counts XLA compilations started from the current thread while active.

      with CompileCounter() as compiles:
        ...
      compiles.count
  """

  _EVENT = "/jax/core/compile/backend_compile_duration"
  _lock = threading.Lock()
  _active: list = []
  _registered = False

  def __init__(self):
    self.count = 0
    self._thread = threading.get_ident()

  @classmethod
  def _listener(cls, event, duration, **kwargs):  # pylint: disable=unused-argument
    if event == cls._EVENT:
      for counter in list(cls._active):
        if counter._thread == threading.get_ident():
          counter.count += 1

  def __enter__(self):
    with CompileCounter._lock:
      if not CompileCounter._registered:
        monitoring.register_event_duration_secs_listener(CompileCounter._listener)
        CompileCounter._registered = True
      CompileCounter._active.append(self)
    return self

  def __exit__(self, *exc):
    with CompileCounter._lock:
      CompileCounter._active.remove(self)
    return False

