"""Trial results on disk -> `Trial` records: what scaling/training/train.py writes per trial (config.json,
metrics.jsonl, summary.json), read so that partial and still-running sweeps load. No JAX.

A file no run writes is `Damaged`: one line naming it and the fix. config.json and summary.json
are written atomically, so one that is not a JSON object (or not UTF-8, or a directory) was
damaged after the fact; metrics.jsonl is appended a line at a time, so a line that is not JSON
(cut by a kill mid-write; a resume drops it) is skipped, but one that is not UTF-8, or a line
that is JSON yet not an object with a step, is damage.

Steps to target (Shallue et al. 2018): the first evaluation whose target metric is strictly below
the target, and beside it the step interpolated between the two bracketing evaluations, linear in
log(metric) (errors fall roughly geometrically between nearby evaluations). Fits use the latter.
"""
import collections
import dataclasses
import json
import math
import os

import numpy as np

REPORT_DIR = "report"
FINISHED = ("done", "diverged")   # a rerun skips such a trial (scaling/sweep.py)
# Sweep axes that are not tuned settings: the batch size, seeds, and what defines a group.
NOT_TUNED = ("batch_size", "seed", "lr_rule", "lr_power", "optimizer.name", "model.name",
             "dataset.name")


@dataclasses.dataclass
class Trial:
  """One trial's files plus the numbers the report needs; `records` are metrics.jsonl lines."""
  trial_id: str
  path: str
  config: dict
  summary: dict | None
  records: list
  batch_size: int
  lr_rule: str
  optimizer: str
  base_lr: float
  lr: float
  seed: int
  status: str               # done | diverged | running | preempted ('running' if no summary.json)
  target_metric: str
  target_value: float
  steps_to_target: int | None        # first evaluation strictly below the target
  examples_to_target: int | None
  steps_interpolated: float | None   # between the bracketing evaluations, linear in log(metric)
  final: dict               # metric -> value at the end (summary.json, else last logged value)
  best: dict                # 'valid/error', 'test/error' -> minimum over training
  wall_time: float
  diverged_at_step: int | None
  notes: list
  setting: dict = dataclasses.field(default_factory=dict)   # tuned sweep axes (lr_multiplier...)
  lr_multiplier: float = 1.0
  stop_reason: str | None = None
  step_cap: int | None = None
  at_target: dict = dataclasses.field(default_factory=dict)  # B_simple, curvature, wall time
  cost: dict = dataclasses.field(default_factory=dict)       # throughput, compile, memory
  eval_interval: float | None = None                         # steps between evaluations
  group: str = ""           # set by load_trials: rule/optimizer (+ model/dataset where they vary)

  @property
  def setting_key(self):
    return json.dumps(self.setting, sort_keys=True)

  def series(self, key):
    """(steps, examples, values) float arrays over the records that hold `key`."""
    rows = [(r.get("step", np.nan), r.get("examples", np.nan), num(r[key]))
            for r in self.records if key in r and not isinstance(r[key], (list, dict))]
    if not rows:
      return np.zeros(0), np.zeros(0), np.zeros(0)
    return tuple(np.asarray(c, dtype=float) for c in zip(*rows))

  @property
  def reached(self):
    return self.steps_to_target is not None

  @property
  def gap(self):
    """Generalization gap: final test error - final train error (eval mode, fixed subset)."""
    te, tr = self.final.get("test/error"), self.final.get("train_eval/error")
    return None if te is None or tr is None else te - tr

  @property
  def last_step(self):
    if self.summary and self.summary.get("step") is not None:
      return self.summary["step"]
    return max((r.get("step", 0) for r in self.records), default=0)


def num(x):
  return np.nan if x is None else float(x)


