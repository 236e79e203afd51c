"""The study protocol over loaded trials: best tuned point per batch size, the critical-batch fit,
its bootstrap intervals. No JAX, no plotting.

- S, a trial's steps to target, is its interpolated steps to target minus its warmup steps
  (config `derived.warmup_steps`): warmup steps are not steps the problem needed (the study
  protocol). Subtracted rather than fitted as an offset: each trial's warmup is known exactly,
  a warmup constant in steps is not identifiable against S_min (S = S_min + w + E_min/B), and one
  given in epochs or examples is ~1/B, confounded with E_min/B. A seed that reached the target
  during warmup counts 0 steps.
- A *point* is (group, batch size, tuned setting), the setting being the trial's sweep axes other
  than batch size, seed and the group's fields (e.g. lr_multiplier): its S is the median over
  seeds, a seed that never reached counting as infinite (so a point reaches the target when more
  than half its seeds do). Per (group, batch size) the point with the fewest steps counts (ties:
  the lower median final validation error); a best setting at the edge of its grid is flagged.
- The critical batch size comes from a fit of McCandlish et al. 2018's S = S_min (1 + B_crit / B) to
  the batch sizes that reached the target (the others are censored: shown, not fitted), with a
  least-squares standard error and two bootstrap intervals. Reported: the seed bootstrap (batch
  sizes fixed; each replicate redraws every batch size's seeds and picks the best setting again),
  the uncertainty of rerunning the same sweep with other seeds. Beside it, labelled: the batch-size
  bootstrap (batch sizes resampled, then seeds within each), which also holds how far the points
  sit from the model curve. With fewer than MIN_SEEDS seeds at a batch size the seed bootstrap
  sees little of its seed noise (none with one seed): fit_table names those batch sizes.
"""
import collections
import math

import numpy as np

from scaling.analysis import results


# Perfect scaling "holds" at batch size B while the examples to target are within this factor of
# those at the group's smallest batch size (on the perfect-scaling line E is constant).
PERFECT_SCALING_TOLERANCE = 1.2
# Not results yet: a failed trial is retried by the next run of the sweep.
PENDING = ("running", "preempted", "failed")
BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 0       # a fixed RNG seed: the same trials give the same intervals
INTERVAL = (2.5, 97.5)   # percentiles: a 95% bootstrap interval
# Fewer seeds than this at a batch size: the seed bootstrap sees its seed noise poorly (a median
# of 2 resampled seeds takes only 3 values; of 1, one), so the findings say so beside the interval.
MIN_SEEDS = 3


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


def median_of(values):
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.median(values)) if values else None


def warmup_steps(trial):
  """The trial's warmup steps (config `derived.warmup_steps`); None where it was not recorded."""
  w = results.get(trial.config, "derived.warmup_steps")
  return float(w) if isinstance(w, (int, float)) else None


def _seed_steps(ts):
  """S per seed: interpolated steps to target minus warmup (0 if the target came during warmup);
  a seed that never reached counts as infinite."""
  return np.array([max(t.steps_interpolated - (warmup_steps(t) or 0.0), 0.0)
                   if t.steps_interpolated is not None else np.inf for t in ts], dtype=float)


def point_steps(seed_steps):
  """A point's S: the median over its seeds (infinite unless more than half of them reached)."""
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


def _b_simple_at_target(reached):
  """B_simple at the target over a setting's seeds that reached it: at frozen parameters where
  every one was measured there (McCandlish et al.'s App. A.1 estimators over many draws, with a
  standard error: `measure_checkpoint --noise_draws`), else the training EMA (source 'EMA', which
  lags: it still averages the gradients of the steps before). The EMA's value is kept beside."""
  frozen = [t.at_target.get("noise/frozen_b_simple") for t in reached]
  ema = median_of(t.at_target.get("noise/b_simple") for t in reached)
  if reached and all(isinstance(v, float) for v in frozen):
    stderr = [t.at_target.get("noise/frozen_b_simple_stderr", math.nan) for t in reached]
    return dict(b_simple_at_target=median_of(frozen), b_simple_ema_at_target=ema,
                b_simple_at_target_source="frozen parameters",
                # the median's error as the mean's: an upper bound's order for 1-3 seeds
                b_simple_at_target_stderr=float(np.sqrt(np.sum(np.square(stderr)))) / len(stderr))
  return dict(b_simple_at_target=ema, b_simple_ema_at_target=ema,
              b_simple_at_target_source="EMA" if ema is not None else "",
              b_simple_at_target_stderr=None)


