"""Training throughput of a real trial through the framework against a bare JAX loop and PyTorch.

    python benchmarks/bench_throughput.py [--models=mlp,cnn] [--batch_sizes=32,128,1024,8192]
        [--train_size=60000] [--segment_examples=30000] [--segments=5] [--chunk_steps=16]
        [--out=benchmarks/throughput.json]
    python benchmarks/bench_throughput.py --tiny    # a smoke run, tests/test_benchmarks.py

For each model (the MLP 784-512-512-10 and Shallue's CNN, from scaling.models) and batch size B it
trains, in one process, one after the other, with momentum SGD (lr 0.01, momentum 0.9; constant LR
for the hand-written loops; the framework's warmup is off and its LR rule 'none'):
  F   a real trial: `scaling.training.train.run(config, workdir)` on configs/mnist.py with grad_groups=1,
      curvature off, no periodic checkpoints, an evaluation (valid 5k, test 10k, train_eval 5k)
      after every segment. Steady-state examples/s is the median of the `examples_per_sec` that
      metrics.jsonl logs per segment, without the first segment (it includes compilation). Also
      the trial's whole wall time: data placement, state init, compilation, evaluations and the
      final checkpoint (the process's imports are printed once, separately).
  J   a minimal hand-written loop: `jax.jit` of a `lax.scan` over `chunk_steps` steps, the data on
      the device, a per-epoch permutation (carried between chunks) and a gather per batch (as the
      framework does), the same model and optax optimizer, the loss fetched once per segment.
  T1  PyTorch as tutorials show it: TensorDataset of float32 host tensors + DataLoader(shuffle=True,
      drop_last=True), each batch moved `.to(device)`, zero_grad / backward / SGD(momentum) step.
  T2  PyTorch with the uint8 data on the device and a manual per-epoch `randperm` + index per batch.
T1 and T2 run only when PyTorch is installed: an optional benchmark dependency, never in
requirements.txt (`pip install torch`). Each runs in a child process of its own: imported into this
one, PyTorch slowed XLA:CPU's F and J by 1.2-1.9x on the 2-core machine of benchmarks/README.md. Every method times `--segments` segments of the same number
of steps (about --segment_examples examples, a multiple of chunk_steps), synchronises at the end of
each, and reports the median examples/s of all but the first.

The data are random uint8 images of MNIST's shape with random labels (timing only: the losses mean
nothing), injected into the framework trial by replacing `scaling.training.train.load_data` in this process.
The persistent compilation cache (set by scaling.main) is not used here: compile times are real.
At the largest batch size of each model it also reports the FLOPs of one training step from XLA's
cost analysis of J's step as lowered (F adds only scalar metrics; see `step_flops` for why not the
compiled step's), the achieved TFLOP/s of F and J, and, with --peak_tflops, the model FLOPs
utilisation (MFU) against that peak. On GPUs XLA's default float32 precision uses TF32 for matmuls
and convolutions (PyTorch's default: TF32 for convolutions only), so the peak to use there is
TF32's (benchmarks/gpu.sh measures both precisions on a matmul first).

Every row runs its methods `--repeats` times, interleaved (F J T1 T2, F J T1 T2, ...): a method's
rate is the median over repeats, and F/J, F/T1, F/T2 are medians of the ratios within each repeat,
leaving out repeats with over 10% CPU steal (`paired_ratio`: a shared host's speed drifts). Prints one table and writes
everything as JSON to --out. Asserts nothing: compare numbers within one run.
"""
import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from scaling import models  # noqa: E402
from host_steal import STEAL_LIMIT, cpu_ticks, steal_share  # noqa: E402

try:   # The framework trial needs the whole stack (TFDS, tensorboardX, ...); J and T do not.
  from configs import mnist as mnist_config
  from scaling import data as data_lib
  from scaling.training import train as train_lib
  FRAMEWORK_ERROR = None
except ImportError as error:
  FRAMEWORK_ERROR = f"{type(error).__name__}: {error}"

