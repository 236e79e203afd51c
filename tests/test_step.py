"""The training step: microbatch plans, accumulation = one big batch, noise-scale statistics
against per-group ground truth, flat memory in K, on-device augmentation, 1 vs 8 devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling import sharding
from scaling.config import ConfigError
from scaling.measurement import noise_scale
from scaling.models.mlp import MLP
from scaling.models.resnet import ResNet
from scaling.training import step as steplib

LR = 0.1


@pytest.mark.parametrize("batch, groups, accumulation, devices, expected", [
    # (microbatches per device, groups in use, microbatch size)
    (128, 8, 1, 1, (8, 8, 16)),
    (128, 8, 1, 8, (1, 8, 16)),
    (32, 2, 1, 8, (1, 8, 4)),      # configs/mnist_sweep.py on 8 devices: rounded up to 8 groups
    (32, 2, 1, 4, (1, 4, 8)),
    (32, 2, 1, 1, (2, 2, 16)),
    (64, 1, 4, 1, (4, 4, 16)),     # accumulation alone also gives groups
    (96, 8, 3, 2, (6, 12, 8)),     # 4 groups per device rounded up to a multiple of K=3
])
def test_microbatch_plan(batch, groups, accumulation, devices, expected):
  mb = steplib.plan_microbatches(batch, groups, accumulation, devices)
  assert (mb.microbatches, mb.groups, mb.microbatch_size) == expected
  assert mb.microbatch_size * mb.groups == batch and mb.microbatches % accumulation == 0


@pytest.mark.parametrize("batch, groups, accumulation, devices, field", [
    (64, 1, 3, 1, "accumulation_steps=3"),
    (64, 1, 0, 1, "accumulation_steps=0"),
    (60, 1, 1, 8, "batch_size=60"),
    (48, 32, 1, 1, "grad_groups=32"),
    (48, 0, 1, 1, "grad_groups=0"),
])
def test_microbatch_plan_errors_name_the_field(batch, groups, accumulation, devices, field):
  with pytest.raises(ConfigError, match=field) as error:
    steplib.plan_microbatches(batch, groups, accumulation, devices)
  assert "\n" not in str(error.value)


def _setup(model, batch, groups, accumulation, num_devices=1, image_shape=(8, 8, 1), seed=0):
  mesh = sharding.make_mesh(num_devices)
  optimizer = optax.sgd(LR)
  init = jax.jit(functools.partial(steplib.init_state, model, optimizer, image_shape=image_shape))
  state = init(jax.random.key(seed))   # jitted: an eager ResNet init compiles op by op (minutes)
  step = jax.jit(functools.partial(
      steplib.train_step, apply_fn=model.apply, optimizer=optimizer,
      lr_fn=optax.constant_schedule(LR), mesh=mesh, axis=sharding.DATA,
      microbatching=steplib.plan_microbatches(batch, groups, accumulation, num_devices)))
  return mesh, sharding.put_replicated(state, mesh), step


def _batch(batch, image_shape=(8, 8, 1), seed=1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, *image_shape)).astype(np.float32),
          rng.integers(0, 10, batch).astype(np.int32))


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_accumulation_gives_the_update_of_one_big_batch():
  """No BN: K sequential microbatches, unrolled groups, and their mix all take the step of the
  plain full-batch gradient, to float32 rounding of sums over 64 examples (rtol 1e-5) and of
  the parameters themselves."""
  model, batch = MLP((32,), 10, False), 64
  images, labels = _batch(batch)
  mesh, state, _ = _setup(model, batch, 1, 1)
  loss = lambda p: steplib.cross_entropy_B(model.apply({"params": p}, images, train=True),
                                           labels).mean()
  grads = jax.grad(loss)(state.params)
  for groups, accumulation in ((1, 1), (1, 8), (8, 1), (8, 4), (4, 4)):
    _, state, step = _setup(model, batch, groups, accumulation)
    new_state, metrics = step(state, *sharding.put_batch((images, labels), mesh))
    update = jax.tree.map(lambda new, old: (old - new) / LR, new_state.params, state.params)
    # (old - new) / LR carries the rounding of the parameters: one ulp of |old| over LR.
    ulp = lambda p: 2 * np.finfo(np.float32).eps * np.max(np.abs(p)) / LR
    jax.tree.map(lambda u, g, p: np.testing.assert_allclose(u, g, rtol=1e-5, atol=ulp(p)),
                 update, grads, state.params)
    assert float(metrics["train/loss"]) == pytest.approx(float(loss(state.params)), rel=1e-6)


@pytest.mark.parametrize("num_devices, accumulation", [(1, 1), (1, 4), (8, 1), (8, 2)])
def test_noise_statistics_match_per_group_truth(num_devices, accumulation):
  """small_grad_sq = mean over the G groups of |g_i|^2 and big_grad_sq = |mean g_i|^2, each g_i
  computed on its own here and summed in float64 (float32 agreement: rtol 1e-5)."""
  model, batch, groups = MLP((32,), 10, False), 128, 16
  images, labels = _batch(batch)
  mesh, state, step = _setup(model, batch, groups, accumulation, num_devices)
  mb = steplib.plan_microbatches(batch, groups, accumulation, num_devices)
  _, metrics = step(state, *sharding.put_batch((images, labels), mesh))
  loss = lambda p, x, y: steplib.cross_entropy_B(model.apply({"params": p}, x, train=True),
                                                 y).mean()
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)
  size = mb.microbatch_size
  grads_GxP = np.stack([flat(jax.grad(loss)(state.params, images[i:i + size], labels[i:i + size]))
                        for i in range(0, batch, size)])
  assert len(grads_GxP) == mb.groups == 16
  small = np.mean(np.sum(grads_GxP ** 2, axis=1))
  big = np.sum(grads_GxP.mean(0) ** 2)
  assert float(metrics["noise/small_grad_sq"]) == pytest.approx(small, rel=1e-5)
  assert float(metrics["noise/big_grad_sq"]) == pytest.approx(big, rel=1e-5)


def test_squared_norms_are_elementwise_not_dot_products():
  """jnp.vdot/dot at default precision is TF32 on recent GPUs and bf16 passes on TPUs."""
  tree = {"a": jnp.ones((3, 4)), "b": jnp.ones(5)}
  jaxpr = str(jax.make_jaxpr(noise_scale.sq_norm)(tree))
  assert "dot_general" not in jaxpr and float(noise_scale.sq_norm(tree)) == 17.0
  bf16 = {"a": jnp.full((1000,), 1.001, jnp.bfloat16)}   # squares summed in float32, not bf16
  assert noise_scale.sq_norm(bf16).dtype == jnp.float32
  assert float(noise_scale.sq_norm(bf16)) == pytest.approx(1000 * float(bf16["a"][0]) ** 2, rel=1e-6)


def _temp_bytes(model, batch, groups, accumulation):
  mesh, state, step = _setup(model, batch, groups, accumulation, image_shape=(28, 28, 1))
  args = (jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))
  return step.lower(state, *args).compile().memory_analysis().temp_size_in_bytes


def test_accumulation_memory_is_flat_in_the_number_of_microbatches():
  """XLA's compiled memory analysis (buffers besides arguments and outputs), microbatch 256.
  Measured on XLA:CPU: K=4 and K=16 both ~4.0 MB; one batch of 256 1.6 MB (2.7 MB while the
  one-device step still ran an all-reduce, a copy of the gradients), of 4096 ~33 MB."""
  model, micro = MLP((512, 512), 10, False), 256
  accumulated = {k: _temp_bytes(model, micro * k, k, k) for k in (4, 16)}
  plain = {k: _temp_bytes(model, micro * k, 1, 1) for k in (1, 16)}
  param_bytes = 4 * (784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10)
  assert accumulated[16] < 1.1 * accumulated[4]         # flat in K
  # One microbatch's step and the scan's running gradient sum (one more set of gradients).
  assert accumulated[16] < plain[1] + 1.25 * param_bytes
  assert plain[16] > 8 * plain[1]                       # grows with the batch without accumulation


def test_augmentation_crops_flips_and_is_a_function_of_key_and_step():
  images = jnp.arange(4 * 6 * 6, dtype=jnp.float32).reshape(4, 6, 6, 1) + 1
  key = jax.random.key(0)
  crop = functools.partial(steplib.augment_images, crop_padding=2, flip=False)
  out = crop(key, images)
  np.testing.assert_array_equal(out, crop(key, images))             # deterministic
  assert not np.array_equal(out, crop(jax.random.fold_in(key, 1), images))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(4):   # every output is some 6x6 window of the zero-padded image
    windows = [padded[i, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
    assert any(np.array_equal(out[i], w) for w in windows)
  flipped = steplib.augment_images(key, images, crop_padding=0, flip=True)
  for i in range(4):
    assert (np.array_equal(flipped[i], images[i])
            or np.array_equal(flipped[i], images[i, :, ::-1]))
  # The same draws on 8 devices as on 1 (threefry is partitionable).
  mesh = sharding.make_mesh(8)
  sharded = jax.jit(crop)(key, sharding.put_batch(np.asarray(images).repeat(2, 0), mesh))
  np.testing.assert_array_equal(sharded, jax.jit(crop)(key, np.asarray(images).repeat(2, 0)))


@pytest.mark.heavy
def test_one_resnet_step_agrees_on_one_and_eight_devices():
  """Ghost BN over 8 examples, 8 groups of 16: the same groups on 1 device (8 sequential
  microbatches: one ResNet to compile, not 8 unrolled) and on 8 (one group each), so only the
  order of the sums differs: float32 rounding (rtol 1e-5 on a step of SGD). Heavy tier: two
  ResNet compilations, most of a minute (tests/test_configs.py trains a ResNet on 8 devices)."""
  model, batch = ResNet(10, depth=8, width=8, ghost_batch_size=8), 128
  images, labels = _batch(batch, (12, 12, 1))
  results = []
  for devices, accumulation in ((1, 8), (8, 1)):
    mesh, state, step = _setup(model, batch, 8, accumulation, devices, image_shape=(12, 12, 1))
    results.append(jax.device_get(step(state, *sharding.put_batch((images, labels), mesh))))
  (one, m1), (eight, m8) = results
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               (one.params, one.batch_stats), (eight.params, eight.batch_stats))
  for key in ("train/loss", "noise/small_grad_sq", "noise/big_grad_sq"):
    assert float(m1[key]) == pytest.approx(float(m8[key]), rel=1e-5), key
