"""Sweep report: trial dirs -> CSV tables, PNG plots and an index.html. No JAX.

    python -m scaling.report --workdir=runs/mnist_sweep

Reads what scaling/train.py writes per trial (config.json, metrics.jsonl, summary.json) and works
on partial or still-running sweeps. The study protocol (DESIGN.md):
- Steps to target (Shallue et al. 2018): the first evaluation whose target metric is strictly below
  the target, and beside it the step interpolated between the two bracketing evaluations, linear in
  log(metric) (errors fall roughly geometrically between nearby evaluations). Fits use the latter.
- A *point* is (group, batch size, tuned setting), the setting being the trial's sweep axes other
  than batch size, seed and the group's fields (e.g. lr_multiplier): its steps to target is the
  median over seeds, a seed that never reached counting as infinite (so a point reaches the target
  when at least half its seeds do). Per (group, batch size) the point with the fewest steps counts
  (ties: the lower median final validation error); a best setting at the edge of its grid is flagged.
- The critical batch size comes from a fit of McCandlish et al. 2018's S = S_min (1 + B_crit / B) to
  the batch sizes that reached the target (the others are censored: shown, not fitted), with a
  least-squares standard error and a bootstrap interval (batch sizes resampled, then seeds within
  each, and the best setting chosen again).
Plotting lives in scaling/report_plots.py.
"""
import collections
import csv
import dataclasses
import html
import json
import logging
import math
import os
import sys

import numpy as np

from scaling.config import ConfigError

# Perfect scaling "holds" at batch size B while the examples to target are within this factor of
# those at the group's smallest batch size (on the perfect-scaling line E is constant).
PERFECT_SCALING_TOLERANCE = 1.2
REPORT_DIR = "report"
# A Lanczos eigenvalue whose Ritz residual |H y - lambda y| exceeds this fraction of |lambda| is
# flagged unconverged: an exact eigenvalue lies within the residual, so below it lambda is within
# 1% of one.
EIGEN_RESIDUAL_LIMIT = 0.01
# Not results yet: a failed trial is retried by the next run of the sweep.
PENDING = ("running", "preempted", "failed")
# Sweep axes that are not tuned settings: the batch size, seeds, and what defines a group.
NOT_TUNED = ("batch_size", "seed", "lr_rule", "lr_power", "optimizer.name", "model.name",
             "dataset.name")
BOOTSTRAP_REPLICATES = 1000
INTERVAL = (2.5, 97.5)   # percentiles: a 95% bootstrap interval


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
    rows = [(r.get("step", np.nan), r.get("examples", np.nan), _num(r[key]))
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


def _num(x):
  return np.nan if x is None else float(x)


def _get(d, dotted, default=None):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):   # absent, or being written right now
    return None


def read_metrics(path):
  """metrics.jsonl -> list of dicts. NaN/Infinity tokens parse; a torn last line is skipped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [_parse_line(line) for line in f]
  return [r for r in records if isinstance(r, dict)]


def _parse_line(line):
  try:
    return json.loads(line)
  except ValueError:
    return None


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


def _at_target(records, summary_target, steps):
  """Summary's record at the target (train.py writes it), else the last B_simple logged by then."""
  at = dict(summary_target.get("at") or {})
  if "noise/b_simple" not in at and steps is not None:
    logged = [r["noise/b_simple"] for r in records if r.get("step", math.inf) <= steps
              and isinstance(r.get("noise/b_simple"), (int, float))]
    if logged:
      at["noise/b_simple"] = float(logged[-1])
  return at