# PyTorch is found, not imported: T1 and T2 import it in their own process (torch_in_child).
TORCH_VERSION = (importlib.metadata.version("torch") if importlib.util.find_spec("torch")
                 else None)

IMPORT_SECONDS = time.perf_counter() - _START
LR, MOMENTUM = 0.01, 0.9
IMAGE_SHAPE = (28, 28, 1)


def random_data(num_train, num_valid, num_test, seed=0):
  """uint8 images of MNIST's shape and random labels in 0..9: the work per step is MNIST's."""
  rng = np.random.default_rng(seed)
  make = lambda n: (rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
                    rng.integers(0, 10, n).astype(np.int32))
  return make(num_train), make(num_valid), make(num_test)


def segment_steps(batch_size, args):
  steps = max(1, math.ceil(args.segment_examples / batch_size))
  return math.ceil(steps / args.chunk_steps) * args.chunk_steps


def unroll_for(model_name, args) -> bool:
  if args.unroll != "auto":
    return args.unroll == "true"
  # XLA:CPU runs convolutions inside loops ~10x slower than unrolled (configs/mnist.py).
  return model_name == "cnn" and jax.default_backend() == "cpu"


def steady_rate(rates_per_segment):
  """Median of every segment but the first (which includes compilation)."""
  steady = rates_per_segment[1:] or rates_per_segment
  return statistics.median(steady) if steady else None


# ----------------------------------------------------------------------------------- F: framework

def framework_config(model_name, batch_size, steps, args):
  config = mnist_config.get_config()
  config.model.name = model_name
  config.model.widths = (512, 512)
  config.batch_size = batch_size
  config.base_lr, config.lr_rule = LR, "none"   # random labels: no LR that might diverge
  config.optimizer.name, config.optimizer.momentum = "momentum", MOMENTUM
  config.warmup.length = 0.0
  config.budget.unit, config.budget.length = "steps", float(steps * args.segments)
  config.eval_every.unit, config.eval_every.length = "steps", float(steps)
  config.log_every_steps = steps                # one train record (one rate) per segment
  config.train_eval_size = args.eval_size
  config.num_devices = 1
  config.grad_groups = 1
  config.chunk_steps = args.chunk_steps
  config.chunk_unroll = unroll_for(model_name, args)
  config.curvature.enabled = False
  config.checkpoint.every_steps = 0             # only the final checkpoint
  return config


@contextlib.contextmanager
def injected_data(splits):
  """`scaling.training.train.run` loads its data through `train.load_data`: hand it `splits` instead."""
  original = train_lib.load_data
  train_lib.load_data = lambda dataset: splits
  try:
    yield
  finally:
    train_lib.load_data = original


