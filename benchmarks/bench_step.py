"""What the training step's loop structure costs on this backend: scan vs unroll, microbatch styles.

    python benchmarks/bench_step.py [--batch_size=128] [--models=cnn,mlp] [--repeats=3]

Random 28x28x1 inputs (timing only), plain SGD, one device. Prints ratios, asserts nothing:
  1. steps: one jitted SGD step per dispatch vs a lax.scan of K steps (rolled, and unroll=True),
     per step, as a ratio to the single jitted step.
  2. gradients over G groups of B/G (what the noise scale needs): jax.vmap vs lax.map vs an
     unrolled Python loop, as a ratio to the plain full-batch gradient (and the forward pass
     alone, for scale). Stacked [G, ...] gradients are averaged two ways: `g.mean(0)`, and a sum
     of the G slices, since XLA:CPU can be far slower at the first.
  3. scaling.training.step.train_step (shard_map, 1-device mesh) with grad_groups=G vs grad_groups=1: the
     cost of the per-group gradients that give the gradient noise scale for free.
Each time is the median over --repeats of the mean over several calls, after compiling ahead of
time (compile times are printed separately); calls over 5 s are timed once. On a shared CPU the
ratios move by ~10-30%: run it on a quiet machine, or compare only within one run.
"""
import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scaling import sharding
from scaling.measurement import noise_scale
from scaling.models import MLP, SimpleCNN, parameter_count
from scaling.training import step as steplib


def compile_(fn, *args, **jit_kwargs):
  """(compiled executable, compile seconds): tracing + lowering + XLA compilation."""
  start = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  return compiled, time.perf_counter() - start


