"""Console progress of a trial and of a sweep, with ETAs from measured costs. No JAX.

A trial's ETA adds up what is left at what it was measured to cost in this run: training steps at
the steady-state rate (the first segment, which compiles, left out once there is another), the
evaluations still scheduled and the curvature measurements still scheduled, each at the median of
its latest measured costs (the first of each includes its compilation: left out once there is
another, so the first ETAs run high). It counts to the step cap; a trial that stops at its target
counts to where a power law fitted to its latest evaluations crosses the target, and says so
(before three evaluations: 'eta <=', to the cap). Measured on the default study's 60 trials, from
their halfway point: the extrapolated steps left are a median 1.03x the real ones, within 1.5x for
a third of the trials (evaluations are noisy near the target); to the cap they were 4.4x.

A sweep's ETA: for each trial still to run, the median wall time of the trials with the same batch
size that ran in this process (else of the latest three), plus what is left of the current one;
trials already finished are skipped at no cost; the process's first trial, which also paid its
one-time costs, counts only until another has been measured. Before the first trial ends there is
no ETA.

Lines stay whole (cluster logs are files); only when stdout is a terminal does the trial line
redraw in place behind a progress bar.
"""
import collections
import math
import statistics
import sys
import time

import numpy as np

# Evaluations a trial's trend to its target is fitted to: 3, 5 and all gave a median further from
# the real steps left on the default study (0.86, 0.86, 0.64x; 8: 1.03x).
TREND_EVALUATIONS = 8


def evaluations_left(step: int, total: int, every: int) -> int:
  """Evaluations after `step`: at each multiple of `every` up to `total`, and at `total`."""
  if step >= total:
    return 0
  left = total // every - step // every if every > 0 else 0
  return left + (0 if every > 0 and total % every == 0 else 1)


def measurements_left(step: int, total: int, every: int) -> int:
  """Curvature measurements after `step`: one per multiple of `every` crossed (every > 0), and
  one at the end (the same one when `total` is a multiple). One taken when the target is first
  reached without stopping there is not counted."""
  return evaluations_left(step, total, every)


def duration(seconds: float | None) -> str:
  """3725 -> '1h02m', 125 -> '2m05s', 9.4 -> '9s'; None -> '?'."""
  if seconds is None:
    return "?"
  s = int(round(seconds))
  if s >= 3600:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def bar(fraction: float, width: int = 20) -> str:
  filled = int(round(width * min(max(fraction, 0.0), 1.0)))
  return "[" + "#" * filled + "." * (width - filled) + "]"


