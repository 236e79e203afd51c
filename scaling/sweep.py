"""A config's sweep -> trials with stable ids -> one directory each; sweep.csv over all of them.

`config.sweep` mirrors the config's own structure and every leaf is a tuple of values: a grid axis
(`sweep.batch_size = (64, 512)`, `sweep.optimizer.name = ("momentum", "adam")`). `config.sweep_zip`
holds axes of equal length that vary together as one axis (a base_lr per batch size). Trials are
the product of the grid axes (in the order ConfigDict keeps them: sorted by name), then the zipped
axis, first axis slowest, so index N names the same trial every time the same config is expanded:
a Slurm array task runs `--trial=$SLURM_ARRAY_TASK_ID`.
A config without axes is one trial, written straight into the workdir.

A trial id is `axis=value,...`: floats as short as they stay exact (`0.05`, `1e+09`, but
`0.05000001`), every character that is not plain percent-encoded (`/` -> `%2F`), so that an id is
one directory name inside `<workdir>/trials`; ids that would still collide (`adam` and `Adam` on a
case-insensitive disk) are refused before anything runs.

Reruns: a finished trial (done or diverged) is skipped, unless its config differs from the one it
ran with, which is refused naming the first differing field (as resuming an unfinished one is).
A trial that raises an unexpected error is recorded as `failed` (summary.json holds the one-line
reason, traceback.txt the traceback) and the sweep goes on; a rerun retries failed trials (failures
are often transient: a lost file system, a preempted host) from their latest checkpoint, and the
command exits non-zero while any trial it ran failed. A full disk stops the sweep: every later
trial would hit it too.
"""
import csv
import dataclasses
import fcntl
import functools
import itertools
import json
import os
import traceback
import urllib.parse

import jax

from scaling import sharding
from scaling.config import ConfigError
from scaling.training import checkpoint, memory, metrics, progress, schedule, train, vectorized
from scaling.training.metrics import write_json

FINISHED = ("done", "diverged")
SHORT_NAMES = {"batch_size": "bs"}


@dataclasses.dataclass(frozen=True)
class Trial:
  index: int
  id: str
  overrides: dict        # dotted field -> value
  config: object         # the trial's full ConfigDict
  directory: str


