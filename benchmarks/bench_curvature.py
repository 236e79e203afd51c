"""Cost of each curvature metric in units of one jitted gradient, on MNIST-sized models.

    python benchmarks/bench_curvature.py [--batch_size=1024] [--models=mlp,cnn] [--repeats=3]
                                         [--rolled_probe_cnn]

Random 28x28 inputs (timing only). Every function is compiled ahead (.lower().compile(), its
compile time printed), then each ratio is the median over rounds of (metric time / median of 3
gradient times right before it), so load from other processes mostly cancels
(curvature.relative_cost). On CPU the CNN runs the loops unrolled: see "XLA:CPU and
convolutions" in scaling/measurement/curvature.py; --rolled_probe_cnn times one probe inside lax.map to show
why (~77 gradients, about 20 minutes at batch 1024 on 2 cores).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from scaling.measurement import curvature as cv
from scaling.measurement import noise_scale as ns
from scaling.models import MLP, SimpleCNN, parameter_count


def bench(name, model, batch_size, repeats, unroll, rolled_probe):
  rng = np.random.default_rng(0)
  x_BxHxWxC = jnp.asarray(rng.uniform(size=(batch_size, 28, 28, 1)), jnp.float32)
  y_B = jnp.asarray(rng.integers(0, 10, batch_size))
  params = model.init(jax.random.key(0), x_BxHxWxC[:1], train=False)["params"]
  v, key, groups = cv.rademacher_like(jax.random.key(1), params), jax.random.key(2), 8

  def loss(p, x, y):
    logits_BxC = model.apply({"params": p}, x, train=False)
    label_logit_B = jnp.take_along_axis(logits_BxC, y[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits_BxC, -1) - label_logit_B)

  def compiled(fn, *args):  # compile ahead, so the timed calls are the only calls
    start = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return (lambda: exe(*args)), time.perf_counter() - start

  def metric(fn):  # fn(loss_fn, params, v), jitted with the batch as an argument; built lazily
    return lambda: compiled(lambda p, x, y, v: fn(lambda q: loss(q, x, y), p, v),
                            params, x_BxHxWxC, y_B, v)

  def group_stats(p, x, y):  # what the training step does for the noise scale
    grads_GxP = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
        p, x.reshape(groups, -1, *x.shape[1:]), y.reshape(groups, -1))
    return ns.group_grad_stats(grads_GxP)

  probes = lambda num, unroll: metric(
      lambda f, p, v: cv.hutchinson_probes(f, p, key, 0, num, unroll=unroll))
  cases = [  # (label, divide by, builder of a compiled thunk)
      ("hvp fwd-over-rev", 1, metric(lambda f, p, v: cv.hvp(f, p, v, "fwd_rev"))),
      ("hvp rev-over-rev", 1, metric(lambda f, p, v: cv.hvp(f, p, v, "rev_rev"))),
      (f"hutchinson, 10-probe chunk / 10 (unroll={unroll})", 10, probes(10, unroll)),
      (f"lanczos, 20 steps (unroll={unroll})", 1,
       metric(lambda f, p, v: cv.top_eigenvalues(f, p, v, num_steps=20, unroll=unroll))),
      (f"eps-sharpness, 10 steps (unroll={unroll})", 1,
       metric(lambda f, p, v: cv.epsilon_sharpness(f, p, num_steps=10, unroll=unroll))),
      (f"per-group grads + stats (G={groups})", 1,
       lambda: compiled(group_stats, params, x_BxHxWxC, y_B)),
  ]
  if rolled_probe or not unroll:
    cases.insert(2, ("hutchinson, 1 probe in a rolled loop (lax.map)", 1, probes(1, False)))
  if not unroll:  # a while_loop with no unroll: ~20-40x slower per step for a CNN on CPU
    cases.insert(5, ("power iteration, 20 steps", 1, metric(
        lambda f, p, v: cv.power_iteration(f, p, v, max_steps=20, tol=0.0))))

  grad, _ = compiled(jax.grad(loss), params, x_BxHxWxC, y_B)
  grad_s = cv.time_call(grad, 3, warmup=False)
  print(f"\n{name}: {parameter_count(params):,} params, batch {batch_size}, one gradient "
        f"{grad_s * 1e3:.0f} ms ({jax.devices()[0].device_kind})", flush=True)
  for label, divisor, build in cases:
    thunk, compile_s = build()
    ratio = cv.relative_cost(thunk, grad, repeats, warmup=False) / divisor
    print(f"  {label:<50s} {ratio:6.2f} x grad   (compile {compile_s:5.1f} s)", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=1024)
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--rolled_probe_cnn", action="store_true")
  args = parser.parse_args()
  models = {"mlp": ("MLP 784-512-512-10", MLP((512, 512), 10), False),
            "cnn": ("Shallue simple CNN", SimpleCNN(10), jax.default_backend() == "cpu")}
  for name in args.models.split(","):
    title, model, unroll = models[name]
    bench(title, model, args.batch_size, args.repeats, unroll, args.rolled_probe_cnn)


if __name__ == "__main__":
  main()