def _load_trial(path):
  config = _read_json(os.path.join(path, "config.json"))
  if not isinstance(config, dict):
    return None
  summary = _read_json(os.path.join(path, "summary.json"))
  s = summary if isinstance(summary, dict) else {}
  records = read_metrics(os.path.join(path, "metrics.jsonl"))
  bs, notes = int(_get(config, "batch_size", 0)), []
  target = s.get("target") or {}
  metric = target.get("metric") or _get(config, "target.metric", "valid/error")
  value = _num(target.get("value", _get(config, "target.value")))
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
    vals = np.asarray([_num(r[k]) for r in records if isinstance(r.get(k), (int, float))])
    best[k] = float(np.nanmin(vals)) if np.isfinite(vals).any() else None
    if isinstance((s.get("best") or {}).get(k), (int, float)):
      best[k] = float(s["best"][k])
  return Trial(
      trial_id=str(config.get("trial_id") or os.path.basename(os.path.abspath(path))),
      path=path, config=config, summary=summary if s else None, records=records, batch_size=bs,
      lr_rule=str(_get(config, "lr_rule", "none")),
      optimizer=str(_get(config, "optimizer.name", "?")),
      base_lr=_num(_get(config, "base_lr")), lr=_num(_get(config, "derived.lr")),
      seed=int(_get(config, "seed", 0)), status=status, target_metric=metric,
      target_value=value, steps_to_target=steps, examples_to_target=examples, final=final,
      best=best, wall_time=float(wall_time),
      diverged_at_step=s.get("diverged_at_step"), notes=notes,
      steps_interpolated=interpolated_crossing(records, metric, value) if steps is not None else None,
      setting={k: v for k, v in (config.get("sweep_axes") or {}).items() if k not in NOT_TUNED},
      lr_multiplier=float(_get(config, "lr_multiplier", 1.0)), stop_reason=s.get("stop_reason"),
      step_cap=s.get("step_cap", _get(config, "derived.total_steps")),
      at_target=_at_target(records, target, steps), eval_interval=eval_interval(records, metric),
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
  power = _get(trial.config, "derived.lr_power", _get(trial.config, "lr_power"))
  rule += f"({_num(power):g})" if rule == "power" else ""
  extra = [str(_get(trial.config, k)) for k in ("model.name", "dataset.name") if k in varying]
  return "/".join([rule, trial.optimizer, *extra])


def _numeric_first(text):
  x = json.loads(text)
  return (0, x, "") if type(x) in (int, float) else (1, 0, text)


def varying_fields(trials):
  """Flattened config keys whose value differs between trials -> sorted distinct values."""
  flat = [_flatten(t.config) for t in trials]
  values = {k: sorted({json.dumps(f.get(k), sort_keys=True) for f in flat}, key=_numeric_first)
            for k in sorted({k for f in flat for k in f} - {"trial_id"})}
  return {k: v for k, v in values.items() if len(v) > 1}


def load_trials(workdir):
  """All trials under `workdir`, sorted by (group, batch size, seed, id)."""
  trials = [t for t in map(_load_trial, find_trial_dirs(workdir)) if t is not None]
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


def _lstsq(b, s):
  """(S_min, E_min) minimising the relative residuals of S = S_min + E_min / B; and the design."""
  x = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
  return np.linalg.lstsq(x, np.ones_like(s), rcond=None)[0], x


def fit_critical_batch(batch_sizes, steps):
  """Fits S = S_min (1 + B_crit / B) to (B, steps-to-target) points (McCandlish et al. 2018).

  S = S_min + E_min / B is linear in (S_min, E_min = S_min B_crit); least squares on relative
  residuals (S - model) / S, since steps span decades. Errors: the fit covariance scaled by the
  residual variance (needs >= 3 points), propagated to B_crit = E_min / S_min.
  """
  b = np.asarray(batch_sizes, dtype=float)
  s = np.asarray(steps, dtype=float)
  ok = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
  b, s = b[ok], s[ok]
  nan = float("nan")
  out = dict(s_min=nan, s_min_err=nan, e_min=nan, e_min_err=nan, b_crit=nan, b_crit_err=nan,
             n_points=int(len(b)), note="")
  if len(np.unique(b)) < 2:
    out["note"] = "needs >= 2 distinct batch sizes that reached the target"
    return out
  coef, x = _lstsq(b, s)
  s_min, e_min = coef  # np.float64: a zero S_min gives inf, not an exception
  dof = len(b) - 2
  resid = np.ones_like(s) - x @ coef
  cov = np.linalg.pinv(x.T @ x) * float(resid @ resid) / dof if dof > 0 else np.full((2, 2), nan)
  out["note"] = "" if dof > 0 else "2 points: exact fit, no uncertainty"
  with np.errstate(divide="ignore", invalid="ignore"):
    grad = np.array([-e_min / s_min**2, 1.0 / s_min])  # d B_crit / d (S_min, E_min)
    out.update(s_min=s_min, s_min_err=np.sqrt(abs(cov[0, 0])), e_min=e_min,
               e_min_err=np.sqrt(abs(cov[1, 1])), b_crit=e_min / s_min,
               b_crit_err=np.sqrt(abs(grad @ cov @ grad)))
  out.update({k: float(v) for k, v in out.items() if k not in ("n_points", "note")})
  if s_min <= 0 or e_min <= 0:
    out["b_crit"] = out["b_crit_err"] = nan
    out["note"] = ("S_min <= 0: steps still fall as 1/B at the largest batch size; B_crit is above "
                   "the measured range" if s_min <= 0 else
                   "E_min <= 0: steps do not fall with batch size; B_crit is below the measured range")
  return out


def _median(values):
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.median(values)) if values else None


