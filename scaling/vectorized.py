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

Everything on the host stays per member: its directory, config.json, metrics.jsonl, TensorBoard
events, Orbax checkpoints (of its slice of the state: a solo run resumes them), summary.json, all
written by the functions loop.train_loop uses. A member that diverges, or reaches its target
with stop_at_target, is frozen: the chunk masks its update (its slice stops changing, NaNs stay
out) and its files are final, while the others train on. Evaluation and curvature run on each
member's slice in turn, at a solo run's cadence; the noise-scale statistics come per member out
of the vmapped step.

`sweep.main` forms the groups (`groups`) when config.vectorize_trials > 1.
"""
import dataclasses
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from scaling import bookkeeping, cadence, checkpoint, chunk, loop, memory, resources, schedule
from scaling import sharding
from scaling import train
from scaling import measure as measure_lib
from scaling import metrics as metrics_lib
from scaling import step as steplib
from scaling.config import ConfigError
from scaling.metrics import write_json

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


@dataclasses.dataclass
class Member:
  """One trial of a vectorised group: its config, files and running record on the host."""
  config: object
  workdir: str
  plan: schedule.Plan
  spec: loop.LoopSpec
  ckpts: checkpoint.Checkpoints
  step: int                          # where this member stands (it stops early when diverged)
  book: dict
  inputs: chunk.TrialInputs          # the runtime arguments of its chunk
  cost: resources.ChunkCost = None   # summary() of the member's share of the group's cost
  writer: metrics_lib.MetricsWriter = None
  top_vector: object = None          # the curvature's Lanczos warm start
  summary: dict = None               # set once the member is finished

  @property
  def running(self) -> bool:
    return self.book["status"] == "running" and self.summary is None


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


def run(configs: list, workdirs: list[str], trial_ids: list[str] | None = None,
        sweep_axes: list[dict] | None = None) -> list[dict]:
  """Trains the trials `configs` (differing only in VMAPPED_FIELDS) in one vmapped program, each
  in its own workdir; returns their summaries, as train.run would one by one."""
  trial_ids = trial_ids or ["trial"] * len(configs)
  sweep_axes = sweep_axes or [{}] * len(configs)
  if len({group_key(c) for c in configs}) > 1:
    raise ConfigError("vectorised trials must differ only in " + ", ".join(VMAPPED_FIELDS) +
                      ": group them with scaling.vectorized.groups")
  first = configs[0]
  mesh = sharding.make_mesh(first.num_devices)
  splits = train.load_data(first)
  check_device_data(first, splits)
  built = [train.build(c, splits, mesh) for c in configs]   # every config checked
  plans = [plan for plan, *_ in built]
  _, model, _, optimizer = built[0]
  # M members hold about M times a solo step's buffers (states and activations).
  memory.check_fits(lambda b, k: len(configs) * train.step_memory_bytes(first, splits, b, k),
                    first.batch_size, memory.device_memory_bytes())
  abstract_state, init = train.abstract_train_state(first, model, optimizer, splits, mesh)
  replicated = sharding.replicated(mesh)
  init_fn = jax.jit(init, out_shardings=replicated)
  microbatching = train.microbatching(first, mesh.size)

  members, states = [], []
  try:
    for config, workdir, plan, tid, axes in zip(configs, workdirs, plans, trial_ids, sweep_axes):
      os.makedirs(workdir, exist_ok=True)
      resolved = train.trial_record(config, plan, mesh, splits, abstract_state, tid, axes)
      ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                     config.checkpoint.keep,
                                     asynchronous=config.checkpoint.asynchronous)
      step, state, book = train.start_or_resume(
          config, workdir, resolved, ckpts, abstract_state,
          lambda: init_fn(jax.random.PRNGKey(config.seed)))
      book["step_cap"] = plan.total_steps
      # Its initial parameters (the distance from them is logged), in their own buffers.
      inputs = chunk.TrialInputs.of(plan, config.seed,
                                    init_fn(jax.random.PRNGKey(config.seed)).params)
      members.append(Member(
          config, workdir, plan, loop.LoopSpec.of(config, plan, workdir, microbatching.groups),
          ckpts, step, book, inputs, cost=resources.ChunkCost(
              None, book.setdefault("resources", {}), config.batch_size)))
      states.append(state)

    gather, train_arrays = train.device_train_data(splits, mesh)
    step_fn = train.step_function(first, plans[0], model, mesh)   # the peak LR is an input
    program = jax.jit(functools.partial(
        vectorized_chunk,
        chunk_fn=train.chunk_function(first, plans[0], splits, mesh, gather, step_fn)),
        static_argnames="num_steps", donate_argnames=("state_M", "order_MxN"))
    shared = Shared(
        program=program, train_arrays=train_arrays,
        initial_order=_initial_order(plans[0].steps_per_epoch, len(splits.train_labels), mesh),
        evaluate=train.make_evaluate(first, splits, model, mesh),
        measure=(measure_lib.Measure(first.curvature, model, splits, mesh, first.seed)
                 if first.curvature.enabled else None),
        stack=jax.jit(lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees),
                      out_shardings=replicated),
        take=jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree), out_shardings=replicated),
        mesh=mesh)
    # Members restored at different steps (e.g. one resumed alone before) train as separate groups.
    by_step = {}
    for member, state in zip(members, states):
      by_step.setdefault(member.step, []).append((member, state))
    for step, pairs in sorted(by_step.items()):
      group = [m for m, _ in pairs]
      _train_group(group, shared.stack(*[s for _, s in pairs]), step, shared)
  finally:
    for m in members:
      m.ckpts.close()
  return [m.summary for m in members]


@dataclasses.dataclass(frozen=True)
class Shared:
  """What every member of a group uses: the compiled programs and the data on the devices."""
  program: object        # jitted vectorized_chunk
  initial_order: object  # (state_M, inputs_M, ...) -> order_MxN of the members' current epoch
  train_arrays: tuple
  evaluate: object       # train.make_evaluate's evaluate(state)
  measure: object        # a measure.Measure (its key and warm start swapped per member) or None
  stack: object          # states -> state_M
  take: object           # (state_M, i) -> member i's state
  mesh: object


def _initial_order(steps_per_epoch, num_examples, mesh):
  """chunk.initial_order for every member: their keys, the group's one step counter."""
  order_M = jax.jit(jax.vmap(lambda key, step: chunk.epoch_order(key, step // steps_per_epoch,
                                                                 num_examples),
                             in_axes=(0, None)), out_shardings=sharding.replicated(mesh))
  return lambda state_M, inputs_M, *_: order_M(inputs_M.data_key, state_M.step[0])


