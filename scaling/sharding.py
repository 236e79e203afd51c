"""The one module that builds meshes and shardings: the batch on `data`, everything else replicated.

A global array is assembled from what each process holds (`make_array_from_callback`), so the same
code runs on one CPU, on 8 fake CPU devices, and on several hosts under `jax.distributed`.
"""
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from scaling.config import ConfigError

DATA = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all of them by default)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"num_devices={num_devices} but only {len(devices)} devices are visible:"
                        f" use num_devices <= {len(devices)} (0 = all)")
    devices = devices[:num_devices]
  # Auto axes: shardings are constraints that XLA propagates (the classic pjit path).
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def _put(tree, sharding: NamedSharding):
  """Host numpy (identical on every process) -> global arrays; each device takes its own part."""
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
      tree)


def put_replicated(tree, mesh: Mesh):
  return _put(tree, replicated(mesh))


def put_batch(tree, mesh: Mesh):
  """[examples, ...] arrays split over `data`."""
  return _put(tree, batch_sharded(mesh))


def put_eval(tree, mesh: Mesh):
  """[chunks, examples, ...] eval arrays: each chunk's examples split over `data`."""
  return _put(tree, NamedSharding(mesh, P(None, DATA)))


def data_parallel(local_fn, mesh: Mesh, axis: str = DATA, *, num_replicated: int):
  """shard_map of local_fn(*replicated, *batch_split) -> replicated outputs. The first
  `num_replicated` arguments are replicated, the rest split on their leading axis over `axis`.
  check_vma=False: local_fn all-reduces its results itself (psum/pmean), once, explicitly."""

  def wrapped(*args):
    in_specs = tuple(P() if i < num_replicated else P(axis) for i in range(len(args)))
    return jax.shard_map(local_fn, mesh=mesh, in_specs=in_specs, out_specs=P(),
                         check_vma=False)(*args)
  return wrapped


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """The rows of a [batch_size, ...] batch split over `data` that this process's devices hold, in
  the order `put_process_rows` expects them (one block per process for a 1-D mesh)."""
  index_map = batch_sharded(mesh).addressable_devices_indices_map((batch_size,))
  blocks = sorted({index[0].indices(batch_size) for index in index_map.values()})
  return np.concatenate([np.arange(*block) for block in blocks])


def put_process_rows(tree, mesh: Mesh, batch_size: int):
  """[K, R, ...] numpy holding this process's R rows (`process_rows`) of K global batches ->
  global [K, batch_size, ...] arrays, each batch split over `data`."""
  split = NamedSharding(mesh, P(None, DATA))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      split, x, (x.shape[0], batch_size, *x.shape[2:])), tree)


def constrain_batch(x, mesh: Mesh):
  return jax.lax.with_sharding_constraint(x, batch_sharded(mesh))


def process0_decides(flag: bool) -> bool:
  """Process 0's `flag` on every process: decisions taken from files or signals (skip a trial,
  stop the loop) must agree, or one process waits forever in a collective the others skipped."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a preemption signal reaching one of them)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def to_host(tree):
  """Global arrays -> numpy on this process (replicated or fully gathered values)."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
