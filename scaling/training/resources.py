"""What a trial costs: compile time, steady-state throughput, peak device memory; why it stopped.

`ChunkCost` wraps the jitted train chunk. A call with a chunk length it has not seen compiles
(tracing + XLA, or a load from the persistent compilation cache): that call is timed as compile
time and its segment is left out of the throughput, so `examples_per_sec` is the steady state of
training alone (evaluation and curvature run between segments and are not timed). Peak memory is
the device's own `peak_bytes_in_use` where the backend reports memory stats (GPU, TPU), else XLA's
compiled memory analysis of the chunk (arguments + outputs - aliased + temporaries): what XLA plans
to hold at once, which the CPU backend does not measure. Everything lands in the trial's
record (scaling/training/record.py: `resources`) (checkpointed, so a resume continues the sums).

Compilations are counted from jax.monitoring's events: every XLA compile request of a jitted
function ends with a backend-compile event, preceded by a cache-hit event when the persistent
compilation cache supplied the executable instead. `compile_counts()` is this process's running
count per function name; summary.json records a trial's own (`compilations`).
"""
import collections
import time

import jax
from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_counts = collections.Counter()     # (function name, "compiled" | "cache_hit") -> count
_hit_pending = [False]


def _on_event(event: str, **kwargs) -> None:
  if event == _CACHE_HIT:
    _hit_pending[0] = True


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  del seconds
  if event == _BACKEND_COMPILE:
    name = kwargs.get("fun_name", "?").removeprefix("jit(").removesuffix(")")
    _counts[name, "cache_hit" if _hit_pending[0] else "compiled"] += 1
    _hit_pending[0] = False


monitoring.register_event_listener(_on_event)
monitoring.register_event_duration_secs_listener(_on_duration)


def compile_counts() -> collections.Counter:
  """A copy of this process's counts so far: (function name, "compiled" | "cache_hit") -> n."""
  return collections.Counter(_counts)


def count_summary(before: collections.Counter, after: collections.Counter) -> dict:
  """What happened between two compile_counts(): XLA compilations of the train chunk and of all
  functions, and executables loaded from the persistent cache instead."""
  delta = after - before
  # A vectorised group's chunk (scaling/training/vectorized.py) is its members' train chunk.
  return {"train_chunk": delta["train_chunk", "compiled"] + delta["vectorized_chunk", "compiled"],
          "all": sum(n for (_, kind), n in delta.items() if kind == "compiled"),
          "cache_hits": sum(n for (_, kind), n in delta.items() if kind == "cache_hit")}

STOP_REASONS = ("target", "budget", "diverged", "preempted")


class ChunkCost:

  def __init__(self, chunk_fn, record: dict, batch_size: int):
    self._fn, self._record, self._batch_size = chunk_fn, record, batch_size
    self._seen, self._compiled_in_segment, self._segment_compile = set(), False, 0.0
    self._counted_from = compile_counts()
    record.setdefault("compilations", {"train_chunk": 0, "all": 0, "cache_hits": 0})
    record.setdefault("compile_seconds", 0.0)
    record.setdefault("train_seconds", 0.0)     # steady-state segments only
    record.setdefault("train_steps", 0)

  def __call__(self, state, *args, num_steps):
    if num_steps in self._seen:
      return self._fn(state, *args, num_steps=num_steps)
    started = time.perf_counter()
    out = self._fn(state, *args, num_steps=num_steps)   # returns once compiled and dispatched
    self._segment_compile += time.perf_counter() - started
    self._record["compile_seconds"] += time.perf_counter() - started
    self._seen.add(num_steps)
    self._compiled_in_segment = True
    if "memory_bytes" not in self._record:
      self._record.update(_memory_analysis(self._fn, out[0], args, num_steps))
    return out

  def segment_done(self, steps: int, seconds: float) -> float:
    """Counts a dispatched-and-fetched segment of `steps` steps unless it included a compile;
    returns the seconds of this segment's compile calls (0.0 without)."""
    if not self._compiled_in_segment:
      self._record["train_seconds"] += seconds
      self._record["train_steps"] += steps
    compiled, self._compiled_in_segment, self._segment_compile = self._segment_compile, False, 0.0
    return compiled

  def _count_compilations(self) -> None:
    """Adds the compilations since the last call to the record (it outlives a resume)."""
    now = compile_counts()
    for key, n in count_summary(self._counted_from, now).items():
      self._record["compilations"][key] += n
    self._counted_from = now

  def summary(self) -> dict:
    self._count_compilations()
    r = self._record
    rate = r["train_steps"] * self._batch_size / r["train_seconds"] if r["train_seconds"] else None
    memory = _device_peak_bytes()
    return {"examples_per_sec": rate, "compile_seconds": r["compile_seconds"],
            "peak_memory_bytes": memory or r.get("memory_bytes"),
            "memory_source": "device memory_stats" if memory else r.get("memory_source"),
            "compilations": dict(r["compilations"])}


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
