"""Hoffer et al. 2017, "Train longer, generalize better: closing the generalization gap in large
batch training of neural networks": a large batch (LB) trained like the small one (SB) generalizes
worse; the square-root LR rule, ghost batch norm with the SB's BN batch, and "regime adaptation"
(as many steps as the SB, so B_LB / B_SB times the epochs) close most of the gap. And the weights'
distance from their initialization grows like log(steps) ("ultra-slow diffusion").

    python -m experiments.hoffer --workdir=runs/hoffer [--scale=smoke|here|paper]

Arms, each with every seed of the scale (their spread is the uncertainty):
  sb           batch SB, lr = base_lr, BN over the SB's microbatch
  lb           batch LB, same lr, same epochs, BN over LB's microbatch (the naive large batch)
  lb_sqrt_gbn  batch LB, lr = base_lr x sqrt(LB / SB), ghost BN of the SB's BN batch, same epochs
  lb_hoffer    all three: sqrt rule, ghost BN and the SB's number of steps (regime adaptation)
The step decay is given in fractions of the run, so regime adaptation stretches it with the run,
as the paper's. Paper (Table 1, ResNet-44 on CIFAR-10, SB 128 vs LB 4096): 7.81 % SB, 10.54 % LB,
8.26 % with LB + sqrt LR + GBN + RA (84 % of the gap closed). Figure 2: ||w_t - w_0|| grows like
log t.

A naive LB with few steps may simply underfit, and a validation error raised by underfitting is no
generalization gap. So the arms are compared at equal training error: every trial's validation
error is read where its training error (on a fixed subset of the training set) first reaches the
level E = the largest final training error of any trial, which every trial reaches; linear between
the two evaluations that bracket it.

Ghost BN on the BN MLP: its BN statistics are per gradient group (grad_groups groups of
B / grad_groups examples, scaling/training/step.py), so ghost batches of g examples are
grad_groups = B / g.
"""
import math

import ml_collections
import numpy as np

from configs import mnist
from experiments import common

PAPER = "ResNet-44 / CIFAR-10 (Table 1): SB 7.81 %, LB 10.54 %, LB + sqrt + GBN + RA 8.26 %"
EVALS_PER_RUN = 16   # evaluations in every trial (and one at step 0): they locate the level E

# Pre-registered domain and rules (experiments/README.md, "Hoffer").
SEEDS_PER_ARM = 3       # finished seeds in every arm: the intervals rest on their spread
MIN_TRAIN_EVAL = 1000   # training examples whose error is the training error
MAX_BRACKET = 0.10      # the level E resolved: training error falls <= 10 points between the
                        # evaluations that bracket it, in every trial (not from the step-0 one)
MOST = 0.5              # "most of the gap": the recipe closes at least half (the paper 84 %)
FIT_R2 = 0.95           # a log(t) fit "holds" when it explains at least 95 % of the variance
MIN_DECADES = 1.5       # the fitted constant-LR phase spans at least 1.5 decades of steps

SCALES = {
    # Seconds, testing nothing: one seed per arm, a 64-image training error, under a decade of
    # steps in the constant-LR phase.
    "smoke": dict(dataset="mnist_tiny", validation_size=100, train_size=0, train_eval=64,
                  widths=(32,), sb=16, lb=64, seeds=(0,), epochs=1.0),
    # A BN MLP (784-256-256-10) on 8192 Fashion-MNIST training images, the training error on the
    # first 2000 of them; SB 128 (BN over 64: two gradient groups), LB 1024 (8x; the paper's 32x
    # would need 32x the SB's examples for the regime-adapted run), 4 SB epochs = 256 steps (the
    # constant-LR half: 128 steps, 2.1 decades); the regime-adapted LB trains 32 epochs.
    "here": dict(dataset="fashion_mnist", validation_size=2000, train_size=8192, train_eval=2000,
                 widths=(256, 256), sb=128, lb=1024, seeds=(0, 1, 2), epochs=4.0),
    # Paper-sized: all 55k images, SB 128 vs LB 4096 (32x), 50 SB epochs.
    "paper": dict(dataset="fashion_mnist", validation_size=5000, train_size=0, train_eval=5000,
                  widths=(512,) * 5, sb=128, lb=4096, seeds=(0, 1, 2), epochs=50.0),
}
ARMS = ("sb", "lb", "lb_sqrt_gbn", "lb_hoffer")


