"""Keskar et al. 2017, "On large-batch training for deep learning: generalization gap and sharp
minima": F1 (784 - 5 x [Dense 512, BN, ReLU] - 10) on MNIST, Adam, a small batch of 256 against a
large batch of 10% of the training set.

    python -m experiments.keskar --workdir=runs/keskar [--scale=smoke|here|paper]

Claims checked (README "Keskar"): the large batch (LB) generalizes worse (Table 2: test accuracy
98.03% SB vs 97.81% LB) and ends at a far sharper minimum (Table 3: epsilon-sharpness, L-BFGS-B
with 10 iterations in the full space, 1.23 vs 205.14 at eps 1e-3, 0.61 vs 42.90 at 5e-4); also the
Hessian's trace and top eigenvalue, and the distance from the initialization (SB travels farther).
Where the paper gives a size (the accuracy gap, the sharpness ratios), its direction and its size
are separate verdicts.

Protocol: both batch sizes train with Adam at the same learning rate until the training error on a
fixed 5,000-example train subset falls below TRAIN_TARGET (the paper's Table 2 trains both to
99.7-99.9% training accuracy), with an epoch cap; the curvature is measured on the final weights
(eval-mode BN, the first `curvature.subset_size` training examples): the trace, the top eigenvalue
and the sign-gradient epsilon-sharpness (scaling.measurement.curvature.epsilon_sharpness, 10
projected steps, eps 1e-3) during training, the L-BFGS-B sharpness from the final checkpoint,
here, after the sweep.

BatchNorm confound: with BN after each hidden Dense layer, the loss does not change when a hidden
kernel W is scaled by c, while the curvature along it scales by 1/c^2; a run that ends with larger
kernels (SB travels farther from the initialization) looks flatter for that reason alone. Beside
the sharpness we therefore report the top eigenvalue x sum |W|^2 over the BN-preceded kernels,
which that rescaling leaves unchanged.
"""
import json
import math
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
SHARPNESS_EPS = (1e-3, 5e-4)  # Keskar et al. Table 3; the sign-gradient estimate runs at the first
MIN_SEEDS = 3                 # finished seeds per batch size: a seed range needs a few
FRACTION = 0.5                # a size verdict needs half the paper's effect (log scale for ratios)
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


def checkpoint_measures(trial_dir: str, trial_config, max_iter: int) -> dict:
  """{eps: L-BFGS-B sharpness, 'bn_kernel_sq_norm': sum of |W|^2 over the hidden Dense kernels
  (each followed by BN)} of the trial's final checkpoint, cached in keskar_sharpness.json (a cache
  without the norm is measured again). trial_config: the sweep's config of the trial (today's
  schema; its config.json may predate a field the loader needs)."""
  path = os.path.join(trial_dir, "keskar_sharpness.json")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if "bn_kernel_sq_norm" in cached:
      return {k if k == "bn_kernel_sq_norm" else float(k): v for k, v in cached.items()}
  config, model, splits, mesh, step, state = measure_checkpoint.restore(
      trial_dir, config=trial_config)
  measurer = measure.Measure(config.curvature, model, splits, mesh, config.seed)
  out = {eps: float(measurer.sharpness_lbfgsb(state, eps, max_iter).sharpness)
         for eps in SHARPNESS_EPS}
  # flax names the MLP's Dense layers in order: Dense_0 .. Dense_{L-1} hidden, Dense_L the output.
  kernels = [state.params[f"Dense_{i}"]["kernel"] for i in range(len(config.model.widths))]
  out["bn_kernel_sq_norm"] = float(sum(np.sum(np.square(np.asarray(w))) for w in kernels))
  metrics.write_json(path, {str(k): v for k, v in out.items()})
  return out


def init_distance(final: dict) -> float:
  """The distance from the initialization at the end; trials trained before the framework named it
  `param_distance_from_init` logged it as `init_distance` (same quantity), and resume into them."""
  return final.get("param_distance_from_init", final.get("init_distance"))


def domain(sb: list[dict], lb: list[dict]) -> list[common.Condition]:
  """When this run can test any of the claims: enough finished seeds a side for a seed range, and
  every run at a minimum (the claims are about the minima training ends at)."""
  short = sum(r["train_error"] > TRAIN_TARGET for r in sb + lb)
  return [common.at_least("finished SB seeds", len(sb), MIN_SEEDS),
          common.at_least("finished LB seeds", len(lb), MIN_SEEDS),
          common.at_most(f"finished runs with train_eval/error > {TRAIN_TARGET:g}", short, 0)]


