"""Training data that stays on the host: each process reads its rows of every global batch.

The device path (chunk.train_chunk) replicates the whole training set on every device, which is
fast while it is small. A set larger than `dataset.device_fraction` of a device's memory (or
`dataset.placement="host"`) stays in its TFDS array_record files instead: a background thread
reads, by random access, the rows of each step's global batch that this process's devices hold
(`sharding.process_rows`), a few steps ahead of the device, and a chunk of K steps is placed as
one [K, B, ...] array split over `data` (`sharding.put_process_rows`).

The order is the device path's: the same permutation `epoch_order(data_key, epoch, N)`, computed
by the same JAX function on the default backend and fetched once per epoch, and the same slice
of it per step, so both placements train the same trial (to float tolerance: XLA fuses the two
programs differently). Step s reads positions (s % steps_per_epoch) * B + rows of epoch
s // steps_per_epoch, so a reader started at the restored step resumes exactly.
"""
import dataclasses
import os
import queue
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scaling import sharding


def epoch_order(data_key, epoch, num_examples):
  """The example order of one epoch: a pure function of (seed, epoch), so a resume replays it."""
  return jax.random.permutation(jax.random.fold_in(data_key, epoch), num_examples)


@dataclasses.dataclass(frozen=True)
class RecordSource:
  """Random access to the first `num_examples` examples of a TFDS split (array_record)."""
  read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # indices [n] -> (images, labels)
  num_examples: int


class Prefetcher:
  """Host batches of steps start, start + 1, ... in order, read `depth` steps ahead by a thread.

  `take(k)` returns the next k steps as (images [k, R, ...], labels [k, R]) for this process's
  R rows. Reads happen only in the thread; the consumer never reads and never skips a step.
  """

  def __init__(self, source: RecordSource, data_key, *, batch_size: int, steps_per_epoch: int,
               rows: np.ndarray, start_step: int, depth: int):
    self._source, self._key, self._rows = source, data_key, rows
    self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
    self._queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self.next_step = start_step   # the step the next take() starts at
    self._thread = threading.Thread(target=self._read_ahead, args=(start_step,), daemon=True)
    self._thread.start()

  def _read_ahead(self, step):
    order_epoch, order_N = None, None
    while not self._stop.is_set():
      try:
        epoch, pos = divmod(step, self._steps_per_epoch)
        if epoch != order_epoch:
          order_N = np.asarray(_epoch_order_jit(self._key, epoch, self._source.num_examples))
          order_epoch = epoch
        item = (step, self._source.read(order_N[pos * self._batch_size + self._rows]))
      except Exception as error:   # handed to the consumer, which raises it in the loop
        item = (step, error)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item[1], Exception):
        return
      step += 1

  def take(self, num_steps: int):
    images, labels = [], []
    for _ in range(num_steps):
      step, batch = self._queue.get()
      if isinstance(batch, Exception):
        raise batch
      assert step == self.next_step, (step, self.next_step)   # never reordered, never skipped
      self.next_step += 1
      images.append(batch[0])
      labels.append(batch[1])
    return np.stack(images), np.stack(labels)

  def close(self):
    self._stop.set()
    self._thread.join()


_epoch_order_jit = jax.jit(epoch_order, static_argnums=2)


def scan_steps(state, inputs, images_KxBxX, labels_KxB, *, step_fn, end_metrics, pixel_scale,
               unroll):
  """K training steps on K placed batches in one scan: the host path's chunk.train_chunk, with
  the same outputs (state, per-step metrics, end_metrics after the last step). `inputs` is
  chunk.TrialInputs (peak LR, augmentation key, initial parameters)."""
  def body(state, batch):
    images_BxX, labels_B = batch
    return step_fn(state, images_BxX.astype(jnp.float32) * pixel_scale, labels_B,
                   inputs.augment_key, inputs.peak_lr)
  state, metrics_K = jax.lax.scan(body, state, (images_KxBxX, labels_KxB), unroll=unroll)
  return state, metrics_K, end_metrics(state.step, state.params, inputs.init_params)


class HostChunk:
  """Called like the device path's jitted chunk, `(state, inputs, num_active, num_steps=K)`: takes
  the next num_active steps' rows from the prefetcher, places them on the mesh and runs
  `scan_steps` on them (one compilation per distinct num_active: the host path reads only the
  rows it trains on)."""

  def __init__(self, source: RecordSource, data_key, mesh, *, batch_size: int,
               steps_per_epoch: int, start_step: int, chunk_steps: int, step_fn, end_metrics,
               pixel_scale: float, unroll: bool):
    self._mesh, self._batch_size = mesh, batch_size
    self.prefetcher = Prefetcher(source, data_key, batch_size=batch_size,
                                 steps_per_epoch=steps_per_epoch,
                                 rows=sharding.process_rows(mesh, batch_size),
                                 start_step=start_step, depth=2 * chunk_steps)
    self._jit = jax.jit(lambda state, inputs, images, labels: scan_steps(
        state, inputs, images, labels, step_fn=step_fn, end_metrics=end_metrics,
        pixel_scale=pixel_scale, unroll=unroll), donate_argnums=0)
    self._last = None   # the placed batches of the latest call (for `lower`)

  def _batches(self, num_steps):
    return sharding.put_process_rows(self.prefetcher.take(num_steps), self._mesh, self._batch_size)

  def __call__(self, state, inputs, num_active, num_steps: int):
    del num_steps   # the device path's fixed chunk length; here the rows decide the shape
    self._last = self._batches(int(num_active))
    return self._jit(state, inputs, *self._last)

  def lower(self, state, inputs, num_active, num_steps: int):
    """The compiled chunk of the latest call (resources.ChunkCost's memory analysis)."""
    del num_active, num_steps
    return self._jit.lower(state, inputs, *self._last)

  def close(self):
    self.prefetcher.close()


def device_memory_bytes() -> int:
  """One local device's memory: what its backend reports, else (CPU) the host's memory divided
  among the local devices, which share it and each hold a replica of device-placed data."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