def _seed_steps(ts):
  """Interpolated steps to target per seed; a seed that never reached counts as infinite."""
  return np.array([t.steps_interpolated if t.steps_interpolated is not None else np.inf
                   for t in ts], dtype=float)


def point_steps(seed_steps):
  """A point's steps to target: the median over its seeds (infinite unless half of them reached)."""
  return float(np.median(seed_steps)) if len(seed_steps) else math.inf


def edge_flags(best_setting, settings):
  """'lr_multiplier=4 (top of 0.25..4)' for each numeric tuned axis whose best value is the
  smallest or largest tried at this batch size: the optimum was not bracketed."""
  flags = []
  for key, value in best_setting.items():
    tried = sorted({s[key] for s in settings if isinstance(s.get(key), (int, float))})
    if len(tried) > 1 and isinstance(value, (int, float)) and value in (tried[0], tried[-1]):
      side = "top" if value == tried[-1] else "bottom"
      flags.append(f"{key}={value:g} ({side} of {tried[0]:g}..{tried[-1]:g})")
  return "; ".join(flags)


def _select_best(points):
  """points: [(steps, final valid error, key)] -> the key with the fewest steps (finite), ties
  broken by the lower final validation error; None if no point reached."""
  reached = [p for p in points if np.isfinite(p[0])]
  if not reached:
    return None
  return min(reached, key=lambda p: (p[0], p[1] if p[1] is not None else math.inf))[2]


