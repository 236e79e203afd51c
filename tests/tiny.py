"""A tiny real trial config for tests: 412 real MNIST train images (the committed slice), an MLP;
and `read_records`, what a trial logged."""
import json
import os

from configs import mnist


def tiny_config(**overrides):
  c = mnist.get_config()
  c.dataset.name = "mnist_tiny"
  c.dataset.validation_size = 100
  c.model.name, c.model.widths = "mlp", (32,)
  c.batch_size = 32
  c.base_lr, c.reference_batch_size = 0.05, 32
  c.budget.unit, c.budget.length = "steps", 24.0
  c.warmup.unit, c.warmup.length = "steps", 4.0
  c.eval_every.unit, c.eval_every.length = "steps", 8.0
  c.log_every_steps = 4
  c.chunk_steps, c.chunk_unroll = 4, False
  c.checkpoint.every_steps = 8
  c.curvature.enabled = False   # compiling it costs more than these trials: on where tested
  c.curvature.subset_size, c.curvature.max_probes, c.curvature.density_steps = 256, 20, 10
  return override(c, **overrides)


def override(config, **dotted):
  """Sets fields given as dotted names ({'budget.length': 48.0}) on `config`; returns it."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def read_records(workdir):
  """metrics.jsonl -> list of dicts. Strict, unlike scaling.analysis.results.read_metrics: a torn line
  fails the test instead of being skipped."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]