def _values(xs: list[float]) -> str:
  return ", ".join(f"{x:.4g}" for x in xs)


def direction(claim: str, small: list[float], large: list[float], *, larger: str,
              conditions: list[common.Condition], unit: str = "",
              paper: str = "") -> common.Verdict:
  """CONFIRMED when every seed of the side named `larger` is above every seed of the other (the
  seed ranges do not overlap); NOT CONFIRMED when its mean is not above the other's; else (ranges
  overlap, means the paper's way) INCONCLUSIVE."""
  big, other = (large, small) if larger == "LB" else (small, large)
  smaller = "SB" if larger == "LB" else "LB"
  if big and other:
    holds = (True if min(big) > max(other) else
             False if np.mean(big) <= np.mean(other) else None)
    evidence = (f"SB mean {np.mean(small):.4g}{unit} [{_values(small)}], LB mean"
                f" {np.mean(large):.4g}{unit} [{_values(large)}]{paper}")
  else:
    holds, evidence = None, f"finished seeds: SB {len(small)}, LB {len(large)}"
  rule = (f"CONFIRMED when every {larger} seed is above every {smaller} seed; NOT CONFIRMED when"
          f" {larger}'s mean is not above {smaller}'s; else INCONCLUSIVE")
  return common.decide(claim, holds, evidence, rule, conditions)


def size(claim: str, small: list[float], large: list[float], *, larger: str, paper: float,
         ratio: bool, conditions: list[common.Condition], unit: str = "") -> common.Verdict:
  """The effect's interval over the seeds against FRACTION x the paper's (common.magnitude): for
  a ratio (ratio=True; paper = the paper's ratio) min(big)/max(other) .. max(big)/min(other) on
  a log scale; for a difference (paper = the paper's difference) min(big) - max(other) ..
  max(big) - min(other)."""
  big, other = (large, small) if larger == "LB" else (small, large)
  smaller = "SB" if larger == "LB" else "LB"
  name = f"{larger}/{smaller}" if ratio else f"{larger} - {smaller}"
  if not (big and other):
    return common.decide(claim, None, f"finished seeds: SB {len(small)}, LB {len(large)}",
                         f"{name} over the seeds vs {FRACTION:g} x the paper's", conditions)
  if ratio:
    div = lambda a, b: a / b if b > 0 else math.inf
    log = lambda x: math.log(x) if x > 0 else -math.inf
    lo, hi = div(min(big), max(other)), div(max(big), min(other))
    holds = common.magnitude((log(lo), log(hi)), math.log(paper), FRACTION)
    bar = paper ** FRACTION
    evidence = (f"{name} over the seeds x{lo:.3g} .. x{hi:.3g}, bar x{bar:.3g}"
                f" ({FRACTION:g} of the paper's x{paper:.3g} on a log scale)")
  else:
    lo, hi = min(big) - max(other), max(big) - min(other)
    holds = common.magnitude((lo, hi), paper, FRACTION)
    evidence = (f"{name} over the seeds {lo:.3g}{unit} .. {hi:.3g}{unit}, bar"
                f" {FRACTION * paper:.3g}{unit} ({FRACTION:g} x the paper's {paper:.3g}{unit})")
  rule = (f"{name} interval over the seeds (min .. max) at or above {FRACTION:g} x the paper's"
          f"{' log ratio' if ratio else ''}: CONFIRMED; entirely below: NOT CONFIRMED;"
          " straddling: INCONCLUSIVE")
  return common.decide(claim, holds, evidence, rule, conditions)


