"""McCandlish et al. 2018, "An empirical model of large-batch training" (the gradient noise scale).

    python -m experiments.mccandlish --workdir=runs/mccandlish [--scale=...] \\
        [--shallue_workdir=runs/shallue]

No second sweep: it reads experiments/shallue.py's sweeps in --shallue_workdir (default
<workdir>/shallue), running or resuming its momentum part where absent (finished trials are
skipped), and uses every part found there (plain SGD too, after `shallue --part=sgd`). Every trial there
measures B_simple = tr(Sigma)/|G|^2 during training (G = 2 gradient groups per step, an EMA over
~1/(1 - ema_decay) steps, scaling/measurement/noise_scale.py); B_crit is fitted from the best steps per batch
size (scaling/analysis/study.py). Claims, per optimizer group:
1. B_crit is of the order of B_simple at the target loss (`crit_vs_simple`);
2. B_simple grows as the loss falls during training (`grows_as_loss_falls`);
3. the measured points lie on (S/S_min - 1)(E/E_min - 1) = 1 (`hyperbola`).
"""
import math
import os

from absl import flags
import numpy as np
from scipy import stats

from experiments import common, shallue

ORDER_OF = 10.0          # "of the order of": B_crit / B_simple within [1/10, 10]
EMA_WINDOWS = 3          # B_simple is read only after this many EMA windows of steps
MIN_RECORDS = 6          # records (after the first EMA window) for a rank correlation
FIT_GOOD, FIT_BAD = 1.25, 1.5   # rms factor between measured and fitted steps


def ema_steps(trial):
  decay = trial.config.get("noise_scale", {}).get("ema_decay", 0.99)
  return 1.0 / (1.0 - decay)


def b_simple_at_target(trials):
  """B_simple at the target of the trials that reached it after >= EMA_WINDOWS EMA windows (in a
  shorter run the EMA still averages the early, larger gradients: biased low): their median, n."""
  values = [t.at_target.get("noise/b_simple") for t in trials
            if t.reached and t.steps_to_target >= EMA_WINDOWS * ema_steps(t)]
  values = [v for v in values if isinstance(v, float) and math.isfinite(v) and v > 0]
  return (float(np.median(values)) if values else math.nan), len(values)


def crit_vs_simple(fit, trials, label=""):
  claim = f"B_crit is of the order of B_simple at the target{label}"
  rule = (f"B_crit / B_simple within [1/{ORDER_OF:g}, {ORDER_OF:g}] over B_crit's 95% interval: "
          "CONFIRMED; entirely outside: NOT CONFIRMED; else INCONCLUSIVE. B_simple: median at the "
          f"target over trials reaching it after >= {EMA_WINDOWS} EMA windows")
  b_simple, n = b_simple_at_target(trials)
  b_crit, lo, hi = (fit.get(k, math.nan) for k in ("b_crit", "b_crit_lo", "b_crit_hi"))
  evidence = (f"B_crit {b_crit:.0f} [{lo:.0f}, {hi:.0f}], B_simple {b_simple:.0f} ({n} trials): "
              f"factor {b_crit / b_simple:.2f} [{lo / b_simple:.2f}, {hi / b_simple:.2f}]")
  if not n or any(math.isnan(x) for x in (b_crit, lo, hi)):
    return common.decide(claim, None, evidence, rule)
  inside = lo / b_simple >= 1 / ORDER_OF and hi / b_simple <= ORDER_OF
  outside = hi / b_simple < 1 / ORDER_OF or lo / b_simple > ORDER_OF
  return common.decide(claim, True if inside else False if outside else None, evidence, rule)


def rank_correlation(trial):
  """Spearman rho between B_simple and the training loss over a trial's log records after its
  first EMA window; None with fewer than MIN_RECORDS."""
  pairs = [(r["train/loss"], r["noise/b_simple"]) for r in trial.records
           if r.get("step", 0) >= ema_steps(trial)
           and all(isinstance(r.get(k), float) and math.isfinite(r[k])
                   for k in ("train/loss", "noise/b_simple"))]
  if len(pairs) < MIN_RECORDS:
    return None
  loss, b_simple = np.array(pairs).T
  return float(stats.spearmanr(loss, b_simple).statistic)


