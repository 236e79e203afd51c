"""Checkpoint save and restore times for the default MNIST trial (configs/mnist.py: the simple CNN,
~3.3M params, momentum SGD, params + momentum: 25 MiB of float32).

    python benchmarks/bench_checkpoint.py [--repeats=5] [--dir=/tmp/bench_checkpoint] [--num_devices=0]

For asynchronous and synchronous Orbax saves it prints the median time the training loop is
blocked by `save()`, the median time until the save is on disk, the checkpoint's size, and the
median time of `restore_latest` (what a resumed trial waits for). The first save and restore are
timed too but not in the medians: they include Orbax's one-time setup.
"""
import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time

import jax
import ml_collections
import optax

from scaling import models, sharding
from scaling.training import checkpoint, record, step as steplib


def directory_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names) / 2**20


def bench(directory, state, abstract_state, book, repeats, asynchronous):
  shutil.rmtree(directory, ignore_errors=True)
  ckpts = checkpoint.Checkpoints(directory, keep=2, asynchronous=asynchronous)
  blocked, on_disk = [], []
  for step in range(1, repeats + 2):
    start = time.perf_counter()
    ckpts.save(step, state, book)
    blocked.append(time.perf_counter() - start)
    ckpts.wait()
    on_disk.append(time.perf_counter() - start)
  size = directory_mb(os.path.join(directory, str(repeats + 1)))
  ckpts.close()
  restored = []
  for _ in range(repeats + 1):
    ckpts = checkpoint.Checkpoints(directory, keep=2)
    start = time.perf_counter()
    ckpts.restore_latest(abstract_state)
    restored.append(time.perf_counter() - start)
    ckpts.close()
  shutil.rmtree(directory)
  median = lambda xs: statistics.median(xs[1:])
  row = ("async" if asynchronous else "sync", f"{size:.1f}", *(f"{t:.3f}" for t in (
      blocked[0], median(blocked), median(on_disk), restored[0], median(restored))))
  print("".join(f"{x:>14}" for x in row), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench_checkpoint"))
  parser.add_argument("--num_devices", type=int, default=0, help="0 = every visible device")
  args = parser.parse_args()

  mesh = sharding.make_mesh(args.num_devices)
  model = models.SimpleCNN(num_classes=10)          # configs/mnist.py's model and optimizer;
  optimizer = optax.sgd(0.1, momentum=0.9)          # the LR does not change the state
  init = functools.partial(steplib.init_state, model, optimizer, image_shape=(28, 28, 1))
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  # A trained state's momentum is not all zeros: Orbax compresses, so sizes would flatter.
  noise = lambda x, k: x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
  state = state.replace(opt_state=jax.tree.map(
      lambda x: noise(x, jax.random.PRNGKey(x.size)) if x.dtype == "float32" else x, state.opt_state))
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  print(f"simple CNN: {models.parameter_count(state.params):,} params, momentum SGD,"
        f" {mesh.size} device(s) ({jax.devices()[0].platform}), {args.dir}")
  print("".join(f"{x:>14}" for x in ("mode", "MB on disk", "1st save s", "save blocks s",
                                      "save done s", "1st restore s", "restore s")))
  book = record.TrialRecord.new(ml_collections.ConfigDict(
      {"target": {"metric": "valid/error", "value": 0.01, "stop_at_target": False}})).as_dict()
  for asynchronous in (True, False):
    bench(args.dir, state, abstract_state, book, args.repeats, asynchronous)


if __name__ == "__main__":
  main()
