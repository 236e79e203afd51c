"""The default study: how does batch size change training of an MLP on real MNIST?

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.report --workdir=runs/mnist_sweep

16 trials: batch sizes 32..4096 (powers of 2) x the `linear` and `sqrt` LR rules, both from
base_lr 0.05 at batch 128, momentum SGD (0.9), warmup over half an epoch then cosine decay, and a
fixed budget of 2 epochs (a fixed *example* budget: large batches get fewer steps). Target:
validation error below 3% (the MLP's analogue of Shallue et al.'s 1% for the CNN).

Why this subset: the full grid of Shallue et al. (16..8192, the CNN, a step budget large enough for
every batch size) takes hours on the 2-core machine this project is developed on; this one takes
about 15 minutes there (~3k examples/s for the MLP). Batch 16 roughly doubles the time (Python and
dispatch overhead per step), 8192 gets only 13 steps in 2 epochs. Widen it with
`--config.sweep.batch_size='(16,32,...,8192)'` on a bigger machine.

Expected: steps to target fall ~linearly with batch size up to a few hundred (perfect scaling),
then flatten; the largest batches do not reach 3% within 2 epochs (fixed example budget), and
`linear` holds further than `sqrt` at this budget until its LR gets too large. The report fits the
critical batch size and plots it beside the measured gradient noise scale.
"""
import ml_collections

from configs import mnist


def get_config():
  c = mnist.get_config()
  c.model.name, c.model.widths = "mlp", (512, 512)
  c.base_lr, c.reference_batch_size = 0.05, 128
  c.budget.length, c.budget.unit = 2.0, "epochs"
  c.warmup.length, c.warmup.unit = 0.5, "epochs"
  c.target.value = 0.03
  c.eval_every.length = 0.1             # epochs: fine enough to resolve steps-to-target
  c.chunk_steps, c.chunk_unroll = 50, False   # the MLP runs fast in a rolled scan
  # 2 gradient groups (small batch B/2) for the noise scale: 8 groups of small matmuls cost the
  # MLP ~3x per step on CPU (benchmarks/bench_step.py), 2 cost little; the EMA does the averaging.
  c.grad_groups = 2
  c.curvature.enabled = True   # at the end of every trial: trace, top-3 eigenvalues, sharpness
  c.checkpoint.every_steps = 1000
  c.sweep = ml_collections.ConfigDict(dict(
      batch_size=(32, 64, 128, 256, 512, 1024, 2048, 4096),
      lr_rule=("linear", "sqrt"),
      seed=(0,),
  ))
  return c
