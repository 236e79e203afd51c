"""Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp
minima": F1 (784 - 5 x [Dense 512, BN, ReLU] - 10) on MNIST, Adam, a small batch of 256 against a
large batch of 10% of the training set.

    python -m experiments.keskar --workdir=runs/keskar [--scale=smoke|here|paper]

Claims checked (README "Keskar"): the large batch (LB) generalizes worse (Table 2: test accuracy
98.03% SB vs 97.81% LB) and ends at a far sharper minimum (Table 3: epsilon-sharpness, L-BFGS-B
with 10 iterations in the full space, 1.23 vs 205.14 at eps 1e-3, 0.61 vs 42.90 at 5e-4); also the
Hessian's trace and top eigenvalue, and the distance from the initialization (SB travels farther).

Protocol: both batch sizes train with Adam at the same learning rate until the training error on a
fixed 5,000-example train subset falls below TRAIN_TARGET (the paper's Table 2 trains both to
99.7-99.9% training accuracy), with an epoch cap; the curvature is measured on the final weights
(eval-mode BN, the first `curvature.subset_size` training examples), the L-BFGS-B sharpness from
the final checkpoint, here, after the sweep.
"""
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from configs import mnist
from experiments import common
from scaling import measure_checkpoint, sweep
from scaling.measurement import measure
from scaling.training import metrics

SMALL_BATCH = 256
TRAIN_TARGET = 0.005          # train_eval/error below 0.5%: "trained to near 100% accuracy"
SHARPNESS_EPS = (1e-3, 5e-4)  # Keskar et al. Table 3
MIN_SEEDS = 2                 # finished seeds per batch size for a verdict
PAPER = {"test_acc": (98.03, 97.81), 1e-3: (1.23, 205.14), 5e-4: (0.61, 42.90)}

# Per scale: data, widths, small batch, seeds, epoch caps (SB, LB), evaluations every (SB, LB)
# steps, steps per dispatch (SB, LB), curvature subset, Lanczos steps, L-BFGS-B iterations.
SCALES = {
    "smoke": dict(dataset="mnist_tiny", validation_size=100, widths=(16,), small_batch=16,
                  seeds=(0,), epochs=(1.0, 2.0), eval_every=(8, 5), chunk=(8, 5), subset=64,
                  lanczos=3, lbfgsb_iter=1, max_probes=2, devices=1),
    # Width 128 instead of 512 (a 5.5x cheaper step) so that 3 seeds x 2 batch sizes fit.
    "here": dict(dataset="mnist", validation_size=5000, widths=(128,) * 5,
                 small_batch=SMALL_BATCH, seeds=(0, 1, 2), epochs=(10.0, 40.0),
                 eval_every=(200, 10), chunk=(8, 10), subset=4096, lanczos=20, lbfgsb_iter=10,
                 max_probes=50, devices=0),
    "paper": dict(dataset="mnist", validation_size=5000, widths=(512,) * 5,
                  small_batch=SMALL_BATCH, seeds=(0, 1, 2, 3, 4), epochs=(100.0, 100.0),
                  eval_every=(200, 10), chunk=(8, 10), subset=10000, lanczos=30, lbfgsb_iter=10,
                  max_probes=100, devices=0),
}


def num_train(s: dict) -> int:
  return {"mnist": 60000, "mnist_tiny": 512}[s["dataset"]] - s["validation_size"]


def get_config(scale: str) -> ml_collections.ConfigDict:
  s = SCALES[scale]
  # 10% of the training set, rounded down to a multiple of the device count (sharded batches).
  devices = jax.device_count()
  large_batch = num_train(s) // 10 // devices * devices
  c = mnist.get_config()
  c.dataset.name, c.dataset.validation_size = s["dataset"], s["validation_size"]
  c.model.name, c.model.widths, c.model.batch_norm = "mlp", s["widths"], True
  c.optimizer.name = "adam"          # Keskar et al.: Adam for both regimes, default settings
  c.base_lr, c.lr_rule = 1e-3, "none"
  c.warmup.length = 0.0
  c.decay.name = "constant"
  c.budget.unit = "epochs"
  c.target.metric, c.target.value, c.target.stop_at_target = "train_eval/error", TRAIN_TARGET, True
  c.train_eval_size = min(5000, num_train(s))
  c.eval_every.unit = "steps"
  c.grad_groups = 1                  # BN statistics over the whole batch, as on one GPU
  c.num_devices = s["devices"]       # 0 = all; smoke: 1 (compiling for 8 test devices costs more)
  c.chunk_steps, c.chunk_unroll = 1, False
  c.checkpoint.every_steps = 1_000_000   # the final weights only
  c.curvature.update(enabled=True, every_steps=0, subset_size=s["subset"], density=False,
                     lanczos_steps=s["lanczos"], top_k=1, max_probes=s["max_probes"],
                     probe_chunk=min(10, s["max_probes"]), min_probes=min(20, s["max_probes"]),
                     sharpness_eps=SHARPNESS_EPS[0])
  c.sweep = ml_collections.ConfigDict(dict(seed=s["seeds"]))
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=(s["small_batch"], large_batch),
      budget=dict(length=s["epochs"]),
      # About one evaluation per epoch; chunks (steps per dispatch) that divide it: one compile.
      eval_every=dict(length=tuple(float(n) for n in s["eval_every"])),
      chunk_steps=s["chunk"],
  ))
  return c


