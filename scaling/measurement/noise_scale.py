"""The gradient noise scale (McCandlish et al. 2018): squared norms of group gradients, the
unbiased |G|^2 and tr(Sigma) estimators, and their bias-corrected EMA (B_simple = tr(Sigma)/|G|^2).

Pure functions of arrays; the training step accumulates the group sums, the loop keeps the EMA on
the host (scaling/training/record.py) so that it is checkpointed exactly. The EMA is a trace over
training (it lags by ~1/(1 - decay) steps); the noise scale at fixed parameters, from many
independent draws with standard errors, is scaling/measurement/frozen_noise.py's.

Public API
  group_grad_stats(grads_GxP) -> (mean_grad pytree, g_small_sq, g_big_sq)
  finish_group_grad_stats(grad_sum, sq_norm_sum, num_groups) -> the same, from sums (train step)
  sq_norm(pytree) -> float32 scalar                                   elementwise, full precision
  noise_scale_estimates(g_small_sq, g_big_sq, b_small, b_big) -> (g_sq, trace_sigma)
  noise_scale_init(dtype=float32) -> NoiseScaleEMA
  noise_scale_update(state, g_small_sq, g_big_sq, b_small, b_big, decay=0.99) -> NoiseScaleEMA
  noise_scale(state) -> (g_sq, trace_sigma, b_simple)
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Pytree = Any


def sq_norm(tree: Pytree) -> jax.Array:
  """Squared norm of a pytree in full float32 (or wider) precision on every backend: elementwise
  square and sum, never a dot product (TF32 on recent GPUs, bf16 passes on TPUs by default); the
  |G|^2 estimator is a difference of nearly equal squared norms (condition number up to 1e5)."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
             for x in jax.tree.leaves(tree))


def finish_group_grad_stats(grad_sum: Pytree, sq_norm_sum, num_groups: int):
  """(sum of G group gradients, sum of their squared norms, G) -> (mean gradient over all B
  examples, |G_small|^2 averaged over the groups, |G_big|^2 of the mean). The training step
  calls it with the sums accumulated over microbatches and all-reduced over devices."""
  mean_grad = jax.tree.map(lambda g: g / num_groups, grad_sum)
  return mean_grad, sq_norm_sum / num_groups, sq_norm(mean_grad)


def group_grad_stats(grads_GxP: Pytree):
  """Per-group gradients (leaves [G, ...], each its group's mean gradient over B/G examples) ->
  (mean gradient over all B examples, |G_small|^2 averaged over the G groups, |G_big|^2)."""
  num_groups = jax.tree.leaves(grads_GxP)[0].shape[0]
  grad_sum = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads_GxP)
  # The squared norm of the stacked tree is the sum of the G group norms.
  return finish_group_grad_stats(grad_sum, sq_norm(grads_GxP), num_groups)


def noise_scale_estimates(g_small_sq, g_big_sq, b_small, b_big):
  """McCandlish et al. 2018 App. A.1 unbiased estimates of (|G|^2, tr(Sigma)) from one step.

  Needs b_big > b_small (at least 2 groups). Either may come out negative on one step: average
  them (noise_scale_update) before taking the ratio.
  """
  g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
  trace_sigma = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
  return g_sq, trace_sigma


class NoiseScaleEMA(NamedTuple):
  g_sq: jax.Array         # EMA of the |G|^2 estimates (not yet bias-corrected)
  trace_sigma: jax.Array  # EMA of the tr(Sigma) estimates
  weight: jax.Array       # 1 - decay^t: dividing by it is Adam's bias correction


def noise_scale_init(dtype=jnp.float32) -> NoiseScaleEMA:
  zero = jnp.zeros((), dtype)
  return NoiseScaleEMA(zero, zero, zero)


def noise_scale_update(state: NoiseScaleEMA, g_small_sq, g_big_sq, b_small, b_big,
                       decay: float = 0.99) -> NoiseScaleEMA:
  g_sq, trace_sigma = noise_scale_estimates(g_small_sq, g_big_sq, b_small, b_big)
  ema = lambda old, new: decay * old + (1 - decay) * new
  return NoiseScaleEMA(ema(state.g_sq, g_sq), ema(state.trace_sigma, trace_sigma),
                       ema(state.weight, 1.0))


def noise_scale(state: NoiseScaleEMA):
  """(|G|^2, tr(Sigma), B_simple = tr(Sigma) / |G|^2) from the bias-corrected averages.

  The correction cancels in B_simple; it matters only for the logged |G|^2 and tr(Sigma).
  """
  g_sq, trace_sigma = state.g_sq / state.weight, state.trace_sigma / state.weight
  return g_sq, trace_sigma, trace_sigma / g_sq
