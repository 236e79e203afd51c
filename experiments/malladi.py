"""Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms": for
Adam, multiplying the batch by kappa calls for the square-root rule, eta -> sqrt(kappa) eta, with
1 - beta1 -> kappa (1 - beta1), 1 - beta2 -> kappa (1 - beta2) and eps -> eps / sqrt(kappa); then
the loss curves against examples seen overlay, and under the linear rule (eta -> kappa eta) they
do not.

    python -m experiments.malladi --workdir=runs/malladi [--scale=smoke|here|paper]

Setup (here): the MLP with Adam on MNIST (the character Transformer is the paper's kind of model but
is too slow on 2 CPU cores for 11 runs), batch sizes B0 .. 16 B0, the same number of examples for
every batch size, the betas and eps scaled by the SDE rule for both LR rules, so that the two arms
differ only in the learning rate's exponent (1/2 or 1).

Overlay metric: D(B) = mean over the evaluation points (fixed example counts) of
|L_B(e) - L_B0(e)| / L_B0(e), L the training loss on a fixed 5,000-example train subset (eval
mode), L_B0 the curve of B0 seed 0. Each larger batch runs with a seed of its own (the same for
both rules), so it differs from that curve in seed as well as in batch size; the noise floor
D_seed is therefore the mean D of the other B0 seeds against B0 seed 0, which differ from it in
seed alone. Tolerance tol = max(3 D_seed, TOL_FLOOR).

Claim 1 (sqrt overlays): CONFIRMED when every D_sqrt(B) <= tol, else NOT CONFIRMED; tested only
where tol is below the largest D_linear(B) (the effect the run must be able to see: otherwise the
floor exceeds the effect). Claim 2 (linear does not overlay), at the largest batch: CONFIRMED when
D_linear exceeds D_sqrt by more than D_seed, NOT CONFIRMED when D_sqrt exceeds D_linear by more
than D_seed, else INCONCLUSIVE. Both need MIN_BASE_SEEDS seeds at B0 and MIN_POINTS evaluation
points per curve.
"""
import math

import ml_collections
import numpy as np

from configs import mnist
from experiments import common

TOL_FLOOR = 0.05        # curves within 5% of each other on average count as overlaid
BASE_B1, BASE_B2, BASE_EPS = 0.99, 0.999, 1e-8   # at B0: 1 - beta stays < 1 up to kappa = 16
METRIC = "train_eval/loss"
MIN_BASE_SEEDS = 3      # B0 seed 0, the reference, and >= 2 seeds against it for the noise floor
MIN_POINTS = 5          # evaluation points per curve: a mean deviation over fewer says little

SCALES = {
    "smoke": dict(dataset="mnist_tiny", validation_size=100, widths=(16,), base_batch=8,
                  kappas=(1, 4), base_seeds=(0, 1), examples=256, eval_examples=64, chunk=2,
                  base_lr=1e-3, devices=1),
    "here": dict(dataset="mnist", validation_size=1000, widths=(128, 128), base_batch=32,
                 kappas=(1, 2, 4, 8, 16), base_seeds=(0, 1, 2), examples=102400,
                 eval_examples=10240, chunk=20, base_lr=1e-3, devices=0),
    "paper": dict(dataset="mnist", validation_size=5000, widths=(512, 512), base_batch=32,
                  kappas=(1, 2, 4, 8, 16), base_seeds=(0, 1, 2), examples=550000,
                  eval_examples=10240, chunk=20, base_lr=1e-3, devices=0),
}


def sde_adam(kappa: int) -> tuple[float, float, float]:
  """(beta1, beta2, eps) at kappa x the base batch (Malladi et al.'s square-root scaling rule)."""
  return 1 - kappa * (1 - BASE_B1), 1 - kappa * (1 - BASE_B2), BASE_EPS / math.sqrt(kappa)


def runs(s: dict) -> list[tuple[int, str, int]]:
  """(kappa, LR rule, seed) of every run: B0 once per base seed (both rules are the same there),
  then every larger batch under each rule with a seed of its own, after the base seeds."""
  first = max(s["base_seeds"]) + 1
  return [(1, "sqrt", seed) for seed in s["base_seeds"]] + [
      (k, rule, first + i) for i, k in enumerate(s["kappas"][1:]) for rule in ("sqrt", "linear")]