def grows_as_loss_falls(trials, label=""):
  claim = f"B_simple grows as the loss falls during training{label}"
  rule = (f"Spearman rho(B_simple, train loss) per trial (records after one EMA window, >= "
          f"{MIN_RECORDS}): CONFIRMED if the median rho <= -0.5 and >= 75% of trials have "
          "rho < 0; NOT CONFIRMED if the median rho >= 0; else INCONCLUSIVE (also < 3 trials)")
  rhos = [r for r in (rank_correlation(t) for t in trials if t.status == "done")
          if r is not None and math.isfinite(r)]
  if len(rhos) < 3:
    return common.decide(claim, None, f"{len(rhos)} trials with enough records", rule)
  median, negative = float(np.median(rhos)), float(np.mean(np.array(rhos) < 0))
  evidence = (f"median rho {median:.2f} over {len(rhos)} trials (quartiles "
              f"{np.percentile(rhos, 25):.2f}, {np.percentile(rhos, 75):.2f}); "
              f"{100 * negative:.0f}% negative")
  holds = True if median <= -0.5 and negative >= 0.75 else False if median >= 0 else None
  return common.decide(claim, holds, evidence, rule)


def hyperbola(rows, fit, label=""):
  """The fitted S_min, E_min; every reached best point's (S/S_min - 1)(E/E_min - 1) and its
  distance from the hyperbola along S (the same as S against S_min (1 + B_crit / B))."""
  claim = f"the measured points fit (S/S_min - 1)(E/E_min - 1) = 1{label}"
  rule = (f"rms of log(S / S_fitted) over the batch sizes reached: <= log {FIT_GOOD:g} CONFIRMED, "
          f"> log {FIT_BAD:g} NOT CONFIRMED, else INCONCLUSIVE; the product's median is shown "
          "where both factors are >= 1/4 (B_crit/4 <= B <= 4 B_crit)")
  pts = [r for r in rows if r["outcome"] == "reached"]
  s_min, e_min = fit.get("s_min", math.nan), fit.get("e_min", math.nan)
  if len(pts) < 3 or not (s_min > 0 and e_min > 0):
    return common.decide(claim, None, f"{len(pts)} points, S_min={s_min:.3g}, E_min={e_min:.3g}",
                         rule)
  b = np.array([r["batch_size"] for r in pts], float)
  s = np.array([r["steps_to_target"] for r in pts], float)
  product = (s / s_min - 1) * (b * s / e_min - 1)
  log_resid = np.log(s / (s_min + e_min / b))
  rms = float(np.sqrt(np.mean(log_resid**2)))
  b_crit = e_min / s_min
  mid = product[(b >= b_crit / 4) & (b <= 4 * b_crit)]
  evidence = (f"rms factor {math.exp(rms):.2f} (worst {math.exp(np.abs(log_resid).max()):.2f}) "
              f"over {len(pts)} batch sizes; product median {np.median(mid) if len(mid) else math.nan:.2f}"
              f" over {len(mid)} mid-range points; products "
              + " ".join(f"{int(x)}:{p:.2f}" for x, p in zip(b, product)))
  holds = True if rms <= math.log(FIT_GOOD) else False if rms > math.log(FIT_BAD) else None
  return common.decide(claim, holds, evidence, rule)


def add_flags(flag_values):
  flags.DEFINE_string("shallue_workdir", "", "the Shallue experiment's workdir to read (and"
                      " complete if needed); '' = <workdir>/shallue", flag_values=flag_values)


def run(args):
  sweep_dir = args.shallue_workdir or os.path.join(args.workdir, "shallue")
  verdicts = []
  found = shallue.run_sweeps(args.scale, sweep_dir, ("momentum",))
  for name, (trials, unfinished) in found.items():
    _, rows, fits = shallue.analyse(trials)
    for optimizer in sorted(rows):
      group = [t for t in trials if t.optimizer == optimizer]
      label = f" ({optimizer}, {name})"
      verdicts += [shallue.guard(v, unfinished, (optimizer,)) for v in (
          crit_vs_simple(fits[optimizer], group, label), grows_as_loss_falls(group, label),
          hyperbola(rows[optimizer], fits[optimizer], label))]
  return verdicts


if __name__ == "__main__":
  common.main(run, add_flags)
