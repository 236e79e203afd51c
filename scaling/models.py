"""Small Flax (linen) models of the large-batch papers.

The training step only ever calls `apply(variables, images, train)`, so params and BatchNorm
statistics stay plain pytrees that jit, grad, vmap and the curvature code can take apart.
"""
from typing import Sequence

import flax.linen as nn
import jax

from scaling.config import ConfigError


class MLP(nn.Module):
  """Dense stack; Keskar et al.'s F1 is widths=(512,)*5 with batch_norm=True."""
  widths: Sequence[int]
  num_classes: int
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    x_BxD = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for width in self.widths:
      x_BxD = nn.Dense(width)(x_BxD)
      if self.batch_norm:
        x_BxD = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x_BxD)
      x_BxD = nn.relu(x_BxD)
    return nn.Dense(self.num_classes)(x_BxD)


class SimpleCNN(nn.Module):
  """Shallue et al. 2018's MNIST CNN: conv5x5 32, pool, conv5x5 64, pool, dense 1024, dense 10."""
  num_classes: int
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    x = x_BxHxWxC
    for features in (32, 64):
      x = nn.Conv(features, (5, 5), padding="SAME")(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    x_BxD = x.reshape(x.shape[0], -1)
    x_BxD = nn.relu(nn.Dense(1024)(x_BxD))
    return nn.Dense(self.num_classes)(x_BxD)


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