def best_per_batch(trials, tolerance=PERFECT_SCALING_TOLERANCE):
  """One row per (group, batch size): the best point over the tuned settings (Shallue's rule).

  outcome: 'reached'; 'pending' (none reached, some still running or preempted); 'not reached'.
  steps_to_target: the best point's median over seeds of the interpolated steps; steps_min/max:
  its spread over seeds; steps_first_eval: the median of the first evaluations below the target.
  examples_ratio: examples to target / those at the group's smallest batch size that reached it.
  `_seed_steps` (setting key -> per-seed steps) feeds the bootstrap; it is not written to CSV.
  """
  rows = []
  for group in sorted({t.group for t in trials}):
    e_ref, holding = None, True
    for bs in sorted({t.batch_size for t in trials if t.group == group}):
      ts = [t for t in trials if t.group == group and t.batch_size == bs]
      by_setting = collections.defaultdict(list)
      for t in ts:
        by_setting[t.setting_key].append(t)
      seed_steps = {k: _seed_steps(v) for k, v in by_setting.items()}
      best_key = _select_best([
          (point_steps(seed_steps[k]), _median(t.final.get("valid/error") for t in v), k)
          for k, v in by_setting.items()])
      pending = sum(t.status in PENDING for t in ts)
      row = dict(group=group, lr_rule=ts[0].lr_rule, optimizer=ts[0].optimizer, batch_size=bs,
                 n_trials=len(ts), n_reached=sum(t.reached for t in ts),
                 n_diverged=sum(t.status == "diverged" for t in ts), n_pending=pending,
                 n_settings=len(by_setting),
                 outcome="reached" if best_key else "pending" if pending else "not reached",
                 best_trial=None, best_setting=None, lr=None, lr_at_edge="", n_seeds=None,
                 steps_to_target=None, steps_min=None, steps_max=None, steps_first_eval=None,
                 eval_interval=_median(t.eval_interval for t in ts),
                 examples_to_target=None, examples_ratio=None, perfect_scaling=False,
                 b_simple_at_target=None, wall_time_to_target=None, examples_per_sec=None,
                 compile_seconds=None, peak_memory_bytes=None, _seed_steps=seed_steps)
      if best_key:
        best_ts, steps = by_setting[best_key], seed_steps[best_key]
        median = point_steps(steps)
        e_ref = e_ref or median * bs
        holding = holding and median * bs / e_ref <= tolerance
        reached = [t for t in best_ts if t.reached]
        row.update(
            best_trial=min(reached, key=lambda t: abs(t.steps_interpolated - median)).trial_id,
            best_setting=best_key, lr=_median(t.lr for t in best_ts), n_seeds=len(best_ts),
            lr_at_edge=edge_flags(best_ts[0].setting, [v[0].setting for v in by_setting.values()]),
            steps_to_target=median, steps_min=float(steps.min()), steps_max=float(steps.max()),
            steps_first_eval=_median(t.steps_to_target for t in reached),
            examples_to_target=median * bs, examples_ratio=median * bs / e_ref,
            perfect_scaling=holding,
            b_simple_at_target=_median(t.at_target.get("noise/b_simple") for t in reached),
            wall_time_to_target=_median(t.at_target.get("wall_time") for t in reached),
            **{k: _median(t.cost.get(k) for t in best_ts)
               for k in ("examples_per_sec", "compile_seconds", "peak_memory_bytes")})
      holding = holding and (e_ref is None or bool(best_key))
      rows.append(row)
  return rows