def verdicts(sb: list[dict], lb: list[dict]) -> list[common.Verdict]:
  """Every claim's verdict from the finished runs' rows (one dict a seed, see `row`)."""
  conditions = domain(sb, lb)
  col = lambda rows, key: [r[key] for r in rows]
  pair = lambda key: (col(sb, key), col(lb, key))
  p_sb, p_lb = PAPER["test_acc"]
  out = [
      direction("LB generalizes worse (higher test accuracy for SB)", *pair("test_acc"),
                larger="SB", conditions=conditions, unit="%", paper=f"; paper {p_sb}% vs {p_lb}%"),
      size("LB generalizes worse by about the paper's margin (SB - LB test accuracy)",
           *pair("test_acc"), larger="SB", paper=p_sb - p_lb, ratio=False, conditions=conditions,
           unit=" points"),
  ]
  for eps, key, estimator in ((SHARPNESS_EPS[0], "sign_sharpness", "sign-gradient ascent"),
                              *((eps, eps, "L-BFGS-B") for eps in SHARPNESS_EPS)):
    p_sb, p_lb = PAPER[eps]
    out += [
        direction(f"LB is sharper: epsilon-sharpness ({estimator}, eps {eps:g})", *pair(key),
                  larger="LB", conditions=conditions, paper=f"; paper {p_sb} vs {p_lb}"),
        size(f"LB is far sharper, by about the paper's ratio: epsilon-sharpness ({estimator},"
             f" eps {eps:g})", *pair(key), larger="LB", paper=p_lb / p_sb, ratio=True,
             conditions=conditions),
    ]
  out += [
      direction("LB is sharper with BN's rescaling taken out: top Hessian eigenvalue x sum |W|^2"
                " over the BN-preceded kernels", *pair("invariant"), larger="LB",
                conditions=conditions),
      direction("LB is sharper: top Hessian eigenvalue", *pair("top_eig"), larger="LB",
                conditions=conditions),
      direction("LB is sharper: Hessian trace", *pair("trace"), larger="LB",
                conditions=conditions),
      direction("SB travels farther from the initialization", *pair("init_distance"),
                larger="SB", conditions=conditions),
  ]
  return out


def row(t, s: dict, trial_config) -> dict:
  """One finished trial's numbers: its final record's and its checkpoint's."""
  at_checkpoint = checkpoint_measures(t.path, trial_config, s["lbfgsb_iter"])
  return {"test_acc": 100 * (1 - t.final["test/error"]),
          "train_error": t.final["train_eval/error"],
          "trace": t.final["curvature/hessian_trace"],
          "top_eig": t.final["curvature/top_eigenvalue"],
          "sign_sharpness": t.final["curvature/sharpness"],
          "init_distance": init_distance(t.final),
          "epochs": t.last_step * t.batch_size / num_train(s),
          "kernel_sq_norm": at_checkpoint["bn_kernel_sq_norm"],
          "invariant": t.final["curvature/top_eigenvalue"] * at_checkpoint["bn_kernel_sq_norm"],
          **{eps: at_checkpoint[eps] for eps in SHARPNESS_EPS}}


def run(args) -> list[common.Verdict]:
  s = SCALES[args.scale]
  config = get_config(args.scale)
  trials = common.run_sweep(config, args.workdir)
  trial_configs = {os.path.normpath(t.directory): t.config
                   for t in sweep.expand(config, args.workdir)}
  sb_size, lb_size = config.sweep_zip.batch_size
  rows = {sb_size: [], lb_size: []}
  for t in sorted(trials, key=lambda t: (t.batch_size, t.seed)):
    if t.status != "done":
      print(f"trial {t.trial_id}: {t.status}; left out", file=sys.stderr)
      continue
    rows[t.batch_size].append(row(t, s, trial_configs[os.path.normpath(t.path)]))
  print(f"SB = {sb_size}, LB = {lb_size}; per seed (test acc %, train error %, epochs, trace, top"
        " eigenvalue, sum |W|^2 of the BN-preceded kernels, top eigenvalue x that, init distance,"
        " sign-gradient sharpness 1e-3, L-BFGS-B sharpness 1e-3, 5e-4):")
  for name, size_rows in (("SB", rows[sb_size]), ("LB", rows[lb_size])):
    for r in size_rows:
      print(f"  {name}: " + " ".join(f"{x:.4g}" for x in (
          r["test_acc"], 100 * r["train_error"], r["epochs"], r["trace"], r["top_eig"],
          r["kernel_sq_norm"], r["invariant"], r["init_distance"], r["sign_sharpness"],
          r[1e-3], r[5e-4])))
  return verdicts(rows[sb_size], rows[lb_size])


if __name__ == "__main__":
  common.main(run)