def seconds_per_call(compiled, args, repeats, min_seconds=0.5, slow_seconds=5.0):
  """Median over `repeats` of the mean call time; each repeat runs >= min_seconds of calls.

  The executable is compiled already, so the first call is a fair sample: a call slower than
  `slow_seconds` (a rolled loop of CNN steps on a busy CPU takes minutes) is timed that once.
  """
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  first = time.perf_counter() - start
  if first > slow_seconds:
    return first
  calls = max(1, int(min_seconds / max(first, 1e-6)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = compiled(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def bench(name, model, batch_size, groups, scan_steps, repeats):
  rng = np.random.default_rng(0)
  x_BxHxWxC = jnp.asarray(rng.uniform(size=(batch_size, 28, 28, 1)), jnp.float32)
  y_B = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
  xs_KxBxHxWxC = jnp.asarray(rng.uniform(size=(scan_steps, batch_size, 28, 28, 1)), jnp.float32)
  ys_KxB = jnp.asarray(rng.integers(0, 10, (scan_steps, batch_size)), jnp.int32)
  params = model.init(jax.random.key(0), x_BxHxWxC[:1], train=False)["params"]
  optimizer = optax.sgd(0.01)
  opt_state = optimizer.init(params)

  def loss(p, x, y):
    return steplib.cross_entropy_B(model.apply({"params": p}, x, train=False), y).mean()

  def sgd_step(p, o, x, y):
    grads = jax.grad(loss)(p, x, y)
    updates, o = optimizer.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  def scan_steps_fn(p, o, xs, ys, unroll):
    def body(carry, xy):
      return sgd_step(*carry, *xy), None
    (p, o), _ = jax.lax.scan(body, (p, o), (xs, ys), unroll=unroll)
    return p, o

  print(f"\n{name}: {parameter_count(params):,} params, batch {batch_size}, "
        f"{jax.devices()[0].device_kind}", flush=True)

  # 1. Steps per dispatch.
  step_c, step_compile = compile_(sgd_step, params, opt_state, x_BxHxWxC, y_B)
  step_s = seconds_per_call(step_c, (params, opt_state, x_BxHxWxC, y_B), repeats)
  print(f"  1 jitted SGD step                    {step_s * 1e3:8.2f} ms/step  1.00 x"
        f"   compile {step_compile:5.2f} s", flush=True)
  for label, unroll in ((f"lax.scan of {scan_steps} steps", 1),
                        (f"lax.scan of {scan_steps}, unroll=True", True)):
    fn = functools.partial(scan_steps_fn, unroll=unroll)
    args = (params, opt_state, xs_KxBxHxWxC, ys_KxB)
    compiled, compile_s = compile_(fn, *args)
    per_step = seconds_per_call(compiled, args, repeats) / scan_steps
    print(f"  {label:<36s} {per_step * 1e3:8.2f} ms/step {per_step / step_s:5.2f} x"
          f"   compile {compile_s:5.2f} s", flush=True)

  # 2. Gradients over G groups: each returns the mean gradient and the mean squared group norm.
  x_GxbxX = x_BxHxWxC.reshape(groups, -1, *x_BxHxWxC.shape[1:])
  y_Gxb = y_B.reshape(groups, -1)
  grad = jax.grad(loss)

  def stats(grads_per_group):
    mean = jax.tree.map(lambda *gs: sum(gs) / groups, *grads_per_group)
    return mean, sum(map(noise_scale.sq_norm, grads_per_group)) / groups

  def stacked_stats(g_G, mean_over_axis):
    """Stacked [G, ...] group gradients -> the same two statistics. `g.mean(0)` is the obvious
    reduction; summing the G slices is the same number by another XLA program."""
    reduce = (lambda g: g.mean(0)) if mean_over_axis else (lambda g: sum(g) / groups)
    return (jax.tree.map(reduce, g_G),
            sum(jnp.sum(g.reshape(groups, -1) ** 2) for g in jax.tree.leaves(g_G)) / groups)

  def full(p, x, y):
    return grad(p, x, y)

  def vmapped(p, x, y, mean_over_axis):
    return stacked_stats(jax.vmap(grad, in_axes=(None, 0, 0))(p, x, y), mean_over_axis)

  def lax_mapped(p, x, y, mean_over_axis):
    return stacked_stats(jax.lax.map(lambda xy: grad(p, *xy), (x, y)), mean_over_axis)

  def python_loop(p, x, y):
    return stats([grad(p, x[i], y[i]) for i in range(groups)])

  full_c, full_compile = compile_(full, params, x_BxHxWxC, y_B)
  full_s = seconds_per_call(full_c, (params, x_BxHxWxC, y_B), repeats)
  print(f"  full-batch gradient                  {full_s * 1e3:8.2f} ms      1.00 x"
        f"   compile {full_compile:5.2f} s", flush=True)
  forward_c, forward_compile = compile_(lambda p, x: model.apply({"params": p}, x, train=False),
                                        params, x_BxHxWxC)
  forward_s = seconds_per_call(forward_c, (params, x_BxHxWxC), repeats)
  print(f"  forward pass only                    {forward_s * 1e3:8.2f} ms     {forward_s / full_s:5.2f} x"
        f"   compile {forward_compile:5.2f} s", flush=True)
  for label, fn in ((f"vmap over {groups}, g.mean(0)", functools.partial(vmapped, mean_over_axis=True)),
                    (f"vmap over {groups}, sum of slices", functools.partial(vmapped, mean_over_axis=False)),
                    (f"lax.map over {groups}, g.mean(0)", functools.partial(lax_mapped, mean_over_axis=True)),
                    (f"lax.map over {groups}, sum of slices", functools.partial(lax_mapped, mean_over_axis=False)),
                    (f"Python loop, {groups} microbatches", python_loop)):
    compiled, compile_s = compile_(fn, params, x_GxbxX, y_Gxb)
    seconds = seconds_per_call(compiled, (params, x_GxbxX, y_Gxb), repeats)
    print(f"  {label:<36s} {seconds * 1e3:8.2f} ms     {seconds / full_s:5.2f} x"
          f"   compile {compile_s:5.2f} s", flush=True)

  # 3. The real train step (shard_map on a 1-device mesh): grad_groups=G vs the plain step.
  mesh = sharding.make_mesh(1)
  state = steplib.init_state(model, optimizer, jax.random.key(0), (28, 28, 1))
  state = jax.device_put(state, sharding.replicated(mesh))
  x, y = jax.device_put((x_BxHxWxC, y_B), sharding.batch_sharded(mesh))
  results = {}
  for g in (1, groups):
    fn = functools.partial(steplib.train_step, apply_fn=model.apply, optimizer=optimizer,
                           lr_fn=optax.constant_schedule(0.01), mesh=mesh,
                           microbatching=steplib.plan_microbatches(len(y_B), g, 1, 1),
                           axis=sharding.DATA)
    compiled, compile_s = compile_(fn, state, x, y)
    results[g] = seconds_per_call(compiled, (state, x, y), repeats)
    label = "train_step, grad_groups=1 (plain)" if g == 1 else f"train_step, grad_groups={g}"
    print(f"  {label:<36s} {results[g] * 1e3:8.2f} ms/step {results[g] / results[1]:5.2f} x"
          f"   compile {compile_s:5.2f} s", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--groups", type=int, default=8)
  parser.add_argument("--scan_steps", type=int, default=10)
  parser.add_argument("--models", default="cnn,mlp")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  models = {"cnn": ("Shallue simple CNN", SimpleCNN(10)),
            "mlp": ("MLP 784-512-512-10", MLP((512, 512), 10))}
  for name in args.models.split(","):
    bench(*models[name], args.batch_size, args.groups, args.scan_steps, args.repeats)


if __name__ == "__main__":
  main()
