"""Where a sweep stands, from its workdir alone: one line per trial and the counts.

    python -m scaling.status --workdir=runs/mnist_sweep

Reads sweep.json (the trials, written when the first trial starts) and each trial's summary.json,
config.json and metrics.jsonl. It imports no JAX, takes no lock and writes nothing, so it runs on a
login node while the array trains. For a run without a sweep it shows the one trial. A trial is
`pending` until it writes config.json, then `running` until its summary says otherwise (`done`,
`diverged`, `preempted`); `updated` is the age of its last write, which tells a stale `running`
(a killed node) from a live one.

A damaged file (scaling/analysis/results.py says which are) hides nothing else: every trial is still listed
(from the directories under trials/ when sweep.json is damaged; `damaged` where its summary.json
is), each damaged file is named on stderr in one line with its fix, and the exit status is 1.
"""
import dataclasses
import os
import sys
import time

from scaling.analysis import results
from scaling.config import parse_tool_flags

ORDER = ("done", "diverged", "running", "preempted", "pending", "damaged")


@dataclasses.dataclass(frozen=True)
class TrialStatus:
  index: int | None
  id: str
  status: str
  step: int
  total_steps: int | None
  steps_to_target: int | None
  valid_error: float | None      # of the last evaluation
  wall_time: float | None        # seconds of training, across resumes
  updated: float | None          # unix time of the trial's last write


def _number(value):
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read(reader, path: str, damaged: list, finished: bool = False):
  """reader(path, finished), or None with its one line appended to `damaged`."""
  try:
    return reader(path, finished)
  except results.Damaged as error:
    damaged.append(str(error))
    return None


def trial_status(directory: str, index: int | None, trial_id: str | None,
                 damaged: list | None = None) -> TrialStatus:
  """The trial in `directory` (its id from config.json when `trial_id` is None); one line per
  damaged file appended to `damaged`."""
  damaged = [] if damaged is None else damaged
  path = lambda name: os.path.join(directory, name)
  summary = _read(results.read_object, path("summary.json"), damaged)
  summary_damaged = summary is None and os.path.lexists(path("summary.json"))
  summary = summary or {}
  finished = summary.get("status") in results.FINISHED
  config = _read(results.read_config, path("config.json"), damaged, finished) or {}
  records = _read(results.read_metrics, path("metrics.jsonl"), damaged, finished) or []
  status = ("damaged" if summary_damaged else str(summary["status"]) if "status" in summary else
            "running" if os.path.lexists(path("config.json")) else "pending")
  last = lambda key: next((r[key] for r in reversed(records) if _number(r.get(key)) is not None),
                          None)
  valid_error = last("valid/error")
  if valid_error is None:
    valid_error = _number(results.get(summary, "final.valid/error"))
  mtimes = [os.path.getmtime(p) for p in map(path, ("summary.json", "metrics.jsonl",
                                                    "config.json")) if os.path.exists(p)]
  return TrialStatus(
      index=index, id=trial_id or str(config.get("trial_id") or os.path.basename(directory)),
      status=status,
      step=max([r["step"] for r in records] + [_number(summary.get("step")) or 0]),
      total_steps=_number(results.get(config, "derived.total_steps")),
      steps_to_target=_number(results.get(summary, "target.step")),
      valid_error=valid_error,
      wall_time=max((t for t in (last("wall_time"), _number(summary.get("wall_time")))
                     if t is not None), default=None),
      updated=max(mtimes, default=None))


def _sweep_trials(workdir: str, damaged: list) -> list | None:
  """sweep.json's trials; None when there is no sweep.json or it is damaged (one line)."""
  path = os.path.join(workdir, "sweep.json")
  sweep = _read(results.read_object, path, damaged)
  if sweep is None:
    return None
  trials = sweep.get("trials")
  if isinstance(trials, list) and all(isinstance(t, dict) and isinstance(t.get("directory"), str)
                                      for t in trials):
    return trials
  damaged.append(str(results.Damaged(path, "no list of trials, each with its directory")))
  return None


def sweep_status(workdir: str, damaged: list | None = None) -> list[TrialStatus]:
  """Every trial of the sweep in `workdir` (or its one trial); [] when none has started. Each
  damaged file is one line appended to `damaged`."""
  damaged = [] if damaged is None else damaged
  trials = _sweep_trials(workdir, damaged)
  if trials is not None:
    return [trial_status(os.path.join(workdir, t["directory"]), t.get("index"),
                         str(t.get("id", t["directory"])), damaged) for t in trials]
  trials_dir = os.path.join(workdir, "trials")
  if os.path.isdir(trials_dir):   # the trials started so far, without sweep.json's order
    return [trial_status(os.path.join(trials_dir, name), None, None, damaged)
            for name in sorted(os.listdir(trials_dir))
            if os.path.isdir(os.path.join(trials_dir, name))]
  if any(os.path.lexists(os.path.join(workdir, n)) for n in ("config.json", "summary.json")):
    return [trial_status(workdir, None, None, damaged)]
  return []


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _age(then: float | None, now: float) -> str:
  if then is None:
    return "-"
  seconds = max(0.0, now - then)
  for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
    if seconds >= size:
      return f"{seconds // size:.0f}{unit} ago"
  return f"{seconds:.0f}s ago"


def counts_line(rows: list[TrialStatus]) -> str:
  counts = {s: sum(r.status == s for r in rows) for s in ORDER}
  counts.update({r.status: sum(x.status == r.status for x in rows) for r in rows})  # unknown ones
  parts = [f"{n} {s}" for s, n in counts.items() if n]
  return f"{len(rows)} trial{'s' if len(rows) != 1 else ''}: " + ", ".join(parts)


def format_table(rows: list[TrialStatus], now: float | None = None) -> str:
  now = time.time() if now is None else now
  lines = [f"{'index':>5}  {'status':<9}  {'steps':>13}  {'to target':>9}  {'valid err':>9}  "
           f"{'wall time':>9}  {'updated':>8}  id"]
  for r in rows:
    steps = f"{r.step}/{r.total_steps if r.total_steps is not None else '?'}"
    to_target = "-" if r.steps_to_target is None else str(r.steps_to_target)
    error = "-" if r.valid_error is None else f"{r.valid_error:.4f}"
    index = "-" if r.index is None else str(r.index)
    lines.append(f"{index:>5}  {r.status:<9}  {steps:>13}  {to_target:>9}  {error:>9}  "
                 f"{_duration(r.wall_time):>9}  {_age(r.updated, now):>8}  {r.id}")
  lines.append(counts_line(rows))
  return "\n".join(lines)


USAGE = "python -m scaling.status --workdir=DIR"


def main(argv):
  from absl import flags
  del argv
  workdir = flags.FLAGS.workdir
  if not os.path.isdir(workdir):
    sys.exit(f"status: {workdir} is not a directory: give the --workdir of a run or sweep")
  damaged = []
  rows = sweep_status(workdir, damaged)
  if rows:
    print(format_table(rows))
  elif not damaged:
    print(f"no trial has started in {workdir} yet (sweep.json appears when the first one starts)")
  for line in damaged[:-1]:
    print(f"status: {line}", file=sys.stderr)
  if damaged:
    sys.exit(f"status: {damaged[-1]}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "The workdir of a sweep or of a single run.")
  app.run(main, flags_parser=lambda argv: parse_tool_flags(
      argv, "status", USAGE, "give the --workdir of a run or sweep"))
