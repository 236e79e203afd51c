"""Shallue et al. 2018, "Measuring the effects of data parallelism on neural network training".

    python -m experiments.shallue --workdir=runs/shallue [--scale=smoke|here|paper] \\
        [--part=all|momentum|sgd]

The protocol is theirs (and the default study's, configs/mnist_sweep.py): at every batch size a
learning-rate grid around a per-batch-size centre, each trial stopping at the target validation
error with a step cap, steps to target interpolated, the best point per batch size, the fit
S = S_min (1 + B_crit / B) with a bootstrap interval (scaling/analysis/study.py). Momentum SGD and
plain SGD are two sub-sweeps (<workdir>/<data set>/momentum and .../sgd); the verdicts use every
part found.

Claims and the rules that decide them (functions below, tested on exact synthetic curves), each
with its pre-registered domain (constants below; unmet: INCONCLUSIVE "not tested: ..."):
1. three regimes: perfect scaling, diminishing returns, maximal data parallelism (`three_regimes`);
2. the tuned LR follows neither the linear nor the sqrt rule across the whole range (`lr_rule`);
3. momentum extends perfect scaling compared with plain SGD (`momentum_extends`).

Scales. paper: their simple CNN on MNIST (target 0.01) and Fashion-MNIST (0.1), B 16..16384,
7 LR multipliers, 3 seeds. here: the MLP on MNIST at a 4% target (the CNN runs ~100 examples/s on
this CPU: one 1%-target trial would take the whole budget; Fashion-MNIST is left to `paper`), in
two parts of <= 20 CPU-minutes each: --part=momentum is the default study itself, --part=sgd
plain SGD beside it. The momentum part's 2 seeds leave claim 1 "not tested" (3 needed at B_max/4
and B_max). smoke: mnist_tiny, seconds; it meets no domain.
"""
import math
import os

from absl import flags
import ml_collections
import numpy as np

from configs import mnist_sweep, mnist_sweep_tiny
from experiments import common
from scaling.analysis import results, study

# Plain SGD's LR centre = this x momentum's: momentum 0.9 moves ~1/(1 - 0.9) = 10x as far per unit
# LR (Shallue's "effective learning rate"); a pilot at 10x reached the target at B = 32 but not
# at B = 128 or 512 within the cap, so the grid (0.5, 1, 2) x 5 spans 2.5x..10x.
SGD_CENTRE_FACTOR = 5.0
# Per batch size: the default study's momentum LR centres and evaluation intervals.
_DEFAULT = dict(zip(mnist_sweep.BATCH_SIZES, zip(
    mnist_sweep.LR_CENTRES, (80.0, 40.0, 24.0, 16.0, 8.0, 8.0, 4.0, 4.0, 4.0, 4.0))))
SGD_HERE_BATCH_SIZES = mnist_sweep.BATCH_SIZES[1::2]   # 32, 128, 512, 2048, 8192
# Targets (validation error) per data set: Shallue et al.'s for their simple CNN.
PAPER_TARGETS = {"mnist": 0.01, "fashion_mnist": 0.1}
LR_GRID_STEP = 2.0   # ratio between neighbouring lr_multiplier values (all scales)
PARTS = ("momentum", "sgd")   # one sub-sweep each


def _zip(c, entries):
  """entries: [(batch size, LR centre, step cap, eval interval)] -> sweep_zip."""
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=tuple(e[0] for e in entries),
      base_lr=tuple(e[1] for e in entries),
      budget=dict(length=tuple(float(e[2]) for e in entries)),
      eval_every=dict(length=tuple(float(e[3]) for e in entries))))
  return c


