"""Vectorised trials: several trials of a sweep trained by one compiled program (jax.vmap).

Trials whose configs differ only in VMAPPED_FIELDS (the seed: the init, data-order and
augmentation keys; base_lr and lr_multiplier: the peak learning rate) share the model, the batch
size and every shape, so one jitted chunk trains M of them: `jax.vmap` of `chunk.train_chunk` over
a stacked TrainState [M, ...] and each member's chunk.TrialInputs (peak LR, data and augmentation
keys, initial parameters: the runtime arguments of a solo run's chunk), so a member does a solo
run's arithmetic, up to the order XLA gives the sums of the vmapped shapes (float32 rounding,
~1e-7 relative per step: README, tests/test_vectorized.py). The chunk's runtime step count (num_active) is the group's, unbatched.
The training set must live on the devices: the host data path (dataset.placement='host', or
'auto' with a set too large) reads one order per trial on the host and is refused here.

Everything on the host stays per member, kept by the one training loop (scaling/training/loop.py) as for a
trial alone: its directory, config.json, metrics.jsonl, TensorBoard events, Orbax checkpoints (of
its slice of the state: a solo run resumes them), summary.json. A member that diverges, or
reaches its target with stop_at_target, is frozen: the chunk masks its update (its slice stops
changing, NaNs stay out) while the others train on. Evaluation and curvature run on each member's
slice in turn; the noise-scale statistics come per member out of the vmapped step.

`sweep.main` forms the groups (`groups`) when config.vectorize_trials > 1 and trains each with
train.run_group (`Vmapped` is its chunk).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from scaling import sharding
from scaling.config import ConfigError
from scaling.training import chunk
from scaling.training import step as steplib

# Fields that only set a member's keys (seed) or its peak learning rate: runtime arguments of the
# vmapped program. Trials differing in anything else compile differently and never share one.
VMAPPED_FIELDS = ("seed", "base_lr", "lr_multiplier")
# Fields that name the sweep, not the trial.
_SWEEP_FIELDS = ("sweep", "sweep_zip", "vectorize_trials")


def group_key(config) -> str:
  """Equal for two trial configs exactly when one vmapped program can train both."""
  fields = json.loads(config.to_json_best_effort())
  for name in VMAPPED_FIELDS + _SWEEP_FIELDS:
    fields.pop(name, None)
  return json.dumps(fields, sort_keys=True)


def groups(trials: list, max_members: int) -> list[list]:
  """sweep.Trials -> groups of at most `max_members` with equal group_key, first index first."""
  buckets = {}
  for t in trials:
    buckets.setdefault(group_key(t.config), []).append(t)
  chunks = [members[i:i + max_members] for members in buckets.values()
            for i in range(0, len(members), max_members)]
  return sorted(chunks, key=lambda g: g[0].index)


def check_sweep(config, splits) -> None:
  """The option's own errors, before any training (`splits`: the sweep's data, loaded)."""
  for field in ("sweep", "sweep_zip"):
    if "vectorize_trials" in config[field]:
      raise ConfigError(f"{field}.vectorize_trials: vectorize_trials is an option of the whole"
                        " sweep, not an axis: set vectorize_trials itself")
  if config.vectorize_trials > 1:
    check_device_data(config, splits)


def check_device_data(config, splits) -> None:
  """Vectorised trials read the training set on the devices, not through the host data path."""
  if splits.train_source:
    raise ConfigError(
        f"vectorize_trials={config.vectorize_trials} needs the training set on the devices, but"
        f" dataset.placement={config.dataset.placement!r} reads it on the host: set"
        " dataset.placement='device' or vectorize_trials=0")


def vectorized_chunk(state_M, order_MxN, inputs_M, active_M, arrays, num_active, *, num_steps,
                     chunk_fn):
  """`chunk_fn` (train.chunk_function) of every member at once, `num_active` steps each; members
  whose active_M is False keep their parameters and optimizer state (frozen: finished or
  diverged). `order_MxN`: each member's epoch order (chunk.CarriedOrder holds it between chunks).
  Returns (state_M, order_MxN, metrics_MxK, chunk_end_metrics_M).

  The members train in lockstep, so they share one unbatched step counter: with a batched one,
  vmap turns the epoch's `lax.cond` (a new permutation of the training set at each epoch start)
  into a select that computes the permutation at every step (benchmarks/README.md: a shared step
  counter). Frozen members' counters advance too; their state is final on disk already."""
  step = state_M.step[0]

  def one(state, order_N, inputs, active):
    new_state, order_N, metrics_K, ends = chunk_fn(state.replace(step=step), order_N, arrays,
                                                   inputs, num_active, num_steps=num_steps)
    trained = (new_state.params, new_state.batch_stats, new_state.opt_state)
    kept = (state.params, state.batch_stats, state.opt_state)
    return (jax.tree.map(lambda new, old: jnp.where(active, new, old), trained, kept), order_N,
            metrics_K, ends)

  (params, batch_stats, opt_state), order_MxN, metrics_MxK, ends_M = jax.vmap(one)(
      state_M, order_MxN, inputs_M, active_M)
  new_state_M = steplib.TrainState(step=state_M.step + num_active, params=params,
                                   batch_stats=batch_stats, opt_state=opt_state)
  return new_state_M, order_MxN, metrics_MxK, ends_M