def best_per_batch(trials, tolerance=PERFECT_SCALING_TOLERANCE):
  """One row per (group, batch size): the best point over the tuned settings (Shallue's rule).

  outcome: 'reached'; 'pending' (none reached, some still running or preempted); 'not reached'.
  Every steps_* column is S, steps after warmup (warmup_steps: the best point's, None where the
  trials did not record it): steps_to_target: the best point's median over seeds of the
  interpolated S; steps_min/max: its spread over seeds; steps_first_eval: the median of the first
  evaluations below the target, less warmup. examples_to_target: S x B; examples_ratio: those /
  the group's at its smallest batch size that reached (None where either is 0).
  `_seed_steps` (setting key -> per-seed S, ordered by seed) and `_seed_ids` (setting key -> its
  seeds) feed the bootstraps; they are not written to CSV.
  """
  rows = []
  for group in sorted({t.group for t in trials}):
    e_ref, holding = None, True
    for bs in sorted({t.batch_size for t in trials if t.group == group}):
      ts = [t for t in trials if t.group == group and t.batch_size == bs]
      by_setting = collections.defaultdict(list)
      for t in sorted(ts, key=lambda t: (t.seed, t.trial_id)):
        by_setting[t.setting_key].append(t)
      seed_steps = {k: _seed_steps(v) for k, v in by_setting.items()}
      best_key = _select_best([
          (point_steps(seed_steps[k]), median_of(t.final.get("valid/error") for t in v), k)
          for k, v in by_setting.items()])
      pending = sum(t.status in PENDING for t in ts)
      row = dict(group=group, lr_rule=ts[0].lr_rule, optimizer=ts[0].optimizer, batch_size=bs,
                 n_trials=len(ts), n_reached=sum(t.reached for t in ts),
                 n_diverged=sum(t.status == "diverged" for t in ts), n_pending=pending,
                 n_settings=len(by_setting),
                 outcome="reached" if best_key else "pending" if pending else "not reached",
                 best_trial=None, best_setting=None, lr=None, lr_at_edge="", n_seeds=None,
                 warmup_steps=median_of(warmup_steps(t) for t in ts),
                 steps_to_target=None, steps_min=None, steps_max=None, steps_first_eval=None,
                 eval_interval=median_of(t.eval_interval for t in ts),
                 examples_to_target=None, examples_ratio=None, perfect_scaling=False,
                 b_simple_at_target=None, b_simple_at_target_stderr=None,
                 b_simple_at_target_source="", b_simple_ema_at_target=None,
                 wall_time_to_target=None, examples_per_sec=None,
                 compile_seconds=None, peak_memory_bytes=None, _seed_steps=seed_steps,
                 _seed_ids={k: tuple(t.seed for t in v) for k, v in by_setting.items()})
      if best_key:
        best_ts, steps = by_setting[best_key], seed_steps[best_key]
        median = point_steps(steps)
        e_ref = e_ref or median * bs or None   # 0: the target came during warmup
        ratio = median * bs / e_ref if e_ref and median > 0 else None
        holding = holding and ratio is not None and ratio <= tolerance
        reached = [t for t in best_ts if t.reached]
        row.update(
            best_trial=min(reached, key=lambda t: abs(
                t.steps_interpolated - (warmup_steps(t) or 0) - median)).trial_id,
            best_setting=best_key, lr=median_of(t.lr for t in best_ts), n_seeds=len(best_ts),
            warmup_steps=median_of(warmup_steps(t) for t in best_ts),
            lr_at_edge=edge_flags(best_ts[0].setting, [v[0].setting for v in by_setting.values()]),
            steps_to_target=median, steps_min=float(steps.min()), steps_max=float(steps.max()),
            steps_first_eval=median_of(max(t.steps_to_target - (warmup_steps(t) or 0), 0)
                                       for t in reached),
            examples_to_target=median * bs, examples_ratio=ratio,
            perfect_scaling=holding,
            **_b_simple_at_target(reached),
            wall_time_to_target=median_of(t.at_target.get("wall_time") for t in reached),
            **{k: median_of(t.cost.get(k) for t in best_ts)
               for k in ("examples_per_sec", "compile_seconds", "peak_memory_bytes")})
      holding = holding and (e_ref is None or bool(best_key))
      rows.append(row)
  return rows