class TrialProgress:
  """Measures a trial's segment, evaluation and curvature costs; prints one line per segment."""

  def __init__(self, batch_size: int, total_steps: int, start_step: int = 0, *, eval_every: int,
               curvature_every: int | None = None, stop_at_target: bool = False,
               target: tuple[str, float] | None = None, members: int = 1, stream=None,
               clock=time.perf_counter):
    """target: (metric, value) that stops the trial when stop_at_target: the ETA then runs to
    the step where the metric's recent trend crosses it, where one can be extrapolated.
    members: the trials of a vectorised group (scaling/training/loop.py), each evaluated (and measured)
    at every evaluation step: the line shows their examples/s together."""
    self.batch_size, self.total_steps, self.start_step = batch_size, total_steps, start_step
    self.eval_every, self.curvature_every = eval_every, curvature_every
    self.stop_at_target, self.target = stop_at_target, target
    self.step = start_step
    self.members = members
    self.evaluations = []              # (step, target metric) of this run's evaluations
    self.stream = stream or sys.stdout
    self.clock = clock
    self.segments = []                 # (steps, seconds) of this run's training segments
    self.times = collections.defaultdict(list)   # 'evaluation' / 'curvature' -> seconds per call
    self._redrawing = False

  def timed(self, kind: str, fn):
    """`fn` whose every call is timed as one `kind` ('evaluation' or 'curvature')."""
    def wrapped(*args, **kwargs):
      started = self.clock()
      out = fn(*args, **kwargs)
      self.times[kind].append(self.clock() - started)
      if kind == "evaluation" and self.target and isinstance(out, dict):
        self.evaluations.append((self.step, out.get(self.target[0])))
      return out
    return wrapped

  @property
  def cost(self) -> dict:
    """kind -> seconds per call: the median of the latest five after the first (which compiled),
    the first while it is the only one."""
    return {k: statistics.median((v[1:] or v)[-5:]) for k, v in self.times.items() if v}

  def steps_per_sec(self) -> float | None:
    """Steady state: this run's segments after the first (which compiled), once there are any."""
    segs = self.segments[1:] or self.segments
    steps, seconds = sum(s for s, _ in segs), sum(t for _, t in segs)
    return steps / seconds if seconds > 0 else None

  def end_step(self) -> int:
    """Where the trial should end: the step cap, or, when it stops at the target, the step at
    which a power law fitted to the last TREND_EVALUATIONS evaluations (at least 3; log metric
    linear in log step) crosses the target, if the metric is falling (capped)."""
    pts = [(s, v) for s, v in self.evaluations[-TREND_EVALUATIONS:]
           if s > 0 and isinstance(v, (int, float)) and v > 0 and math.isfinite(v)]
    if not (self.stop_at_target and self.target and len(pts) >= 3):
      return self.total_steps
    slope, intercept = np.polyfit(np.log([s for s, _ in pts]), np.log([v for _, v in pts]), 1)
    if slope >= 0:
      return self.total_steps
    # In log space: a nearly flat trend puts the crossing past any float (it must never crash a
    # trial: this is a console estimate), and past the cap the cap is the answer anyway.
    log_crossing = (math.log(self.target[1]) - intercept) / slope
    if not log_crossing < math.log(self.total_steps):
      return self.total_steps
    crossing = math.exp(log_crossing)
    return int(min(max(math.ceil(crossing - 1e-6), self.step), self.total_steps))   # float noise

  def eta(self, step: int) -> dict:
    """Seconds left per part ('train', 'evaluation', 'curvature') and 'total'; None if unknown."""
    rate = self.steps_per_sec()
    end = self.end_step()
    # Evaluations fall on multiples of eval_every: the one that sees the target is at or after it.
    if end < self.total_steps and self.eval_every > 0:
      end = min(-(-end // self.eval_every) * self.eval_every, self.total_steps)
    parts = {"train": (end - step) / rate if rate else None}
    evals = evaluations_left(step, end, self.eval_every)
    per_step = self.members   # one evaluation (and measurement) per member
    parts["evaluation"] = (evals * per_step * self.cost["evaluation"] if "evaluation" in self.cost
                           else None)
    if self.curvature_every is not None:
      left = measurements_left(step, end, self.curvature_every) * per_step
      parts["curvature"] = left * self.cost["curvature"] if "curvature" in self.cost else None
    known = [v for v in parts.values() if v is not None]
    parts["total"] = sum(known) if parts["train"] is not None else None
    return parts

  def segment(self, step: int, steps: int, seconds: float, loss: float, show=True) -> float:
    """Records a segment that ended at `step`, prints the line (if `show`); returns its
    examples/s (per member of a group)."""
    self.segments.append((steps, seconds))
    self.step = step
    if show:
      self.line(step, loss)
    return steps / max(seconds, 1e-9) * self.batch_size

  def line(self, step: int, loss: float) -> str:
    rate, eta, end = self.steps_per_sec(), self.eta(step), self.end_step()
    group = f"  {self.members} vectorised trials" if self.members > 1 else ""
    text = (f"step {step}/{self.total_steps}{group}  loss {loss:.4f}  "
            f"{(rate or 0) * self.batch_size * self.members:,.0f} examples/s")
    if eta["total"] is None:
      text += "  eta ? (measuring)"
    else:
      parts = {k: v for k, v in eta.items() if k != "total"}
      detail = ", ".join(f"{k} {duration(v)}" for k, v in parts.items() if v is not None)
      unknown = [k for k, v in parts.items() if v is None]
      detail += "".join(f"; + {k} (not measured yet)" for k in unknown)
      bound = "<=" if self.stop_at_target and end == self.total_steps else ""
      whence = ("" if not self.stop_at_target else "; to the cap, unless it reaches the target"
                if end == self.total_steps else f"; to the target, extrapolated at step ~{end}")
      text += (f"  eta {'>=' if unknown else bound}{duration(eta['total'])} ({detail}{whence})")
    sweep = SweepProgress.current
    if sweep is not None:
      text += "  |  " + sweep.status(current_left=eta["total"])
    self._print(text, step / max(self.total_steps, 1))
    return text

  def _print(self, text, fraction):
    if self.stream.isatty():
      self.stream.write(f"\r{bar(fraction)} {text}\x1b[K")
      self._redrawing = True
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def close(self):
    if self._redrawing:
      self.stream.write("\n")
      self.stream.flush()
      self._redrawing = False


class SweepProgress:
  """Where a sweep stands: trial k of N, outcomes so far, and its ETA (module docstring)."""

  current = None   # the sweep whose trial this process is training now, for the trial's lines

  def __init__(self, batch_sizes: list[int], finished: set[int], stream=None,
               clock=time.monotonic):
    """batch_sizes: of the trials this process will go through, in order; finished: indices
    into it of trials already finished (they will be skipped)."""
    self.batch_sizes, self.finished = batch_sizes, set(finished)
    self.stream = stream or sys.stdout
    self.clock = clock
    self.counts = collections.Counter()
    self.measured = []   # (batch size, wall seconds) of the trials run here, in order
    self.position, self._started = -1, None


  def estimate(self, batch_size: int) -> float | None:
    """A trial's expected wall time: the median of those measured at its batch size, else of the
    latest three (the machine as it is now). The process's first trial also paid one-time costs
    (imports, data, the first compilations): it counts only while it is the only one."""
    measured = self.measured[1:] or self.measured
    same = [s for b, s in measured if b == batch_size]
    latest = [s for _, s in measured[-3:]]
    return statistics.median(same or latest) if measured else None

  def eta(self, current_left: float | None = None) -> float | None:
    """Seconds left: the current trial's remainder (its own ETA, capped by what its batch size
    took before) and every later trial not already finished."""
    later = [self.estimate(b) for i, b in enumerate(self.batch_sizes)
             if i > self.position and i not in self.finished]
    now = 0.0
    if self._started is not None:
      typical = self.estimate(self.batch_sizes[self.position])
      elapsed = self.clock() - self._started
      guesses = [g for g in (current_left, typical and max(typical - elapsed, 0.0))
                 if g is not None]
      now = min(guesses) if guesses else None
    if now is None or any(e is None for e in later):
      return None
    return now + sum(later)

  def status(self, current_left: float | None = None) -> str:
    c = self.counts
    eta = self.eta(current_left)
    return (f"sweep: trial {self.position + 1} of {len(self.batch_sizes)}; done {c['done']},"
            f" skipped {c['skipped']}, diverged {c['diverged']}, failed {c['failed']};"
            f" eta {duration(eta) if eta is not None else '? (after the first trial)'}")

  def start(self, position: int, label: str) -> None:
    self.position, self._started = position, self.clock()
    SweepProgress.current = self
    self._print(f"{label}: training  |  {self.status()}")

  def leave(self) -> None:
    """The current trial's lines no longer report this sweep (it ended, or raised)."""
    if SweepProgress.current is self:
      SweepProgress.current = None

  def skip(self, position: int) -> None:
    self.position, self._started = position, None
    self.counts["skipped"] += 1

  def end(self, status: str) -> None:
    """The current trial ended with `status` (done, diverged, failed, preempted)."""
    if self._started is not None and status in ("done", "diverged"):
      self.measured.append((self.batch_sizes[self.position], self.clock() - self._started))
    self.counts[status] += 1
    self._started = None

  def finish(self) -> None:
    c = self.counts
    self._print(f"sweep: {len(self.batch_sizes)} trial(s): done {c['done']}, skipped "
                f"{c['skipped']}, diverged {c['diverged']}, failed {c['failed']}")

  def _print(self, text):
    self.stream.write(text + "\n")
    self.stream.flush()