def _share_cost(cost_record: dict, before: dict, members: list[Member]) -> None:
  """Adds the group's compile and train time of the last segment to each member's record: the
  wall time the member's trial took, shared with the others."""
  for m in members:
    record = m.book["resources"]
    for key in ("compile_seconds", "train_seconds", "train_steps"):
      record[key] += cost_record[key] - before[key]
    for key in ("memory_bytes", "memory_source"):   # the whole group's program
      if key in cost_record:
        record[key] = cost_record[key]


def _save(m: Member, state, step: int) -> None:
  m.book["elapsed"] = m.writer.elapsed()
  m.book["last_checkpoint_step"] = step
  m.writer.flush()
  m.ckpts.save(step, state, m.book)


def _finish(m: Member, state) -> None:
  """A solo run's end: the last checkpoint (not for a diverged trial), then summary.json."""
  spec = m.spec
  if m.book["status"] in ("done", "preempted") and m.book["last_checkpoint_step"] != m.step:
    _save(m, state, m.step)
  m.ckpts.wait()
  m.book["elapsed"] = m.writer.elapsed()
  m.writer.close()
  m.summary = bookkeeping.summary(m.book, m.step, spec.batch_size, spec.tokens_per_example, m.cost)
  write_json(os.path.join(spec.workdir, "summary.json"), m.summary)


def _measure_curvature(shared: Shared, m: Member, state, step: int, **kwargs) -> dict:
  """The shared Measure (one compilation) with this member's key and Lanczos warm start."""
  shared.measure.key = jax.random.PRNGKey(m.config.seed + 2_000_003)   # as Measure(seed) has
  shared.measure.top_vector = m.top_vector
  results = shared.measure(state, step, **kwargs)
  m.top_vector = shared.measure.top_vector
  return results


def _evaluate_member(shared: Shared, m: Member, state, step: int, rate: float) -> None:
  """loop.evaluate_and_record for one member: its book, writer, cost, key and warm start."""
  loop.evaluate_and_record(
      m.spec, m.book, m.writer, state, step, rate, evaluate=shared.evaluate,
      measure_curvature=shared.measure and functools.partial(_measure_curvature, shared, m),
      save=functools.partial(_save, m), cost=m.cost)