def here_config(part):
  """momentum: the default study itself (configs/mnist_sweep.py: MLP, MNIST, 4% target, B
  16..8192, 3 LRs, 2 seeds, 60 trials, 17.5 CPU-minutes). sgd: plain SGD on the same protocol at
  B 32, 128, .., 8192, 3 LRs around SGD_CENTRE_FACTOR x momentum's centre, one seed (15 trials)."""
  c = mnist_sweep.get_config()
  if part == "momentum":
    return c
  c.optimizer.name = "sgd"
  c.sweep = ml_collections.ConfigDict(dict(lr_multiplier=(0.5, 1.0, 2.0), seed=(0,)))
  return _zip(c, [(b, SGD_CENTRE_FACTOR * _DEFAULT[b][0], mnist_sweep.step_cap(b), _DEFAULT[b][1])
                  for b in SGD_HERE_BATCH_SIZES])


def smoke_config(part):
  """Seconds: mnist_tiny, a tiny MLP, 2 batch sizes, one LR, one seed."""
  c = mnist_sweep_tiny.get_config()
  c.num_devices = 1
  c.model.widths = (16,)
  c.optimizer.name = part
  c.lr_rule = "none"
  c.chunk_steps, c.log_every_steps = 4, 4
  c.sweep = ml_collections.ConfigDict(dict(seed=(0,)))
  factor = 1.0 if part == "momentum" else SGD_CENTRE_FACTOR
  return _zip(c, [(16, 0.05 * factor, 32, 8), (64, 0.1 * factor, 32, 8)])


