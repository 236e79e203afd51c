"""Shallue et al. 2018's simple CNN for MNIST and Fashion-MNIST."""
import flax.linen as nn


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