def bootstrap_fit(seed_steps_per_batch, replicates=BOOTSTRAP_REPLICATES, seed=0):
  """Bootstrap of the critical-batch fit: [(B, {setting: per-seed steps})] -> replicate
  (s_min, e_min, b_crit) rows. Each replicate resamples the batch sizes, then the seeds of every
  setting at each, and picks the best setting again (so tuning noise is inside the interval).
  B_crit is +inf where a replicate's S_min <= 0 (still perfect scaling at the largest B) and 0
  where E_min <= 0; replicates with < 2 distinct batch sizes that reached are dropped.
  Vectorized over replicates: the same least squares as fit_critical_batch, by normal equations."""
  rng = np.random.default_rng(seed)
  n = len(seed_steps_per_batch)
  if n < 2:
    return np.zeros((0, 3))
  best_RxN = np.empty((replicates, n))   # best point's steps per replicate and batch size
  for j, (_, settings) in enumerate(seed_steps_per_batch):
    medians = [np.median(v[rng.integers(0, len(v), (replicates, len(v)))], axis=1)
               for v in settings.values()]
    best_RxN[:, j] = np.min(medians, axis=0)
  pick_RxN = rng.integers(0, n, (replicates, n))
  b_N = np.array([bs for bs, _ in seed_steps_per_batch], dtype=float)
  b_RxN, s_RxN = b_N[pick_RxN], np.take_along_axis(best_RxN, pick_RxN, axis=1)
  ok_RxN = np.isfinite(s_RxN)
  # Rows x = (1, 1/B) / S, target 1 (relative residuals); zero rows where S is infinite.
  x0 = np.where(ok_RxN, 1.0 / np.where(ok_RxN, s_RxN, 1.0), 0.0)
  x1 = x0 / b_RxN
  a00, a01, a11 = (x0 * x0).sum(1), (x0 * x1).sum(1), (x1 * x1).sum(1)
  c0, c1 = x0.sum(1), x1.sum(1)
  det = a00 * a11 - a01 ** 2
  distinct = np.array([len(set(b[ok])) for b, ok in zip(b_RxN, ok_RxN)])
  keep = (distinct >= 2) & (det > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    s_min = (a11 * c0 - a01 * c1) / det
    e_min = (a00 * c1 - a01 * c0) / det
    b_crit = np.where(s_min <= 0, np.inf, np.where(e_min <= 0, 0.0, e_min / s_min))
  return np.stack([s_min, e_min, b_crit], axis=1)[keep]


def fit_table(best_rows, replicates=BOOTSTRAP_REPLICATES):
  """One row per group: the critical-batch fit to the batch sizes that reached the target (the
  rest censored), its bootstrap interval, and B_simple at the target for comparison."""
  rows = []
  for group in sorted({r["group"] for r in best_rows}):
    g = [r for r in best_rows if r["group"] == group]
    used = [r for r in g if r["outcome"] == "reached"]
    fit = fit_critical_batch([r["batch_size"] for r in used], [r["steps_to_target"] for r in used])
    boot = bootstrap_fit([(r["batch_size"], r["_seed_steps"]) for r in used], replicates)
    for i, name in enumerate(("s_min", "e_min", "b_crit")):
      # "nearest": replicates may hold B_crit = inf, which interpolation would turn into NaN.
      lo, hi = (np.percentile(boot[:, i], INTERVAL, method="nearest") if len(boot)
                else (math.nan, math.nan))
      fit[f"{name}_lo"], fit[f"{name}_hi"] = float(lo), float(hi)
    held = [r["batch_size"] for r in g if r["perfect_scaling"]]
    b_simple = [r["b_simple_at_target"] for r in used if r["b_simple_at_target"] is not None]
    rows.append(dict(
        group=group, lr_rule=g[0]["lr_rule"], optimizer=g[0]["optimizer"], **fit,
        bootstrap_replicates=len(boot),
        b_simple_at_target=float(np.median(b_simple)) if b_simple else None,
        b_simple_at_target_min=min(b_simple, default=None),
        b_simple_at_target_max=max(b_simple, default=None),
        fitted_batch_sizes=" ".join(str(r["batch_size"]) for r in used),
        censored_batch_sizes=" ".join(str(r["batch_size"]) for r in g if r["outcome"] != "reached"),
        lr_at_edge=" ".join(str(r["batch_size"]) for r in used if r["lr_at_edge"]),
        perfect_scaling_up_to=max(held) if held else None,
        largest_batch_reached=max((r["batch_size"] for r in used), default=None),
        _boot=boot))
  return rows


def trial_table(trials):
  """One row per trial, for trials.csv."""
  rows = []
  for t in trials:
    f, b_simple = t.final, t.series("noise/b_simple")[2]
    b_simple = b_simple[np.isfinite(b_simple)]
    rows.append({
        "trial_id": t.trial_id, "group": t.group, "batch_size": t.batch_size,
        "lr_rule": t.lr_rule, "optimizer": t.optimizer, "base_lr": t.base_lr, "lr": t.lr,
        "lr_multiplier": t.lr_multiplier, "seed": t.seed, "status": t.status,
        "stop_reason": t.stop_reason, "step": t.last_step, "step_cap": t.step_cap,
        "diverged_at_step": t.diverged_at_step, "target": f"{t.target_metric}<{t.target_value:g}",
        "steps_to_target": t.steps_to_target, "steps_interpolated": t.steps_interpolated,
        "eval_interval": t.eval_interval, "examples_to_target": t.examples_to_target,
        "best_valid_error": t.best.get("valid/error"), "best_test_error": t.best.get("test/error"),
        "final_valid_error": f.get("valid/error"), "final_test_error": f.get("test/error"),
        "final_train_loss": f.get("train/loss"), "final_train_eval_error": f.get("train_eval/error"),
        "generalization_gap": t.gap, "hessian_trace": f.get("curvature/hessian_trace"),
        "top_eigenvalue": f.get("curvature/top_eigenvalue"), "sharpness": f.get("curvature/sharpness"),
        "b_simple_final": f.get("noise/b_simple"),
        "b_simple_median": float(np.median(b_simple)) if len(b_simple) else None,
        "b_simple_at_target": t.at_target.get("noise/b_simple"),
        "b_simple_window_examples": _ema_window_examples(t),
        "top_eigenvalue_at_target": t.at_target.get("curvature/top_eigenvalue"),
        "hessian_trace_at_target": t.at_target.get("curvature/hessian_trace"),
        "wall_time_s": t.wall_time, "wall_time_to_target_s": t.at_target.get("wall_time"),
        **{k: t.cost.get(k) for k in ("examples_per_sec", "compile_seconds", "peak_memory_bytes",
                                      "memory_source")}})
  return rows


def _ema_window_examples(t):
  """The noise-scale EMA averages over ~1/(1 - decay) steps: that many batches of examples."""
  decay = _get(t.config, "noise_scale.ema_decay")
  return t.batch_size / (1 - decay) if isinstance(decay, (int, float)) and decay < 1 else None


def unconverged_eigenvalues(trial) -> list[str]:
  """One note per curvature measurement of `trial` with an eigenvalue above EIGEN_RESIDUAL_LIMIT."""
  notes = []
  for r in trial.records:
    bad = [f"λ_{i}={lam:.4g} (residual {r[f'curvature/eig_residual_{i}']:.2g})"
           for i, lam in enumerate(r.get("curvature/eigenvalues", []))
           if not r.get(f"curvature/eig_residual_{i}", 0) <= EIGEN_RESIDUAL_LIMIT * abs(lam)]
    if bad:
      notes.append(f"step {r['step']}: unconverged eigenvalue(s) {', '.join(bad)}: residual above"
                   f" {EIGEN_RESIDUAL_LIMIT:g} |λ|; raise curvature.lanczos_steps")
  return notes


def write_csv(path, rows):
  cols = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows([{k: "" if r.get(k) is None else r[k] for k in cols} for r in rows])


def _fmt(v):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, float):
    return f"{v:.4g}"
  return html.escape(str(v))


