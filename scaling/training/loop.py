"""The training loop: a group of M >= 1 trials (members) trained by one chunk program. A trial
trained alone is a group of one (train.run); scaling/training/vectorized.py's groups vmap the chunk.

Chunks are dispatched up to each evaluation and their metrics fetched in one go; each member's
record (scaling/training/record.py) absorbs its metrics, and the member evaluates, measures curvature,
checkpoints and writes summary.json at a solo trial's cadence. A member that diverges, or reaches
its target with stop_at_target, is finished at once: its files are final and the chunk freezes it
(its `active` flag) while the others train on. SIGTERM/SIGINT stop the group between chunks with
a checkpoint for every member still running.

It knows nothing of configs (`LoopSpec` holds what it needs) nor of how the chunk was built: every
chunk is called as `chunk(state, active_M, num_active, num_steps=K)` -> (state, metrics, ends)
and turns a list of those outputs into host arrays with a leading member axis
(`chunk.to_host`); `chunk.member_state(state, i)` is member i's TrainState (chunk.Solo,
vectorized.Vmapped).
"""
import dataclasses
import os
import signal
import threading
import time

import jax
import numpy as np

from scaling import models, sharding
from scaling.training import cadence, checkpoint, progress, resources, schedule
from scaling.training import metrics as metrics_lib
from scaling.training import record as record_lib
from scaling.training.metrics import write_json


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """What the training loop needs of the config and the plan: no ConfigDict below `run`."""
  workdir: str
  batch_size: int
  total_steps: int
  eval_every_steps: int
  log_every_steps: int
  chunk_steps: int
  chunk_unroll: bool
  checkpoint_every_steps: int
  eval_at_start: bool
  stop_at_target: bool
  tokens_per_example: int               # the context length of a language model; 0 for images
  noise_sizes: tuple[int, int] | None   # (small, big) batch of the noise-scale estimators
  noise_ema_decay: float
  loss_multiple: float                  # diverged past this multiple of the initial loss (0: off)
  curvature_every_steps: int
  curvature_density: bool
  curvature_top_only: bool              # the every_steps measurements: top eigenvalue only

  @classmethod
  def of(cls, config, plan: schedule.Plan, workdir: str, groups: int) -> "LoopSpec":
    B, G = config.batch_size, groups   # G: derived.microbatching's noise-scale groups
    return cls(
        workdir=workdir, batch_size=B, total_steps=plan.total_steps,
        eval_every_steps=plan.eval_every_steps, log_every_steps=plan.log_every_steps,
        chunk_steps=config.chunk_steps, chunk_unroll=config.chunk_unroll,
        checkpoint_every_steps=config.checkpoint.every_steps,
        eval_at_start=config.eval_at_start, stop_at_target=config.target.stop_at_target,
        tokens_per_example=models.context_length(config.model), noise_sizes=(B // G, B) if G > 1 else None,
        noise_ema_decay=config.noise_scale.ema_decay,
        loss_multiple=config.divergence.loss_multiple,
        curvature_every_steps=config.curvature.every_steps,
        curvature_density=config.curvature.density,
        curvature_top_only=config.curvature.scheduled == "top_eigenvalue")

  def chunk_length(self, num_active: int) -> int:
    """The compiled chunk's (static) length for a chunk of num_active steps: chunk_steps, one
    program for every length, or, unrolled, num_active itself (train_chunk: no skipped steps)."""
    return num_active if self.chunk_unroll else self.chunk_steps


class StopRequest:
  """SIGTERM/SIGINT set a flag; the loop polls it before every chunk it dispatches, saves a
  checkpoint where it stands and exits."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def requested(self, step: int) -> bool:
    """Whether to stop at `step` (every process agrees: a signal may reach only one of them)."""
    del step   # where the loop stands; tests/harness.py signals the process at a known step
    return sharding.any_process(self.signal is not None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Preempted(SystemExit):
  """Raised after a SIGTERM/SIGINT checkpoint; exits the process with 128 + signal number."""


@dataclasses.dataclass
class Member:
  """One trial of a group, on the host: its files, its running record, where it stands."""
  spec: LoopSpec
  record: record_lib.TrialRecord
  ckpts: checkpoint.Checkpoints
  step: int                       # where it stands: behind the group once it has diverged
  measure: object = None          # its measure.Measure (its own key and warm start), or None
  cost: resources.ChunkCost = None   # summary() of its share of the group's cost
  writer: metrics_lib.MetricsWriter = None
  summary: dict | None = None     # set once it is finished

  @property
  def running(self) -> bool:
    return self.record.status == "running" and self.summary is None

  def save(self, state, step: int) -> None:
    self.record.elapsed = self.writer.elapsed()
    self.record.last_checkpoint_step = step
    self.writer.flush()
    self.ckpts.save(step, state, self.record.as_dict())

  def evaluate(self, state, step: int, rate: float, evaluate) -> None:
    """The evaluation at `step` and what hangs on it: the target (and the noise scale there),
    the curvature on its schedule, a checkpoint on its schedule, the flushed metrics and
    summary.json."""
    spec, record = self.spec, self.record
    B, T = spec.batch_size, spec.tokens_per_example
    results = evaluate(state)
    self.writer.write(step, results)
    newly_reached = record.record_eval(step, B, results, T)
    if newly_reached:   # equal-loss comparisons across batch sizes (McCandlish et al. 2018)
      record.target.at = {"wall_time": self.writer.elapsed(), **record.noise_metrics()}
    if spec.stop_at_target and record.target.reached:
      record.status = "done"
    finishing = step == spec.total_steps or record.status == "done"
    if self.measure and (finishing or newly_reached or cadence.crossed(
        step, record.last_curvature_step, spec.curvature_every_steps)):
      results = self.measure(state, step, step_seconds=B / rate,
                             density=finishing and spec.curvature_density,
                             top_only=spec.curvature_top_only and not (finishing or newly_reached))
      density = results.pop("curvature/density", None)
      if density and jax.process_index() == 0:
        np.savez(os.path.join(spec.workdir, f"density_{step}.npz"), **density)
      record.curvature, record.last_curvature_step = results, step
      if newly_reached:
        record.target.at.update(results)
      self.writer.write(step, results)
    if cadence.crossed(step, record.last_checkpoint_step, spec.checkpoint_every_steps):
      self.save(state, step)
    record.elapsed = self.writer.elapsed()
    self.writer.flush()   # metrics.jsonl is readable (the report, a person) at every evaluation
    write_json(os.path.join(spec.workdir, "summary.json"), self._summary())

  def finish(self, state) -> None:
    """Its last checkpoint (not for a diverged trial: its state is not worth resuming), then
    summary.json; its files are final."""
    if self.record.status in ("done", "preempted") and self.record.last_checkpoint_step != self.step:
      self.save(state, self.step)
    self.ckpts.wait()
    self.record.elapsed = self.writer.elapsed()
    self.writer.close()
    self.summary = self._summary()
    write_json(os.path.join(self.spec.workdir, "summary.json"), self.summary)

  def _summary(self) -> dict:
    return self.record.summary(self.step, self.spec.batch_size, self.spec.tokens_per_example,
                               self.cost)


def _share_cost(group_record: dict, before: dict, members: list[Member]) -> None:
  """Adds the group's compile and train time of the last segment to each member that trained in
  it: the wall time its trial took, shared with the others."""
  for m in members:
    own = m.record.resources
    for key in ("compile_seconds", "train_seconds", "train_steps"):
      own[key] += group_record[key] - before.get(key, 0)
    for key in ("memory_bytes", "memory_source"):   # the whole group's program
      if key in group_record:
        own[key] = group_record[key]


def _fetch_segment(chunk, chunks):
  """The dispatched chunks' outputs on the host: per-step metrics {name: [M, steps]} of the whole
  segment and, per chunk end step, the end metrics {name: [M]}."""
  fetched = chunk.to_host([c[2:] for c in chunks])
  metrics_MxK = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1), *[
      jax.tree.map(lambda x: x[:, :end - start], m) for (start, end, *_), (m, _) in
      zip(chunks, fetched)])
  return metrics_MxK, {end: e for (_, end, *_), (_, e) in zip(chunks, fetched)}


def train_loop(members: list[Member], state, step: int, chunk, *, evaluate) -> list[dict]:
  """Trains the group, every member standing at `step`, to the end of the budget (each member
  may stop earlier at its target or divergence); returns the members' summaries. Raises
  Preempted after a stop request, with every running member checkpointed."""
  spec = members[0].spec   # every field but workdir is the members' common one
  B, T, M = spec.batch_size, spec.tokens_per_example, len(members)
  solo = members[0] if M == 1 else None   # a lone trial's ETA can follow its own target
  tracker = progress.TrialProgress(
      B, spec.total_steps, step, eval_every=spec.eval_every_steps, members=M,
      stop_at_target=bool(solo) and spec.stop_at_target,
      target=solo and (solo.record.target.metric, solo.record.target.value),
      curvature_every=spec.curvature_every_steps if members[0].measure else None)
  evaluate = tracker.timed("evaluation", evaluate)   # their measured cost goes into the ETA
  group_cost = {}
  cost = resources.ChunkCost(chunk, group_cost, B)
  for m in members:
    m.measure = m.measure and tracker.timed("curvature", m.measure)
    m.writer = metrics_lib.MetricsWriter(m.spec.workdir, B, spec.total_steps, step,
                                         m.record.elapsed, tokens_per_example=T)
  rate = None
  with StopRequest() as stop:
    if step == 0 and spec.eval_at_start:
      for i, m in enumerate(members):
        results = evaluate(chunk.member_state(state, i))
        m.writer.write(0, results)
        m.record.record_eval(0, B, results, T)
    while step < spec.total_steps and any(m.running for m in members):
      active = [i for i, m in enumerate(members) if m.running]
      active_M = np.array([m.running for m in members])
      # Dispatch the chunks up to the next evaluation, then fetch their metrics in one go. At
      # most one chunk waits in the queue, so a stop request is honoured within about two chunks.
      segment_end = cadence.next_due(step, spec.eval_every_steps, spec.total_steps)
      chunks, started, stopping, start = [], time.perf_counter(), False, step
      before = dict(group_cost)
      while start < segment_end:
        if stop.requested(start):
          segment_end, stopping = start, True
          break
        # A chunk ends at a train record too: its parameter norm is the record's.
        end = min(start + spec.chunk_steps, segment_end,
                  cadence.next_due(start, spec.log_every_steps, spec.total_steps))
        state, metrics, ends = cost(state, active_M, end - start,
                                    num_steps=spec.chunk_length(end - start))
        if chunks:
          jax.block_until_ready(chunks[-1])
        chunks.append((start, end, metrics, ends))
        start = end
      if chunks:
        metrics_MxK, ends_M = _fetch_segment(chunk, chunks)
        n, seconds = segment_end - step, time.perf_counter() - started
        compile_seconds = cost.segment_done(n, seconds)
        _share_cost(group_cost, before, [members[i] for i in active])
        rate = tracker.segment(segment_end, n, seconds - compile_seconds,
                               float(np.mean(metrics_MxK["train/loss"][active])),
                               show=jax.process_index() == 0)
        for i in active:
          m = members[i]
          count = m.record.absorb(
              m.writer, {k: v[i] for k, v in metrics_MxK.items()}, step, m.spec,
              examples_per_sec=rate,
              chunk_ends={end: {k: float(v[i]) for k, v in e.items()} for end, e in ends_M.items()})
          m.step = step + count
          if m.record.status == "diverged":   # frozen from the next chunk on
            m.finish(None)
        step = segment_end
      if not stopping and cadence.due(step, spec.eval_every_steps, spec.total_steps):
        for i, m in enumerate(members):
          if m.running:
            member_state = chunk.member_state(state, i)
            m.evaluate(member_state, step, rate, evaluate)
            if m.record.status == "done":   # stopped at its target: frozen from now on
              m.finish(member_state)
      # Every process stops together; a member that just finished (or reached its target) is done.
      if ((stopping or stop.requested(step)) and any(m.running for m in members)
          and step < spec.total_steps):
        for m in members:
          if m.running:
            m.record.status = "preempted"   # checkpointed by finish(), unless it just was
        break
    for i, m in enumerate(members):
      if m.summary is None:
        if m.record.status == "running":
          m.record.status = "done"
        m.finish(chunk.member_state(state, i))
    tracker.close()
  if any(m.record.status == "preempted" for m in members):
    print(f"stopped by signal {stop.signal} at step {step}: checkpoint{'s' if M > 1 else ''}"
          " saved, rerun to resume", flush=True)
    raise Preempted(128 + (stop.signal or signal.SIGTERM))
  return [m.summary for m in members]
