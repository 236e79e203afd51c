"""A small decoder-only Transformer for byte-level language modelling (pre-LayerNorm, GPT-style).

Inputs are byte ids [B, T]; they may arrive as floats, the dtype the image pipeline hands every
model (evaluation, curvature), which holds 0..255 exactly. Outputs are next-byte logits [B, T, V].
No dropout and no BatchNorm: `train` changes nothing, so the loss is a pure function of
(params, inputs) for the curvature code.
"""
import flax.linen as nn
import jax.numpy as jnp


def rotary(x_BxTxHxK):
  """Rotary position embedding (Su et al. 2021): rotates feature pairs (i, i + K/2) by angle
  position * 10000^(-2i/K), so that query-key products depend on relative position only."""
  T, K = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
  half = K // 2
  freqs_F = 10000.0 ** (-jnp.arange(half) / half)
  angles_TxF = jnp.arange(T)[:, None] * freqs_F[None, :]
  cos, sin = jnp.cos(angles_TxF)[None, :, None, :], jnp.sin(angles_TxF)[None, :, None, :]
  x1, x2 = x_BxTxHxK[..., :half], x_BxTxHxK[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class CausalSelfAttention(nn.Module):
  heads: int
  rotary: bool

  @nn.compact
  def __call__(self, x_BxTxD):
    T, D = x_BxTxD.shape[1], x_BxTxD.shape[2]
    K = D // self.heads
    qkv_BxTx3xHxK = nn.DenseGeneral((3, self.heads, K), name="qkv")(x_BxTxD)
    q, k, v = (qkv_BxTx3xHxK[:, :, i] for i in range(3))
    if self.rotary:
      q, k = rotary(q), rotary(k)
    logits_BxHxTxT = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(K).astype(q.dtype)
    # Position t attends to positions s <= t only: no information flows from later bytes.
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    logits_BxHxTxT = jnp.where(causal_TxT, logits_BxHxTxT, jnp.finfo(logits_BxHxTxT.dtype).min)
    weights = nn.softmax(logits_BxHxTxT, axis=-1)
    out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", weights, v)
    return nn.DenseGeneral(D, axis=(-2, -1), name="out")(out_BxTxHxK)


class Block(nn.Module):
  heads: int
  rotary: bool
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x_BxTxD):
    x_BxTxD = x_BxTxD + CausalSelfAttention(self.heads, self.rotary)(nn.LayerNorm()(x_BxTxD))
    h = nn.gelu(nn.Dense(self.mlp_ratio * x_BxTxD.shape[-1])(nn.LayerNorm()(x_BxTxD)))
    return x_BxTxD + nn.Dense(x_BxTxD.shape[-1])(h)


class Transformer(nn.Module):
  """width D, depth blocks of `heads` heads, at most `context_length` positions;
  positions = 'learned' (an added embedding) or 'rotary' (rotated queries and keys)."""
  vocab_size: int
  width: int
  depth: int
  heads: int
  context_length: int
  positions: str = "learned"

  @nn.compact
  def __call__(self, tokens_BxT, train: bool):
    del train  # No dropout or BatchNorm: training and evaluation compute the same function.
    tokens_BxT = tokens_BxT.astype(jnp.int32)
    T = tokens_BxT.shape[1]
    x_BxTxD = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                       name="embed")(tokens_BxT)
    if self.positions == "learned":
      table_CxD = self.param("position_embed", nn.initializers.normal(0.02),
                             (self.context_length, self.width))
      x_BxTxD = x_BxTxD + table_CxD[:T]
    for _ in range(self.depth):
      x_BxTxD = Block(self.heads, rotary=self.positions == "rotary")(x_BxTxD)
    return nn.Dense(self.vocab_size, name="logits")(nn.LayerNorm()(x_BxTxD))