def _html_table(rows, cols=None):
  if not rows:
    return "<p>(none)</p>"
  cols = cols or list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>"
                 for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _interval(fit, name):
  lo, hi = fit[f"{name}_lo"], fit[f"{name}_hi"]
  return "–" if math.isnan(lo) else f"[{lo:.4g}, {hi:.4g}]"


def _b_simple_range(fit):
  if fit["b_simple_at_target"] is None:
    return "–"
  return (f"{fit['b_simple_at_target']:.4g} [{fit['b_simple_at_target_min']:.3g}, "
          f"{fit['b_simple_at_target_max']:.3g}]")


def _pm(v, err):
  return _fmt(v) if err is None or not math.isfinite(err) else f"{v:.4g} ± {err:.2g}"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:85%;margin-bottom:1em}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:4px 0}"
        ".note{color:#a40}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:85%}")


def _index_html(workdir, trials, trows, best_rows, fits, images, notes):
  h = html.escape
  status = {**dict.fromkeys(("done", "diverged", "running", "preempted", "failed"), 0),
            **collections.Counter(t.status for t in trials)}
  tgt = ", ".join(sorted({f"{t.target_metric} < {t.target_value:g}" for t in trials})) or "?"
  key = [dict(group=f["group"], b_crit=_pm(f["b_crit"], f["b_crit_err"]),
              b_crit_95=_interval(f, "b_crit"), b_simple_at_target=_b_simple_range(f),
              s_min=_pm(f["s_min"], f["s_min_err"]), s_min_95=_interval(f, "s_min"),
              e_min=_pm(f["e_min"], f["e_min_err"]), e_min_95=_interval(f, "e_min"),
              fitted_batch_sizes=f["fitted_batch_sizes"],
              censored_batch_sizes=f["censored_batch_sizes"] or "none",
              best_lr_at_grid_edge=f["lr_at_edge"] or "none",
              perfect_scaling_up_to=f["perfect_scaling_up_to"],
              largest_batch_reached=f["largest_batch_reached"], note=f["note"]) for f in fits]
  stops = collections.Counter(t.stop_reason or t.status for t in trials)
  caps = sorted({(t.batch_size, t.step_cap) for t in trials if t.step_cap})
  resolution = sorted({(t.batch_size, t.eval_interval) for t in trials if t.eval_interval})
  windows = sorted({(t.batch_size, _ema_window_examples(t)) for t in trials
                    if _ema_window_examples(t)})
  sweep = _read_json(os.path.join(workdir, "sweep.json"))
  varying = varying_fields(trials)
  common = {k: v for k, v in (_flatten(trials[0].config) if trials else {}).items()
            if k not in varying and k != "trial_id"}
  tol = PERFECT_SCALING_TOLERANCE
  parts = [
      f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {h(workdir)}</title>"
      f"<style>{_CSS}</style></head><body><h1>Scaling report: {h(os.path.abspath(workdir))}</h1>",
      f"<p>{len(trials)} trials. Target: {h(tgt)}. Steps to target: the step where the target "
      "metric crosses the target, interpolated linearly in log(metric) between the last evaluation "
      "above it and the first strictly below (Shallue et al. 2018 use the latter: "
      "<i>steps_first_eval</i>); resolution = the evaluation interval per batch size (steps): "
      f"{h(', '.join(f'B={b}: {i:g}' for b, i in resolution) or '?')}. A point (batch size, tuned "
      "setting) takes the median over its seeds (a seed that never reached counts as infinite); "
      "per batch size the best point counts (fewest steps, ties by final validation error).</p>"
      f"<p>Why trials stopped: {h(', '.join(f'{k}: {v}' for k, v in sorted(stops.items())))}. "
      f"Step caps: {h(', '.join(f'B={b}: {c}' for b, c in caps) or '?')}.</p>",
      "<h2>Key numbers</h2><p>B_crit, S_min, E_min: least-squares fit of S = S_min (1 + B_crit/B)"
      " (McCandlish et al. 2018) to the best steps to target at the <i>fitted</i> batch sizes (the"
      " censored ones never reached the target and are left out); E_min = S_min B_crit;"
      " &plusmn; one standard error, and a 95% bootstrap interval (batch sizes resampled, seeds "
      "resampled within each, best setting chosen again; B_crit = inf where a replicate still "
      "scales perfectly at the largest B). <i>b_simple_at_target</i>: the gradient noise scale "
      "B_simple = tr(Σ)/|G|² when each best trial first reached the target (equal loss), median "
      "[min, max] over batch sizes; McCandlish et al. predict B_crit ≈ B_noise. Its EMA averages "
      "over ~1/(1-decay) steps = "
      f"{h(', '.join(f'B={b}: {w:.3g}' for b, w in windows[:1] + windows[-1:]) or '?')} examples."
      " <i>perfect_scaling_up_to</i>: the largest batch size up to "
      f"which every batch size reached the target with examples to target within {tol:g}x those "
      f"at the group's smallest batch size, i.e. steps within {100 * (tol - 1):.0f}% of the "
      "perfect-scaling line.</p>", _html_table(key),
      "<h2>Trial status</h2>", _html_table([status]), "<h3>Trials not done</h3>",
      _html_table([r for r in trows if r["status"] != "done"],
                  ["trial_id", "status", "step", "diverged_at_step", "batch_size", "lr"])]
  if notes:
    parts += ["<h2>Notes</h2><ul>", *(f"<li class='note'>{h(n)}</li>" for n in notes), "</ul>"]
  parts.append("<h2>Sweep config</h2>")
  if sweep is not None:
    parts.append(f"<h3>sweep.json</h3><pre>{h(json.dumps(sweep, indent=2))}</pre>")
  parts += ["<h3>Fields that vary between trials</h3>",
            _html_table([dict(field=k, values=", ".join(v)) for k, v in varying.items()]),
            "<h3>Fields shared by all trials</h3>",
            f"<pre>{h(json.dumps(common, indent=2, default=str))}</pre><h2>Tables</h2>"]
  for name, title, rows in (("critical_batch_fit", "Critical batch size fit", fits),
                            ("best_per_batch", "Best trial per batch size", best_rows),
                            ("trials", "All trials", trows)):
    parts += [f"<h3>{title} (<a href='{name}.csv'>{name}.csv</a>)</h3>", _html_table(rows)]
  parts.append("<h2>Plots</h2>")
  for name, title, note in images:
    parts.append(f"<h3>{h(title)}</h3>" + (f"<p class='note'>Skipped: {h(note)}</p>" if note
                                            else f"<img src='{h(name)}' alt='{h(title)}'>"))
  return "\n".join(parts + ["</body></html>"])