def _train_group(members: list[Member], state_M, step: int, shared: Shared) -> None:
  """loop.train_loop for members that all stand at `step`, one chunk program for all."""
  spec = members[0].spec   # every field but workdir is the same for all members
  B, T = spec.batch_size, spec.tokens_per_example
  for m in members:
    m.writer = metrics_lib.MetricsWriter(m.workdir, B, spec.total_steps, step, m.book["elapsed"],
                                         tokens_per_example=T)
  member_inputs = shared.stack(*[m.inputs for m in members])
  cost_record = {}
  cost = resources.ChunkCost(chunk.CarriedOrder(shared.program, shared.initial_order),
                             cost_record, B)
  take = lambda i: shared.take(state_M, i)
  with loop.StopRequest() as stop:
    if step == 0 and spec.eval_at_start:
      for i, m in enumerate(members):
        results = shared.evaluate(take(i))
        m.writer.write(0, results)
        bookkeeping.record_eval(m.book, 0, B, results, T)
    while step < spec.total_steps and any(m.running for m in members):
      active = [i for i, m in enumerate(members) if m.running]
      active_M = sharding.put_replicated(np.asarray([m.running for m in members]), shared.mesh)
      segment_end = cadence.next_due(step, spec.eval_every_steps, spec.total_steps)
      chunks, started, stopping, before = [], time.perf_counter(), False, dict(cost_record)
      start = step
      while start < segment_end:   # loop.train_loop's chunks: each ends at a log record too
        if stop.requested(start):
          segment_end, stopping = start, True
          break
        end = min(start + spec.chunk_steps, segment_end,
                  cadence.next_due(start, spec.log_every_steps, spec.total_steps))
        state_M, metrics_MxK, ends_M = cost(state_M, member_inputs, active_M, shared.train_arrays,
                                            np.int32(end - start),
                                            num_steps=spec.chunk_length(end - start))
        if chunks:
          jax.block_until_ready(chunks[-1])
        chunks.append((start, end, metrics_MxK, ends_M))
        start = end
      if chunks:
        fetched = jax.device_get([c[2:] for c in chunks])
        metrics_MxK = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[
            jax.tree.map(lambda x: x[:, :end - start], m) for (start, end, *_), (m, _) in
            zip(chunks, fetched)])
        n, seconds = segment_end - step, time.perf_counter() - started
        compile_seconds = cost.segment_done(n, seconds)
        _share_cost(cost_record, {k: before.get(k, 0.0) for k in cost_record},
                    [members[i] for i in active])
        rate = n * B / max(seconds - compile_seconds, 1e-9)   # each member's examples/s
        if jax.process_index() == 0:
          print(f"step {segment_end}/{spec.total_steps}  {len(active)} vectorised trials  loss"
                f" {np.mean(metrics_MxK['train/loss'][active]):.4f}  {rate * len(active):,.0f}"
                " examples/s", flush=True)
        for i in active:
          m = members[i]
          metrics_K = {k: v[i] for k, v in metrics_MxK.items()}
          chunk_ends = {end: {k: float(v[i]) for k, v in e.items()}
                        for (_, end, *_), (_, e) in zip(chunks, fetched)}
          if m.book["initial_loss"] is None:
            m.book["initial_loss"] = float(metrics_K["train/loss"][0])
          diverged = bookkeeping.first_divergence(metrics_K["train/loss"], step,
                                                  m.book["initial_loss"], spec.loss_multiple)
          count = diverged[0] + 1 if diverged else n
          bookkeeping.log_train(m.writer, m.book, metrics_K, step, count,
                                diverged=bool(diverged), examples_per_sec=rate, spec=m.spec,
                                chunk_ends=chunk_ends)
          m.step = step + count
          if diverged:   # frozen from the next chunk on; the others train on
            m.book.update(status="diverged", diverged_at_step=step + diverged[0],
                          diverged_reason=diverged[1])
            _finish(m, None)
        step = segment_end
      if not stopping and cadence.due(step, spec.eval_every_steps, spec.total_steps):
        for i, m in enumerate(members):
          if m.running:
            state = take(i)
            _evaluate_member(shared, m, state, step, rate)
            if m.book["status"] == "done":   # stopped at its target: frozen from now on
              _finish(m, state)
      if ((stopping or stop.requested(step)) and any(m.running for m in members)
          and step < spec.total_steps):
        for m in members:
          if m.running:
            m.book["status"] = "preempted"
        break
    for i, m in enumerate(members):
      if m.summary is None:
        if m.book["status"] == "running":
          m.book["status"] = "done"
        _finish(m, take(i))
  if any(m.book["status"] == "preempted" for m in members):
    print(f"stopped by signal {stop.signal} at step {step}: checkpoints saved, rerun to resume",
          flush=True)
    raise loop.Preempted(128 + (stop.signal or signal.SIGTERM))
