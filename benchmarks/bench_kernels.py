"""Where a JAX training step loses to PyTorch's on this backend: the kernels, without any loop.

    python3 benchmarks/bench_kernels.py [--batch_sizes=32,128] [--reps=20] [--out=kernels.json]
    python3 benchmarks/bench_kernels.py --tiny      # a smoke run (tests/test_benchmarks.py)

bench_throughput.py compares whole training loops. This times what every loop is made of, the
same work in `jax.jit` and in PyTorch eager mode (float32, the backend's default precision):
  model/mlp, model/cnn   one forward and backward of the models of bench_throughput.py (the
                         gradient of the mean cross-entropy with respect to every weight), no
                         optimizer, no data pipeline;
  conv1                  the CNN's first convolution (1 -> 32 channels, 5x5, 28x28), forward and
                         its kernel's gradient (the images need none);
  conv2                  the second (32 -> 64, 5x5, 14x14), forward and the gradients of its
                         input and kernel;
  dense1                 the CNN's 3136 -> 1024 layer, forward and both gradients.
JAX's layout is flax's NHWC, PyTorch's NCHW (each framework's native one). PyTorch runs in a
spawned child process that alone imports it (imported here it slows XLA:CPU, bench_throughput.py).
Each time is the median of `--reps` timed calls after two warm-up calls. The whole comparison
runs `--repeats` times (JAX, then PyTorch, then JAX, ...); J/T, how many times longer JAX takes, is
the median over repeats of the ratio within a repeat, leaving out repeats that lost more than 10%
of the CPUs to the host's other guests (host_steal.py). Asserts nothing.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import importlib.util  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bench_throughput  # noqa: E402  (the models: one definition for both benchmarks)
from host_steal import STEAL_LIMIT, cpu_ticks, steal_share  # noqa: E402
from scaling import models  # noqa: E402

NUM_CLASSES = 10
KERNELS = ("model/mlp", "model/cnn", "conv1", "conv2", "dense1")


def median_ms(call, reps):
  """Median wall milliseconds of `call()` (which waits for its result) after two warm-ups."""
  call(), call()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def inputs(batch_size, seed=0):
  """Random float images [B, 28, 28, 1] in [0, 1) and labels, the same for both frameworks."""
  rng = np.random.default_rng(seed)
  return (rng.random((batch_size, 28, 28, 1), dtype=np.float32),
          rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32))


# ------------------------------------------------------------------------------------------- JAX

def jax_kernels(batch_size):
  """{kernel: a call that runs it once and waits} in jax.jit."""
  images, labels = inputs(batch_size)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  calls = {}
  for name in ("mlp", "cnn"):
    model = models.build(bench_throughput._ModelConfig(name), NUM_CLASSES)
    params = model.init(jax.random.PRNGKey(0), images[:1], train=False)["params"]
    loss = lambda p, x, y, model=model: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x, train=True), y).mean()
    grad = jax.jit(jax.grad(loss))
    calls[f"model/{name}"] = lambda g=grad, p=params: jax.block_until_ready(g(p, images, labels))

  key = iter(jax.random.split(jax.random.PRNGKey(1), 8))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w1 = jax.random.normal(next(key), (5, 5, 1, 32)) * 0.1
  x2 = jax.random.normal(next(key), (batch_size, 14, 14, 32))
  w2 = jax.random.normal(next(key), (5, 5, 32, 64)) * 0.05
  x3 = jax.random.normal(next(key), (batch_size, 3136))
  w3 = jax.random.normal(next(key), (3136, 1024)) * 0.02
  # The sum of the output's squares: a cotangent as dense as a loss's, one scalar out.
  conv1 = jax.jit(jax.grad(lambda w: jnp.sum(conv(images, w) ** 2)))
  conv2 = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  dense1 = jax.jit(jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), argnums=(0, 1)))
  calls["conv1"] = lambda: jax.block_until_ready(conv1(w1))
  calls["conv2"] = lambda: jax.block_until_ready(conv2(x2, w2))
  calls["dense1"] = lambda: jax.block_until_ready(dense1(x3, w3))
  return calls


# --------------------------------------------------------------------------------------- PyTorch

def torch_kernels(batch_size):
  """{kernel: a call that runs it once and waits} in PyTorch eager mode (NCHW)."""
  import torch
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  images, labels = inputs(batch_size)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  nets = {name: bench_throughput.torch_model(name) for name in ("mlp", "cnn")}
  calls = {}
  for name, net in nets.items():
    net = net.to(device)

    def model_grad(net=net):
      net.zero_grad(set_to_none=True)
      torch.nn.functional.cross_entropy(net(x), y).backward()
      sync()
    calls[f"model/{name}"] = model_grad

  torch.manual_seed(1)
  w1 = (torch.randn(32, 1, 5, 5, device=device) * 0.1).requires_grad_()
  x2 = torch.randn(batch_size, 32, 14, 14, device=device, requires_grad=True)
  w2 = (torch.randn(64, 32, 5, 5, device=device) * 0.05).requires_grad_()
  x3 = torch.randn(batch_size, 3136, device=device, requires_grad=True)
  w3 = (torch.randn(3136, 1024, device=device) * 0.02).requires_grad_()
  conv = torch.nn.functional.conv2d

  def grads(out, wrt):
    torch.autograd.grad((out ** 2).sum(), wrt)
    sync()
  calls["conv1"] = lambda: grads(conv(x, w1, padding=2), (w1,))
  calls["conv2"] = lambda: grads(conv(x2, w2, padding=2), (x2, w2))
  calls["dense1"] = lambda: grads(x3 @ w3, (x3, w3))
  return calls


def torch_times(batch_sizes, reps):
  """In the child process: ({B: {kernel: ms}}, PyTorch's version and thread count)."""
  import torch
  times = {b: {k: median_ms(c, reps) for k, c in torch_kernels(b).items()} for b in batch_sizes}
  return times, {"torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------- the table

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch_sizes", default="32,128")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="")
  p.add_argument("--tiny", action="store_true", help="batch 8, 3 reps, 1 repeat")
  args = p.parse_args(argv)
  if args.tiny:
    args.batch_sizes, args.reps, args.repeats = "8", 3, 1
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  jax_calls = {b: jax_kernels(b) for b in batch_sizes}   # compiled once, timed every repeat
  has_torch = importlib.util.find_spec("torch") is not None
  repeats, torch_info = [], None
  with (multiprocessing.get_context("spawn").Pool(1) if has_torch
        else contextlib.nullcontext()) as pool:
    for _ in range(args.repeats):
      before = cpu_ticks()
      jax_ms = {b: {k: median_ms(c, args.reps) for k, c in jax_calls[b].items()}
                for b in batch_sizes}
      torch_ms, torch_info = (pool.apply(torch_times, (batch_sizes, args.reps)) if has_torch
                              else ({}, None))
      repeats.append({"jax_ms": jax_ms, "torch_ms": torch_ms,
                      "steal": steal_share(before, cpu_ticks())})
  clean = [r for r in repeats if (r["steal"] or 0) <= STEAL_LIMIT]
  print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}; jax {jax.__version__};"
        f" torch {torch_info or 'absent (pip install torch)'}; {len(clean)} of {len(repeats)}"
        f" repeats under {STEAL_LIMIT:.0%} CPU steal (all used if none is): " + ", ".join(
            f"{r['steal']:.0%}" if r["steal"] is not None else "-" for r in repeats))
  print(f"{'kernel':10} {'B':>5} | {'JAX ms':>8} {'torch ms':>8} | {'J/T':>5}")
  clean = clean or repeats
  rows = []
  for b in batch_sizes:
    for k in KERNELS:
      j = statistics.median(r["jax_ms"][b][k] for r in clean)
      t = (statistics.median(r["torch_ms"][b][k] for r in clean) if has_torch else None)
      ratio = (statistics.median(r["jax_ms"][b][k] / r["torch_ms"][b][k] for r in clean)
               if has_torch else None)
      rows.append({"kernel": k, "batch_size": b, "jax_ms": j, "torch_ms": t,
                   "jax_over_torch": ratio})
      print(f"{k:10} {b:>5} | {j:8.2f} " + (f"{t:8.2f} | {ratio:5.2f}" if t else
                                                f"{'-':>8} | {'-':>5}"))
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"backend": jax.default_backend(), "jax": jax.__version__, "torch": torch_info,
                 "args": vars(args), "rows": rows, "repeats": repeats}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
