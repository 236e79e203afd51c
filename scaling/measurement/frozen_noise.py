"""The gradient noise scale at frozen parameters (a checkpoint), with standard errors.

McCandlish et al. 2018 (App. A.1) from many independent draws at fixed parameters, instead of the
training EMA (scaling/measurement/noise_scale.py), which averages ~1/(1 - decay) steps of a moving trajectory
and so lags: where the target comes within its window it averages higher-loss gradients.

Sampling. Each draw takes G groups of b examples, all drawn uniformly WITH replacement from the N
training examples (the big batch is the G groups together, B = G b). With per-example gradients
g_i, G = (1/N) sum_i g_i and Sigma = (1/N) sum_i (g_i - G)(g_i - G)^T (1/N, the population's own
covariance), a batch mean of B i.i.d. draws has, exactly,

    E |G_B|^2 = |G|^2 + tr(Sigma) / B,

so per draw (noise_scale.noise_scale_estimates)

    |G|^2    ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B),

with |G_b|^2 the mean of the G groups' squared norms and |G_B|^2 that of their mean: both
unbiased. (Training draws without replacement within an epoch, where the tr(Sigma)/B term carries
a finite-population factor (N - B)/(N - 1): negligible for B << N, not zero.)

Over D independent draws the estimates are i.i.d., so their means have standard errors
s / sqrt(D) (sample standard deviations, ddof=1). B_simple = mean tr(Sigma) / mean |G|^2 (the ratio
of the means, not the mean of per-draw ratios, whose denominators may be near zero or negative);
its standard error is the delta method's, with the two estimates' covariance over the draws (they
come from the same squared norms, so they are correlated: weakly or strongly, by the problem):

    SE(R)^2 = (s_t^2 - 2 R s_tg + R^2 s_g^2) / (D mean(|G|^2)^2).

The ratio has a bias of order 1/D, small next to that SE for the D used here.

The loss closure `loss_fn(params, idx_b, key) -> mean loss over examples idx_b` is the caller's:
scaling/measure_checkpoint.py builds it from a trial (its `trial_loss`) in training mode, so a
BatchNorm model normalises each group with its own statistics, as the train step does. Then a group
gradient is not a mean of independent per-example gradients and the equation above holds only
approximately; the numbers are still what the training EMA estimates, at one point.

Public API
  draw_sq_norms(loss_fn, params, key, *, num_examples, b_small, groups, unroll=False)
      -> (|G_b|^2 averaged over the groups, |G_B|^2)                    one draw, jittable
  many_draws(loss_fn, params, key, start, *, num_draws, ..., unroll=False) -> ([D], [D])
  summarize(small_D, big_D, b_small, b_big) -> FrozenNoiseScale       numpy, host
  frozen_noise_scale(loss_fn, params, key, *, num_examples, b_small, b_big, num_draws,
                     chunk=10, unroll=False) -> FrozenNoiseScale
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scaling.measurement import noise_scale

# fold_in stream ids of a draw's key: the examples, and each group's augmentation.
_INDICES, _AUGMENT = 0, 1


class FrozenNoiseScale(NamedTuple):
  g_sq: float              # |G|^2: mean over the draws of the unbiased estimate
  g_sq_stderr: float       # standard error of that mean (sample std / sqrt(num_draws))
  trace_sigma: float       # tr(Sigma), likewise
  trace_sigma_stderr: float
  b_simple: float          # trace_sigma / g_sq
  b_simple_stderr: float   # delta method over the draws (module docstring)
  num_draws: int
  b_small: int
  b_big: int


def draw_sq_norms(loss_fn, params, key, *, num_examples: int, b_small: int, groups: int,
                  unroll: bool = False):
  """One draw of `groups` groups of `b_small` examples, uniform with replacement from
  range(num_examples) -> (|G_small|^2 averaged over the groups, |G_big|^2 of their mean).

  The groups run one after another (a scan carrying the gradient sum and the sum of squared norms,
  memory of one group), or unrolled (`unroll`: XLA:CPU runs convolutions in loops far slower).
  """
  idx_GxS = jax.random.randint(jax.random.fold_in(key, _INDICES), (groups, b_small), 0,
                               num_examples)
  augment_key = jax.random.fold_in(key, _AUGMENT)
  grad_fn = jax.grad(loss_fn)
  wide = lambda dtype: jnp.promote_types(dtype, jnp.float32)   # sums in float32 at least

  def add(sums, g):
    grads = grad_fn(params, idx_GxS[g], jax.random.fold_in(augment_key, g))
    grads = jax.tree.map(lambda x: x.astype(wide(x.dtype)), grads)
    return jax.tree.map(jnp.add, sums[0], grads), sums[1] + noise_scale.sq_norm(grads)

  zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, wide(x.dtype)), params),
           jnp.zeros((), wide(jnp.result_type(*jax.tree.leaves(params)))))
  if unroll:
    sums = zeros
    for g in range(groups):
      sums = add(sums, g)
  else:
    sums, _ = lax.scan(lambda s, g: (add(s, g), None), zeros, jnp.arange(groups))
  _, small_sq, big_sq = noise_scale.finish_group_grad_stats(*sums, groups)
  return small_sq, big_sq


def many_draws(loss_fn, params, key, start, *, num_draws: int, num_examples: int, b_small: int,
               groups: int, unroll: bool = False):
  """Draws start, ..., start + num_draws - 1, draw d from fold_in(key, d) -> ([D], [D]) of
  draw_sq_norms: a draw's numbers do not depend on how the draws are chunked."""
  one = lambda d: draw_sq_norms(loss_fn, params, jax.random.fold_in(key, d),
                                num_examples=num_examples, b_small=b_small, groups=groups,
                                unroll=unroll)
  if unroll:
    pairs = [one(start + d) for d in range(num_draws)]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
  return lax.map(one, start + jnp.arange(num_draws))