def _leaves(tree, prefix=""):
  """Nested dict -> [(dotted key, value)] in insertion order."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _axes(config, field: str) -> list[tuple[str, tuple]]:
  axes = []
  for key, values in _leaves(config[field].to_dict()):
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values:
      raise ConfigError(f"{field}.{key} is an empty axis: give at least one value")
    axes.append((key, values))
  return axes


def _format(value) -> str:
  """A value as its id shows it: floats short (`0.05`, `1e+09`) unless that would lose digits."""
  if isinstance(value, float):
    short = f"{value:g}"
    return short if float(short) == value else repr(value)
  return str(value)


def trial_id(overrides: dict) -> str:
  """`bs=64,base_lr=0.1`: one path component (no `/`, never `.` or `..`: it holds `=`)."""
  text = ",".join(f"{SHORT_NAMES.get(k, k)}={_format(v)}" for k, v in overrides.items())
  return urllib.parse.quote(text, safe="=,.+-_()[]")


MAX_ID_BYTES = 255   # a directory name on common file systems


def _check_ids(trials: list[Trial]) -> None:
  """Ids must name distinct directories, even on case-insensitive disks."""
  seen = {}
  for t in trials:
    if len(t.id.encode()) > MAX_ID_BYTES:
      raise ConfigError(f"trial {t.index} id is {len(t.id.encode())} bytes, over the"
                        f" {MAX_ID_BYTES} a directory name may have: use fewer or shorter sweep"
                        " values")
    other = seen.setdefault(t.id.lower(), t)
    if other is not t:
      raise ConfigError(f"trials {other.index} and {t.index} would share the directory"
                        f" trials/{t.id}: their sweep values print alike ({other.overrides} vs"
                        f" {t.overrides}); make them differ")


def _override(config, key: str, value):
  """Sets a dotted field on a copy; unknown fields and wrong types fail naming the sweep axis."""
  node = config
  *parents, leaf = key.split(".")
  try:
    for name in parents:
      node = node[name]
    if leaf not in node or isinstance(node[leaf], dict) or hasattr(node[leaf], "to_dict"):
      raise KeyError(leaf)
    node[leaf] = value
  except (KeyError, AttributeError):
    raise ConfigError(f"sweep axis {key!r} is not a config field: use one of the config's dotted"
                      " field names (e.g. batch_size, base_lr, optimizer.name)") from None
  except TypeError as error:
    raise ConfigError(f"sweep axis {key!r} value {value!r} has the wrong type: {error}") from None


def expand(config, workdir: str) -> list[Trial]:
  grid = _axes(config, "sweep")
  zipped = _axes(config, "sweep_zip")
  if zipped and len({len(v) for _, v in zipped}) > 1:
    lengths = {k: len(v) for k, v in zipped}
    raise ConfigError(f"sweep_zip axes must have equal lengths, got {lengths}")
  clash = {k for k, _ in grid} & {k for k, _ in zipped}
  if clash:
    raise ConfigError(f"{sorted(clash)[0]} is both in sweep and sweep_zip: keep it in one")
  axes = [[((k, v),) for v in values] for k, values in grid]
  if zipped:
    axes.append([tuple((k, values[i]) for k, values in zipped) for i in range(len(zipped[0][1]))])
  trials = []
  for index, combo in enumerate(itertools.product(*axes)):
    overrides = dict(pair for group in combo for pair in group)
    trial_config = config.copy_and_resolve_references()
    for key, value in overrides.items():
      _override(trial_config, key, value)
    tid = trial_id(overrides) if axes else "trial"
    directory = os.path.join(workdir, "trials", tid) if axes else workdir
    trials.append(Trial(index, tid, overrides, trial_config, directory))
  _check_ids(trials)
  return trials


def validate(trials: list[Trial], num_train: int, num_devices: int) -> list[schedule.Plan]:
  """Every config error of every trial, before any training starts."""
  plans = []
  for trial in trials:
    try:
      plans.append(train.check_config(trial.config, num_train, num_devices))
    except ConfigError as error:
      prefix = f"trial {trial.index} ({trial.id}): " if trial.overrides else ""
      raise ConfigError(prefix + str(error)) from None
  return plans


def select(trials: list[Trial], trial: str) -> list[Trial]:
  """--trial=N (index, e.g. $SLURM_ARRAY_TASK_ID) or --trial=ID."""
  for t in trials:
    if trial == str(t.index) or trial == t.id:
      return [t]
  raise ConfigError(f"--trial={trial} matches no trial: use an index 0..{len(trials) - 1}"
                    " or an id from --list_trials")


def read_summary(directory: str) -> dict | None:
  """A trial's summary.json, None before it has one; ConfigError naming a damaged one."""
  path = os.path.join(directory, "summary.json")
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except (FileNotFoundError, NotADirectoryError):
    return None
  except (OSError, ValueError) as error:   # truncated, not UTF-8, not JSON, a directory
    summary, reason = None, " ".join(str(error).split())[:120]
  else:
    reason = f"it holds {type(summary).__name__}, not a JSON object"
  if isinstance(summary, dict):
    return summary
  raise ConfigError(f"{path} is damaged ({reason}): delete it and rerun; the trial resumes from"
                    " its latest checkpoint and writes it again")


def _holds_work(directory: str) -> bool:
  """Whether a rerun would skip or resume this trial, rather than start it afresh."""
  ckpts = os.path.join(directory, "checkpoints")
  return (os.path.exists(os.path.join(directory, "summary.json"))
          or (os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))))


def _check_kinds(directory: str, kinds: tuple) -> None:
  for name, kind in kinds:
    path = os.path.join(directory, name)
    if os.path.lexists(path) and not kind(path):
      what = "a file" if kind is os.path.isdir else "not a file"
      raise ConfigError(f"{path} is {what}, which this run cannot use: move it out of the way"
                        " (it is written again) and rerun")


def _check_same_config(trial: Trial, finished: bool) -> None:
  current = json.loads(trial.config.to_json_best_effort())
  current.update(trial_id=trial.id, sweep_axes=json.loads(json.dumps(trial.overrides)))
  checkpoint.check_same_run(os.path.join(trial.directory, "config.json"), current,
                            ignore=("derived",), finished=finished)


def check_trial_directory(trial: Trial) -> None:
  """Everything about a trial's existing directory that would refuse or spoil its run, checked
  for every selected trial before any trains: a sweep rerun with a changed config must not train
  some trials under the new one and then refuse the next (the workdir would mix two configs)."""
  _check_kinds(trial.directory, ((".lock", os.path.isfile), ("checkpoints", os.path.isdir),
                                 ("metrics.jsonl", os.path.isfile),
                                 ("summary.json", os.path.isfile)))
  summary = read_summary(trial.directory)
  if _holds_work(trial.directory):
    _check_same_config(trial, finished=bool(summary) and summary.get("status") in FINISHED)