def run_framework(model_name, batch_size, dataset, args):
  (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = dataset
  splits = data_lib.Splits(train_images=train_x, train_labels=train_y, valid_images=valid_x,
                           valid_labels=valid_y, test_images=test_x, test_labels=test_y,
                           num_classes=10, pixel_scale=1 / 255, name="random")
  steps = segment_steps(batch_size, args)
  config = framework_config(model_name, batch_size, steps, args)
  workdir = tempfile.mkdtemp(prefix=f"bench_throughput_{model_name}_{batch_size}_")
  try:
    with injected_data(splits), open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
      start = time.perf_counter()
      summary = train_lib.run(config, workdir)
      wall = time.perf_counter() - start
    rates = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        record = json.loads(line)
        if "examples_per_sec" in record:   # every record of a segment carries that segment's rate
          rates.setdefault((record["step"] - 1) // steps, record["examples_per_sec"])
  finally:
    if not args.keep_workdirs:
      shutil.rmtree(workdir, ignore_errors=True)
  per_segment = [rates[k] for k in sorted(rates)]
  return {"examples_per_sec": steady_rate(per_segment), "segments": per_segment,
          "trial_wall_s": wall, "status": summary["status"], "steps_per_segment": steps}


# ------------------------------------------------------------------------ J: hand-written JAX loop

def jax_loop(model_name, batch_size, dataset, args):
  (train_x, train_y), _, _ = dataset
  model = models.build(_ModelConfig(model_name), 10)
  optimizer = optax.sgd(LR, momentum=MOMENTUM)
  n = len(train_y)
  steps_per_epoch = n // batch_size
  steps = segment_steps(batch_size, args)

  def loss_fn(params, images_BxX, labels_B):
    logits_BxC = model.apply({"params": params}, images_BxX, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B).mean()

  def sgd_step(params, opt_state, images_BxX, labels_B):
    loss, grads = jax.value_and_grad(loss_fn)(params, images_BxX, labels_B)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def epoch_order(key, epoch):
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)

  def chunk(params, opt_state, step, order_N, images_NxX, labels_N, key):
    def body(carry, _):
      params, opt_state, step, order_N = carry
      pos = step % steps_per_epoch
      order_N = jax.lax.cond(pos == 0, lambda: epoch_order(key, step // steps_per_epoch),
                             lambda: order_N)
      idx_B = jax.lax.dynamic_slice_in_dim(order_N, pos * batch_size, batch_size)
      images_BxX = images_NxX[idx_B].astype(jnp.float32) / 255
      params, opt_state, loss = sgd_step(params, opt_state, images_BxX, labels_N[idx_B])
      return (params, opt_state, step + 1, order_N), loss

    # The epoch's order is carried from chunk to chunk, shuffled only when an epoch starts (as
    # the framework's chunk.CarriedOrder does): a permutation of the whole training set at every
    # chunk's start would cost J as much as ~8 steps at small batches.
    (params, opt_state, step, order_N), losses_K = jax.lax.scan(
        body, (params, opt_state, step, order_N), None, length=args.chunk_steps,
        unroll=unroll_for(model_name, args))
    return params, opt_state, step, order_N, losses_K

  images, labels = jax.device_put(train_x), jax.device_put(train_y)
  key = jax.random.PRNGKey(1)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False)["params"]
  opt_state = optimizer.init(params)
  step = jnp.zeros((), jnp.int32)
  order_N = jax.jit(epoch_order)(key, 0)
  start = time.perf_counter()
  chunk_fn = jax.jit(chunk, donate_argnums=(0, 1, 3)).lower(
      params, opt_state, step, order_N, images, labels, key).compile()
  compile_s = time.perf_counter() - start

  per_segment = []
  for _ in range(args.segments):
    start, losses = time.perf_counter(), []
    for _ in range(steps // args.chunk_steps):
      params, opt_state, step, order_N, losses_K = chunk_fn(params, opt_state, step, order_N,
                                                            images, labels, key)
      losses.append(losses_K)
    jax.device_get(losses)      # the framework fetches its per-step metrics once per segment too
    per_segment.append(steps * batch_size / (time.perf_counter() - start))

  flops, compiled_flops = step_flops(sgd_step, params, opt_state, batch_size)
  return {"examples_per_sec": steady_rate(per_segment), "segments": per_segment,
          "compile_s": compile_s, "step_flops": flops, "compiled_step_flops": compiled_flops,
          "num_params": models.parameter_count(params)}


def step_flops(sgd_step, params, opt_state, batch_size):
  """FLOPs of one training step by XLA's cost analysis: (the step as written, the compiled step).

  One step, not the scanned chunk (a loop's cost would be that of one body). The first number is
  the analysis of the lowered (unoptimised) HLO and is what the MFU uses: on GPU the compiled
  module hands matmuls and convolutions to cuBLAS/cuDNN custom calls, which its analysis does not
  count (measured on an H200: 4.6 of 26.3 GFLOP for the MLP at B=8192, 5.0 of 592 for the CNN).
  """
  x = jax.ShapeDtypeStruct((batch_size, *IMAGE_SHAPE), jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  lowered = jax.jit(sgd_step).lower(params, opt_state, x, y)

  def flops(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", math.nan)) if cost else math.nan
  return flops(lowered.cost_analysis()), flops(lowered.compile().cost_analysis())


class _ModelConfig:
  """The fields of config.model that models.build reads, for the hand-written loop."""

  def __init__(self, name):
    self.name, self.widths, self.batch_norm = name, (512, 512), False


# ------------------------------------------------------------------------------------ T: PyTorch

def torch_model(model_name):
  import torch
  nn = torch.nn
  if model_name == "mlp":
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, 10))
  return nn.Sequential(   # Shallue's CNN: what scaling/models/cnn.py builds, in NCHW
      nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, 10))


def torch_loop(model_name, batch_size, dataset, args, manual):
  import torch
  (train_x, train_y), _, _ = dataset
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  model = torch_model(model_name).to(device)
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  images_NCHW = torch.from_numpy(train_x).permute(0, 3, 1, 2).contiguous()
  labels_N = torch.from_numpy(train_y.astype(np.int64))
  steps = segment_steps(batch_size, args)

  def batches_tutorial():
    dataset = torch.utils.data.TensorDataset(images_NCHW.float() / 255, labels_N)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         drop_last=True)
    while True:
      for x, y in loader:
        yield x.to(device), y.to(device)

  def batches_manual():
    images, labels = images_NCHW.to(device), labels_N.to(device)
    n = len(labels)
    while True:
      order = torch.randperm(n, device=device)
      for pos in range(n // batch_size):
        idx = order[pos * batch_size:(pos + 1) * batch_size]
        yield images[idx].float().div_(255), labels[idx]

  batches = batches_manual() if manual else batches_tutorial()
  per_segment = []
  for _ in range(args.segments):
    start = time.perf_counter()
    for _ in range(steps):
      x, y = next(batches)
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(x), y)
      loss.backward()
      optimizer.step()
    loss.item()   # waits for the device
    per_segment.append(steps * batch_size / (time.perf_counter() - start))
  return {"examples_per_sec": steady_rate(per_segment), "segments": per_segment,
          "torch_settings": torch_settings()}


