"""Cohen et al. 2021, "Gradient descent on neural networks typically occurs at the edge of
stability": full-batch gradient descent at step size eta drives the top Hessian eigenvalue (the
sharpness) up to 2/eta, where it stops rising and hovers; with heavy-ball momentum beta the
threshold is (2 + 2 beta)/eta.

    python -m experiments.cohen --workdir=runs/cohen [--scale=smoke|here|paper]

Setup: a fixed 5,000-example MNIST training subset (dataset.train_size), batch = the whole subset
(every step is an exact gradient step), constant step size, three step sizes of plain GD and one
of heavy-ball momentum; the top eigenvalue of the training loss's Hessian on the same 5,000
examples is measured every few steps by warm-started Lanczos (curvature.scheduled =
'top_eigenvalue').

Verdict rule, per run (threshold T = 2/eta, or (2 + 2 beta)/eta): "reaches" = the sharpness
crosses 0.9 T; "hovers" = afterwards (at least MIN_AFTER measurements) the median of
sharpness / T lies in HOVER. The claim holds when every run reaches and hovers; NOT CONFIRMED when
a run that reached T does not hover (or a run diverged); INCONCLUSIVE when a run never reached
0.9 T within its budget (progressive sharpening too slow for the budget, not evidence against).
"""

import ml_collections
import numpy as np

from configs import mnist
from experiments import common

REACH = 0.9             # the sharpness has reached the threshold at 0.9 T
HOVER = (0.8, 1.2)      # the median of sharpness / T after reaching it
MIN_AFTER = 5           # measurements after reaching, for a median to mean anything

SCALES = {
    "smoke": dict(dataset="mnist_tiny", validation_size=100, train_size=128, widths=(16,),
                  gd_lrs=(0.5,), momentum_lr=0.1, steps=12, every=4, lanczos=3, devices=1),
    # A small ReLU MLP (Cohen et al.'s fully connected nets have 2 hidden layers of 200, tanh or
    # ELU) so that four runs of 300 exact-gradient steps fit on 2 CPU cores. The sharpness is
    # ~5 after 15 steps (pilot): step sizes whose 2/eta is 1.3x to 4x that.
    "here": dict(dataset="mnist", validation_size=1000, train_size=5000, widths=(64, 64),
                 gd_lrs=(0.15, 0.3, 0.6), momentum_lr=0.3, steps=300, every=10, lanczos=8,
                 devices=0),
    "paper": dict(dataset="mnist", validation_size=1000, train_size=5000, widths=(200, 200),
                  gd_lrs=(2 / 30, 2 / 50, 2 / 70), momentum_lr=0.01, steps=20000, every=10,
                  lanczos=20, devices=0),
}
MOMENTUM = 0.9


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
  lrs = (*s["gd_lrs"], s["momentum_lr"])
  c.sweep_zip = ml_collections.ConfigDict(dict(
      base_lr=lrs,
      optimizer=dict(name=("sgd",) * len(s["gd_lrs"]) + ("momentum",)),
  ))
  c.optimizer.momentum = MOMENTUM
  return c


def threshold(trial) -> float:
  momentum = MOMENTUM if trial.optimizer == "momentum" else 0.0
  return (2 + 2 * momentum) / trial.lr


def judge(trial) -> tuple[bool | None, str]:
  """(reached and hovered / did not hover / never reached, the numbers) of one run."""
  series = [(r["step"], r["curvature/top_eigenvalue"]) for r in trial.records
            if "curvature/top_eigenvalue" in r]
  t = threshold(trial)
  name = f"{trial.optimizer} eta={trial.lr:g} (T={t:.3g})"
  if trial.status != "done" or not series:
    return False, f"{name}: {trial.status}, {len(series)} measurements"
  steps, ratio = np.array([s for s, _ in series]), np.array([v for _, v in series]) / t
  crossed = np.flatnonzero(ratio >= REACH)
  start = f"starts at {ratio[0]:.2f} T, max {ratio.max():.2f} T"
  if not crossed.size:
    return None, f"{name}: {start}, never reached {REACH} T in {steps[-1]} steps"
  after = ratio[crossed[0]:]
  median = float(np.median(after))
  text = (f"{name}: {start}, reached {REACH} T at step {steps[crossed[0]]}, then median "
          f"{median:.2f} T [{after.min():.2f}, {after.max():.2f}] over {after.size}")
  if after.size < MIN_AFTER:
    return None, text + f" (< {MIN_AFTER} measurements)"
  return HOVER[0] <= median <= HOVER[1], text


def run(args) -> list[common.Verdict]:
  trials = sorted(common.run_sweep(get_config(args.scale), args.workdir),
                  key=lambda t: (t.optimizer, -t.lr))
  judged = {t.trial_id: judge(t) for t in trials}
  for t in trials:
    series = [f"{r['step']}:{r['curvature/top_eigenvalue'] * t.lr:.2f}" for r in t.records
              if "curvature/top_eigenvalue" in r]
    print(f"{t.optimizer} eta={t.lr:g}: step:sharpness*eta " + " ".join(series))
  verdicts = []
  for claim, group in (
      ("GD: the sharpness rises to 2/eta and hovers there", [t for t in trials
                                                            if t.optimizer == "sgd"]),
      (f"heavy-ball momentum {MOMENTUM}: the sharpness rises to (2 + 2 beta)/eta and hovers there",
       [t for t in trials if t.optimizer == "momentum"])):
    outcomes = [judged[t.trial_id] for t in group]
    holds = (False if any(o is False for o, _ in outcomes) else
             None if any(o is None for o, _ in outcomes) or not outcomes else True)
    verdicts.append(common.decide(
        claim, holds, "; ".join(text for _, text in outcomes),
        f"each run crosses {REACH} T and the median of sharpness/T afterwards (>= {MIN_AFTER}"
        f" measurements) lies in [{HOVER[0]}, {HOVER[1]}]; never crossing = INCONCLUSIVE"))
  return verdicts


if __name__ == "__main__":
  common.main(run)
