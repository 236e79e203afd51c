"""TrainState and the pure training/evaluation steps.

Data parallelism is explicit: `jax.shard_map` over the mesh's `data` axis, each device taking its
slice of L = B / devices examples of the global batch of B. A device cuts its slice into M
microbatches of b examples; each microbatch's gradient is computed on its own and the update uses
their mean (summed over microbatches and devices), which equals the full-batch gradient.

Microbatches serve two ends (`plan_microbatches`):
- Noise scale. The microbatches are the G = M * devices groups of McCandlish et al.'s two batch
  sizes, b = B / G and B. G is `grad_groups` rounded up to a multiple of the device count (and of
  `accumulation_steps`), so any config runs on 1, 2, 4 or 8 devices; the G in use is recorded in
  config.json's `derived.microbatching`. The estimators of |G|^2 and tr(Sigma) are unbiased for
  any b < B: the device count changes only their variance, not what they estimate.
- Memory. `accumulation_steps` K > 1 runs the M microbatches as K sequential steps of a
  `lax.scan` (M / K unrolled microbatches per step) carrying the running gradient sum and the sum
  of microbatch squared norms, so peak memory is that of B / (devices * K) examples, not of L.

BatchNorm statistics never span microbatches (nor devices): the CNN/MLP normalise over each
microbatch of b examples; the ResNet over ghost batches of `model.ghost_batch_size` inside each
microbatch, a size fixed by the config whatever the batch size, groups, K or device count.

Microbatches run as an unrolled Python loop when K = 1, not lax.map/vmap: XLA:CPU runs
convolutions inside loops far slower, and vmapped kernel gradients become grouped convolutions,
slower too (benchmarks/README.md: microbatch loop). K > 1 trades that speed (on CPU, for conv
nets) for memory; dense models lose nothing in the loop.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from scaling import sharding
from scaling.config import ConfigError
from scaling.measurement import noise_scale
from scaling.models import cross_entropy_B, mask_like


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


@dataclasses.dataclass(frozen=True)
class Microbatching:
  """How each device's share of the global batch is cut (see the module docstring)."""
  per_device_batch: int     # L = B / devices
  microbatches: int         # M per device, all of b examples
  accumulation_steps: int   # K sequential steps, M / K microbatches each
  groups: int               # G = M * devices: the noise scale's groups of b examples
  microbatch_size: int      # b = B / G: the noise scale's small batch


