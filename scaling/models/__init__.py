"""Model stage: config.model -> a pure Flax (linen) module, one file per family.

The training step only ever calls `apply(variables, inputs, train)`, so params and BatchNorm
statistics stay plain pytrees that jit, grad, vmap and the curvature code can take apart.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from scaling.config import ConfigError
from scaling.models.cnn import SimpleCNN
from scaling.models.mlp import MLP
from scaling.models.resnet import ResNet
from scaling.models.transformer import Transformer


def build(model_config, num_classes: int) -> nn.Module:
  """config.model -> module. Names are matched here, in one visible place."""
  name = model_config.name
  if name == "mlp":
    return MLP(tuple(model_config.widths), num_classes, model_config.batch_norm)
  if name == "cnn":
    return SimpleCNN(num_classes, model_config.batch_norm)
  if name == "resnet":
    depth = model_config.depth
    if depth < 8 or (depth - 2) % 6:
      raise ConfigError(f"model.depth={depth} is not a CIFAR ResNet depth: use 6n + 2 (8, 14, 20,"
                        " 32, 44, 56, 110)")
    if model_config.width < 1:
      raise ConfigError(f"model.width={model_config.width} must be >= 1 (16 in He et al.)")
    return ResNet(num_classes, depth, model_config.width, model_config.ghost_batch_size)
  if name == "transformer":
    m = model_config
    if m.width % m.heads or (m.positions == "rotary" and (m.width // m.heads) % 2):
      raise ConfigError(f"model.heads={m.heads} must divide model.width={m.width} (into an even"
                        " head size for rotary positions)")
    if m.positions not in ("learned", "rotary"):
      raise ConfigError(f"model.positions={m.positions!r} is unknown: use 'learned' or 'rotary'")
    return Transformer(num_classes, m.width, m.depth, m.heads, m.context_length, m.positions)
  raise ConfigError(f"model.name={name!r} is unknown: use 'mlp', 'cnn', 'resnet' or 'transformer'")


def check_microbatch(model_config, microbatch_size: int) -> None:
  """The ResNet's ghost batches must tile each microbatch: BN statistics never span microbatches
  (they are computed one microbatch at a time) nor devices."""
  if model_config.name != "resnet":
    return
  ghost = model_config.ghost_batch_size
  if ghost < 0 or (ghost and microbatch_size % ghost):
    raise ConfigError(
        f"model.ghost_batch_size={ghost} does not divide the per-device microbatch of"
        f" {microbatch_size} examples (batch_size / devices / microbatches per device): use a"
        f" divisor of {microbatch_size}, or 0 for BN over the whole microbatch")


def context_length(model_config) -> int:
  """Tokens per example: the Transformer's context length; 0 for the image models."""
  return model_config.context_length if model_config.name == "transformer" else 0


def parameter_count(params) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))


def cross_entropy_B(logits_BxC, labels_B):
  """The loss of every model here: softmax cross-entropy per example (per token)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)


def mask_like(mask_E, labels_ExS):
  """An [E] example mask broadcast over the labels' trailing axes (a sequence model's [E, T])."""
  return jnp.broadcast_to(mask_E.reshape(mask_E.shape + (1,) * (labels_ExS.ndim - 1)),
                          labels_ExS.shape)
