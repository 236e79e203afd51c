"""The default study: how does batch size change training of an MLP on real MNIST?

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.report --workdir=runs/mnist_sweep

The protocol of Shallue et al. 2018 and McCandlish et al. 2018 (DESIGN.md, "study protocol"):
batch sizes 16..8192 (powers of 2); at every batch size a learning-rate grid that moves with B
(lr_multiplier 1, 2, 4 around lr = 0.03 (B/128)^0.25, a centre from a pilot grid);
2 seeds; momentum SGD (0.9) at a constant LR after 20 warmup steps (so steps to target do not depend
on the cap); training stops at the target, validation error below 4%, or at a step cap per batch
size of 2.5x a pilot's steps to target (S ~ 120 (1 + 256/B)), so every batch size reaches the
target or shows it cannot. Evaluations every ~S/25 steps (validation + test only), interpolated.
Curvature is off (its compilation would cost more than most trials here); turn it on
(`--config.curvature.enabled=True`) to measure it at the target and at the end.

Measured (2026-11-28, 2 cores shared with ~7 other jobs, load average 13-18, so pessimistic): 60
trials used 13.8 CPU-minutes in all (user + sys), about 20-45 s of wall clock per trial here; on an
idle 2-core machine that is at most ~14 minutes. Wall clock here: one worker did the first 13
trials in 16 minutes (it gets ~25% of a core), so the sweep was finished with 3 workers on the same
workdir (the per-trial lock allows that). The report shows all three regimes: steps to target fall
~1/B up to 128, flatten around B_crit = 275 +- 37 (95% bootstrap [197, 378]), S_min = 78 steps
from 1024 to 8192; every batch size reached 4%; B_simple at the target is ~350 at B <= 64 and falls
at large B (its 100-step EMA is longer than those runs); the best multiplier is at the top of the
grid at 128..4096 (flagged: the optimum LR there is above 4x the rule; widen the grid upwards).
"""
import ml_collections

from configs import mnist

BATCH_SIZES = tuple(2**k for k in range(4, 14))   # 16 .. 8192
# The centre of each batch size's LR grid: the best LR of a pilot sweep (power-0.25 rule x
# multipliers 0.5..4, 2 seeds, same protocol), whose optimum sat at the top of its grid for
# B = 128..4096 and at the bottom for B = 16. The grid 0.5x, 1x, 2x around it moves with B.
LR_CENTRES = (0.018, 0.042, 0.06, 0.12, 0.14, 0.2, 0.24, 0.28, 0.28, 0.28)


def step_cap(batch_size):
  return int(2.5 * 120 * (1 + 256 / batch_size)) + 1


def get_config():
  c = mnist.get_config()
  c.model.name, c.model.widths = "mlp", (128, 128)
  c.base_lr, c.reference_batch_size = 0.12, 128
  c.lr_rule = "none"               # lr = base_lr (per batch size, below) x lr_multiplier
  c.decay.name = "constant"
  c.warmup.length, c.warmup.unit = 20.0, "steps"
  c.budget.unit = "steps"          # a cap: training stops at the target
  c.target.value, c.target.stop_at_target = 0.04, True
  c.eval_every.unit = "steps"
  c.train_eval_size = 0            # evaluate validation and test only: evaluations are frequent
  c.chunk_steps, c.chunk_unroll = 8, False   # divides every eval interval: one compilation
  c.grad_groups = 2                # B/2 small batches for the noise scale B_simple
  c.checkpoint.every_steps = 100_000         # trials are short: checkpoint at the end only
  c.sweep = ml_collections.ConfigDict(dict(lr_multiplier=(0.5, 1.0, 2.0), seed=(0, 1)))
  c.sweep_zip = ml_collections.ConfigDict(dict(
      batch_size=BATCH_SIZES,
      base_lr=LR_CENTRES,
      budget=dict(length=tuple(float(step_cap(b)) for b in BATCH_SIZES)),
      eval_every=dict(length=(80.0, 40.0, 24.0, 16.0, 8.0, 8.0, 4.0, 4.0, 4.0, 4.0)),
  ))
  return c
