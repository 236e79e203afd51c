"""Keskar et al.'s fully connected networks (F1 = 5 x [Dense 512, BN, ReLU])."""
from typing import Sequence

import flax.linen as nn


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
