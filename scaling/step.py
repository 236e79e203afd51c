"""TrainState and the pure training/evaluation steps.

Data parallelism is explicit: `jax.shard_map` over the mesh's `data` axis, each device taking its
slice of the global batch of B examples. A device splits its slice into microbatches, so the batch
is G = grad_groups groups of b = B/G examples; each group's gradient is computed on its own and the
update uses their mean (all-reduced over devices), which equals the full-batch gradient. The group
gradients are the two batch sizes of McCandlish et al.'s gradient noise scale (b and B), so it
comes for free. BatchNorm statistics are per group of b examples (ghost batch norm), exactly what
gradient accumulation over microbatches implies; G is a config field, not the device count, so a
run gives the same numbers on 1 or on 8 devices.

Microbatches run as an unrolled Python loop, not lax.map/vmap: XLA:CPU runs convolutions inside
loops ~10x slower, and vmapped kernel gradients become grouped convolutions, ~5x slower (measured
on the simple CNN, batch 128, in benchmarks/bench_step.py).
"""
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from scaling.config import ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any         # BatchNorm running statistics ({} for models without BN)
  opt_state: Any


def make_optimizer(opt, learning_rate: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer -> optax transform; weight decay is L2 on the gradient for the SGD family."""
  name, wd = opt.name, opt.weight_decay
  if name in ("sgd", "momentum", "nesterov"):
    momentum = None if name == "sgd" else opt.momentum
    sgd = optax.sgd(learning_rate, momentum=momentum, nesterov=name == "nesterov")
    return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd
  if name == "adam":
    adam = optax.adam(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.chain(optax.add_decayed_weights(wd), adam) if wd else adam
  if name == "adamw":
    return optax.adamw(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd)
  if name == "lars":
    return optax.lars(learning_rate, weight_decay=wd, momentum=opt.momentum,
                      trust_coefficient=opt.trust_coefficient)
  if name == "lamb":
    return optax.lamb(learning_rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd)
  raise ConfigError(f"optimizer.name={name!r} is unknown: use one of"
                    " sgd, momentum, nesterov, adam, adamw, lars, lamb")


def init_state(model, optimizer, rng, image_shape) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=optimizer.init(params))


def cross_entropy_B(logits_BxC, labels_B):
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)


def global_norm_sq(tree):
  return sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree))


def _group_loss(apply_fn, params, batch_stats, images_bxX, labels_b):
  logits_bxC, updated = apply_fn({"params": params, "batch_stats": batch_stats}, images_bxX,
                                 train=True, mutable=["batch_stats"])
  loss = cross_entropy_B(logits_bxC, labels_b).mean()
  accuracy = (logits_bxC.argmax(-1) == labels_b).mean()
  return loss, (updated.get("batch_stats", {}), accuracy)


def _mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def train_step(state: TrainState, images_BxX, labels_B, *, apply_fn: Callable,
               optimizer: optax.GradientTransformation, lr_fn: optax.Schedule, groups: int,
               mesh, axis: str):
  """One step on a global batch; returns the new state and this step's scalar metrics."""
  microbatches = groups // mesh.size

  def local_step(params, batch_stats, opt_state, images_LxX, labels_L):
    """Runs on each device with its slice of L = B / devices examples; state is replicated."""
    grad_fn = jax.value_and_grad(functools.partial(_group_loss, apply_fn), has_aux=True)
    results = [grad_fn(params, batch_stats, x, y) for x, y in
               zip(jnp.split(images_LxX, microbatches), jnp.split(labels_L, microbatches))]
    grads_per_group = [g for _, g in results]
    local_grads = _mean(grads_per_group)
    # check_vma=False below: gradients stay per-device until this explicit all-reduce.
    grads = jax.lax.pmean(local_grads, axis)
    small_grad_sq = jax.lax.pmean(sum(global_norm_sq(g) for g in grads_per_group) / microbatches,
                                  axis)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_batch_stats = jax.lax.pmean(_mean([bs for (_, (bs, _)), _ in results]), axis)
    scalars = jax.lax.pmean({"train/loss": _mean([l for (l, _), _ in results]),
                             "train/accuracy": _mean([a for (_, (_, a)), _ in results])}, axis)
    big_grad_sq = global_norm_sq(grads)
    metrics = {**scalars, "grad_norm": jnp.sqrt(big_grad_sq),
               "param_norm": jnp.sqrt(global_norm_sq(new_params)),
               "noise/small_grad_sq": small_grad_sq, "noise/big_grad_sq": big_grad_sq}
    return new_params, new_batch_stats, opt_state, metrics

  replicated, split = jax.P(), jax.P(axis)
  params, batch_stats, opt_state, metrics = jax.shard_map(
      local_step, mesh=mesh, in_specs=(replicated, replicated, replicated, split, split),
      out_specs=replicated, check_vma=False)(state.params, state.batch_stats, state.opt_state,
                                             images_BxX, labels_B)
  metrics["lr"] = lr_fn(state.step)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def mask_like(mask_E, labels_ExS):
  """An [E] example mask broadcast over the labels' trailing axes (a sequence model's [E, T])."""
  return jnp.broadcast_to(mask_E.reshape(mask_E.shape + (1,) * (labels_ExS.ndim - 1)),
                          labels_ExS.shape)


def eval_sums(params, batch_stats, images_ExX, labels_E, mask_E, *, apply_fn, pixel_scale):
  """Summed loss, errors and label count over one padded eval chunk (mask marks real examples;
  a sequence model's labels [E, T] count each token); eval-mode BN."""
  logits = apply_fn({"params": params, "batch_stats": batch_stats},
                    images_ExX.astype(jnp.float32) * pixel_scale, train=False)
  mask = mask_like(mask_E, labels_E)
  loss = (cross_entropy_B(logits, labels_E) * mask).sum()
  errors = ((logits.argmax(-1) != labels_E) * mask).sum()
  return loss, errors, mask.sum()
