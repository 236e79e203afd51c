"""McCandlish et al. 2018, "An empirical model of large-batch training" (the gradient noise scale).

    python -m experiments.mccandlish --workdir=runs/mccandlish [--scale=...] \\
        [--shallue_workdir=runs/shallue]

It reads experiments/shallue.py's sweeps in --shallue_workdir (default <workdir>/shallue),
running or resuming its momentum part where absent (finished trials are skipped), and uses every
part found there (plain SGD too, after `shallue --part=sgd`). B_crit is fitted from the best steps
per batch size (scaling/analysis/study.py). B_simple = tr(Sigma)/|G|^2 is measured at frozen
parameters (scaling/measurement/frozen_noise.py: McCandlish's App. A.1 two-batch-size unbiased
estimators over many independent draws, with standard errors), not read from the training EMA,
which averages the gradients of the ~1/(1 - ema_decay) steps before and so lags: where the target
comes within that window the EMA averages higher-loss gradients, and a lagging trace of a constant
B_simple already "grows as the loss falls". Claims, per optimizer group:
1. B_crit is of the order of B_simple at the target loss (`crit_vs_simple`): B_simple at the
   target checkpoint of each batch size's best trial (the Shallue trials stop at the target and
   checkpoint there);
2. B_simple grows as the loss falls during training (`grows_as_loss_falls`): B_simple along a
   ladder of checkpoints of one long small-batch trial (<workdir>/ladder/<data set>: the
   smallest batch size's momentum config, trained past the target);
3. the measured points lie on (S/S_min - 1)(E/E_min - 1) = 1 (`hyperbola`).
Measurements are cached as noise_<step>.json in the trial's directory (scaling.measure_checkpoint's
file) and reused where present.
"""
import copy
import math
import os

from absl import flags
import numpy as np
from scipy import stats

from experiments import common, shallue
from scaling import measure_checkpoint
from scaling.analysis import results
from scaling.config import ConfigError

ORDER_OF = 10.0          # "of the order of": B_crit / B_simple within [1/10, 10]
EMA_WINDOWS = 3          # the EMA trace (evidence only) is read after this many EMA windows
FIT_GOOD, FIT_BAD = 1.25, 1.5   # rms factor between measured and fitted steps
# Pre-registered domains (experiments/README.md states them too).
MIN_BRACKETED = 5        # batch sizes reached with a bracketed LR optimum: the B_crit fit's points
MAX_REL_SE = 0.2         # frozen B_simple's relative standard error, at every batch size measured
MIN_LADDER = 4           # ladder checkpoints measured
MIN_LOSS_SPAN = 2.0      # highest / lowest training loss over the ladder
# Frozen B_simple per scale: (examples per draw, draws), each draw cut into 2 groups. A property
# of the parameters, not of the trial's batch size; B = 1024 keeps |G|^2 resolved where B_simple
# is ~100-500 (a draw of the ladder's B = 16 would be all noise). ~8 CPU-s a checkpoint at `here`
# (most of it compilation), relative SE ~1% on an untrained MLP.
NOISE = {"smoke": (64, 4), "here": (1024, 200), "paper": (1024, 400)}
# The ladder per scale: (steps between checkpoints, checkpoints, train_eval_size: the fixed train
# subset whose loss, evaluated at each checkpoint, places it on the loss axis).
LADDER = {"smoke": (8, 3, 256), "here": (400, 8, 5000), "paper": (1000, 8, 5000)}
BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED = 1000, 0


# ---- frozen-parameter measurements (JAX) ----

def frozen_b_simple(trial_dir, step, scale):
  """(B_simple, its standard error) at the parameters of the trial's checkpoint at `step`: from
  noise_<step>.json where it was measured with NOISE[scale] (examples per draw, draws), else
  measured so and written there (a file of another protocol, e.g. `measure_checkpoint
  --noise_draws` at the trial's own batch size, is replaced). None where that checkpoint was not
  saved."""
  found = results.read_json(os.path.join(trial_dir, f"noise_{step}.json"))
  examples, draws = NOISE[scale]
  if not (isinstance(found, dict) and found.get("step") == step
          and found.get("noise/frozen_b_big") == examples
          and found.get("noise/frozen_num_draws") == draws):
    try:
      config, model, splits, _, step, state = measure_checkpoint.restore(trial_dir, str(step))
    except ConfigError:
      return None
    config.batch_size = examples
    found = measure_checkpoint.measure_noise(trial_dir, config, model, splits, step, state, draws,
                                             groups=2)
  return found["noise/frozen_b_simple"], found["noise/frozen_b_simple_stderr"]


