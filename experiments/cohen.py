"""Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability": full-batch gradient descent at step size eta drives the top Hessian eigenvalue (the
sharpness) up to 2/eta, where it stops rising and hovers; with heavy-ball momentum beta the
threshold is (2 + 2 beta)/eta.

    python -m experiments.cohen --workdir=runs/cohen [--scale=smoke|here|paper]

Setup: a fixed 5,000-example MNIST training subset (dataset.train_size), batch = the whole subset
(every step is an exact gradient step), constant step size, three step sizes of plain GD and two
of heavy-ball momentum; the top eigenvalue of the training loss's Hessian on the same 5,000
examples is measured every few steps by warm-started Lanczos (curvature.scheduled =
'top_eigenvalue').

What a run can test (its domain, threshold T = 2/eta or (2 + 2 beta)/eta): the claim is that
training *drives* the sharpness up to T (progressive sharpening), so the first measurement must be
at most FROM_BELOW x T (a run that starts above T and comes down tests a catapult instead); the
sharpness must reach REACH x T within the budget, with at least MIN_AFTER measurements after it.
A claim is tested when at least MIN_TESTABLE of its runs are in that domain.

Verdict rule over the testable runs: "hovers" = the median of sharpness / T from the first
measurement at or above REACH x T on lies in HOVER. CONFIRMED when every testable run hovers; NOT
CONFIRMED when one does not (or diverged).
"""

import ml_collections
import numpy as np

from configs import mnist
from experiments import common
from scaling.analysis import results

FROM_BELOW = 0.5        # the first measurement at most half the threshold: approached from below
REACH = 0.9             # the sharpness has reached the threshold at 0.9 T
HOVER = (0.8, 1.2)      # the median of sharpness / T after reaching it
MIN_AFTER = 5           # measurements after reaching, for a median to mean anything
MIN_TESTABLE = {"sgd": 2, "momentum": 1}   # runs in the domain for a verdict, per claim
# Heavy-ball beta. Not Cohen et al.'s 0.9: its 10x effective step drives this small net's sharpness
# past (2 + 2 beta)/eta before the first measurement, or (at a small eta) never up to it (pilots,
# README "Cohen"); 0.5 still puts the threshold 1.5x above GD's 2/eta at the same eta.
MOMENTUM = 0.5

SCALES = {
    "smoke": dict(dataset="mnist_tiny", validation_size=100, train_size=128, widths=(16,),
                  gd_lrs=(0.5,), momentum_lrs=(0.1,), steps=12, every=4, lanczos=3, devices=1),
    # A small ReLU MLP (Cohen et al.'s fully connected nets have 2 hidden layers of 200, tanh or
    # ELU) so that five runs of 300 exact-gradient steps fit on 2 CPU cores. Pilots (README
    # "Cohen"): without a threshold in the way the sharpness peaks at ~17 (GD eta 0.1, step 75)
    # and then slowly falls, and it is ~2 + 1.4 eta t after t early steps: GD step sizes whose
    # 2/eta (10 .. 16) lies below that peak and, at the first measurement (step 5), >= 2x above
    # the sharpness; momentum 0.5 (an effective step 1/(1 - beta) = 2x eta) at eta 0.25 and 0.2,
    # T = 12 and 15, on the same two counts.
    "here": dict(dataset="mnist", validation_size=1000, train_size=5000, widths=(64, 64),
                 gd_lrs=(0.2, 0.15, 0.125), momentum_lrs=(0.25, 0.2), steps=300, every=5, lanczos=8,
                 devices=0),
    "paper": dict(dataset="mnist", validation_size=1000, train_size=5000, widths=(200, 200),
                  gd_lrs=(2 / 30, 2 / 50, 2 / 70), momentum_lrs=(3 / 50,), steps=20000, every=10,
                  lanczos=20, devices=0),
}


def get_config(scale: str) -> ml_collections.ConfigDict:
  s = SCALES[scale]
  c = mnist.get_config()
  c.dataset.name = s["dataset"]
  c.dataset.validation_size, c.dataset.train_size = s["validation_size"], s["train_size"]
  c.model.name, c.model.widths, c.model.batch_norm = "mlp", s["widths"], False
  c.batch_size = s["train_size"]     # full batch: each step is an exact gradient step
  c.lr_rule, c.warmup.length, c.decay.name = "none", 0.0, "constant"
  c.budget.length, c.budget.unit = float(s["steps"]), "steps"
  c.target.value = 0.0               # never reached: no stop, no extra measurement
  c.eval_every.length, c.eval_every.unit = float(s["every"]), "steps"
  c.train_eval_size = 0
  c.log_every_steps = s["every"]
  c.grad_groups = 1
  c.num_devices = s["devices"]       # 0 = all; smoke: 1 (compiling for 8 test devices costs more)
  c.chunk_steps, c.chunk_unroll = s["every"], False
  c.checkpoint.every_steps = 1_000_000
  c.curvature.update(enabled=True, every_steps=s["every"], subset_size=s["train_size"],
                     scheduled="top_eigenvalue", lanczos_steps=s["lanczos"], top_k=1,
                     density=False, max_probes=10, probe_chunk=10, min_probes=10)
  lrs = (*s["gd_lrs"], *s["momentum_lrs"])
  c.sweep_zip = ml_collections.ConfigDict(dict(
      base_lr=lrs,
      optimizer=dict(name=("sgd",) * len(s["gd_lrs"]) + ("momentum",) * len(s["momentum_lrs"])),
  ))
  c.optimizer.momentum = MOMENTUM
  return c