def write_report(workdir):
  """Writes <workdir>/report/ (PNGs, CSVs, index.html) and returns its path."""
  from scaling import report_plots  # matplotlib only when a report is written
  out = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  trials = load_trials(workdir)
  notes = [f"{t.trial_id}: {n}" for t in trials for n in t.notes + unconverged_eigenvalues(t)]
  if not trials:
    notes.append(f"no trial directories (with a config.json) under {workdir}")
  trows, best_rows = trial_table(trials), best_per_batch(trials)
  fits = fit_table(best_rows)
  notes += [f"{f['group']}: critical batch fit: {f['note']}" for f in fits if f["note"]]
  for name, rows in (("trials", trows), ("best_per_batch", best_rows), ("critical_batch_fit", fits)):
    write_csv(os.path.join(out, f"{name}.csv"), rows)
  images = []
  for name, title, fn in report_plots.PLOTS:
    path = os.path.join(out, name)
    try:
      note = fn(path, trials, best_rows, fits)
    except Exception as e:  # one broken plot must not cost the rest of the report
      logging.exception("plot %s failed", name)
      note = f"plot failed: {type(e).__name__}: {e}"
    if note and os.path.exists(path):
      os.remove(path)  # a stale image from an earlier report would contradict the note
    images.append((name, title, note))
  with open(os.path.join(out, "index.html"), "w") as f:
    f.write(_index_html(workdir, trials, trows, best_rows, fits, images, notes))
  return out


