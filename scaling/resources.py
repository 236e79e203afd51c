"""What a trial costs: compile time, steady-state throughput, peak device memory; why it stopped.

`ChunkCost` wraps the jitted train chunk. A call with a chunk length it has not seen compiles
(tracing + XLA, or a load from the persistent compilation cache): that call is timed as compile
time and its segment is left out of the throughput, so `examples_per_sec` is the steady state of
training alone (evaluation and curvature run between segments and are not timed). Peak memory is
the device's own `peak_bytes_in_use` where the backend reports memory stats (GPU, TPU), else XLA's
compiled memory analysis of the chunk (arguments + outputs - aliased + temporaries): what XLA plans
to hold at once, which the CPU backend does not measure. Everything lands in the trial's
bookkeeping dict `record` (checkpointed, so a resume continues the sums).
"""
import time

import jax

STOP_REASONS = ("target", "budget", "diverged", "preempted")


class ChunkCost:

  def __init__(self, chunk_fn, record: dict, batch_size: int):
    self._fn, self._record, self._batch_size = chunk_fn, record, batch_size
    self._seen, self._compiled_in_segment = set(), False
    record.setdefault("compile_seconds", 0.0)
    record.setdefault("train_seconds", 0.0)     # steady-state segments only
    record.setdefault("train_steps", 0)

  def __call__(self, state, *args, num_steps):
    if num_steps in self._seen:
      return self._fn(state, *args, num_steps=num_steps)
    started = time.perf_counter()
    out = self._fn(state, *args, num_steps=num_steps)   # returns once compiled and dispatched
    self._record["compile_seconds"] += time.perf_counter() - started
    self._seen.add(num_steps)
    self._compiled_in_segment = True
    if "memory_bytes" not in self._record:
      self._record.update(_memory_analysis(self._fn, out[0], args, num_steps))
    return out

  def segment_done(self, steps: int, seconds: float) -> None:
    """Counts a dispatched-and-fetched segment of `steps` steps unless it included a compile."""
    if not self._compiled_in_segment:
      self._record["train_seconds"] += seconds
      self._record["train_steps"] += steps
    self._compiled_in_segment = False

  def summary(self) -> dict:
    r = self._record
    rate = r["train_steps"] * self._batch_size / r["train_seconds"] if r["train_seconds"] else None
    memory = _device_peak_bytes()
    return {"examples_per_sec": rate, "compile_seconds": r["compile_seconds"],
            "peak_memory_bytes": memory or r.get("memory_bytes"),
            "memory_source": "device memory_stats" if memory else r.get("memory_source")}


def _memory_analysis(chunk_fn, state, args, num_steps) -> dict:
  """XLA's plan for the chunk; after the first call, lower().compile() hits jit's cache."""
  try:
    m = chunk_fn.lower(state, *args, num_steps=num_steps).compile().memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)
    return {"memory_bytes": int(total), "memory_source": "XLA compiled memory analysis"}
  except Exception:   # some backends have no memory analysis: the report shows '-'
    return {"memory_bytes": None, "memory_source": None}


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def stop_reason(status: str, target_reached: bool, stop_at_target: bool) -> str | None:
  """Why a finished trial stopped: one of STOP_REASONS, None while it runs."""
  if status in ("diverged", "preempted"):
    return status
  if status != "done":
    return None
  return "target" if target_reached and stop_at_target else "budget"