def _resampled_best(settings, rng, replicates, paired):
  """{setting: per-seed S} -> (replicates,) best point's S per replicate: each setting's seeds
  drawn with replacement, the median over them, the fewest steps over settings (as
  best_per_batch chooses; a tie takes the same steps whichever setting wins it). paired: every
  setting holds the same seeds in the same order, so one draw of seed indices serves them all (a
  seed's trials share its initialization and data order across settings)."""
  arrays = list(settings.values())
  if paired:
    pick_RxS = rng.integers(0, len(arrays[0]), (replicates, len(arrays[0])))
    medians = [np.median(v[pick_RxS], axis=1) for v in arrays]
  else:
    medians = [np.median(v[rng.integers(0, len(v), (replicates, len(v)))], axis=1) for v in arrays]
  return np.min(medians, axis=0)


def _fit_replicates(b_RxN, s_RxN):
  """Replicate (s_min, e_min, b_crit) rows: the least squares of fit_critical_batch, vectorized
  over replicates by normal equations. B_crit is +inf where a replicate's S_min <= 0 (still
  perfect scaling at the largest B) and 0 where E_min <= 0; replicates with < 2 distinct batch
  sizes whose S is finite and positive are dropped."""
  ok_RxN = np.isfinite(s_RxN) & (s_RxN > 0)
  # Rows x = (1, 1/B) / S, target 1 (relative residuals); zero rows where S is not usable.
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


def seed_bootstrap_fit(seed_steps_per_batch, replicates=BOOTSTRAP_REPLICATES, seed=BOOTSTRAP_SEED):
  """The reported bootstrap of the critical-batch fit: [(B, {setting: per-seed S}, paired)] ->
  replicate (s_min, e_min, b_crit) rows. The batch sizes stay fixed; each replicate draws every
  batch size's seeds with replacement (one draw for all its settings where `paired`, see
  _resampled_best), takes each setting's median, picks the best setting again and refits: the
  spread of rerunning the sweep with other seeds. A batch size whose replicate has no setting
  with a finite median drops out of that replicate's fit."""
  rng = np.random.default_rng(seed)
  n = len(seed_steps_per_batch)
  if n < 2:
    return np.zeros((0, 3))
  s_RxN = np.stack([_resampled_best(settings, rng, replicates, paired)
                    for _, settings, paired in seed_steps_per_batch], axis=1)
  b_N = np.array([bs for bs, _, _ in seed_steps_per_batch], dtype=float)
  return _fit_replicates(np.broadcast_to(b_N, s_RxN.shape), s_RxN)


def bootstrap_fit(seed_steps_per_batch, replicates=BOOTSTRAP_REPLICATES, seed=BOOTSTRAP_SEED):
  """The batch-size bootstrap of the critical-batch fit: [(B, {setting: per-seed S})] ->
  replicate (s_min, e_min, b_crit) rows. Each replicate resamples the batch sizes, then the seeds
  of every setting at each, and picks the best setting again (so tuning noise is inside the
  interval); rows as _fit_replicates. Wider than the seed bootstrap: it also holds how far the
  points sit from the model curve, which a rerun with other seeds would not change."""
  rng = np.random.default_rng(seed)
  n = len(seed_steps_per_batch)
  if n < 2:
    return np.zeros((0, 3))
  best_RxN = np.stack([_resampled_best(settings, rng, replicates, paired=False)
                       for _, settings in seed_steps_per_batch], axis=1)
  pick_RxN = rng.integers(0, n, (replicates, n))
  b_N = np.array([bs for bs, _ in seed_steps_per_batch], dtype=float)
  return _fit_replicates(b_N[pick_RxN], np.take_along_axis(best_RxN, pick_RxN, axis=1))


def _paired(row):
  """Whether every setting of a best_per_batch row holds the same seeds (rows built elsewhere,
  without `_seed_ids`, are resampled setting by setting)."""
  return len(set(row.get("_seed_ids", {}).values())) == 1


