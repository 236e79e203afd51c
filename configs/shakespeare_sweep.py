"""A batch-size study of the byte-level Transformer on Shakespeare (configs/shakespeare.py).

    python -m scaling.main --config=configs/shakespeare_sweep.py --workdir=runs/shakespeare_sweep
    python -m scaling.report --workdir=runs/shakespeare_sweep

12 trials: batch sizes 16..512 windows of 128 bytes (2k..64k tokens per step) x base learning rates
1e-3 and 3e-3 at batch 32 scaled by the `sqrt` rule (the report keeps the best per batch size),
Adam, warmup over 5% of an epoch then cosine decay, two epochs of train text (a fixed token budget:
batch 512 gets 135 steps), stopped at the target of 2.5 bits per character on the validation works.
Curvature at the end of each trial. Meant for an accelerator: on a 2-core CPU under load the
single trial (configs/shakespeare.py, batch 32) runs ~1.5 s per step.
"""
import ml_collections

from configs import shakespeare


def get_config():
  c = shakespeare.get_config()
  c.budget.length, c.budget.unit = 2.0, "epochs"
  c.warmup.length, c.warmup.unit = 0.05, "epochs"
  c.target.stop_at_target = True
  c.eval_every.length, c.eval_every.unit = 0.02, "epochs"   # fine enough to resolve steps-to-target
  c.curvature.enabled = True
  c.sweep = ml_collections.ConfigDict(dict(
      batch_size=(16, 32, 64, 128, 256, 512),
      base_lr=(1e-3, 3e-3),
  ))
  return c