def frozen_at_target(rows, trials, scale):
  """{batch size: (B_simple, SE)} at the target checkpoint of each reached batch size's best
  trial (a trial that stops at its target checkpoints at that step)."""
  by_id = {t.trial_id: t for t in trials}
  found = {}
  for r in rows:
    t = by_id.get(r["best_trial"])
    if r["outcome"] == "reached" and t is not None:
      value = frozen_b_simple(t.path, t.steps_to_target, scale)
      if value is not None:
        found[r["batch_size"]] = value
  return found


def ladder_config(sweep_config, scale):
  """The sweep's smallest batch size at its LR centre, seed 0, trained past the target for
  LADDER[scale] checkpoints, each with an evaluation of the training loss on a fixed subset."""
  every, count, train_eval_size = LADDER[scale]
  c = copy.deepcopy(sweep_config)
  c.batch_size, c.base_lr = c.sweep_zip.batch_size[0], c.sweep_zip.base_lr[0]
  c.sweep, c.sweep_zip = type(c.sweep)(), type(c.sweep_zip)()
  c.seed, c.lr_multiplier = 0, 1.0
  c.target.stop_at_target = False
  c.budget.length, c.budget.unit = float(every * count), "steps"
  c.eval_every.length, c.eval_every.unit = float(every), "steps"
  c.checkpoint.every_steps, c.checkpoint.keep = every, count
  c.train_eval_size = train_eval_size
  return c


def ladder_points(trial, scale):
  """[(step, training loss on the fixed subset, B_simple, SE)] at the ladder's checkpoints."""
  points = []
  for r in trial.records:
    if isinstance(r.get("train_eval/loss"), float) and r.get("step"):
      value = frozen_b_simple(trial.path, r["step"], scale)
      if value is not None:
        points.append((r["step"], r["train_eval/loss"], *value))
  return points


# ---- the decision rules: pure functions of numbers ----

def ema_steps(trial):
  decay = trial.config.get("noise_scale", {}).get("ema_decay", 0.99)
  return 1.0 / (1.0 - decay)


def b_simple_at_target(trials):
  """The training EMA's B_simple at the target (evidence only: the lagging trace) of the trials
  that reached it after >= EMA_WINDOWS EMA windows: their median, n."""
  values = [t.at_target.get("noise/b_simple") for t in trials
            if t.reached and t.steps_to_target >= EMA_WINDOWS * ema_steps(t)]
  values = [v for v in values if isinstance(v, float) and math.isfinite(v) and v > 0]
  return (float(np.median(values)) if values else math.nan), len(values)


def median_interval(values):
  """(median, lo, hi): the median and its 95% bootstrap interval over the values (resampled)."""
  values = np.asarray(values, float)
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  medians = np.median(values[rng.integers(0, len(values), (BOOTSTRAP_REPLICATES, len(values)))],
                      axis=1)
  lo, hi = np.percentile(medians, (2.5, 97.5))
  return float(np.median(values)), float(lo), float(hi)


