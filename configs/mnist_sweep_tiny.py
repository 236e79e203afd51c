"""A sweep that finishes in about a minute: first contact and tests.

    python -m scaling.main --config=configs/mnist_sweep_tiny.py --workdir=runs/tiny
    python -m scaling.report --workdir=runs/tiny

6 trials on the committed 512-image MNIST slice (no download): batch sizes 16, 32, 64 x the
`linear` and `sqrt` rules, a small MLP, a fixed budget of 6 epochs, target 30% validation error.
"""
import ml_collections

from configs import mnist


def get_config():
  c = mnist.get_config()
  c.dataset.name, c.dataset.validation_size = "mnist_tiny", 100
  c.model.name, c.model.widths = "mlp", (64,)
  c.base_lr, c.reference_batch_size = 0.05, 32
  c.budget.length, c.budget.unit = 6.0, "epochs"
  c.warmup.length, c.warmup.unit = 0.5, "epochs"
  c.target.value = 0.3
  c.eval_every.length, c.eval_every.unit = 0.5, "epochs"
  c.log_every_steps = 5
  c.chunk_steps, c.chunk_unroll = 8, False
  c.checkpoint.every_steps = 50
  c.sweep = ml_collections.ConfigDict(dict(batch_size=(16, 32, 64), lr_rule=("linear", "sqrt")))
  return c