def torch_in_child(model_name, batch_size, dataset, args, manual):
  """torch_loop in a fresh (spawned) process, which imports PyTorch; this one never does."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(torch_loop, (model_name, batch_size, dataset, args, manual))


# ------------------------------------------------------------------------------------- the table

def paired_ratio(runs, a, b):
  """Median over repeats of (a's rate / b's rate) within each repeat, over the repeats where
  neither run lost more than STEAL_LIMIT of the CPUs to other guests (all repeats if none is that
  clean). A shared host's speed drifts by up to 3x over minutes (up to 40% CPU steal seen here):
  methods run one after another, so rates measured in one repeat, minutes apart at most, are what
  can be compared, and the median drops a repeat that a slow spell split."""
  pairs = [(ra["examples_per_sec"] / rb["examples_per_sec"],
            max(ra.get("steal") or 0, rb.get("steal") or 0))
           for ra, rb in zip(runs.get(a, []), runs.get(b, []))
           if ra.get("examples_per_sec") and rb.get("examples_per_sec")]
  clean = [r for r, steal in pairs if steal <= STEAL_LIMIT]
  return statistics.median(clean or [r for r, _ in pairs]) if pairs else None


def fmt(x, spec):
  """`x` formatted, or '-' as wide as the field when it is missing."""
  if isinstance(x, (int, float)) and math.isfinite(x):
    return format(x, spec)
  width = re.match(r"\d*", spec).group()
  return format("-", f">{width}") if width else "-"


def print_table(rows):
  print(f"{'model':5} {'B':>5} | {'F ex/s':>9} {'J ex/s':>9} {'T1 ex/s':>9} {'T2 ex/s':>9} |"
        f" {'F/J':>5} {'F/T1':>5} {'F/T2':>5} | {'F trial s':>9} {'J comp s':>8} {'steal':>5}")
  for r in rows:
    rate = lambda m: r[m]["examples_per_sec"] if r.get(m) else None
    print(f"{r['model']:5} {r['batch_size']:>5} |"
          f" {fmt(rate('F'), '9,.0f')} {fmt(rate('J'), '9,.0f')}"
          f" {fmt(rate('T1'), '9,.0f')} {fmt(rate('T2'), '9,.0f')} |"
          f" {fmt(r['F/J'], '5.2f')} {fmt(r['F/T1'], '5.2f')} {fmt(r['F/T2'], '5.2f')} |"
          f" {fmt((r.get('F') or {}).get('trial_wall_s'), '9.1f')}"
          f" {fmt((r.get('J') or {}).get('compile_s'), '8.1f')}"
          f" {fmt(max((s or 0 for m in ('F', 'J', 'T1', 'T2') for s in (r.get(m) or {}).get('steal', [])), default=None), '5.0%')}")


def mfu_lines(rows, peak_tflops):
  """Per model, at its largest batch: FLOPs/step (XLA), achieved TFLOP/s of F and J, MFU."""
  out = []
  for model_name in dict.fromkeys(r["model"] for r in rows):
    r = max((r for r in rows if r["model"] == model_name), key=lambda r: r["batch_size"])
    flops = (r.get("J") or {}).get("step_flops")
    if not flops or not math.isfinite(flops):
      continue
    entry = {"model": model_name, "batch_size": r["batch_size"], "step_flops": flops,
             "peak_tflops": peak_tflops or None}
    for m in ("F", "J"):
      rate = (r.get(m) or {}).get("examples_per_sec")
      if rate:
        tflops = flops * rate / r["batch_size"] / 1e12
        entry[f"{m}_tflops"] = tflops
        entry[f"{m}_mfu"] = tflops / peak_tflops if peak_tflops else None
    out.append(entry)
  return out


def write_json(args, rows, mfu):
  if not args.out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "torch": TORCH_VERSION,
               "torch_settings": next((r[m]["torch_settings"] for r in rows for m in ("T1", "T2")
                                       if "torch_settings" in r.get(m, {})), None),
               "import_s": IMPORT_SECONDS, "args": vars(args),
               "rows": rows, "mfu": mfu, "framework_error": FRAMEWORK_ERROR}, f, indent=1)


def torch_settings():
  """What PyTorch does with float32 by default on this machine (TF32 is off for matmuls)."""
  import torch
  return {"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
          "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=None, help="default mlp,cnn (--tiny: mlp)")
  p.add_argument("--batch_sizes", default=None, help="default 32,128,1024,8192 (--tiny: 16)")
  p.add_argument("--methods", default="F,J,T1,T2", help="any of F,J,T1,T2")
  p.add_argument("--train_size", type=int, default=None, help="default 60000 (--tiny: 256)")
  p.add_argument("--eval_size", type=int, default=None,
                 help="valid and train_eval examples; test gets twice as many (default 5000)")
  p.add_argument("--segment_examples", type=int, default=None,
                 help="examples per timed segment, rounded up to whole chunks (default 30000)")
  p.add_argument("--segments", type=int, default=None,
                 help="timed segments, the first dropped (default 5)")
  p.add_argument("--chunk_steps", type=int, default=None,
                 help="steps per dispatch (one lax.scan), for F and J alike (default 16)")
  p.add_argument("--unroll", choices=("auto", "true", "false"), default="auto",
                 help="unroll the scan (auto: for the CNN on CPU, as configs/mnist.py)")
  p.add_argument("--repeats", type=int, default=None,
                 help="every method of a row this many times, interleaved (default 3, --tiny 1)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="the chip's peak TFLOP/s for the MFU (0 = report TFLOP/s only)")
  p.add_argument("--out", default="", help="write the results as JSON to this file")
  p.add_argument("--keep_workdirs", action="store_true")
  p.add_argument("--tiny", action="store_true",
                 help="seconds: the MLP, 256 train examples, batch 16, 3 segments of 2 steps")
  args = p.parse_args(argv)
  defaults = (dict(models="mlp", batch_sizes="16", train_size=256, eval_size=64,
                   segment_examples=1, segments=3, chunk_steps=2, repeats=1) if args.tiny else
              dict(models="mlp,cnn", batch_sizes="32,128,1024,8192", train_size=60000,
                   eval_size=5000, segment_examples=30000, segments=5, chunk_steps=16, repeats=3))
  for name, value in defaults.items():   # what the command line gives wins, --tiny or not
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  model_names = args.models.split(",")
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  methods = args.methods.split(",")
  print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}; jax {jax.__version__};"
        f" torch {TORCH_VERSION or 'absent (T1, T2 skipped)'} (in child processes);"
        f" imports {IMPORT_SECONDS:.1f}s", flush=True)
  if FRAMEWORK_ERROR:
    print(f"framework trial (F) skipped: {FRAMEWORK_ERROR}", flush=True)
  dataset = random_data(args.train_size, args.eval_size, 2 * args.eval_size)
  runners = {
      "F": None if FRAMEWORK_ERROR else run_framework,
      "J": jax_loop,
      "T1": TORCH_VERSION and functools.partial(torch_in_child, manual=False),
      "T2": TORCH_VERSION and functools.partial(torch_in_child, manual=True),
  }
  rows = []
  for model_name in model_names:
    for batch_size in batch_sizes:
      row = {"model": model_name, "batch_size": batch_size}
      runs = {m: [] for m in methods if runners.get(m)}
      for repeat in range(args.repeats):   # F J T1 T2, F J T1 T2, ...: see paired_ratio
        for method in runs:
          start, cpu_before = time.perf_counter(), cpu_ticks()
          try:
            result = runners[method](model_name, batch_size, dataset, args)
          except Exception as error:   # one failing method (e.g. out of memory) is a row entry
            result = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
          result["seconds"] = time.perf_counter() - start
          result["steal"] = steal_share(cpu_before, cpu_ticks())
          runs[method].append(result)
          print(f"  {model_name} B={batch_size} {method} #{repeat + 1}: "
                + (fmt(result.get("examples_per_sec"), ",.0f") + " examples/s"
                   if "error" not in result else result["error"])
                + f" ({result['seconds']:.1f}s, steal {fmt(result['steal'], '.0%')})", flush=True)
      for method, results in runs.items():
        rates = [r.get("examples_per_sec") for r in results]
        row[method] = {**results[0], "repeats": rates, "steal": [r["steal"] for r in results],
                       "examples_per_sec": statistics.median(rates) if all(rates) else None}
        for key in ("trial_wall_s", "compile_s"):   # medians over the repeats too
          if all(key in r for r in results):
            row[method][key] = statistics.median(r[key] for r in results)
      row.update({f"F/{m}": paired_ratio(runs, "F", m) for m in ("J", "T1", "T2")})
      rows.append(row)
      write_json(args, rows, [])   # after every row: a run cut short keeps what it measured
  print_table(rows)
  mfu = mfu_lines(rows, args.peak_tflops)
  for m in mfu:
    mfu_text = (f"; MFU vs {args.peak_tflops:g} TFLOP/s peak: F {fmt(m.get('F_mfu'), '.1%')},"
                f" J {fmt(m.get('J_mfu'), '.1%')}" if args.peak_tflops else "")
    print(f"{m['model']} B={m['batch_size']}: {m['step_flops'] / 1e9:,.1f} GFLOP/step (XLA cost"
          f" analysis of the lowered step); F {fmt(m.get('F_tflops'), '.2f')} TFLOP/s,"
          f" J {fmt(m.get('J_tflops'), '.2f')} TFLOP/s{mfu_text}")
  write_json(args, rows, mfu)
  if args.out:
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