def crit_vs_simple(fit, rows, frozen, ema=(math.nan, 0), label=""):
  """fit, rows: the group's fit_table and best_per_batch rows; frozen: {B: (B_simple, SE)} at
  the best trials' target checkpoints; ema: (median, n) of the training EMA (evidence only)."""
  claim = f"B_crit is of the order of B_simple at the target{label}"
  rule = (f"B_crit / B_simple within [1/{ORDER_OF:g}, {ORDER_OF:g}] over the whole interval "
          "[B_crit_lo / B_simple_hi, B_crit_hi / B_simple_lo]: CONFIRMED; entirely outside: NOT "
          "CONFIRMED; else INCONCLUSIVE. B_simple: median over batch sizes of B_simple at frozen "
          "parameters at each best trial's target checkpoint, 95% bootstrap over batch sizes; "
          "B_crit: shallue.b_crit_interval")
  rel = max((se / b if b > 0 else math.inf for b, se in frozen.values()), default=math.inf)
  domain = [common.at_least("batch sizes reached with a bracketed LR optimum",
                            len(shallue.bracketed(rows)), MIN_BRACKETED),
            common.at_least("batch sizes measured at frozen parameters", len(frozen),
                            MIN_BRACKETED),
            common.at_most("largest relative SE of frozen B_simple", rel, MAX_REL_SE)]
  lo, hi, interval = shallue.b_crit_interval(fit)
  b_crit = fit.get("b_crit", math.nan)
  ema_text = f"EMA trace (lagging, not the verdict's) {ema[0]:.0f} over {ema[1]} trials"
  if not frozen:
    return common.decide(claim, None, f"B_crit {b_crit:.0f} [{lo:.0f}, {hi:.0f}]; {ema_text}",
                         rule, domain)
  simple, s_lo, s_hi = median_interval([b for b, _ in frozen.values()])
  f_lo, f_hi = lo / s_hi, hi / s_lo
  evidence = (f"B_crit {b_crit:.0f} [{lo:.0f}, {hi:.0f}] ({interval}), B_simple {simple:.0f} "
              f"[{s_lo:.0f}, {s_hi:.0f}] over {len(frozen)} batch sizes: factor "
              f"{b_crit / simple:.2f} [{f_lo:.2f}, {f_hi:.2f}]; frozen B_simple per B "
              + " ".join(f"{b}:{v:.0f}+-{se:.0f}" for b, (v, se) in sorted(frozen.items()))
              + f"; {ema_text}")
  if any(math.isnan(x) for x in (f_lo, f_hi)):
    return common.decide(claim, None, evidence, rule, domain)
  inside = f_lo >= 1 / ORDER_OF and f_hi <= ORDER_OF
  outside = f_hi < 1 / ORDER_OF or f_lo > ORDER_OF
  return common.decide(claim, True if inside else False if outside else None, evidence, rule,
                       domain)


def grows_as_loss_falls(ladder, label=""):
  """ladder: [(step, training loss, B_simple, SE)] at frozen parameters along one trial."""
  claim = f"B_simple grows as the loss falls during training{label}"
  rule = ("frozen B_simple along a ladder of checkpoints: CONFIRMED if B_simple at the lowest-loss"
          " checkpoint exceeds that at the highest-loss one by > 2 combined SE and Spearman"
          " rho(loss, B_simple) over the ladder < 0; NOT CONFIRMED if it is below it by > 2"
          " combined SE; else INCONCLUSIVE")
  losses = [loss for _, loss, _, _ in ladder]
  span = max(losses) / min(losses) if ladder and min(losses) > 0 else 0.0
  domain = [common.at_least("frozen-parameter ladder checkpoints", len(ladder), MIN_LADDER),
            common.at_least("ladder loss span (highest / lowest)", span, MIN_LOSS_SPAN)]
  if len(ladder) < 2:
    return common.decide(claim, None, "no frozen-parameter ladder", rule, domain)
  high = max(ladder, key=lambda p: p[1])
  low = min(ladder, key=lambda p: p[1])
  diff, se = low[2] - high[2], math.hypot(low[3], high[3])
  rho = float(stats.spearmanr(losses, [p[2] for p in ladder]).statistic)
  evidence = (f"B_simple {high[2]:.0f}+-{high[3]:.0f} at loss {high[1]:.3g} (step {high[0]}) -> "
              f"{low[2]:.0f}+-{low[3]:.0f} at loss {low[1]:.3g} (step {low[0]}): difference "
              f"{diff / se if se > 0 else math.inf:.1f} SE; Spearman rho(loss, B_simple) "
              f"{rho:.2f} over {len(ladder)} checkpoints; step:loss:B_simple "
              + " ".join(f"{s}:{loss:.3g}:{b:.0f}" for s, loss, b, _ in ladder))
  holds = True if diff > 2 * se and rho < 0 else False if diff < -2 * se else None
  return common.decide(claim, holds, evidence, rule, domain)