def get(d, dotted, default=None):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def read_json(path):
  """Whatever JSON the file holds; None when it is absent or damaged (see `read_object`)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


class Damaged(ValueError):
  """A trial's (or the sweep's) file that no run writes, as one line: the file, what is wrong
  with it, and the fix."""

  def __init__(self, path, problem, finished=False, fix=None):
    super().__init__(f"{path} is damaged ({problem}): {fix or _fix(path, finished)}")
    self.path = path


def _fix(path, finished):
  """What brings back `path`, as rerunning its trial does or does not (a finished trial is skipped
  by a rerun, so only what a resume writes comes back)."""
  name, directory = os.path.basename(path), os.path.dirname(path)
  again = f"delete {directory} and rerun that trial with scaling.main to train it again"
  if name == "sweep.json":
    return ("rerun scaling.main with the sweep's --config and --workdir, which writes it again"
            " (--trial=<the index of a finished trial> trains nothing)")
  if name == "summary.json":
    return ("delete it and rerun that trial with scaling.main: it resumes from its latest"
            " checkpoint and writes it again")
  if name == "config.json" and not finished:
    return ("delete it and rerun that trial with scaling.main: it resumes from its checkpoint"
            " under the current config and writes it again")
  if name == "config.json":
    return f"it records what the finished trial ran with: restore it from a copy, or {again}"
  return f"a rerun cannot rewrite its records: restore it from a copy, or {again}"


def _kind(value):
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          type(None): "null"}.get(type(value), "a number")


def _read_text(path, finished):
  """The file's text; Damaged when it is a directory or not UTF-8."""
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8")
  except UnicodeDecodeError as error:
    raise Damaged(path, f"not UTF-8: byte {error.object[error.start]:#x} at offset {error.start}",
                  finished) from None
  except IsADirectoryError:
    raise Damaged(path, "a directory, not a file", finished) from None
  except PermissionError as error:
    raise Damaged(path, f"cannot be read: {error.strerror}", fix="fix its permissions") from None


def read_object(path, finished=False):
  """A JSON file that holds an object (config.json, summary.json, sweep.json) as a dict; None when
  absent; Damaged when it is anything else. `finished`: whether its trial is (for the fix)."""
  if not os.path.lexists(path):
    return None
  text = _read_text(path, finished)
  try:
    content = json.loads(text)
  except ValueError as error:
    raise Damaged(path, f"not JSON: {error}", finished) from None
  if not isinstance(content, dict):
    raise Damaged(path, f"not a JSON object: it holds {_kind(content)}", finished)
  return content


def read_config(path, finished=False):
  """A trial's config.json (as `read_object`), Damaged also when empty."""
  config = read_object(path, finished)
  if config == {}:
    raise Damaged(path, "an empty object, not the trial's config", finished)
  return config


def read_metrics(path, finished=False):
  """metrics.jsonl -> list of dicts; [] when absent. NaN/Infinity tokens parse; a line that is not
  JSON (a torn last line) is skipped; Damaged as the module says."""
  if not os.path.lexists(path):
    return []
  records = []
  for number, line in enumerate(_read_text(path, finished).splitlines(), 1):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if not isinstance(record, dict):
      raise Damaged(path, f"line {number} holds {_kind(record)}, not a JSON object", finished)
    if type(record.get("step")) is not int:
      raise Damaged(path, f"line {number} has no integer step", finished)
    records.append(record)
  return records


def first_below(records, metric, value, batch_size):
  """(step, examples) of the first record whose `metric` is strictly below `value`, else None."""
  for r in records:
    v = r.get(metric)
    if isinstance(v, (int, float)) and v < value:
      return int(r["step"]), int(r.get("examples") or r["step"] * batch_size)
  return None