def get_config(scale: str) -> ml_collections.ConfigDict:
  s = SCALES[scale]
  c = mnist.get_config()
  c.dataset.name, c.dataset.validation_size = s["dataset"], s["validation_size"]
  c.model.name, c.model.widths, c.model.batch_norm = "mlp", s["widths"], False
  c.optimizer.name = "adam"
  c.base_lr, c.reference_batch_size = s["base_lr"], s["base_batch"]
  c.warmup.length, c.decay.name = 0.0, "constant"
  c.budget.length, c.budget.unit = float(s["examples"]), "examples"
  c.eval_every.length, c.eval_every.unit = float(s["eval_examples"]), "examples"
  c.target.value = 0.0               # never reached: every run sees the same examples
  c.train_eval_size = 5000 if s["dataset"] == "mnist" else 256
  c.log_every_steps = s["chunk"]
  c.grad_groups = 1
  c.num_devices = s["devices"]       # 0 = all; smoke: 1 (compiling for 8 test devices costs more)
  c.chunk_steps, c.chunk_unroll = s["chunk"], False
  c.checkpoint.every_steps = 1_000_000
  every = runs(s)
  adam = [sde_adam(k) for k, _, _ in every]
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=tuple(k * s["base_batch"] for k, _, _ in every),
      lr_rule=tuple(rule for _, rule, _ in every),
      seed=tuple(seed for _, _, seed in every),
      optimizer=dict(b1=tuple(a[0] for a in adam), b2=tuple(a[1] for a in adam),
                     eps=tuple(a[2] for a in adam)),
  ))
  return c


def curve(trial) -> dict[int, float]:
  """examples seen -> METRIC at each evaluation."""
  return {int(r["step"]) * trial.batch_size: r[METRIC] for r in trial.records if METRIC in r}


def deviation(curve_b: dict, curve_0: dict) -> float:
  """Mean relative deviation of curve_b from curve_0 over their shared example counts."""
  shared = sorted(set(curve_b) & set(curve_0))
  if not shared:
    return float("nan")
  return float(np.mean([abs(curve_b[e] - curve_0[e]) / curve_0[e] for e in shared]))


def verdicts(base_devs: list[float], devs: dict[str, dict[int, float]], points: int,
             b0: int) -> list[common.Verdict]:
  """The two claims from the base seeds' deviations from B0 seed 0 (the noise floor), each larger
  batch's deviation per rule ({rule: {B: D}}) and the evaluation points of the reference curve."""
  d_seed = float(np.mean(base_devs)) if base_devs else math.nan
  tol = max(3 * d_seed, TOL_FLOOR)
  sqrt_max = max(devs["sqrt"].values(), default=math.nan)
  linear_max = max(devs["linear"].values(), default=math.nan)
  largest = max(set(devs["sqrt"]) & set(devs["linear"]), default=None)
  gap = devs["linear"][largest] - devs["sqrt"][largest] if largest else math.nan
  fmt = lambda d: ", ".join(f"B={b}: {v:.3f}" for b, v in sorted(d.items()))
  why = (f"D_seed(B0={b0}) = {d_seed:.3f} (mean of {len(base_devs)}), tol = max(3 D_seed,"
         f" {TOL_FLOOR}) = {tol:.3f}; D_sqrt {fmt(devs['sqrt'])}; D_linear {fmt(devs['linear'])}")
  shared = [common.at_least(f"seeds at B0={b0}", len(base_devs) + 1, MIN_BASE_SEEDS),
            common.at_least("evaluation points per curve", points, MIN_POINTS)]
  power = common.Condition("tol", tol, f"< the largest D_linear ({linear_max:.3g})",
                           tol < linear_max)
  metric_rule = f"D(B) = mean_e |L_B(e) - L_B0(e)| / L_B0(e) of {METRIC} at equal examples e"
  holds = True if gap > d_seed else False if -gap > d_seed else None   # nan: neither
  return [
      common.decide(f"Adam, batch {b0}..{max(devs['sqrt'], default=b0)}: loss curves against"
                    " examples overlay under the sqrt rule (betas, eps scaled by the SDE rule)",
                    None if math.isnan(sqrt_max) else sqrt_max <= tol, why,
                    f"{metric_rule}; CONFIRMED when every D_sqrt(B) <= tol, else NOT CONFIRMED",
                    shared + [power]),
      common.decide("they do not overlay under the linear rule (D_linear beyond D_sqrt at the"
                    " largest batch)", holds, why + f"; at B={largest}: D_linear - D_sqrt ="
                    f" {gap:.3f}", f"{metric_rule}; at the largest batch, D_linear - D_sqrt >"
                    " D_seed: CONFIRMED; < -D_seed: NOT CONFIRMED; else INCONCLUSIVE", shared),
  ]


def run(args) -> list[common.Verdict]:
  s = SCALES[args.scale]
  trials = common.run_sweep(get_config(args.scale), args.workdir)
  b0 = s["base_batch"]
  base = {t.seed: curve(t) for t in trials if t.batch_size == b0 and t.status == "done"}
  reference = base.pop(0, {})
  base_devs = [deviation(c, reference) for c in base.values()] if reference else []
  devs = {"sqrt": {}, "linear": {}}
  for t in sorted(trials, key=lambda t: t.batch_size):
    if t.batch_size == b0 or not reference:
      continue
    # A diverged or unfinished run does not overlay: its curve stops (or explodes) early.
    devs[t.lr_rule][t.batch_size] = (deviation(curve(t), reference) if t.status == "done"
                                     else float("inf"))
  for rule, d in devs.items():
    print(f"{rule}: D(B) = " + ", ".join(f"{b}: {v:.3f}" for b, v in d.items()))
  return verdicts(base_devs, devs, len(reference), b0)


if __name__ == "__main__":
  common.main(run)
