"""He et al. 2016's ResNet for small images (the CIFAR family: depth 6n + 2, so 20, 32, 44, 56,
110) with ghost batch norm (Hoffer et al. 2017).

Three stages of n basic blocks at widths w, 2w, 4w (w = 16 in the paper), stride 2 at the start of
the second and third stage, a 1x1 projection shortcut where the shape changes, global average
pooling, one dense layer. On 28x28 inputs the stages see 28, 14 and 7 pixels.

BN statistics are those of ghost batches of `ghost_batch_size` examples inside each microbatch the
step passes in (scaling/training/step.py), never across devices. Plain BN over each device's batch is
ghost_batch_size = batch_size / devices with one microbatch per device (grad_groups <= devices,
accumulation_steps = 1); ghost_batch_size = 0 is BN over whatever microbatch comes in.
"""
import functools

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class GhostBatchNorm(nn.Module):
  """BatchNorm whose training statistics are those of consecutive ghost batches of
  `ghost_batch_size` examples (0: all examples passed in at once, plain BN over the microbatch).

  Hoffer et al. 2017: normalising over a fixed small ghost batch keeps the regularising noise of
  BN the same whatever the batch size. The running averages (eval mode) are updated with the mean
  over ghost batches of their means and variances.
  """
  ghost_batch_size: int = 0
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    features = x_BxHxWxC.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if not train:
      mean, var = running_mean.value, running_var.value
      return (x_BxHxWxC - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
    n = x_BxHxWxC.shape[0]
    ghost = self.ghost_batch_size or n
    if n % ghost:   # the config check (models.check_microbatch) says this before training
      raise ValueError(f"ghost_batch_size={ghost} does not divide the {n} examples passed in")
    x_NxSxHxWxC = x_BxHxWxC.reshape(n // ghost, ghost, *x_BxHxWxC.shape[1:])
    axes = tuple(range(1, x_NxSxHxWxC.ndim - 1))   # examples and pixels of each ghost batch
    mean_N = jnp.mean(x_NxSxHxWxC, axes, keepdims=True)
    var_N = jnp.mean(jnp.square(x_NxSxHxWxC - mean_N), axes, keepdims=True)   # two-pass: stable
    y = ((x_NxSxHxWxC - mean_N) * lax.rsqrt(var_N + self.epsilon)).reshape(x_BxHxWxC.shape)
    if not self.is_initializing():
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * mean_N.reshape(-1, features).mean(0)
      running_var.value = m * running_var.value + (1 - m) * var_N.reshape(-1, features).mean(0)
    return y * scale + bias


class _Block(nn.Module):
  features: int
  strides: int
  ghost_batch_size: int

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=nn.initializers.he_normal())
    norm = functools.partial(GhostBatchNorm, self.ghost_batch_size)
    y = conv(self.features, (3, 3), strides=self.strides)(x)
    y = nn.relu(norm()(y, train))
    y = conv(self.features, (3, 3))(y)
    # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
    y = norm(scale_init=nn.initializers.zeros)(y, train)
    if x.shape != y.shape:
      x = norm()(conv(self.features, (1, 1), strides=self.strides)(x), train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  num_classes: int
  depth: int = 20
  width: int = 16
  ghost_batch_size: int = 0

  @nn.compact
  def __call__(self, x_BxHxWxC, train: bool):
    blocks_per_stage = (self.depth - 2) // 6
    x = nn.Conv(self.width, (3, 3), use_bias=False, kernel_init=nn.initializers.he_normal())(
        x_BxHxWxC)
    x = nn.relu(GhostBatchNorm(self.ghost_batch_size)(x, train))
    for stage in range(3):
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _Block(self.width * 2 ** stage, strides, self.ghost_batch_size)(x, train)
    x_BxC = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x_BxC)