def interpolated_crossing(records, metric, value):
  """Step at which `metric` crosses `value`, linear in log(metric) between the last evaluation at
  or above it and the first strictly below; the first evaluation's step when no earlier one exists
  (nothing to interpolate from); None if never below."""
  evals = [(float(r["step"]), float(r[metric])) for r in records
           if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
  for i, (step, v) in enumerate(evals):
    if v < value:
      if i == 0 or v <= 0:
        return step
      step0, v0 = evals[i - 1]
      return step0 + (step - step0) * math.log(v0 / value) / math.log(v0 / v)
  return None


def eval_interval(records, metric):
  """Median spacing in steps between evaluations of `metric`: the steps-to-target resolution."""
  steps = [r["step"] for r in records if isinstance(r.get(metric), (int, float))]
  return float(np.median(np.diff(steps))) if len(steps) > 1 else None


def _at_target(path, records, summary_target, steps):
  """Summary's record at the target (train.py writes it), else the last B_simple logged by then;
  plus the noise scale at frozen parameters (`noise/frozen_*`) where `measure_checkpoint
  --noise_draws` measured the checkpoint of the target step (noise_<step>.json: a trial that
  stops at its target checkpoints there). The EMA's `noise/b_simple` is the trace over training:
  it lags, averaging the gradients of the ~1/(1 - ema_decay) steps before."""
  at = dict(summary_target.get("at") or {})
  if "noise/b_simple" not in at and steps is not None:
    logged = [r["noise/b_simple"] for r in records if r.get("step", math.inf) <= steps
              and isinstance(r.get("noise/b_simple"), (int, float))]
    if logged:
      at["noise/b_simple"] = float(logged[-1])
  if steps is not None:
    frozen = read_json(os.path.join(path, f"noise_{steps}.json"))
    if isinstance(frozen, dict) and frozen.get("step") == steps:
      at.update((k, float(v)) for k, v in frozen.items()
                if k.startswith("noise/frozen_") and isinstance(v, (int, float)))
  return at


def _load_trial(path):
  """The trial in `path`; None without a config.json; Damaged (see the module docstring)."""
  summary = read_object(os.path.join(path, "summary.json"))
  finished = (summary or {}).get("status") in FINISHED
  config = read_config(os.path.join(path, "config.json"), finished)
  if config is None:
    return None
  if type(config.get("batch_size")) is not int or config["batch_size"] < 1:
    # Every number of the report is computed from it (examples, the critical batch fit).
    raise Damaged(os.path.join(path, "config.json"), "no batch_size, a positive integer: it holds"
                  f" {config.get('batch_size')!r}", finished)
  s = summary or {}
  records = read_metrics(os.path.join(path, "metrics.jsonl"), finished)
  bs, notes = int(get(config, "batch_size", 0)), []
  target = s.get("target") or {}
  metric = target.get("metric") or get(config, "target.metric", "valid/error")
  value = num(target.get("value", get(config, "target.value")))
  measured = first_below(records, metric, value, bs)
  if target.get("reached") and target.get("step") is not None:
    steps, examples = int(target["step"]), target.get("examples") or int(target["step"]) * bs
    if measured and measured[0] != steps:
      notes.append(f"summary.json: target reached at step {steps}, metrics.jsonl: at step "
                   f"{measured[0]}; using summary.json")
  else:  # metrics.jsonl is the ground truth where summary.json lacks the answer
    steps, examples = measured or (None, None)

  if s:
    status = s.get("status", "running")
  else:  # no summary yet: running, unless the loss already blew up
    status = "diverged" if any(isinstance(r.get("train/loss"), float) and
                               not math.isfinite(r["train/loss"]) for r in records) else "running"
  final = {}
  for r in records:  # the last logged value of every metric
    final.update((k, float(v)) for k, v in r.items() if isinstance(v, (int, float)))
  wall_time = s.get("wall_time") or final.pop("wall_time", 0.0)
  final = {k: v for k, v in final.items() if k not in ("step", "examples", "wall_time")}
  for k, v in {**s.get("final", {}), **s.get("noise", {}), **s.get("curvature", {})}.items():
    if isinstance(v, (int, float)):
      final[k] = float(v)
  best = {}
  for k in ("valid/error", "test/error"):
    vals = np.asarray([num(r[k]) for r in records if isinstance(r.get(k), (int, float))])
    best[k] = float(np.nanmin(vals)) if np.isfinite(vals).any() else None
    if isinstance((s.get("best") or {}).get(k), (int, float)):
      best[k] = float(s["best"][k])
  return Trial(
      trial_id=str(config.get("trial_id") or os.path.basename(os.path.abspath(path))),
      path=path, config=config, summary=summary if s else None, records=records, batch_size=bs,
      lr_rule=str(get(config, "lr_rule", "none")),
      optimizer=str(get(config, "optimizer.name", "?")),
      base_lr=num(get(config, "base_lr")), lr=num(get(config, "derived.lr")),
      seed=int(get(config, "seed", 0)), status=status, target_metric=metric,
      target_value=value, steps_to_target=steps, examples_to_target=examples, final=final,
      best=best, wall_time=float(wall_time),
      diverged_at_step=s.get("diverged_at_step"), notes=notes,
      steps_interpolated=interpolated_crossing(records, metric, value) if steps is not None else None,
      setting={k: v for k, v in (config.get("sweep_axes") or {}).items() if k not in NOT_TUNED},
      lr_multiplier=float(get(config, "lr_multiplier", 1.0)), stop_reason=s.get("stop_reason"),
      step_cap=s.get("step_cap", get(config, "derived.total_steps")),
      at_target=_at_target(path, records, target, steps), eval_interval=eval_interval(records, metric),
      cost={k: s.get(k) for k in ("examples_per_sec", "compile_seconds", "peak_memory_bytes",
                                  "memory_source")})


def find_trial_dirs(workdir):
  """Every dir under workdir (itself included, report/ excluded) that holds a config.json."""
  found = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not (root == workdir and d == REPORT_DIR))
    if "config.json" in files:
      found.append(root)
  # A sweep-level config.json in the workdir itself is not a trial unless it has metrics.
  if len(found) > 1 and found[0] == workdir and not any(
      os.path.exists(os.path.join(workdir, f)) for f in ("metrics.jsonl", "summary.json")):
    found = found[1:]
  return found


