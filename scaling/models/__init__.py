"""Model stage: config.model -> a pure Flax (linen) module, one file per family.

The training step only ever calls `apply(variables, inputs, train)`, so params and BatchNorm
statistics stay plain pytrees that jit, grad, vmap and the curvature code can take apart.
"""
import flax.linen as nn
import jax

from scaling.config import ConfigError
from scaling.models.cnn import SimpleCNN
from scaling.models.mlp import MLP
from scaling.models.transformer import Transformer


def build(model_config, num_classes: int) -> nn.Module:
  """config.model -> module. Names are matched here, in one visible place."""
  name = model_config.name
  if name == "mlp":
    return MLP(tuple(model_config.widths), num_classes, model_config.batch_norm)
  if name == "cnn":
    return SimpleCNN(num_classes, model_config.batch_norm)
  if name == "transformer":
    m = model_config
    if m.width % m.heads or (m.positions == "rotary" and (m.width // m.heads) % 2):
      raise ConfigError(f"model.heads={m.heads} must divide model.width={m.width} (into an even"
                        " head size for rotary positions)")
    if m.positions not in ("learned", "rotary"):
      raise ConfigError(f"model.positions={m.positions!r} is unknown: use 'learned' or 'rotary'")
    return Transformer(num_classes, m.width, m.depth, m.heads, m.context_length, m.positions)
  raise ConfigError(f"model.name={name!r} is unknown: use 'mlp', 'cnn' or 'transformer'")


def parameter_count(params) -> int:
  return int(sum(p.size for p in jax.tree.leaves(params)))
