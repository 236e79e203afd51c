"""The training loop of one trial: chunks dispatched up to each evaluation, their metrics fetched
in one go, evaluations, curvature, checkpoints, summary.json, and a stop on SIGTERM/SIGINT.

It knows nothing of configs (`LoopSpec` holds what it needs) nor of how the chunk was built
(train.run's jitted chunk, data.host.HostChunk, or vectorized's per-member bookkeeping reuse it).
"""
import dataclasses
import os
import signal
import threading
import time

import jax
import numpy as np

from scaling import bookkeeping, cadence, models, progress, schedule, sharding
from scaling import metrics as metrics_lib
from scaling.metrics import write_json


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


def evaluate_and_record(spec: LoopSpec, book, writer, state, step: int, rate: float, *, evaluate,
                        measure_curvature, save, cost) -> None:
  """The evaluation at `step` and what hangs on it: the target (and the noise scale there), the
  curvature on its schedule, a checkpoint on its schedule, the flushed metrics and summary.json.
  Shared by train_loop and vectorized's members (each with its own book, writer and cost)."""
  B, T = spec.batch_size, spec.tokens_per_example
  results = evaluate(state)
  writer.write(step, results)
  newly_reached = bookkeeping.record_eval(book, step, B, results, T)
  if newly_reached:   # equal-loss comparisons across batch sizes (McCandlish et al. 2018)
    book["target"]["at"] = {"wall_time": writer.elapsed(),
                            **bookkeeping.noise_metrics(book["noise"])}
  if spec.stop_at_target and book["target"]["reached"]:
    book["status"] = "done"
  finishing = step == spec.total_steps or book["status"] == "done"
  if measure_curvature and (finishing or newly_reached or cadence.crossed(
      step, book["last_curvature_step"], spec.curvature_every_steps)):
    results = measure_curvature(state, step, step_seconds=B / rate,
                                density=finishing and spec.curvature_density,
                                top_only=spec.curvature_top_only and not (
                                    finishing or newly_reached))
    density = results.pop("curvature/density", None)
    if density and jax.process_index() == 0:
      np.savez(os.path.join(spec.workdir, f"density_{step}.npz"), **density)
    book["curvature"], book["last_curvature_step"] = results, step
    if newly_reached:
      book["target"]["at"].update(results)
    writer.write(step, results)
  if cadence.crossed(step, book["last_checkpoint_step"], spec.checkpoint_every_steps):
    save(state, step)
  book["elapsed"] = writer.elapsed()
  writer.flush()   # metrics.jsonl is readable (the report, a person) at every evaluation
  write_json(os.path.join(spec.workdir, "summary.json"),
             bookkeeping.summary(book, step, B, T, cost))


def train_loop(spec: LoopSpec, state, step, book, *, ckpts, chunk_fn, evaluate,
                measure_curvature, train_data):
  """Runs from `step` to the end of the budget (or target/divergence/preemption)."""
  B, T = spec.batch_size, spec.tokens_per_example
  tracker = progress.TrialProgress(
      B, spec.total_steps, step, eval_every=spec.eval_every_steps,
      stop_at_target=spec.stop_at_target,
      target=(book["target"]["metric"], book["target"]["value"]),
      curvature_every=spec.curvature_every_steps if measure_curvature else None)
  evaluate = tracker.timed("evaluation", evaluate)   # their measured cost goes into the ETA
  measure_curvature = measure_curvature and tracker.timed("curvature", measure_curvature)
  writer = metrics_lib.MetricsWriter(spec.workdir, B, spec.total_steps, step, book["elapsed"],
                                     tokens_per_example=T, tracker=tracker)
  summary_path = os.path.join(spec.workdir, "summary.json")

  def save(state, step):
    book["elapsed"] = writer.elapsed()
    book["last_checkpoint_step"] = step
    writer.flush()
    ckpts.save(step, state, book)

  with StopRequest() as stop:
    if step == 0 and spec.eval_at_start:
      results = evaluate(state)
      writer.write(0, results)
      bookkeeping.record_eval(book, 0, B, results, T)
    while step < spec.total_steps and book["status"] == "running":
      # Dispatch the chunks up to the next evaluation, then fetch their metrics in one go. At
      # most one chunk waits in the queue, so a stop request is honoured within about two chunks.
      segment_end = cadence.next_due(step, spec.eval_every_steps, spec.total_steps)
      chunks, started, stopping, start = [], time.perf_counter(), False, step
      while start < segment_end:
        if stop.requested(start):
          segment_end, stopping = start, True
          break
        # A chunk ends at a log record too: its parameter norm is the record's.
        end = min(start + spec.chunk_steps, segment_end,
                  cadence.next_due(start, spec.log_every_steps, spec.total_steps))
        state, metrics_K, ends = chunk_fn(state, *train_data, np.int32(end - start),
                                          num_steps=spec.chunk_length(end - start))
        if chunks:
          jax.block_until_ready(chunks[-1])
        chunks.append((start, end, metrics_K, ends))
        start = end
      if chunks:
        fetched = jax.device_get([c[2:] for c in chunks])
        metrics_K = jax.tree.map(lambda *xs: np.concatenate(xs), *[
            jax.tree.map(lambda x: x[:end - start], m) for (start, end, *_), (m, _) in
            zip(chunks, fetched)])
        chunk_ends = {end: {k: float(v) for k, v in e.items()}
                      for (_, end, *_), (_, e) in zip(chunks, fetched)}
        n = segment_end - step
        seconds = time.perf_counter() - started
        compile_seconds = chunk_fn.segment_done(n, seconds)
        rate = writer.progress(segment_end, n, seconds - compile_seconds,
                               float(np.mean(metrics_K["train/loss"])))
        if book["initial_loss"] is None:
          book["initial_loss"] = float(metrics_K["train/loss"][0])
        diverged = bookkeeping.first_divergence(metrics_K["train/loss"], step, book["initial_loss"],
                                    spec.loss_multiple)
        count = diverged[0] + 1 if diverged else n
        bookkeeping.log_train(writer, book, metrics_K, step, count, diverged=bool(diverged),
                              examples_per_sec=rate, spec=spec, chunk_ends=chunk_ends)
        if diverged:  # a result, not a crash: record where and why, keep the sweep going
          book.update(status="diverged", diverged_at_step=step + diverged[0],
                      diverged_reason=diverged[1])
          step += count
          break
        step = segment_end
      if not stopping and cadence.due(step, spec.eval_every_steps, spec.total_steps):
        evaluate_and_record(spec, book, writer, state, step, rate, evaluate=evaluate,
                            measure_curvature=measure_curvature, save=save, cost=chunk_fn)
      # Every process stops together; a run that just finished (or stopped at its target) is done.
      if ((stopping or stop.requested(step)) and book["status"] == "running"
          and step < spec.total_steps):
        book["status"] = "preempted"   # saved below, unless this step's checkpoint just was
        break
    if book["status"] == "running":
      book["status"] = "done"
    # A stop right after a checkpoint finds its step saved already.
    if book["status"] in ("done", "preempted") and book["last_checkpoint_step"] != step:
      save(state, step)
    ckpts.wait()
    book["elapsed"] = writer.elapsed()
    writer.close()
    summary = bookkeeping.summary(book, step, B, T, chunk_fn)
    write_json(summary_path, summary)
  if book["status"] == "preempted":
    print(f"stopped by signal {stop.signal} at step {step}: checkpoint saved, rerun to resume",
          flush=True)
    raise Preempted(128 + (stop.signal or signal.SIGTERM))
  return summary