def threshold(trial) -> float:
  momentum = MOMENTUM if trial.optimizer == "momentum" else 0.0
  return (2 + 2 * momentum) / trial.lr


def judge(trial) -> tuple[bool | None, list[common.Condition], str]:
  """One run: (hovers at T: True / False (or diverged) / None without a measurement after
  reaching it, the conditions under which the run tests the claim, the numbers)."""
  series = [(r["step"], r["curvature/top_eigenvalue"]) for r in trial.records
            if "curvature/top_eigenvalue" in r]
  t = threshold(trial)
  name = f"{trial.optimizer} eta={trial.lr:g}"
  finished = common.Condition(f"{name}: status", trial.status, " or ".join(results.FINISHED),
                              trial.status in results.FINISHED)
  if not series:
    return None, [finished, common.at_least(f"{name}: measurements", 0, 1)], f"{name}: none"
  steps, ratio = np.array([s for s, _ in series]), np.array([v for _, v in series]) / t
  crossed = np.flatnonzero(ratio >= REACH)
  after = ratio[crossed[0]:] if crossed.size else ratio[:0]
  conditions = [finished,
                common.at_most(f"{name}: first sharpness / T", float(ratio[0]), FROM_BELOW),
                common.at_least(f"{name}: max sharpness / T", float(ratio.max()), REACH),
                common.at_least(f"{name}: measurements from {REACH} T on", int(after.size),
                                MIN_AFTER)]
  text = (f"{name} (T={t:.3g}, {trial.status}): starts at {ratio[0]:.2f} T (step {steps[0]}),"
          f" max {ratio.max():.2f} T")
  if not after.size:
    return None, conditions, text + f", never reached {REACH} T in {steps[-1]} steps"
  median = float(np.median(after))
  text += (f", reached {REACH} T at step {steps[crossed[0]]}, then median {median:.2f} T"
           f" [{after.min():.2f}, {after.max():.2f}] over {after.size}")
  return trial.status == "done" and HOVER[0] <= median <= HOVER[1], conditions, text


def verdict(claim: str, judged: list[tuple], min_testable: int) -> common.Verdict:
  """The claim over its runs' judgements (`judge`): tested where at least min_testable runs meet
  all their conditions; decided by those runs alone (the others are listed with what they
  missed)."""
  testable = [holds for holds, conditions, _ in judged if all(c.met for c in conditions)]
  texts = [text + ("" if all(c.met for c in conditions) else " -- not testable: " + "; ".join(
      c.text() for c in conditions if not c.met)) for _, conditions, text in judged]
  holds = False if False in testable else True if testable else None
  domain = [common.at_least(f"runs with the first measurement <= {FROM_BELOW} T that reach"
                            f" {REACH} T with >= {MIN_AFTER} measurements from there",
                            len(testable), min_testable)]
  rule = (f"over the testable runs: CONFIRMED when the median of sharpness/T from the first"
          f" measurement >= {REACH} T on lies in [{HOVER[0]}, {HOVER[1]}] for every run; NOT"
          " CONFIRMED when it lies outside for one (or one diverged)")
  return common.decide(claim, holds, "; ".join(texts), rule, domain)


def run(args) -> list[common.Verdict]:
  trials = sorted(common.run_sweep(get_config(args.scale), args.workdir),
                  key=lambda t: (t.optimizer, -t.lr))
  for t in trials:
    series = [f"{r['step']}:{r['curvature/top_eigenvalue'] * t.lr:.2f}" for r in t.records
              if "curvature/top_eigenvalue" in r]
    print(f"{t.optimizer} eta={t.lr:g}: step:sharpness*eta " + " ".join(series))
  return [
      verdict("GD: the sharpness rises to 2/eta and hovers there",
              [judge(t) for t in trials if t.optimizer == "sgd"], MIN_TESTABLE["sgd"]),
      verdict(f"heavy-ball momentum {MOMENTUM}: the sharpness rises to (2 + 2 beta)/eta and"
              " hovers there", [judge(t) for t in trials if t.optimizer == "momentum"],
              MIN_TESTABLE["momentum"]),
  ]


if __name__ == "__main__":
  common.main(run)