def paper_config(dataset, part):
  """Their simple CNN, their targets, B 16..16384, a 7-point LR grid (2^-3..2^3) around the sqrt
  rule from configs/mnist.py's 0.02 at B = 128 (no pilot for the CNN here; SGD's centre
  SGD_CENTRE_FACTOR x), 3 seeds, a cap of max(20 epochs, 3000 steps). For accelerators; not run
  on this machine."""
  c = mnist_sweep.get_config()
  c.dataset.name = dataset
  c.model.name = "cnn"
  c.optimizer.name = part
  c.target.value = PAPER_TARGETS[dataset]
  c.chunk_unroll = True           # configs/mnist.py: XLA:CPU runs convolutions in loops slowly
  c.sweep = ml_collections.ConfigDict(dict(
      lr_multiplier=tuple(LR_GRID_STEP**k for k in range(-3, 4)), seed=(0, 1, 2)))
  factor = 1.0 if part == "momentum" else SGD_CENTRE_FACTOR
  batch_sizes = [2**k for k in range(4, 15)]
  caps = [max(20 * 55_000 // b, 3000) for b in batch_sizes]
  return _zip(c, [(b, factor * 0.02 * math.sqrt(b / 128), cap, max(cap // 100, 1))
                  for b, cap in zip(batch_sizes, caps)])


def sweeps(scale, parts=PARTS):
  """-> {(data set, part): sweep config}."""
  if scale == "smoke":
    return {("mnist_tiny", p): smoke_config(p) for p in parts}
  if scale == "here":
    return {("mnist", p): here_config(p) for p in parts}
  return {(d, p): paper_config(d, p) for d in PAPER_TARGETS for p in parts}


# ---- the decision rules: pure functions of best_per_batch rows and fit_table rows ----

# Pre-registered domains (experiments/README.md states them too).
MIN_BATCH_SIZES = 4         # batch sizes reached, for a curve with three regimes (and per part)
MIN_BRACKETED = 5           # bracketed LR optima, for the LR rule's two half-range slopes
MIN_FLAT_SEEDS = 3          # seeds at B_max/4 and B_max: "flat" is judged against their spread
# "Flat": S(B_max/4)/S(B_max)'s interval over seed pairs within [1/1.25, 1.25]; entirely outside,
# a significant fall (still scaling) or rise (steps 70 -> 93 is 0.75) of the steps: not flat.
FLAT_TOLERANCE = 1.25


def _reached(rows):
  return sorted((r for r in rows if r["outcome"] == "reached"), key=lambda r: r["batch_size"])


def bracketed(rows):
  """The reached rows whose tuned LR lies inside its grid (an optimum at the grid's edge is a
  bound, not a value: the best LR may lie beyond it)."""
  return [r for r in _reached(rows) if not r["lr_at_edge"]]


def edges(rows):
  """'B:edge ...' for the reached rows whose tuned LR sits at its grid's edge ('' if none)."""
  return " ".join(f"{r['batch_size']}:{r['lr_at_edge']}" for r in _reached(rows) if r["lr_at_edge"])


def seed_steps(row):
  """The best setting's S per seed (infinite for a seed that did not reach the target)."""
  return np.asarray(row["_seed_steps"][row["best_setting"]], float)


def b_crit_interval(fit):
  """(lo, hi, name) of B_crit's 95% interval: the seed bootstrap's where every fitted batch size
  has >= study.MIN_SEEDS seeds; else the batch-size bootstrap's, which rests on the points'
  scatter about the curve, not on seed spread (with 1-2 seeds the seed interval is ~a point)."""
  if fit.get("few_seed_batch_sizes"):
    return (fit.get("b_crit_batchboot_lo", math.nan), fit.get("b_crit_batchboot_hi", math.nan),
            "batch-size bootstrap")
  return fit.get("b_crit_lo", math.nan), fit.get("b_crit_hi", math.nan), "seed bootstrap"


def flat_ratio(quarter, top):
  """S(B_max/4)/S(B_max) from two rows: (median ratio, lo, hi, flat), lo..hi the ratios over
  every pair of seeds (the seed ranges' interval). flat: True when the interval lies within
  [1/FLAT_TOLERANCE, FLAT_TOLERANCE] (any fall or rise of the steps is within the tolerance);
  False when it lies entirely beyond it, above (the steps still fall: not yet maximal) or below
  (they rise: 70 -> 93 steps is 0.75); None when it straddles a bound: the seeds cannot tell."""
  q, m = seed_steps(quarter), seed_steps(top)
  ratio = quarter["steps_to_target"] / top["steps_to_target"]
  with np.errstate(invalid="ignore"):
    lo, hi = float(q.min() / m.max()), float(q.max() / m.min())
  if math.isnan(lo) or math.isnan(hi):   # inf / inf: seeds that never reached on both sides
    return ratio, lo, hi, None
  within = 1 / FLAT_TOLERANCE <= lo and hi <= FLAT_TOLERANCE
  beyond = lo > FLAT_TOLERANCE or hi < 1 / FLAT_TOLERANCE
  return ratio, lo, hi, True if within else False if beyond else None


def three_regimes(rows, fit, label=""):
  """rows: one group's best_per_batch rows; fit: its fit_table row. Each end of the curve is read
  twice, from the measured points and from the fitted curve's 95% interval; the fitted
  E(B)/E_min = 1 + B/B_crit and S(B)/S_min = 1 + B_crit/B are within 1.25 beyond 4x B_crit.
  Domain: >= MIN_BATCH_SIZES reached, B_max/4 among them, bracketed LR optima at the batch sizes
  read (B_min, 2 B_min, B_max/4, B_max), >= MIN_FLAT_SEEDS seeds at B_max/4 and B_max."""
  claim = f"three regimes of steps vs batch size{label}"
  rule = ("perfect scaling: measured examples within 1.2x of the smallest B's over >= 1 doubling "
          "and B_crit_lo >= 4 B_min; maximal data parallelism: S(B_max/4)/S(B_max) flat (its "
          f"interval over seed pairs within [1/{FLAT_TOLERANCE:g}, {FLAT_TOLERANCE:g}]; entirely"
          " beyond it, a significant fall or rise of the steps: not flat) and B_max >= "
          "4 B_crit_hi; diminishing returns between (B_crit's interval inside the range). "
          "CONFIRMED if both ends hold, NOT CONFIRMED if either fails, else INCONCLUSIVE")
  pts = _reached(rows)
  by_b = {r["batch_size"]: r for r in pts}
  b_min, b_max = (pts[0]["batch_size"], pts[-1]["batch_size"]) if pts else (0, 0)
  read = [by_b[b] for b in dict.fromkeys((b_min, 2 * b_min, b_max // 4, b_max)) if b in by_b]
  quarter, top = by_b.get(b_max // 4), by_b.get(b_max)
  domain = [common.at_least("batch sizes reached", len(pts), MIN_BATCH_SIZES),
            common.Condition("B_max/4 reached", b_max // 4 if quarter else "no", "yes",
                             quarter is not None),
            common.Condition("LR optima at a grid edge among the batch sizes read (B_min, 2 B_min,"
                             " B_max/4, B_max)", edges(read) or "none", "none", not edges(read)),
            common.at_least(f"seeds at B_max/4 and B_max ({b_max // 4}, {b_max})",
                            min((len(seed_steps(r)) for r in (quarter, top) if r), default=0),
                            MIN_FLAT_SEEDS)]
  if not (quarter and len(pts) >= 2):
    return common.decide(claim, None, f"{len(pts)} batch sizes reached", rule, domain)
  lo, hi, interval = b_crit_interval(fit)
  steps = {b: r["steps_to_target"] for b, r in by_b.items()}
  perfect_to = fit.get("perfect_scaling_up_to") or 0
  ratio, ratio_lo, ratio_hi, flat = flat_ratio(quarter, top)
  # A NaN fit (S_min <= 0: still perfect scaling at B_max; E_min <= 0) fails the comparisons.
  perfect = perfect_to >= 2 * b_min and lo >= 4 * b_min
  beyond = b_max >= 4 * hi
  holds = (False if not perfect or not beyond or flat is False else
           True if flat else None)
  evidence = (f"perfect scaling (measured) B={b_min}..{perfect_to}; S({b_max // 4})/S({b_max})="
              f"{ratio:.2f} [{ratio_lo:.2f}, {ratio_hi:.2f}] over seed pairs (flat: {flat}); "
              f"B_crit={fit.get('b_crit', math.nan):.0f} [{lo:.0f}, {hi:.0f}] ({interval}), "
              f"S_min={fit.get('s_min', math.nan):.0f}; steps "
              + " ".join(f"{b}:{s:.0f}" for b, s in steps.items()))
  return common.decide(claim, holds, evidence, rule, domain)


def loglog_slope(batch_sizes, lrs, grid_step=LR_GRID_STEP):
  """(slope, standard error) of log2(lr) on log2(B) by least squares. The error is the larger of
  the residuals' and the grid's: a tuned LR is only known to within one grid step (a uniform
  error of sd log2(step)/sqrt(12) per point)."""
  x, y = np.log2(np.asarray(batch_sizes, float)), np.log2(np.asarray(lrs, float))
  sxx = float(((x - x.mean())**2).sum())
  slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
  resid = y - y.mean() - slope * (x - x.mean())
  se_resid = math.sqrt(float(resid @ resid) / (len(x) - 2) / sxx) if len(x) > 2 else math.inf
  se_grid = math.log2(grid_step) / math.sqrt(12) / math.sqrt(sxx)
  return slope, max(se_resid, se_grid)


def lr_rule(rows, label=""):
  """The tuned LR's log-log slope over the lower and the upper half of the batch sizes reached
  (sharing the middle one when their number is odd), on bracketed optima only (`bracketed`).
  Domain: at least MIN_BRACKETED batch sizes whose tuned LR lies inside its grid."""
  claim = f"the tuned LR follows neither the linear nor the sqrt rule over the whole range{label}"
  rule = ("on the batch sizes whose tuned LR is bracketed by its grid: slope of log LR vs"
          " log B on each half of their range; a rule (exponent 1 or 0.5) fails if it is > 2 SE"
          " from the slope on some half; CONFIRMED if both fail, NOT CONFIRMED if one holds on"
          " both halves")
  pts, at_edge = bracketed(rows), edges(rows)
  what = (f"batch sizes reached with a bracketed LR optimum (of {len(_reached(rows))} reached;"
          f" at the grid edge: {at_edge or 'none'})")
  domain = [common.at_least(what, len(pts), MIN_BRACKETED)]
  if len(pts) < 3:
    return common.decide(claim, None, f"{len(pts)} bracketed optima", rule, domain)
  half = (len(pts) + 1) // 2
  ranges = [pts[:half], pts[len(pts) - half:]]
  fails, parts = {1.0: False, 0.5: False}, []
  for part in ranges:
    slope, se = loglog_slope([r["batch_size"] for r in part], [r["lr"] for r in part])
    for exponent in fails:
      fails[exponent] |= abs(slope - exponent) > 2 * se
    parts.append(f"B {part[0]['batch_size']}..{part[-1]['batch_size']}: slope {slope:.2f} "
                 f"+- {se:.2f}")
  lrs = " ".join(f"{r['batch_size']}:{r['lr']:.3g}" for r in pts)
  evidence = "; ".join(parts) + f"; linear fails: {fails[1.0]}, sqrt fails: {fails[0.5]}; LR {lrs}"
  if at_edge:
    evidence += f"; left out at the grid edge: {at_edge}"
  return common.decide(claim, fails[1.0] and fails[0.5], evidence, rule, domain)


def momentum_extends(fit_momentum, fit_sgd, rows_momentum, rows_sgd):
  """Momentum's B_crit interval against plain SGD's, and their perfect-scaling extents. The two
  parts run on different LR grids, so the comparison is tested only where every batch size both
  reached has a bracketed optimum in both, and each part reached >= MIN_BATCH_SIZES."""
  claim = "momentum extends perfect scaling compared with plain SGD"
  rule = ("CONFIRMED if momentum's 95% B_crit interval lies above SGD's and its perfect-scaling "
          "extent is >= SGD's; NOT CONFIRMED if it lies below, or the intervals overlap and "
          "momentum's extent is smaller; else INCONCLUSIVE. Intervals: the seed bootstrap's with "
          f">= {study.MIN_SEEDS} seeds per batch size, else the batch-size bootstrap's")
  m_lo, m_hi, m_interval = b_crit_interval(fit_momentum)
  s_lo, s_hi, s_interval = b_crit_interval(fit_sgd)
  ext_m = fit_momentum.get("perfect_scaling_up_to") or 0
  ext_s = fit_sgd.get("perfect_scaling_up_to") or 0
  reached_m, reached_s = _reached(rows_momentum), _reached(rows_sgd)
  steps_m = {r["batch_size"]: r["steps_to_target"] for r in reached_m}
  steps_s = {r["batch_size"]: r["steps_to_target"] for r in reached_s}
  both = [b for b in sorted(steps_m) if b in steps_s]
  at_edge = " ".join(f"{r['optimizer']} {r['batch_size']}:{r['lr_at_edge']}"
                     for r in reached_m + reached_s if r["batch_size"] in both and r["lr_at_edge"])
  domain = [common.at_least("batch sizes reached by momentum", len(reached_m), MIN_BATCH_SIZES),
            common.at_least("batch sizes reached by plain SGD", len(reached_s), MIN_BATCH_SIZES),
            common.Condition("LR optima at a grid edge among the batch sizes compared "
                             f"({' '.join(map(str, both)) or 'none'})", at_edge or "none", "none",
                             not at_edge)]
  ratios = " ".join(f"{b}:{steps_s[b] / steps_m[b]:.2f}" for b in both)
  evidence = (f"B_crit momentum {fit_momentum.get('b_crit', math.nan):.0f} [{m_lo:.0f}, "
              f"{m_hi:.0f}] ({m_interval}) vs SGD {fit_sgd.get('b_crit', math.nan):.0f} "
              f"[{s_lo:.0f}, {s_hi:.0f}] ({s_interval}); perfect scaling up to B={ext_m} vs "
              f"{ext_s}; S_min {fit_momentum.get('s_min', math.nan):.0f} vs "
              f"{fit_sgd.get('s_min', math.nan):.0f}; steps SGD/momentum per B {ratios}")
  if any(math.isnan(x) for x in (m_lo, m_hi, s_lo, s_hi)):   # +inf: perfect scaling throughout
    return common.decide(claim, None, evidence, rule, domain)
  above, below = m_lo > s_hi, m_hi < s_lo
  holds = (True if above and ext_m >= ext_s else
           False if below or (not above and ext_m < ext_s) else None)
  return common.decide(claim, holds, evidence, rule, domain)


def by_optimizer(rows):
  out = {}
  for r in rows:
    out.setdefault(r["optimizer"], []).append(r)
  return out


def guard(verdict, unfinished, parts):
  """INCONCLUSIVE, numbers kept, where a sweep the claim needs has not finished every trial."""
  notes = [f"{p} sweep unfinished: {unfinished[p]}" for p in parts if unfinished.get(p)]
  if not notes:
    return verdict
  return common.Verdict(verdict.claim, common.INCONCLUSIVE, "not tested: " + "; ".join(notes)
                        + " | so far: " + verdict.evidence, verdict.rule)


def analyse(trials, label="", unfinished=None):
  """Loaded trials of one data set (all parts) -> (verdicts, best rows by optimizer, fits by
  optimizer). unfinished: {part: 'k of n trials finished'} for the sweeps still incomplete."""
  unfinished = unfinished or {}
  rows = study.best_per_batch(trials)
  fits = {f["optimizer"]: f for f in study.fit_table(rows)}
  rows = by_optimizer(rows)
  verdicts = []
  if "momentum" in rows:
    for v in (three_regimes(rows["momentum"], fits["momentum"], f" (momentum{label})"),
              lr_rule(rows["momentum"], f" (momentum{label})")):
      verdicts.append(guard(v, unfinished, ("momentum",)))
  if "momentum" in rows and "sgd" in rows:
    v = momentum_extends(fits["momentum"], fits["sgd"], rows["momentum"], rows["sgd"])
    v = common.Verdict(v.claim + label, v.outcome, v.evidence, v.rule)
  else:
    found = [p for p in PARTS if p in rows]
    v = common.decide("momentum extends perfect scaling compared with plain SGD" + label, None,
                      "run --part=momentum and --part=sgd", "needs both parts", [common.Condition(
                          "parts found", " ".join(found) or "none", "momentum and sgd", False)])
  verdicts.append(guard(v, unfinished, PARTS))
  return verdicts, rows, fits


def completeness(sweep_dir, trials):
  """'' when every trial of the sweep in sweep_dir has finished, else 'k of n trials finished'."""
  planned = len((results.read_json(os.path.join(sweep_dir, "sweep.json")) or {}).get("trials", []))
  finished = sum(t.status in ("done", "diverged") for t in trials)
  return "" if finished >= planned else f"{finished} of {planned} trials finished"


def run_sweeps(scale, workdir, parts=PARTS):
  """Runs (or resumes: finished trials are skipped) the parts' sweeps, then loads every part found
  under each data set's directory (a part run earlier counts): {data set: (trials, unfinished)}."""
  for (dataset, part), config in sweeps(scale, parts).items():
    common.run_sweep(config, os.path.join(workdir, dataset, part))
  found = {}
  for dataset in dict.fromkeys(d for d, _ in sweeps(scale, parts)):
    trials, unfinished = [], {}
    for p in PARTS:
      sweep_dir = os.path.join(workdir, dataset, p)
      if os.path.isdir(sweep_dir):
        loaded = results.load_trials(sweep_dir)
        trials += loaded
        unfinished[p] = completeness(sweep_dir, loaded)
    found[dataset] = trials, unfinished
  return found


def add_flags(flag_values):
  flags.DEFINE_enum("part", "all", ("all",) + PARTS, "the sub-sweep to run (each <= 20"
                    " CPU-minutes at --scale=here); the verdicts use every part found in the"
                    " workdir", flag_values=flag_values)


def run(args):
  parts = PARTS if args.part == "all" else (args.part,)
  verdicts = []
  for name, (trials, unfinished) in run_sweeps(args.scale, args.workdir, parts).items():
    verdicts += analyse(trials, f", {name}", unfinished)[0]
  return verdicts


if __name__ == "__main__":
  common.main(run, add_flags)