def lbfgsb_sharpness(trial_dir: str, trial_config, max_iter: int) -> dict:
  """{eps: sharpness} of the trial's final checkpoint, cached in keskar_sharpness.json.
  trial_config: the sweep's config of the trial (today's schema; its config.json may predate a
  field the loader needs)."""
  path = os.path.join(trial_dir, "keskar_sharpness.json")
  if os.path.exists(path):
    with open(path) as f:
      return {float(k): v for k, v in json.load(f).items()}
  config, model, splits, mesh, step, state = measure_checkpoint.restore(
      trial_dir, config=trial_config)
  measurer = measure.Measure(config.curvature, model, splits, mesh, config.seed)
  out = {eps: float(measurer.sharpness_lbfgsb(state, eps, max_iter).sharpness)
         for eps in SHARPNESS_EPS}
  metrics.write_json(path, {str(k): v for k, v in out.items()})
  return out


def init_distance(final: dict) -> float:
  """The distance from the initialization at the end; trials trained before the framework named it
  `param_distance_from_init` logged it as `init_distance` (same quantity), and resume into them."""
  return final.get("param_distance_from_init", final.get("init_distance"))


def compare(claim: str, small: list[float], large: list[float], *, larger: str, ratio: float,
            unit: str = "", paper: str = "") -> common.Verdict:
  """CONFIRMED when the side named `larger` has mean >= ratio x the other's mean and the seed
  ranges do not overlap; NOT CONFIRMED when its mean is not above the other's; else
  INCONCLUSIVE, and always INCONCLUSIVE with fewer than MIN_SEEDS finished seeds a side (one seed
  has no range)."""
  big, other = (large, small) if larger == "LB" else (small, large)
  m_big, m_other = float(np.mean(big)), float(np.mean(other))
  separated = min(big) > max(other)
  r = m_big / m_other if m_other > 0 else float("inf")
  holds = True if separated and r >= ratio else False if m_big <= m_other else None
  if min(len(small), len(large)) < MIN_SEEDS:
    holds = None
  fmt = lambda xs: ", ".join(f"{x:.4g}" for x in xs)
  evidence = (f"SB mean {np.mean(small):.4g}{unit} [{fmt(small)}], LB mean {np.mean(large):.4g}"
              f"{unit} [{fmt(large)}], {larger}/other = {r:.3g}{paper}")
  rule = (f"{larger} mean >= {ratio:g} x the other's with non-overlapping seed ranges; NOT"
          f" CONFIRMED if {larger}'s mean is not above the other's; >= {MIN_SEEDS} seeds a side")
  return common.decide(claim, holds, evidence, rule)


def run(args) -> list[common.Verdict]:
  s = SCALES[args.scale]
  config = get_config(args.scale)
  trials = common.run_sweep(config, args.workdir)
  trial_configs = {os.path.normpath(t.directory): t.config
                   for t in sweep.expand(config, args.workdir)}
  by_batch = {}
  for t in sorted(trials, key=lambda t: (t.batch_size, t.seed)):
    if t.status != "done":
      print(f"trial {t.trial_id}: {t.status}; left out", file=sys.stderr)
      continue
    row = {"test_acc": 100 * (1 - t.final["test/error"]),
           "train_acc": 100 * (1 - t.final["train_eval/error"]),
           "trace": t.final["curvature/hessian_trace"],
           "top_eig": t.final["curvature/top_eigenvalue"],
           "init_distance": init_distance(t.final),
           "epochs": t.last_step * t.batch_size / num_train(s),
           **lbfgsb_sharpness(t.path, trial_configs[os.path.normpath(t.path)],
                              s["lbfgsb_iter"])}
    by_batch.setdefault(t.batch_size, []).append(row)
  if len(by_batch) != 2:
    return [common.decide("LB generalizes worse and is sharper", None,
                          f"finished batch sizes: {sorted(by_batch)}", "needs both SB and LB")]
  (sb_size, sb), (lb_size, lb) = sorted(by_batch.items())
  col = lambda rows, key: [r[key] for r in rows]
  print(f"SB = {sb_size}, LB = {lb_size}; per seed (test acc %, train acc %, epochs, trace, top"
        " eigenvalue, init distance, sharpness 1e-3, 5e-4):")
  for name, rows in (("SB", sb), ("LB", lb)):
    for r in rows:
      print(f"  {name}: {r['test_acc']:.2f} {r['train_acc']:.2f} {r['epochs']:.1f} "
            f"{r['trace']:.4g} {r['top_eig']:.4g} {r['init_distance']:.4g} {r[1e-3]:.4g} "
            f"{r[5e-4]:.4g}")
  verdicts = [
      compare("LB generalizes worse (higher test accuracy for SB)", col(sb, "test_acc"),
              col(lb, "test_acc"), larger="SB", ratio=1.0, unit="%",
              paper="; paper 98.03% vs 97.81%"),
  ]
  for eps in SHARPNESS_EPS:
    p_sb, p_lb = PAPER[eps]
    verdicts.append(compare(
        f"LB is far sharper: epsilon-sharpness (L-BFGS-B, eps {eps:g})", col(sb, eps),
        col(lb, eps), larger="LB", ratio=3.0,
        paper=f"; paper {p_sb} vs {p_lb} (x{p_lb / p_sb:.0f})"))
  verdicts += [
      compare("LB is sharper: top Hessian eigenvalue", col(sb, "top_eig"), col(lb, "top_eig"),
              larger="LB", ratio=3.0),
      compare("LB is sharper: Hessian trace", col(sb, "trace"), col(lb, "trace"), larger="LB",
              ratio=3.0),
      compare("SB travels farther from the initialization", col(sb, "init_distance"),
              col(lb, "init_distance"), larger="SB", ratio=1.0),
  ]
  return verdicts


if __name__ == "__main__":
  common.main(run)