def _percentiles(values):
  # "nearest": replicates may hold B_crit = inf, which interpolation would turn into NaN.
  if not len(values):
    return math.nan, math.nan
  lo, hi = np.percentile(values, INTERVAL, method="nearest")
  return float(lo), float(hi)


def fit_table(best_rows, replicates=BOOTSTRAP_REPLICATES):
  """One row per group: the critical-batch fit of S (steps after warmup) to the batch sizes that
  reached the target (the rest censored), B_simple at the target for comparison, and two 95%
  bootstrap intervals: {s_min,e_min,b_crit}_lo/_hi from the seed bootstrap (batch sizes fixed:
  the reported one, replicates in `_boot`) and _batchboot_lo/_hi from the batch-size bootstrap
  (batch sizes resampled, then seeds; replicates in `_batchboot`). seeds_per_batch: the fewest and
  most seeds at a fitted batch size; few_seed_batch_sizes: those with fewer than MIN_SEEDS, where
  the seed interval sees little of the seed noise."""
  rows = []
  for group in sorted({r["group"] for r in best_rows}):
    g = [r for r in best_rows if r["group"] == group]
    used = [r for r in g if r["outcome"] == "reached"]
    fit = fit_critical_batch([r["batch_size"] for r in used], [r["steps_to_target"] for r in used])
    boot = seed_bootstrap_fit([(r["batch_size"], r["_seed_steps"], _paired(r)) for r in used],
                              replicates)
    batchboot = bootstrap_fit([(r["batch_size"], r["_seed_steps"]) for r in used], replicates)
    for i, name in enumerate(("s_min", "e_min", "b_crit")):
      fit[f"{name}_lo"], fit[f"{name}_hi"] = _percentiles(boot[:, i])
    for i, name in enumerate(("s_min", "e_min", "b_crit")):
      fit[f"{name}_batchboot_lo"], fit[f"{name}_batchboot_hi"] = _percentiles(batchboot[:, i])
    seeds = {r["batch_size"]: max(len(v) for v in r["_seed_steps"].values()) for r in used}
    during_warmup = [r["batch_size"] for r in used if r["steps_to_target"] <= 0]
    if during_warmup:
      fit["note"] = "; ".join(filter(None, [fit["note"], (
          f"B = {', '.join(map(str, during_warmup))} reached the target during warmup (S = 0): "
          "left out of the fit")]))
    held = [r["batch_size"] for r in g if r["perfect_scaling"]]
    # At frozen parameters where any batch size was measured so (the EMA lags), else the EMA's.
    frozen = [r for r in used if r["b_simple_at_target_source"] == "frozen parameters"]
    b_simple = [r["b_simple_at_target"] for r in (frozen or used)
                if r["b_simple_at_target"] is not None]
    rows.append(dict(
        group=group, lr_rule=g[0]["lr_rule"], optimizer=g[0]["optimizer"], **fit,
        bootstrap_replicates=len(boot), batchboot_replicates=len(batchboot),
        seeds_per_batch=(f"{min(seeds.values())}" if len(set(seeds.values())) == 1 else
                         f"{min(seeds.values())}-{max(seeds.values())}") if seeds else "",
        few_seed_batch_sizes=" ".join(str(b) for b, n in seeds.items() if n < MIN_SEEDS),
        b_simple_at_target=float(np.median(b_simple)) if b_simple else None,
        b_simple_at_target_min=min(b_simple, default=None),
        b_simple_at_target_max=max(b_simple, default=None),
        b_simple_at_target_source=("frozen parameters" if frozen else "EMA") if b_simple else "",
        b_simple_at_target_batch_sizes=" ".join(
            str(r["batch_size"]) for r in (frozen or used) if r["b_simple_at_target"] is not None),
        fitted_batch_sizes=" ".join(str(r["batch_size"]) for r in used),
        censored_batch_sizes=" ".join(str(r["batch_size"]) for r in g if r["outcome"] != "reached"),
        lr_at_edge=" ".join(str(r["batch_size"]) for r in used if r["lr_at_edge"]),
        perfect_scaling_up_to=max(held) if held else None,
        largest_batch_reached=max((r["batch_size"] for r in used), default=None),
        _boot=boot, _batchboot=batchboot))
  return rows
