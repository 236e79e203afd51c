"""A small language-model sweep on the committed slice: first contact and tests.

    python -m scaling.main --config=configs/shakespeare_sweep_tiny.py --workdir=runs/text_tiny
    python -m scaling.report --workdir=runs/text_tiny

6 trials on the committed 32 KB slice of Macbeth (shakespeare_tiny, no download): a 2-block
Transformer of width 64 over 64-byte windows, batch sizes 8, 16, 32 windows x the `sqrt` and
`linear` rules from Adam's 1e-2 at batch 16, 8 epochs of the slice, target 3.4 bits per character
on validation (batch 16 at 1e-2 crosses it near step 150 and ends near 3.2).
Measured on a 2-core CPU shared by ~7 jobs (load ~18): the batch-8 trials (499 steps) took 443 s
and 512 s, mostly compilation and evaluation; batch 16 and 32 have half and a quarter the steps.
"""
import ml_collections

from configs import shakespeare


def get_config():
  c = shakespeare.get_config()
  c.dataset.name = "shakespeare_tiny"
  c.model.width, c.model.depth, c.model.heads, c.model.context_length = 64, 2, 4, 64
  c.base_lr, c.reference_batch_size = 1e-2, 16
  c.budget.length, c.budget.unit = 8.0, "epochs"
  c.warmup.length, c.warmup.unit = 0.25, "epochs"
  c.target.value = 3.4
  c.eval_every.length, c.eval_every.unit = 0.25, "epochs"
  c.eval_batch_size, c.train_eval_size = 64, 64
  c.log_every_steps = 10
  c.chunk_steps = 8
  c.grad_groups = 8
  c.checkpoint.every_steps = 100
  c.sweep = ml_collections.ConfigDict(dict(batch_size=(8, 16, 32), lr_rule=("sqrt", "linear")))
  return c