def get_config(scale: str) -> ml_collections.ConfigDict:
  """One sweep: the four arms, each with every seed, zipped."""
  s = SCALES[scale]
  sb, lb, seeds = s["sb"], s["lb"], tuple(s["seeds"])
  c = mnist.get_config()
  c.dataset.name, c.dataset.validation_size = s["dataset"], s["validation_size"]
  c.dataset.train_size = s["train_size"]
  c.model.name, c.model.widths, c.model.batch_norm = "mlp", s["widths"], True
  c.optimizer.name, c.optimizer.momentum, c.optimizer.weight_decay = "momentum", 0.9, 5e-4
  c.base_lr, c.reference_batch_size, c.lr_power = 0.1, sb, 0.5
  c.warmup.length = 0.0
  c.decay.name, c.decay.boundaries, c.decay.factor = "step", (0.5, 0.75), 0.1
  c.budget.unit = "epochs"
  c.eval_every.unit = "epochs"
  c.eval_at_start = True   # brackets the level E from above in every trial
  c.target.value = 0.5     # not used: the verdicts read the evaluations
  c.train_eval_size = s["train_eval"]
  c.num_devices = 1        # the BN batch is B / grad_groups: one device keeps it that
  c.chunk_steps, c.chunk_unroll = 1, False
  c.checkpoint.every_steps = 0
  c.log_every_steps = 1    # the distance from init at every step
  ghost = 2 * lb // sb     # gradient groups giving the SB's BN batch (SB / 2)
  arms = (  # batch, LR rule (power 0.5: the sqrt rule), gradient groups, epochs (RA: SB's steps)
      (sb, "none", 2, s["epochs"]), (lb, "none", 2, s["epochs"]),
      (lb, "power", ghost, s["epochs"]), (lb, "power", ghost, s["epochs"] * lb / sb))
  column = lambda i: tuple(arm[i] for arm in arms for _ in seeds)
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=column(0), seed=seeds * len(arms), lr_rule=column(1), grad_groups=column(2),
      budget=dict(length=column(3)),
      eval_every=dict(length=tuple(e / EVALS_PER_RUN for e in column(3)))))
  return c


def arm_of(trial, s: dict) -> str:
  if trial.batch_size == s["sb"]:
    return "sb"
  if trial.lr_rule == "none":
    return "lb"
  return "lb_hoffer" if trial.config["budget"]["length"] > s["epochs"] else "lb_sqrt_gbn"


def evaluations(trial) -> tuple[np.ndarray, np.ndarray]:
  """(training error, validation error) at each evaluation that has both, in step order."""
  rows = [(r["step"], r["train_eval/error"], r["valid/error"]) for r in trial.records
          if "train_eval/error" in r and "valid/error" in r]
  rows = sorted(rows) or [(0, np.nan, np.nan)]
  return np.array([r[1] for r in rows], float), np.array([r[2] for r in rows], float)


def at_training_error(train, valid, level: float) -> tuple[float, float]:
  """(validation error, resolution) where the training error first reaches `level`: linear in
  the training error between the evaluation before and the first at or below it; resolution is
  the training error's drop between the two (inf where no evaluation lies above the level, nan
  where none reaches it)."""
  below = np.flatnonzero(np.asarray(train) <= level)
  if not len(below):
    return math.nan, math.nan
  i = below[0]
  if i == 0:
    return float(valid[0]), math.inf
  drop = float(train[i - 1] - train[i])
  w = (train[i - 1] - level) / drop
  return float(valid[i - 1] + w * (valid[i] - valid[i - 1])), drop


def mean_se(values) -> tuple[float, float]:
  """Mean and standard error over seeds (SE nan with fewer than 2)."""
  v = np.asarray(values, float)
  if not len(v):
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def gap_closed(sb, lb, full) -> dict:
  """From per-seed validation errors at equal training error: the naive LB's gap to the SB and
  its SE, the residual gap of the full recipe and its SE, and the fraction of the naive gap that
  the recipe closes with its interval (the residual's mean +- 2 SE; nan where the naive gap is
  not positive: nothing to close)."""
  (m_sb, se_sb), (m_lb, se_lb), (m_full, se_full) = mean_se(sb), mean_se(lb), mean_se(full)
  naive, residual = m_lb - m_sb, m_full - m_sb
  out = dict(naive=naive, naive_se=math.hypot(se_lb, se_sb), residual=residual,
             residual_se=math.hypot(se_full, se_sb))
  ok = naive > 0
  closed = lambda r: 1 - r / naive if ok else math.nan
  out.update(closed=closed(residual), lo=closed(residual + 2 * out["residual_se"]),
             hi=closed(residual - 2 * out["residual_se"]))
  return out


