"""Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms": for
Adam, multiplying the batch by kappa calls for the square-root rule, eta -> sqrt(kappa) eta, with
1 - beta1 -> kappa (1 - beta1), 1 - beta2 -> kappa (1 - beta2) and eps -> eps / sqrt(kappa); then
the loss curves against examples seen overlay, and under the linear rule (eta -> kappa eta) they
do not.

    python -m experiments.malladi --workdir=runs/malladi [--scale=smoke|here|paper]

Setup (here): the MLP with Adam on MNIST (the character Transformer is the paper's kind of model but
is too slow on 2 CPU cores for 10 runs), batch sizes B0 .. 16 B0, the same number of examples for
every batch size, the betas and eps scaled by the SDE rule for both LR rules, so that the two arms
differ only in the learning rate's exponent (1/2 or 1).

Overlay metric: D(B) = mean over the evaluation points (fixed example counts) of
|L_B(e) - L_B0(e)| / L_B0(e), L the training loss on a fixed 5,000-example train subset (eval
mode). Noise floor: D_seed = the same metric between two seeds at B0. Tolerance
tol = max(3 D_seed, TOL_FLOOR). Claim 1 (sqrt overlays): every B has D_sqrt(B) <= tol. Claim 2
(linear does not): some B has D_linear(B) > tol.
"""
import math

import ml_collections
import numpy as np

from configs import mnist
from experiments import common

TOL_FLOOR = 0.05        # curves within 5% of each other on average count as overlaid
BASE_B1, BASE_B2, BASE_EPS = 0.99, 0.999, 1e-8   # at B0: 1 - beta stays < 1 up to kappa = 16
METRIC = "train_eval/loss"

SCALES = {
    "smoke": dict(dataset="mnist_tiny", validation_size=100, widths=(16,), base_batch=8,
                  kappas=(1, 4), examples=256, eval_examples=64, chunk=2, base_lr=1e-3, devices=1),
    "here": dict(dataset="mnist", validation_size=1000, widths=(128, 128), base_batch=32,
                 kappas=(1, 2, 4, 8, 16), examples=102400, eval_examples=10240, chunk=20,
                 base_lr=1e-3, devices=0),
    "paper": dict(dataset="mnist", validation_size=5000, widths=(512, 512), base_batch=32,
                  kappas=(1, 2, 4, 8, 16), examples=550000, eval_examples=10240, chunk=20,
                  base_lr=1e-3, devices=0),
}


def sde_adam(kappa: int) -> tuple[float, float, float]:
  """(beta1, beta2, eps) at kappa x the base batch (Malladi et al.'s square-root scaling rule)."""
  return 1 - kappa * (1 - BASE_B1), 1 - kappa * (1 - BASE_B2), BASE_EPS / math.sqrt(kappa)


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
  # Runs: B0 with seeds 0 and 1 (the noise floor; both rules are the same there), then every
  # larger batch under each rule, seed 0.
  runs = [(1, "sqrt", 0), (1, "sqrt", 1)] + [(k, rule, 0) for k in s["kappas"][1:]
                                             for rule in ("sqrt", "linear")]
  adam = [sde_adam(k) for k, _, _ in runs]
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=tuple(k * s["base_batch"] for k, _, _ in runs),
      lr_rule=tuple(rule for _, rule, _ in runs),
      seed=tuple(seed for _, _, seed in runs),
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


def run(args) -> list[common.Verdict]:
  s = SCALES[args.scale]
  trials = common.run_sweep(get_config(args.scale), args.workdir)
  b0 = s["base_batch"]
  base = {t.seed: curve(t) for t in trials if t.batch_size == b0}
  if len(base) < 2:
    return [common.decide("loss curves overlay under the sqrt rule", None,
                          f"base-batch runs finished: {sorted(base)}", "needs two seeds at B0")]
  d_seed = deviation(base[1], base[0])
  tol = max(3 * d_seed, TOL_FLOOR)
  devs = {"sqrt": {}, "linear": {}}
  for t in sorted(trials, key=lambda t: t.batch_size):
    if t.batch_size == b0:
      continue
    # A diverged or unfinished run does not overlay: its curve stops (or explodes) early.
    devs[t.lr_rule][t.batch_size] = (deviation(curve(t), base[0]) if t.status == "done"
                                     else float("inf"))
  for rule, d in devs.items():
    print(f"{rule}: D(B) = " + ", ".join(f"{b}: {v:.3f}" for b, v in d.items()))
  fmt = lambda d: ", ".join(f"B={b}: {v:.3f}" for b, v in d.items())
  why = (f"D_seed(B0={b0}) = {d_seed:.3f}, tol = max(3 D_seed, {TOL_FLOOR}) = {tol:.3f}; "
         f"D_sqrt {fmt(devs['sqrt'])}; D_linear {fmt(devs['linear'])}")
  sqrt_max, linear_max = max(devs["sqrt"].values()), max(devs["linear"].values())
  metric_rule = (f"D(B) = mean_e |L_B(e) - L_B0(e)| / L_B0(e) of {METRIC} at equal examples e")
  return [
      common.decide(f"Adam, batch {b0}..{b0 * s['kappas'][-1]}: loss curves against examples "
                    "overlay under the sqrt rule (betas, eps scaled by the SDE rule)",
                    sqrt_max <= tol, why, f"{metric_rule}; every D_sqrt(B) <= tol"),
      common.decide("they do not overlay under the linear rule", linear_max > tol, why,
                    f"{metric_rule}; some D_linear(B) > tol"),
  ]


if __name__ == "__main__":
  common.main(run)
