"""A sweep that finishes in about a minute: first contact and tests.

    python -m scaling.main --config=configs/mnist_sweep_tiny.py --workdir=runs/tiny
    python -m scaling.report --workdir=runs/tiny

The default study's protocol in miniature, on the committed 512-image MNIST slice (no download):
batch sizes 16, 32, 64 x lr_multiplier 0.5, 2 around the sqrt rule x 2 seeds (12 trials), a small
MLP, stop at the target (validation error below 30%) with a cap of 150 steps, evaluations every 3
steps (interpolated). Every plot of the report appears, with coarse numbers.
"""
import ml_collections

from configs import mnist


def get_config():
  c = mnist.get_config()
  c.dataset.name, c.dataset.validation_size = "mnist_tiny", 100
  c.model.name, c.model.widths = "mlp", (64,)
  c.base_lr, c.reference_batch_size, c.lr_rule = 0.05, 32, "sqrt"
  c.decay.name = "constant"
  c.budget.length, c.budget.unit = 150.0, "steps"
  c.target.value, c.target.stop_at_target = 0.3, True
  c.warmup.length, c.warmup.unit = 3.0, "steps"
  c.eval_every.length, c.eval_every.unit = 3.0, "steps"
  c.train_eval_size = 0
  c.log_every_steps = 3
  c.chunk_steps, c.chunk_unroll = 3, False
  c.grad_groups = 2
  c.checkpoint.every_steps = 1000
  c.sweep = ml_collections.ConfigDict(dict(
      batch_size=(16, 32, 64), lr_multiplier=(0.5, 2.0), seed=(0, 1)))
  return c