def closing_verdicts(gap: dict, seeds: int, train_eval: int, bracket: float,
                     evidence: str) -> list[common.Verdict]:
  """Direction (the recipe narrows the naive gap) and magnitude (it closes at least MOST of it),
  each ruled on the seed interval of the fraction closed, in the domain below."""
  domain = [
      common.at_least("finished seeds in the smallest arm", seeds, SEEDS_PER_ARM),
      common.at_least("training examples evaluated for the training error", train_eval,
                      MIN_TRAIN_EVAL),
      common.at_most("largest training-error drop across the evaluations bracketing E", bracket,
                     MAX_BRACKET),
      common.Condition("naive LB gap to SB at equal training error", gap["naive"],
                       f"> 2 SE = {2 * gap['naive_se']:.4g}", gap["naive"] > 2 * gap["naive_se"]),
  ]
  lo, hi = gap["lo"], gap["hi"]
  where = ", read at equal training error E, over the seeds"
  return [
      common.decide(
          "sqrt LR scaling, ghost BN and regime adaptation narrow the large-batch generalization"
          " gap", True if lo > 0 else False if hi <= 0 else None, evidence,
          "CONFIRMED if the fraction of the naive gap closed (1 - residual / naive gap, residual"
          " mean +- 2 SE) is > 0 at its lower end, NOT CONFIRMED if <= 0 at its upper end" + where,
          domain),
      common.decide(
          f"they close most (>= {MOST:.0%}) of it (paper: 84 %)",
          True if lo >= MOST else False if hi < MOST else None, evidence,
          f"CONFIRMED if the fraction closed is >= {MOST:.0%} at its lower end, NOT CONFIRMED if"
          f" < {MOST:.0%} at its upper end" + where, domain)]


def log_fit(steps, distances):
  """Least squares d = a + b x (x = log t, then sqrt t): {name: (slope, R^2)}."""
  steps, distances = np.asarray(steps, float), np.asarray(distances, float)
  out = {}
  for name, x in (("log", np.log(steps)), ("sqrt", np.sqrt(steps))):
    slope, intercept = np.polyfit(x, distances, 1)
    resid = distances - (intercept + slope * x)
    out[name] = (float(slope), float(1 - resid.var() / distances.var()))
  return out


def diffusion_verdict(r2: dict, decades: float) -> common.Verdict:
  """r2: {run: [(log fit R^2, sqrt fit R^2) per seed]}. CONFIRMED when in every run the log fit's
  mean R^2 is >= FIT_R2 at its lower end (mean - 2 SE) and above the sqrt fit's mean; NOT
  CONFIRMED when in some run it is < FIT_R2 at its upper end or not above the sqrt fit's."""
  holds, parts = True, []
  for run, fits in r2.items():
    (m, se), (m_sqrt, _) = mean_se([f[0] for f in fits]), mean_se([f[1] for f in fits])
    parts.append(f"{run}: log R^2 {m:.3f} +- {2 * se:.3f} (2 SE, {len(fits)} seeds),"
                 f" sqrt t R^2 {m_sqrt:.3f}")
    if m + 2 * se < FIT_R2 or m <= m_sqrt:
      holds = False
    elif holds and not (m - 2 * se >= FIT_R2):
      holds = None
  seeds = min((len(f) for f in r2.values()), default=0)
  return common.decide(
      "the weights' distance from initialization grows like log(steps)", holds,
      "; ".join(parts) + f"; fitted over {decades:.2f} decades of steps",
      f"per seed, d = a + b log t and d = a + b sqrt t (random walk) over the constant-LR phase;"
      f" CONFIRMED if, in both runs, the log fit's mean R^2 - 2 SE >= {FIT_R2} and its mean beats"
      f" the sqrt fit's; NOT CONFIRMED if in one its mean R^2 + 2 SE < {FIT_R2} or it does not",
      [common.at_least("seeds fitted in the smaller run", seeds, SEEDS_PER_ARM),
       common.at_least("decades of steps fitted (the shorter run)", decades, MIN_DECADES)])


