"""Metrics sinks: metrics.jsonl (the source of truth), TensorBoard events beside it, the console;
`atomic_write`, beneath every rewritten file (sweep.csv, a truncated metrics.jsonl), and over it
`write_json`, the JSON writer of every small file a trial keeps (config, summary).

Only process 0 writes; every record carries `step`, `examples` and `wall_time`. A full disk is
reported as `DiskFull`: one line naming the file, raised when it happens, with nothing half-written
left behind (temporary files removed; a cut metrics line is dropped on resume by `truncate_after`).
"""
import contextlib
import errno
import json
import math
import os
import sys
import threading
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


class DiskFull(Exception):
  """No space left on the device while writing a trial's files: one line, what and where."""


def mentions_disk_full(text: str) -> bool:
  return "No space left on device" in text or "Disk quota exceeded" in text


def is_disk_full(error: BaseException) -> bool:
  """ENOSPC/EDQUOT from Python, or from TensorStore (Orbax), which reports it in its message."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  return mentions_disk_full(str(error))


@contextlib.contextmanager
def reporting_disk_full(what: str, path: str):
  """Turns a full disk while writing `what` into DiskFull (one line); other errors pass."""
  try:
    yield
  except Exception as error:
    if not is_disk_full(error):
      raise
    raise DiskFull(f"disk full while writing {what}: free space on the disk of"
                   f" {path} and rerun (the trial resumes from its last checkpoint)") from None


@contextlib.contextmanager
def atomic_write(path: str, what: str, newline: str | None = None):
  """Yields a temporary file beside `path`, renamed onto it when the block ends without error: a
  reader never sees half a file. On any error the previous file is kept and the temporary one
  removed; a full disk becomes DiskFull naming `what`."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with reporting_disk_full(what, path):
      with open(tmp, "w", newline=newline) as f:
        yield f
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  """Atomic: a reader (the report, a resuming run) never sees half a file; on a full disk the
  previous file is kept and the temporary one removed."""
  if jax.process_index() != 0:
    return
  with atomic_write(path, os.path.basename(path)) as f:
    json.dump(obj, f, indent=2)


def _quiet_disk_full(previous_hook):
  """threading.excepthook / sys.unraisablehook that drops a full-disk error of a background
  writer or an exit handler (tensorboardX's): the loop reports it in one line. Others go on to
  `previous_hook`."""
  def hook(args):
    if not is_disk_full(args.exc_value):
      previous_hook(args)
  hook.drops_disk_full = True
  return hook


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
      self._tb = SummaryWriter(logdir=workdir, flush_secs=30, max_queue=1000,
                               purge_step=start_step + 1 if start_step else 0)
      if not getattr(threading.excepthook, "drops_disk_full", False):
        threading.excepthook = _quiet_disk_full(threading.excepthook)
      if not getattr(sys.unraisablehook, "drops_disk_full", False):
        sys.unraisablehook = _quiet_disk_full(sys.unraisablehook)

  def _check_tensorboard(self) -> None:
    """tensorboardX writes from a thread; when a full disk kills it, its queue fills and the next
    add_scalar would block forever. (tensorboardX offers no public handle on that thread.)"""
    worker = getattr(self._tb._get_file_writer().event_writer, "_worker", None)
    if worker is None or worker.is_alive():
      return
    directory = os.path.dirname(self._jsonl.name)
    stats = os.statvfs(directory)
    if stats.f_bavail * stats.f_frsize < 1 << 20:
      raise DiskFull(f"disk full while writing the TensorBoard events in {directory}: free space"
                     " and rerun (the trial resumes from its last checkpoint)")
    raise RuntimeError(f"tensorboardX's event writer in {directory} stopped (its error is above)")

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
    with reporting_disk_full("metrics.jsonl", self._jsonl.name):
      self._jsonl.write(json.dumps(record) + "\n")
    self._check_tensorboard()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, global_step=step)

  def flush(self) -> None:
    if self.enabled:
      with reporting_disk_full("metrics.jsonl", self._jsonl.name):
        self._jsonl.flush()
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      with reporting_disk_full("metrics.jsonl", self._jsonl.name):
        self._check_tensorboard()   # closing waits for its thread
        self._tb.close()
        self._jsonl.close()


def truncate_after(path: str, step: int, log_every_steps: int = 0) -> list[int]:
  """Drops records past `step`: a resumed run rewrites them, so none is duplicated. Returns the
  steps at or before `step` (multiples of log_every_steps, if given) that have no train record:
  records lost or removed while the run was stopped, which this run does not write again."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return []
  kept, logged = [], set()
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
        if record["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
          if "train/loss" in record:
            logged.add(record["step"])
      except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write, or damaged
        pass
  with atomic_write(path, "metrics.jsonl") as f:
    f.writelines(kept)
  expected = range(log_every_steps, step + 1, log_every_steps) if log_every_steps else ()
  return [s for s in expected if s not in logged]