def check_sweep_unchanged(trials: list[Trial], chosen: list[Trial], workdir: str) -> None:
  """The sweep's own files, and the trials not selected (--trial=N: a Slurm array task): none
  may hold another config's run, else the sweep would mix two configs that the report merges.
  A damaged file of an unselected trial is that trial's own run's business: skipped here."""
  _check_kinds(workdir, (("trials", os.path.isdir), ("sweep.json", os.path.isfile),
                         ("sweep.csv", os.path.isfile)))
  selected = {t.index for t in chosen}
  for t in trials:
    if t.index in selected or not _holds_work(t.directory):
      continue
    try:
      summary = read_summary(t.directory)
      _check_same_config(t, finished=bool(summary) and summary.get("status") in FINISHED)
    except checkpoint.DifferentRun as error:
      raise ConfigError(f"--trial={chosen[0].index}: the sweep's trial {t.index} {error}"
                        ) from None
    except ConfigError:
      pass


def record_failure(trial: Trial, error: Exception) -> dict:
  """status `failed` with the one-line reason in summary.json; the traceback beside it."""
  lines = str(error).strip().splitlines()
  reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
  try:
    previous = read_summary(trial.directory) or {}
  except ConfigError:   # a damaged summary is replaced by this one
    previous = {}
  summary = {**previous, "status": "failed", "failed_reason": reason,
             "trial_id": trial.id}
  if jax.process_index() == 0:
    with open(os.path.join(trial.directory, "traceback.txt"), "w") as f:
      f.write("".join(traceback.format_exception(error)))
  write_json(os.path.join(trial.directory, "summary.json"), summary)
  print(f"[{trial.index}] {trial.id}: failed: {reason} (traceback in"
        f" {os.path.join(trial.directory, 'traceback.txt')})", flush=True)
  return summary


class TrialLock:
  """An exclusive lock per trial directory: two processes never train the same trial at once."""

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self._file = open(os.path.join(directory, ".lock"), "w")

  def acquire(self) -> bool:
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      return False

  def release(self) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


CSV_COLUMNS = ("index", "id", "batch_size", "lr_rule", "base_lr", "lr_multiplier", "lr", "seed",
               "optimizer", "status", "stop_reason", "step", "step_cap", "steps_to_target",
               "examples_to_target", "best_valid_error", "final_valid_error", "best_test_error",
               "final_test_error", "final_train_loss", "wall_time", "wall_time_to_target",
               "examples_per_sec", "compile_seconds", "peak_memory_bytes")


def csv_row(trial: Trial, plan: schedule.Plan, summary: dict | None) -> dict:
  c, s = trial.config, summary or {}
  final, best, target = s.get("final", {}), s.get("best", {}), s.get("target", {})
  return {
      "index": trial.index, "id": trial.id, "batch_size": c.batch_size, "lr_rule": c.lr_rule,
      "base_lr": c.base_lr, "lr_multiplier": c.lr_multiplier, "lr": plan.lr, "seed": c.seed,
      "optimizer": c.optimizer.name, "status": s.get("status", "pending"),
      **{k: s.get(k) for k in ("stop_reason", "step", "step_cap", "examples_per_sec",
                               "compile_seconds", "peak_memory_bytes")},
      "wall_time_to_target": target.get("at", {}).get("wall_time"),
      "steps_to_target": target.get("step"),
      "examples_to_target": target.get("examples"),
      "best_valid_error": best.get("valid/error"), "final_valid_error": final.get("valid/error"),
      "best_test_error": best.get("test/error"), "final_test_error": final.get("test/error"),
      "final_train_loss": final.get("train/loss"), "wall_time": s.get("wall_time"),
  }