def summarize(small_D, big_D, b_small: int, b_big: int) -> FrozenNoiseScale:
  """Per-draw squared norms -> means of the unbiased estimates with standard errors (module
  docstring). Needs b_big > b_small and at least 2 draws."""
  small_D, big_D = np.asarray(small_D, np.float64), np.asarray(big_D, np.float64)
  d = len(small_D)
  if d < 2 or b_big <= b_small:
    raise ValueError(f"need >= 2 draws and b_big > b_small (got {d} draws, b_small={b_small},"
                     f" b_big={b_big})")
  g_sq_D, trace_D = noise_scale.noise_scale_estimates(small_D, big_D, b_small, b_big)
  g_sq, trace = float(np.mean(g_sq_D)), float(np.mean(trace_D))
  cov = np.cov(np.stack([trace_D, g_sq_D]), ddof=1)   # [[s_t^2, s_tg], [s_tg, s_g^2]]
  ratio = trace / g_sq
  ratio_var = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[1, 1]) / (d * g_sq ** 2)
  return FrozenNoiseScale(
      g_sq=g_sq, g_sq_stderr=float(np.sqrt(cov[1, 1] / d)),
      trace_sigma=trace, trace_sigma_stderr=float(np.sqrt(cov[0, 0] / d)),
      b_simple=ratio, b_simple_stderr=float(np.sqrt(max(ratio_var, 0.0))),
      num_draws=d, b_small=int(b_small), b_big=int(b_big))


def frozen_noise_scale(loss_fn, params, key, *, num_examples: int, b_small: int, b_big: int,
                       num_draws: int, chunk: int = 10, unroll: bool = False) -> FrozenNoiseScale:
  """The noise scale at `params` from `num_draws` independent draws of a big batch of b_big
  examples cut into groups of b_small (b_small must divide b_big), in jitted chunks of `chunk`
  draws (one compilation; the last chunk's extra draws are dropped). A pure function of
  (loss_fn, params, key): nothing of the training history enters."""
  if b_big % b_small or b_big // b_small < 2:
    raise ValueError(f"b_small={b_small} must divide b_big={b_big} at least twice")
  chunk = max(1, min(chunk, num_draws))
  run = jax.jit(functools.partial(
      many_draws, loss_fn, num_draws=chunk, num_examples=num_examples, b_small=b_small,
      groups=b_big // b_small, unroll=unroll))
  outs = [run(params, key, jnp.int32(start)) for start in range(0, num_draws, chunk)]
  small_D = np.concatenate([np.asarray(jax.device_get(o[0])) for o in outs])[:num_draws]
  big_D = np.concatenate([np.asarray(jax.device_get(o[1])) for o in outs])[:num_draws]
  return summarize(small_D, big_D, b_small, b_big)
