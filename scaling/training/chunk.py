"""The compiled training chunk: `num_active` of `num_steps` training steps in one program, on the
device-resident training set, each batch gathered on the devices from the epoch's order.

`TrialInputs` are the chunk's runtime inputs (what differs between trials of an LR grid or of
several seeds), so those trials share one compilation; `CarriedOrder` keeps the epoch's order
between chunks; `Solo` presents a trial alone to the loop as a group of one. scaling/data/host.py's
`HostChunk` stands in for the chunk when the training set is read on the host;
scaling/training/vectorized.py vmaps it over trials.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

from scaling import data, sharding, streams
from scaling.measurement import noise_scale
from scaling.streams import Stream
from scaling.training import cadence, schedule, step as steplib


epoch_order = data.host.epoch_order   # one order for both placements of the training set


def gather_examples(arrays, idx_B, data_key, epoch, *, pixel_scale):
  """Examples idx_B of the device-resident (images, labels) -> a float batch."""
  del data_key, epoch   # the order alone decides an image batch
  images_NxX, labels_N = arrays
  return images_NxX[idx_B].astype(jnp.float32) * pixel_scale, labels_N[idx_B]


@flax.struct.dataclass
class TrialInputs:
  """What differs between the trials of an LR grid or of several seeds without changing a shape:
  arguments of the compiled chunk, not constants baked into it, so those trials share one
  compilation (in-process and in the persistent cache)."""
  peak_lr: jax.Array       # float32 scalar: plan.lr; the step scales the schedule's shape by it
  data_key: jax.Array      # each epoch's order
  augment_key: jax.Array   # the augmentations (folded with the step)
  init_params: object      # the initial parameters: the distance from them is logged

  @classmethod
  def of(cls, plan: schedule.Plan, seed: int, init_params) -> "TrialInputs":
    return cls(peak_lr=jnp.float32(plan.lr), data_key=streams.key(seed, Stream.DATA_ORDER),
               augment_key=streams.key(seed, Stream.AUGMENT), init_params=init_params)


def chunk_end_metrics(params, init_params) -> dict:
  """The parameter norm and the distance from the initial parameters (Hoffer et al. 2017: it
  grows like log(steps)), for the train record a chunk ends at (`record_end_metrics`)."""
  return {"param_norm": steplib.param_norm(params),
          "param_distance_from_init": jnp.sqrt(noise_scale.sq_norm(
              jax.tree.map(jnp.subtract, params, init_params)))}


def record_end_metrics(step, params, init_params, *, log_every_steps: int, total_steps: int):
  """chunk_end_metrics after a chunk whose last step (`step` steps done) writes a train record
  (record.TrialRecord.absorb: every log_every_steps and the last step; the loop ends a chunk at each),
  zeros after any other chunk, whose end metrics nothing reads. In a cond: computed after every
  short chunk they are a visible share of it (benchmarks/README.md: chunk-end metrics)."""
  at_record = cadence.due(step, log_every_steps, total_steps)
  shapes = jax.eval_shape(chunk_end_metrics, params, init_params)
  return jax.lax.cond(at_record, lambda: chunk_end_metrics(params, init_params),
                      lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))


def train_chunk(state, order_N, arrays, inputs: TrialInputs, num_active, *, num_steps,
                num_examples, batch_size, steps_per_epoch, gather, step_fn, end_metrics,
                shard_batch, unroll):
  """The first `num_active` (a runtime count, at most `num_steps`) of `num_steps` training steps,
  in one program: the shorter chunks at the end of a segment or before a log record reuse the
  compiled chunk instead of compiling one per length. `gather` (per data kind: `gather_examples`,
  `data.text.gather_windows`) builds each batch on the devices from the epoch's order.

  `order_N` is the order of the epoch `state.step` is in (CarriedOrder holds it between chunks);
  a step that starts an epoch makes the next one. Recomputing it at every chunk's start instead
  shuffles the whole training set per chunk, at small batches the cost of several steps
  (benchmarks/README.md: carried epoch order).

  Returns the state, the order, the per-step metrics [num_steps] (zeros past num_active) and
  `end_metrics(step, params, init_params)` after the last step (record_end_metrics).
  Rolled (`unroll` false): a loop of num_active iterations. Unrolled (XLA:CPU's convolutions are
  far slower in loops): all num_steps steps, with no lax.cond around them (a step inside a cond
  is as slow as in a loop; benchmarks/README.md: unrolled chunks), so the caller passes num_steps
  = num_active (LoopSpec.chunk_length): one program per distinct length, at most chunk_steps.
  """
  n, data_key = num_examples, inputs.data_key

  def one_step(state, order_N):
    pos = state.step % steps_per_epoch
    order_N = jax.lax.cond(pos == 0, lambda: epoch_order(data_key, state.step // steps_per_epoch, n),
                           lambda: order_N)
    # Each device gathers only its own slice of the batch.
    idx_B = shard_batch(jax.lax.dynamic_slice_in_dim(order_N, pos * batch_size, batch_size))
    inputs_BxX, targets_B = gather(arrays, idx_B, data_key, state.step // steps_per_epoch)
    state, metrics = step_fn(state, inputs_BxX, targets_B, inputs.augment_key, inputs.peak_lr)
    return state, order_N, metrics

  zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype),
                       jax.eval_shape(one_step, state, order_N)[2])
  metrics_K = jax.tree.map(lambda z: jnp.zeros((num_steps, *z.shape), z.dtype), zeros)

  def body(i, carry):
    state, order_N, metrics_K = carry
    state, order_N, metrics = one_step(state, order_N)
    return state, order_N, jax.tree.map(lambda buf, m: buf.at[i].set(m), metrics_K, metrics)

  carry = (state, order_N, metrics_K)
  if unroll:
    for i in range(num_steps):
      carry = body(i, carry)
  else:
    carry = jax.lax.fori_loop(0, num_active, body, carry)
  state, order_N, metrics_K = carry
  return state, order_N, metrics_K, end_metrics(state.step, state.params, inputs.init_params)


class CarriedOrder:
  """A jitted chunk (`chunk(state, order, *args, num_steps=...)` -> (state, order, ...)) called
  as `chunk(state, *args, num_steps=...)` -> (state, ...): the epoch's order lives here between
  calls, in the buffers the previous chunk returned, and is computed only at the first call (a
  start or a resume) by `initial_order(state, *args)`."""

  def __init__(self, chunk, initial_order):
    self._chunk, self._initial_order, self._order = chunk, initial_order, None

  def _current(self, state, args):
    if self._order is None:
      self._order = self._initial_order(state, *args)
    return self._order

  def __call__(self, state, *args, num_steps: int):
    state, self._order, *out = self._chunk(state, self._current(state, args), *args,
                                           num_steps=num_steps)
    return (state, *out)

  def lower(self, state, *args, num_steps: int):
    return self._chunk.lower(state, self._current(state, args), *args, num_steps=num_steps)


class Solo:
  """A trial trained alone, as the loop calls every chunk (scaling/training/loop.py): a group of one.

  `fn(state, *args, num_active, num_steps=K)` -> (state, metrics_K, end_metrics) is the device
  path's CarriedOrder chunk (args: the training arrays and the TrialInputs) or data.host.HostChunk
  (args: the TrialInputs). The member axis is added on the host, after the fetch, so that the
  compiled program is exactly the one a trial alone runs."""

  def __init__(self, fn, *args, close=None):
    self._fn, self._args, self._close = fn, args, close

  def __call__(self, state, active_M, num_active, *, num_steps: int):
    del active_M   # its one member: the loop stops dispatching when it stops
    return self._fn(state, *self._args, np.int32(num_active), num_steps=num_steps)

  def lower(self, state, active_M, num_active, *, num_steps: int):
    del active_M
    return self._fn.lower(state, *self._args, np.int32(num_active), num_steps=num_steps)

  @staticmethod
  def to_host(outputs: list) -> list:
    """[(metrics_K, end_metrics)] on the devices -> [(metrics_1xK, end_metrics_1)] numpy."""
    return jax.tree.map(lambda x: x[None], jax.device_get(outputs))

  @staticmethod
  def member_state(state, i: int):
    del i
    return state

  def close(self) -> None:
    if self._close:
      self._close()


def initial_order(steps_per_epoch, num_examples, mesh):
  """(state, arrays, inputs, ...) -> the order of the epoch state.step is in, replicated."""
  order = jax.jit(lambda key, step: epoch_order(key, step // steps_per_epoch, num_examples),
                  out_shardings=sharding.replicated(mesh))
  return lambda state, arrays, inputs, *_: order(inputs.data_key, state.step)