def _group_label(trial, varying):
  rule = trial.lr_rule  # lr = base_lr (B / B_ref)^power: the power is part of a 'power' rule
  power = get(trial.config, "derived.lr_power", get(trial.config, "lr_power"))
  rule += f"({num(power):g})" if rule == "power" else ""
  extra = [str(get(trial.config, k)) for k in ("model.name", "dataset.name") if k in varying]
  return "/".join([rule, trial.optimizer, *extra])


def _numeric_first(text):
  x = json.loads(text)
  return (0, x, "") if type(x) in (int, float) else (1, 0, text)


def varying_fields(trials):
  """Flattened config keys whose value differs between trials -> sorted distinct values."""
  flat = [flatten(t.config) for t in trials]
  values = {k: sorted({json.dumps(f.get(k), sort_keys=True) for f in flat}, key=_numeric_first)
            for k in sorted({k for f in flat for k in f} - {"trial_id"})}
  return {k: v for k, v in values.items() if len(v) > 1}


def load_trials(workdir, damaged=None):
  """All trials under `workdir`, sorted by (group, batch size, seed, id). A trial with a damaged
  file raises its `Damaged`; or, given a list `damaged`, is left out and its error appended."""
  trials = []
  for path in find_trial_dirs(workdir):
    try:
      trial = _load_trial(path)
    except Damaged as error:
      if damaged is None:
        raise
      damaged.append(error)
      continue
    if trial is not None:
      trials.append(trial)
  varying = varying_fields(trials)
  ids = collections.Counter(t.trial_id for t in trials)
  for t in trials:
    t.group = _group_label(t, varying)
    if ids[t.trial_id] > 1:  # e.g. single-trial runs gathered under one dir all say 'trial'
      t.trial_id = os.path.relpath(t.path, workdir)
  # Tuned settings vary within a batch size; axes zipped with it (a step cap per B) do not.
  values = collections.defaultdict(set)
  for t in trials:
    for k, v in t.setting.items():
      values[(t.group, t.batch_size, k)].add(json.dumps(v))
  tuned = {k for (_, _, k), v in values.items() if len(v) > 1}
  for t in trials:
    t.setting = {k: v for k, v in t.setting.items() if k in tuned}
  return sorted(trials, key=lambda t: (t.group, t.batch_size, t.seed, t.trial_id))