def check_group(configs: list, splits) -> None:
  """Configs one vmapped program can train together, on device-resident data."""
  if len({group_key(c) for c in configs}) > 1:
    raise ConfigError("vectorised trials must differ only in " + ", ".join(VMAPPED_FIELDS) +
                      ": group them with scaling.training.vectorized.groups")
  check_device_data(configs[0], splits)


class Vmapped:
  """M members' chunk as the loop calls every chunk (scaling/training/loop.py): one jitted
  vectorized_chunk over their stacked states and TrialInputs; `member_state` slices one out
  (for its evaluation, curvature and checkpoint)."""

  def __init__(self, program, initial_order, inputs_M, train_arrays, take, mesh):
    self._chunk = chunk.CarriedOrder(program, initial_order)
    self._inputs_M, self._arrays, self._take, self._mesh = inputs_M, train_arrays, take, mesh
    self._active = (None, None)   # the latest active flags, and their copy on the devices

  def _placed(self, active_M):
    if self._active[0] != tuple(active_M):
      self._active = (tuple(active_M), sharding.put_replicated(np.asarray(active_M), self._mesh))
    return self._active[1]

  def __call__(self, state_M, active_M, num_active, *, num_steps: int):
    return self._chunk(state_M, self._inputs_M, self._placed(active_M), self._arrays,
                       np.int32(num_active), num_steps=num_steps)

  def lower(self, state_M, active_M, num_active, *, num_steps: int):
    return self._chunk.lower(state_M, self._inputs_M, self._placed(active_M), self._arrays,
                             np.int32(num_active), num_steps=num_steps)

  @staticmethod
  def to_host(outputs: list) -> list:
    return jax.device_get(outputs)   # already [M, ...]

  def member_state(self, state_M, i: int):
    return self._take(state_M, i)

  def close(self) -> None:
    pass


def chunk_maker(chunk_fn, plan, splits, mesh, train_arrays):
  """new_chunk(step, inputs, states) -> (Vmapped, stacked state) for members standing at `step`:
  one jitted program of `chunk_fn` (train.chunk_function) for every group of the sweep."""
  replicated = sharding.replicated(mesh)
  program = jax.jit(functools.partial(vectorized_chunk, chunk_fn=chunk_fn),
                    static_argnames="num_steps", donate_argnames=("state_M", "order_MxN"))
  order = _initial_order(plan.steps_per_epoch, len(splits.train_labels), mesh)
  stack = jax.jit(lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees),
                  out_shardings=replicated)
  take = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=replicated)

  def new_chunk(step, inputs, states):
    del step   # the stacked state's shared step counter places the group in its epoch
    return Vmapped(program, order, stack(*inputs), train_arrays, take, mesh), stack(*states)
  return new_chunk


def _initial_order(steps_per_epoch, num_examples, mesh):
  """chunk.initial_order for every member: their keys, the group's one step counter."""
  order_M = jax.jit(jax.vmap(lambda key, step: chunk.epoch_order(key, step // steps_per_epoch,
                                                                 num_examples),
                             in_axes=(0, None)), out_shardings=sharding.replicated(mesh))
  return lambda state_M, inputs_M, *_: order_M(inputs_M.data_key, state_M.step[0])
