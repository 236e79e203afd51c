"""Where a sweep stands, from its workdir alone: one line per trial and the counts.

    python -m scaling.status --workdir=runs/mnist_sweep

Reads sweep.json (the trials, written when the first trial starts) and each trial's summary.json,
config.json and metrics.jsonl. It imports no JAX, takes no lock and writes nothing, so it runs on a
login node while the array trains. For a run without a sweep it shows the one trial. A trial is
`pending` until it writes config.json, then `running` until its summary says otherwise (`done`,
`diverged`, `preempted`); `updated` is the age of its last write, which tells a stale `running`
(a killed node) from a live one.
"""
import dataclasses
import json
import os
import sys
import time

ORDER = ("done", "diverged", "running", "preempted", "pending")


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


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):   # absent, or mid-write by a live trial
    return None


def _metrics(path: str) -> tuple[int, float | None, float | None]:
  """metrics.jsonl -> (last step, last validation error, last wall time)."""
  step, valid_error, wall_time = 0, None, None
  try:
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:   # the line a live trial is writing
          continue
        step = max(step, record.get("step", 0))
        wall_time = record.get("wall_time", wall_time)
        valid_error = record.get("valid/error", valid_error)
  except FileNotFoundError:
    pass
  return step, valid_error, wall_time


def trial_status(directory: str, index: int | None, trial_id: str) -> TrialStatus:
  summary = _read_json(os.path.join(directory, "summary.json")) or {}
  config = _read_json(os.path.join(directory, "config.json")) or {}
  step, valid_error, wall_time = _metrics(os.path.join(directory, "metrics.jsonl"))
  status = summary.get("status") or ("running" if config else "pending")
  mtimes = [os.path.getmtime(p) for p in (os.path.join(directory, name) for name in
                                          ("summary.json", "metrics.jsonl", "config.json"))
            if os.path.exists(p)]
  return TrialStatus(
      index=index, id=trial_id, status=status, step=max(step, summary.get("step", 0)),
      total_steps=config.get("derived", {}).get("total_steps"),
      steps_to_target=(summary.get("target") or {}).get("step"),
      valid_error=valid_error if valid_error is not None else
      (summary.get("final") or {}).get("valid/error"),
      wall_time=max((t for t in (wall_time, summary.get("wall_time")) if t is not None),
                    default=None),
      updated=max(mtimes, default=None))


def sweep_status(workdir: str) -> list[TrialStatus]:
  """Every trial of the sweep in `workdir` (or its one trial); [] when none has started."""
  sweep = _read_json(os.path.join(workdir, "sweep.json"))
  if sweep:
    return [trial_status(os.path.join(workdir, t["directory"]), t["index"], t["id"])
            for t in sweep["trials"]]
  if any(os.path.exists(os.path.join(workdir, n)) for n in ("config.json", "summary.json")):
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    return [trial_status(workdir, None, config.get("trial_id", "trial"))]
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


def main(argv):
  from absl import flags
  del argv
  workdir = flags.FLAGS.workdir
  if not os.path.isdir(workdir):
    sys.exit(f"status: {workdir} is not a directory: give the --workdir of a run or sweep")
  rows = sweep_status(workdir)
  if not rows:
    print(f"no trial has started in {workdir} yet (sweep.json appears when the first one starts)")
    return
  print(format_table(rows))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "The workdir of a sweep or of a single run.")
  flags.mark_flag_as_required("workdir")
  app.run(main)