def plan_microbatches(batch_size: int, grad_groups: int, accumulation_steps: int,
                      num_devices: int) -> Microbatching:
  """Config fields -> Microbatching; a ConfigError naming the field when they do not fit."""
  if grad_groups < 1:
    raise ConfigError(f"grad_groups={grad_groups} must be >= 1 (1 = no noise-scale groups)")
  if accumulation_steps < 1:
    raise ConfigError(f"accumulation_steps={accumulation_steps} must be >= 1 (1 = no accumulation)")
  if batch_size % num_devices:
    raise ConfigError(f"batch_size={batch_size} is not divisible by the {num_devices}"
                      f" devices: use a multiple of {num_devices}")
  per_device = batch_size // num_devices
  if per_device % accumulation_steps:
    raise ConfigError(f"accumulation_steps={accumulation_steps} does not divide the per-device"
                      f" batch of {per_device} (batch_size={batch_size} / {num_devices} devices): use a"
                      f" divisor of {per_device}")
  per_device_groups = -(-grad_groups // num_devices)
  microbatches = -(-per_device_groups // accumulation_steps) * accumulation_steps
  if per_device % microbatches:
    raise ConfigError(
        f"grad_groups={grad_groups} needs {microbatches} microbatches per device (rounded up to a"
        f" multiple of the {num_devices} devices and of accumulation_steps={accumulation_steps}),"
        f" which do not divide the per-device batch of {per_device}: use a batch_size that is a"
        f" multiple of {microbatches * num_devices}, or fewer grad_groups")
  return Microbatching(per_device_batch=per_device, microbatches=microbatches,
                       accumulation_steps=accumulation_steps, groups=microbatches * num_devices,
                       microbatch_size=per_device // microbatches)


def augment_images(key, images_BxHxWxC, *, crop_padding: int, flip: bool):
  """Random crops from the image zero-padded by `crop_padding` pixels, and left-right flips.

  A pure function of (key, images): the caller folds the step into the key, so a resumed run
  draws the same augmentations. Random bits come from the global batch's shape (threefry is
  partitionable), so they do not depend on the device count either.
  """
  x = images_BxHxWxC
  b, h, w, _ = x.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets_Bx2 = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    x = jax.vmap(crop)(padded, offsets_Bx2)
  if flip:
    flip_B = jax.random.bernoulli(flip_key, 0.5, (b,))
    x = jnp.where(flip_B[:, None, None, None], x[:, :, ::-1], x)
  return x


def _microbatch_loss(apply_fn, params, batch_stats, images_bxX, labels_b):
  logits_bxC, updated = apply_fn({"params": params, "batch_stats": batch_stats}, images_bxX,
                                 train=True, mutable=["batch_stats"])
  loss = cross_entropy_B(logits_bxC, labels_b).mean()
  accuracy = (logits_bxC.argmax(-1) == labels_b).mean()
  return loss, (updated.get("batch_stats", {}), accuracy)


def _add(tree_a, tree_b):
  return jax.tree.map(jnp.add, tree_a, tree_b)


def train_step(state: TrainState, images_BxX, labels_B, augment_key=None, peak_lr=None, *,
               apply_fn: Callable, optimizer: optax.GradientTransformation, lr_fn: optax.Schedule,
               microbatching: Microbatching, mesh, axis: str, crop_padding: int = 0,
               flip: bool = False):
  """One step on a global batch; returns the new state and this step's scalar metrics.

  Only what a train record averages or needs per step: the parameter norm, a reduction over every
  weight as costly as the update itself for small models, is `param_norm`'s, once per chunk.

  With `augment_key`, the batch is augmented first (augment_images) with the key folded with the
  step number. With `peak_lr` (a runtime scalar), `optimizer` and `lr_fn` are built at peak 1
  (`schedule.learning_rate_fn(..., peak=1)`) and the update is scaled by `peak_lr`: every
  optimizer of `make_optimizer` applies its learning rate as a linear factor of the update (LARS's
  momentum trace after it is linear too; tests/test_speed.py checks each), so the trials of an LR
  grid share one compiled step instead of baking their LR in as a constant.
  """
  mb = microbatching
  per_scan_step = mb.microbatches // mb.accumulation_steps
  if augment_key is not None and (crop_padding or flip):
    images_BxX = augment_images(jax.random.fold_in(augment_key, state.step), images_BxX,
                                crop_padding=crop_padding, flip=flip)

  peak_lr = jnp.float32(1.0) if peak_lr is None else peak_lr   # x 1.0 is exact

  def local_step(params, batch_stats, opt_state, peak_lr, images_LxX, labels_L):
    """Runs on each device with its slice of L = B / devices examples; state is replicated."""
    grad_fn = jax.value_and_grad(functools.partial(_microbatch_loss, apply_fn), has_aux=True)

    def microbatches(sums, images_SxX, labels_S):
      """Adds the gradients (and their squared norms) of the per_scan_step microbatches of these
      S examples to `sums`."""
      for x_bxX, y_b in zip(jnp.split(images_SxX, per_scan_step),
                            jnp.split(labels_S, per_scan_step)):
        (loss, (stats, accuracy)), grads = grad_fn(params, batch_stats, x_bxX, y_b)
        # One group (no noise scale): |G_small|^2 = |G_big|^2, computed once below.
        grad_sq = noise_scale.sq_norm(grads) if mb.groups > 1 else scalar
        sums = _add(sums, {"grad": grads, "grad_sq": grad_sq, "loss": loss,
                           "accuracy": accuracy, "batch_stats": stats})
      return sums

    # Sums in float32 at least, whatever the parameters' dtype.
    zeros_like = lambda tree: jax.tree.map(
        lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), tree)
    scalar = jnp.zeros((), jnp.float32)
    zeros = {"grad": zeros_like(params), "grad_sq": scalar, "loss": scalar, "accuracy": scalar,
             "batch_stats": zeros_like(batch_stats)}
    if mb.accumulation_steps == 1:
      sums = microbatches(zeros, images_LxX, labels_L)   # unrolled: fast convolutions on CPU
    else:
      # Sequential: only one scan step's microbatches are alive at a time (memory flat in K).
      # Slices of the device's batch, not a [K, ...] reshape fed as scan inputs: XLA copies those.
      size = mb.per_device_batch // mb.accumulation_steps
      take = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * size, size)
      sums, _ = jax.lax.scan(
          lambda carry, i: (microbatches(carry, take(images_LxX, i), take(labels_L, i)), None),
          zeros, jnp.arange(mb.accumulation_steps))
    # check_vma=False below: everything stays per-device until this explicit all-reduce. On a
    # one-device mesh XLA:CPU would still run it, as a copy of every gradient
    # (benchmarks/README.md: one-device all-reduce).
    if mesh.shape[axis] > 1:
      sums = jax.lax.psum(sums, axis)
    grads, small_grad_sq, big_grad_sq = noise_scale.finish_group_grad_stats(
        sums["grad"], sums["grad_sq"], mb.groups)
    if mb.groups == 1:
      small_grad_sq = big_grad_sq
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (peak_lr * u).astype(u.dtype), updates)
    new_params = optax.apply_updates(params, updates)
    mean = lambda x: x / mb.groups
    new_batch_stats = jax.tree.map(lambda s, old: mean(s).astype(old.dtype), sums["batch_stats"],
                                   batch_stats)
    metrics = {"train/loss": mean(sums["loss"]), "train/accuracy": mean(sums["accuracy"]),
               "grad_norm": jnp.sqrt(big_grad_sq),
               "noise/small_grad_sq": small_grad_sq, "noise/big_grad_sq": big_grad_sq}
    return new_params, new_batch_stats, opt_state, metrics

  params, batch_stats, opt_state, metrics = sharding.data_parallel(
      local_step, mesh, axis, num_replicated=4)(state.params, state.batch_stats, state.opt_state,
                                                peak_lr, images_BxX, labels_B)
  metrics["lr"] = peak_lr * lr_fn(state.step)
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def param_norm(params):
  return jnp.sqrt(noise_scale.sq_norm(params))


def eval_sums(params, batch_stats, images_ExX, labels_E, mask_E, *, apply_fn, pixel_scale):
  """Summed loss, errors and label count over one padded eval chunk (mask marks real examples;
  a sequence model's labels [E, T] count each token); eval-mode BN."""
  logits = apply_fn({"params": params, "batch_stats": batch_stats},
                    images_ExX.astype(jnp.float32) * pixel_scale, train=False)
  mask = mask_like(mask_E, labels_E)
  loss = (cross_entropy_B(logits, labels_E) * mask).sum()
  errors = ((logits.argmax(-1) != labels_E) * mask).sum()
  return loss, errors, mask.sum()
