"""Metrics sinks: metrics.jsonl (the source of truth), TensorBoard events beside it, the console.

Only process 0 writes; every record carries `step`, `examples` and `wall_time`.
"""
import json
import math
import os
import time

import jax
from tensorboardX import SummaryWriter


def _plain(value):
  """numpy/jax scalars and small arrays -> JSON-ready Python values (NaN stays NaN)."""
  if hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, float) or isinstance(value, int) or isinstance(value, list):
    return value
  return float(value)


class MetricsWriter:

  def __init__(self, workdir: str, batch_size: int, total_steps: int, start_step: int = 0,
               elapsed: float = 0.0, tokens_per_example: int = 0):
    self.enabled = jax.process_index() == 0
    self.batch_size = batch_size
    self.tokens_per_example = tokens_per_example   # a language model's batch measure; 0: none
    self.total_steps = total_steps
    self._t0 = time.time() - elapsed       # wall_time continues across resumes
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      # TensorBoard hides events at or past purge_step that an interrupted run left behind
      # (metrics.jsonl is truncated the same way; a resumed run starts after its checkpoint).
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30,
                               purge_step=start_step + 1 if start_step else 0)

  def elapsed(self) -> float:
    return time.time() - self._t0

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "examples": int(step) * self.batch_size,
              "wall_time": round(self.elapsed(), 3)}
    if self.tokens_per_example:
      record["tokens"] = record["examples"] * self.tokens_per_example
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, global_step=step)

  def progress(self, step: int, steps: int, seconds: float, loss: float) -> float:
    """One console line: step, loss, training throughput (`steps` took `seconds`, evaluation and
    curvature excluded) and ETA; returns examples per second."""
    rate = steps / max(seconds, 1e-9)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    if self.enabled:
      print(f"step {step}/{self.total_steps}  loss {loss:.4f}  "
            f"{rate * self.batch_size:,.0f} examples/s  eta {eta:,.0f}s", flush=True)
    return rate * self.batch_size

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def truncate_after(path: str, step: int) -> None:
  """Drops records past `step`: a resumed run rewrites them, so none is duplicated or missing."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):  # a line cut by a kill mid-write
        pass
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