def write_csv(workdir: str, trials: list[Trial], plans: list[schedule.Plan]) -> None:
  """Rewritten from every trial's summary.json (atomic rename): readable mid-sweep, and safe
  when several processes run different trials of the same sweep."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "sweep.csv")
  with metrics.atomic_write(path, "sweep.csv", newline="") as f:
    writer = csv.DictWriter(f, CSV_COLUMNS)
    writer.writeheader()
    for trial, plan in zip(trials, plans):
      writer.writerow(csv_row(trial, plan, read_summary(trial.directory)))


def _run_trials(ready: list[Trial]) -> list[dict]:
  """One trial alone (train.run), or several in one vmapped program (train.run_group)."""
  if len(ready) == 1:
    t = ready[0]
    return [train.run(t.config, t.directory, trial_id=t.id, sweep_axes=t.overrides)]
  return train.run_group([t.config for t in ready], [t.directory for t in ready],
                         [t.id for t in ready], [t.overrides for t in ready])


def plan_memory(config, limit_bytes: int | None = None) -> list[str]:
  """--plan_memory: the memory planner's lines for the sweep's batch sizes (compiles, never runs)."""
  trials = expand(config, "")
  splits = train.load_data(config)
  devices = sharding.make_mesh(config.num_devices).size
  validate(trials, len(splits.train_labels), devices)
  batch_sizes = sorted({t.config.batch_size for t in trials})
  bytes_of = functools.partial(train.step_memory_bytes, trials[0].config, splits)
  return memory.plan(bytes_of, batch_sizes, devices, len(splits.train_labels),
                     limit_bytes or memory.device_memory_bytes())


def main(config, workdir: str, trial: str | None = None, list_only: bool = False) -> list[dict]:
  """Expands, validates, then runs the selected trials in order; returns their summaries."""
  trials = expand(config, workdir)
  mesh = sharding.make_mesh(config.num_devices)
  splits = train.load_data(config)
  plans = validate(trials, splits.num_train, mesh.size)
  vectorized.check_sweep(config, splits)
  chosen = select(trials, trial) if trial is not None else trials
  if list_only:
    print(f"{'index':>5}  {'batch':>6}  {'lr':>10}  {'warmup':>6}  {'steps':>7}  id")
    selected = {t.index for t in chosen}
    for t, p in zip(trials, plans):
      if t.index in selected:
        print(f"{t.index:>5}  {t.config.batch_size:>6}  {p.lr:>10.4g}  {p.warmup_steps:>6}  "
              f"{p.total_steps:>7}  {t.id}")
    return []
  for t in chosen:
    check_trial_directory(t)
  check_sweep_unchanged(trials, chosen, workdir)
  os.makedirs(workdir, exist_ok=True)
  if trials[0].overrides:
    write_json(os.path.join(workdir, "sweep.json"), {
        "config": json.loads(config.to_json_best_effort()),
        "axes": {k: list(v) for k, v in _axes(config, "sweep")},
        "zipped_axes": {k: list(v) for k, v in _axes(config, "sweep_zip")},
        "trials": [{"index": t.index, "id": t.id, "directory": os.path.relpath(t.directory, workdir)}
                   for t in trials]})
  summaries = []
  tracker = progress.SweepProgress([t.config.batch_size for t in chosen], {
      i for i, t in enumerate(chosen)
      if (read_summary(t.directory) or {}).get("status") in FINISHED})
  position_of = {t.index: position for position, t in enumerate(chosen)}
  batches = ([[t] for t in chosen] if config.vectorize_trials <= 1 else
             vectorized.groups(chosen, config.vectorize_trials))
  for batch in batches:
    ready, locks = [], []
    for t in batch:
      # Under jax.distributed the processes train a trial together: process 0 decides and locks.
      summary = read_summary(t.directory)
      if sharding.process0_decides(bool(summary) and summary.get("status") in FINISHED):
        print(f"[{t.index}] {t.id}: already {(summary or {}).get('status')}, skipped", flush=True)
        summaries.append(summary)
        tracker.skip(position_of[t.index])
        continue
      lock = TrialLock(t.directory) if jax.process_index() == 0 else None
      if not sharding.process0_decides(lock is None or lock.acquire()):
        print(f"[{t.index}] {t.id}: running in another process, skipped", flush=True)
        tracker.skip(position_of[t.index])
        continue
      ready.append(t)
      locks.append(lock)
    if not ready:
      continue
    try:
      # '...: training' and the sweep's state; a vectorised group counts as its first member.
      tracker.start(position_of[ready[0].index],
                    f"[{','.join(str(t.index) for t in ready)}] {' '.join(t.id for t in ready)}"
                    + (f" ({len(ready)} vectorised)" if len(ready) > 1 else ""))
      ran = _run_trials(ready)
      summaries += ran
      for summary in ran:
        tracker.end(summary.get("status", "done"))
    except (ConfigError, metrics.DiskFull):   # bad input, or a disk every later trial shares
      raise
    except Exception as error:   # these trials' own failure: record it, go on to the next
      for t in ready:   # a vectorised member that finished before the error keeps its result
        summary = read_summary(t.directory)
        finished = summary and summary.get("status") in FINISHED
        summaries.append(summary if finished else record_failure(t, error))
        tracker.end(summaries[-1].get("status", "failed"))
    except BaseException:        # preempted (SystemExit) or interrupted: sweep.csv says so
      write_csv(workdir, trials, plans)
      raise
    finally:
      tracker.leave()
      for lock in locks:
        if lock:
          lock.release()
    write_csv(workdir, trials, plans)
  tracker.finish()
  write_csv(workdir, trials, plans)
  return summaries