def check_workdir(workdir):
  """The report's bad input, as one ConfigError before anything is written: a workdir that is not
  a directory, or a trial's config.json / summary.json that is not a JSON object (both are written
  atomically, so a reader never sees half of one: such a file was damaged after the fact)."""
  if not os.path.isdir(workdir):
    what = "is not a directory" if os.path.exists(workdir) else "does not exist"
    raise ConfigError(f"--workdir={workdir} {what}: pass the --workdir given to scaling.main")
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not (root == workdir and d == REPORT_DIR))
    for name in ("config.json", "summary.json") if "config.json" in files else ():
      path = os.path.join(root, name)
      if name not in files:
        continue
      try:
        with open(path) as f:
          content = json.load(f)
        problem = None if isinstance(content, dict) else "not a JSON object"
      except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror}): fix its permissions"
                          ) from None
      except ValueError as error:
        problem = f"not JSON: {error}"
      if problem:
        raise ConfigError(f"{path} is corrupt ({problem}): delete it and rerun that trial with"
                          " scaling.main, which rewrites it (from the trial's checkpoint if it"
                          " has one), then rerun the report")


def main(argv):
  from absl import flags
  del argv
  try:
    check_workdir(flags.FLAGS.workdir)
  except ConfigError as error:  # bad input: one line naming the file and the fix
    sys.exit(f"report error: {error}")
  print(f"report written to {os.path.join(write_report(flags.FLAGS.workdir), 'index.html')}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Sweep (or single-trial) workdir to report on.")
  flags.mark_flag_as_required("workdir")

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:
      sys.exit(f"report error: {error} (usage: python -m scaling.report --workdir=DIR, the"
               " --workdir given to scaling.main)")

  app.run(main, flags_parser=parse_flags)