def hyperbola(rows, fit, label=""):
  """The fitted S_min, E_min; every reached best point's (S/S_min - 1)(E/E_min - 1) and its
  distance from the hyperbola along S (the same as S against S_min (1 + B_crit / B))."""
  claim = f"the measured points fit (S/S_min - 1)(E/E_min - 1) = 1{label}"
  rule = (f"rms of log(S / S_fitted) over the batch sizes reached: <= log {FIT_GOOD:g} CONFIRMED, "
          f"> log {FIT_BAD:g} NOT CONFIRMED, else INCONCLUSIVE; the product's median is shown "
          "where both factors are >= 1/4 (B_crit/4 <= B <= 4 B_crit)")
  pts = [r for r in rows if r["outcome"] == "reached"]
  domain = [common.at_least("batch sizes reached with a bracketed LR optimum",
                            len(shallue.bracketed(rows)), MIN_BRACKETED)]
  s_min, e_min = fit.get("s_min", math.nan), fit.get("e_min", math.nan)
  if len(pts) < 3 or not (s_min > 0 and e_min > 0):
    return common.decide(claim, None, f"{len(pts)} points, S_min={s_min:.3g}, E_min={e_min:.3g}",
                         rule, domain)
  b = np.array([r["batch_size"] for r in pts], float)
  s = np.array([r["steps_to_target"] for r in pts], float)
  product = (s / s_min - 1) * (b * s / e_min - 1)
  log_resid = np.log(s / (s_min + e_min / b))
  rms = float(np.sqrt(np.mean(log_resid**2)))
  b_crit = e_min / s_min
  mid = product[(b >= b_crit / 4) & (b <= 4 * b_crit)]
  mid_median = np.median(mid) if len(mid) else math.nan
  evidence = (f"rms factor {math.exp(rms):.2f} (worst {math.exp(np.abs(log_resid).max()):.2f}) "
              f"over {len(pts)} batch sizes; product median {mid_median:.2f}"
              f" over {len(mid)} mid-range points; products "
              + " ".join(f"{int(x)}:{p:.2f}" for x, p in zip(b, product)))
  holds = True if rms <= math.log(FIT_GOOD) else False if rms > math.log(FIT_BAD) else None
  return common.decide(claim, holds, evidence, rule, domain)


def add_flags(flag_values):
  flags.DEFINE_string("shallue_workdir", "", "the Shallue experiment's workdir to read (and"
                      " complete if needed); '' = <workdir>/shallue", flag_values=flag_values)


def run(args):
  sweep_dir = args.shallue_workdir or os.path.join(args.workdir, "shallue")
  configs = shallue.sweeps(args.scale, ("momentum",))
  verdicts = []
  found = shallue.run_sweeps(args.scale, sweep_dir, ("momentum",))
  for name, (trials, unfinished) in found.items():
    ladder_dir = os.path.join(args.workdir, "ladder", name)
    ladder_trial, = common.run_sweep(ladder_config(configs[(name, "momentum")], args.scale),
                                     ladder_dir)
    _, rows, fits = shallue.analyse(trials)
    for optimizer in sorted(rows):
      group = [t for t in trials if t.optimizer == optimizer]
      label = f" ({optimizer}, {name})"
      # The ladder is momentum's smallest batch size: plain SGD has none (not tested).
      ladder = ladder_points(ladder_trial, args.scale) if optimizer == "momentum" else []
      verdicts += [shallue.guard(v, unfinished, (optimizer,)) for v in (
          crit_vs_simple(fits[optimizer], rows[optimizer],
                         frozen_at_target(rows[optimizer], group, args.scale),
                         b_simple_at_target(group), label),
          grows_as_loss_falls(ladder, label),
          hyperbola(rows[optimizer], fits[optimizer], label))]
  return verdicts


if __name__ == "__main__":
  common.main(run, add_flags)
