"""Model stage: config.model -> a pure Flax (linen) module, one file per family.

The training step only ever calls `apply(variables, inputs, train)`, so params and BatchNorm
statistics stay plain pytrees that jit, grad, vmap and the curvature code can take apart.
"""
import flax.linen as nn
import jax

from scaling.config import ConfigError
from scaling.models.cnn import SimpleCNN
from scaling.models.mlp import MLP


def build(model_config, num_classes: int) -> nn.Module:
  """config.model -> module. Names are matched here, in one visible place."""
  name = model_config.name
  if name == "mlp":
    return MLP(tuple(model_config.widths), num_classes, model_config.batch_norm)
  if name == "cnn":
    return SimpleCNN(num_classes, model_config.batch_norm)
  raise ConfigError(f"model.name={name!r} is unknown: use 'mlp' or 'cnn'")


def parameter_count(params) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))