def run(args) -> list[common.Verdict]:
  s = SCALES[args.scale]
  trials = common.run_sweep(get_config(args.scale), args.workdir)
  done = {arm: [t for t in trials if arm_of(t, s) == arm and t.status == "done"] for arm in ARMS}
  evals = {arm: [evaluations(t) for t in done[arm]] for arm in ARMS}
  final = {arm: np.array([(train[-1], valid[-1]) for train, valid in evals[arm]]).reshape(-1, 2)
           for arm in ARMS}   # (training, validation) error at the end, one row per seed
  finals = np.concatenate([final[arm][:, 0] for arm in ARMS])
  level = float(finals.max()) if len(finals) and not np.isnan(finals).any() else math.nan
  matched = {arm: [at_training_error(train, valid, level) for train, valid in evals[arm]]
             for arm in ARMS}
  at_level = {arm: [m[0] for m in matched[arm]] for arm in ARMS}
  # An unreached level (nan) counts as unresolved.
  bracket = max((math.inf if math.isnan(m[1]) else m[1] for arm in ARMS for m in matched[arm]),
                default=math.inf)

  def pm(values):
    m, se = mean_se(values)
    return f"{m:.4f} +- {2 * se:.4f}"
  print(f"{'arm':>12} {'batch':>6} {'lr':>7} {'steps':>6} {'seeds':>5} {'train err':>9}"
        f" {'valid err':>9} {'gap valid-train':>17} {'valid err at E':>17}")
  for arm in ARMS:
    if done[arm]:
      t, (train, valid) = done[arm][0], final[arm].T
      print(f"{arm:>12} {t.batch_size:>6} {t.lr:>7.4g} {t.last_step:>6} {len(done[arm]):>5}"
            f" {train.mean():>9.4f} {valid.mean():>9.4f} {pm(valid - train):>17}"
            f" {pm(at_level[arm]):>17}")
  gap = gap_closed(at_level["sb"], at_level["lb"], at_level["lb_hoffer"])
  partial = gap_closed(at_level["sb"], at_level["lb"], at_level["lb_sqrt_gbn"])["closed"]
  final_text = "; ".join(f"{arm} train {final[arm][:, 0].mean():.4f} valid"
                         f" {final[arm][:, 1].mean():.4f}" for arm in ARMS if done[arm])
  evidence = (
      f"at equal training error E = {level:.4f} (the largest final one), validation error (mean"
      f" +- 2 SE): SB B={s['sb']} {pm(at_level['sb'])}, naive LB B={s['lb']} {pm(at_level['lb'])},"
      f" + sqrt + GBN {pm(at_level['lb_sqrt_gbn'])}, + regime adaptation"
      f" {pm(at_level['lb_hoffer'])}; naive gap {gap['naive']:+.4f} +- {2 * gap['naive_se']:.4f},"
      f" residual {gap['residual']:+.4f} +- {2 * gap['residual_se']:.4f}: {gap['closed']:.0%}"
      f" closed [{gap['lo']:.0%}, {gap['hi']:.0%}] (sqrt + GBN alone {partial:.0%}); final"
      f" errors (seed means): {final_text}; paper {PAPER} (84 % closed)")
  seeds = min(len(done[arm]) for arm in ARMS)
  verdicts = closing_verdicts(gap, seeds, s["train_eval"], bracket, evidence)

  # Distance from init against steps, over the constant-LR phase (before the first decay), for
  # the SB and the regime-adapted LB, the two arms with many steps: one fit per seed.
  r2, decades = {}, math.inf
  for arm in ("sb", "lb_hoffer"):
    r2[arm] = []
    for t in done[arm]:
      steps, _, dist = t.series("param_distance_from_init")
      keep = (steps >= 1) & (steps <= 0.5 * t.config["derived"]["total_steps"])
      if keep.sum() >= 3:
        fit = log_fit(steps[keep], dist[keep])
        r2[arm].append((fit["log"][1], fit["sqrt"][1]))
        decades = min(decades, math.log10(steps[keep].max() / steps[keep].min()))
  verdicts.append(diffusion_verdict(r2, decades if decades < math.inf else 0.0))
  return verdicts


if __name__ == "__main__":
  common.main(run)
