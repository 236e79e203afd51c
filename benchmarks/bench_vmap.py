"""Trials per hour: a group of trials vectorised (one vmapped program) vs the same trials one by one.

    python3 benchmarks/bench_vmap.py                      # tiny sweep + the default sweep's shapes
    python3 benchmarks/bench_vmap.py --tiny               # a smoke run (tests/test_benchmarks.py)
    python3 benchmarks/bench_vmap.py --batch_sizes=16,1024 --steps=48 --out=vmap.json

For each sweep and batch size it takes the trials of one vectorised group (the LR grid x seeds at
that batch size: 4 in configs/mnist_sweep_tiny.py, 6 in configs/mnist_sweep.py), cuts their budget
to `--steps` steps (stop at target off, so every trial runs the same steps; curvature off; one
checkpoint at the end; evaluations every `--steps / 3` steps:
two steady-state segments after the compiling one) and trains them twice in one process:
  S: sequentially, `scaling.training.train.run` per trial (they share one compiled chunk: the peak LR and
     the keys are runtime inputs), and
  V: `scaling.training.train.run_group` on all of them (one vmapped chunk program).
Both use a fresh persistent compilation cache, as scaling.main does. Whole-trial rates count everything a sweep pays (state init, compilation, evaluations, checkpoints,
files): trials/hour = trials / wall seconds x 3600. The steady-state rate (compiling segments left
out) is the group's examples per second of training: for S, whose trials ran one after another,
n / sum(1 / each trial's summary `examples_per_sec`); for V, whose members ran at once, the sum of
the members' rates (each member's summary rate is its share of the group's). CPU seconds (user + system of this process) are
printed beside the wall times: on a shared machine wall time misleads, ratios within one run less.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # this checkout's scaling/ and configs/, whatever is pip-installed

import jax  # noqa: E402

from scaling import config as config_lib  # noqa: E402
from scaling import sweep
from scaling.training import train, vectorized  # noqa: E402

SWEEPS = {"tiny": os.path.join(ROOT, "configs/mnist_sweep_tiny.py"),
          "default": os.path.join(ROOT, "configs/mnist_sweep.py")}


def cpu_seconds() -> float:
  t = os.times()
  return t.user + t.system


def group_trials(config, batch_size: int, steps: int, workdir: str) -> list:
  """The first vectorisable group of the sweep at `batch_size`, cut to `steps` steps."""
  trials = [t for t in sweep.expand(config, workdir) if t.config.batch_size == batch_size]
  if not trials:
    raise SystemExit(f"no trial of batch size {batch_size} in this sweep")
  group = vectorized.groups(trials, len(trials))[0]
  for t in group:
    c = t.config
    c.budget.length, c.budget.unit = float(steps), "steps"
    c.eval_every.length, c.eval_every.unit = float(max(1, steps // 3)), "steps"
    c.target.stop_at_target = False
    c.curvature.enabled = False
    c.checkpoint.every_steps = 0
    c.chunk_steps = min(c.chunk_steps, max(1, steps // 3))
    c.warmup.length, c.warmup.unit = 0.0, "steps"
  return group


def timed(fn):
  wall, cpu = time.perf_counter(), cpu_seconds()
  out = fn()
  return out, time.perf_counter() - wall, cpu_seconds() - cpu


def measure(name: str, batch_size: int, steps: int, root: str) -> dict:
  config = config_lib.load_file(SWEEPS[name])
  group = group_trials(config, batch_size, steps, os.path.join(root, name, str(batch_size)))
  seq_dir = os.path.join(root, name, f"{batch_size}-S")
  vec_dir = os.path.join(root, name, f"{batch_size}-V")
  seq, seq_wall, seq_cpu = timed(lambda: [
      train.run(t.config, os.path.join(seq_dir, t.id), trial_id=t.id, sweep_axes=t.overrides)
      for t in group])
  vec, vec_wall, vec_cpu = timed(lambda: train.run_group(
      [t.config for t in group], [os.path.join(vec_dir, t.id) for t in group],
      [t.id for t in group], [t.overrides for t in group]))
  # Steady-state examples/s of the whole group. S's trials ran one after another, each at its own
  # rate over the same number of examples: together n / sum(1 / rate). V's members ran at once,
  # each summary rate being a member's share: together their sum.
  rates = lambda summaries: [s["examples_per_sec"] for s in summaries if s["examples_per_sec"]]
  seq_rates, vec_rates = rates(seq), rates(vec)
  n = len(group)
  row = {"sweep": name, "batch_size": batch_size, "trials": n, "steps": steps,
         "S_trials_per_hour": n / seq_wall * 3600, "V_trials_per_hour": n / vec_wall * 3600,
         "S_wall_s": seq_wall, "V_wall_s": vec_wall, "S_cpu_s": seq_cpu, "V_cpu_s": vec_cpu,
         "S_train_examples_per_sec": (len(seq_rates) / sum(1 / r for r in seq_rates)
                                      if seq_rates else 0.0),
         "V_train_examples_per_sec": sum(vec_rates),
         "statuses": sorted({s["status"] for s in seq + vec})}
  row["V/S trials"] = row["V_trials_per_hour"] / row["S_trials_per_hour"]
  row["V/S train"] = (row["V_train_examples_per_sec"] / row["S_train_examples_per_sec"]
                      if row["S_train_examples_per_sec"] else None)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweeps", default="tiny,default")
  parser.add_argument("--batch_sizes", default="16,128,1024,8192",
                      help="the default sweep's batch sizes to run (the tiny sweep: 16, 64)")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--tiny", action="store_true", help="tiny sweep, batch 16, 6 steps")
  parser.add_argument("--out", default="", help="write the rows as JSON here")
  args = parser.parse_args()
  plan = []
  if args.tiny:
    plan, steps = [("tiny", 16)], 6
  else:
    steps = args.steps
    for name in args.sweeps.split(","):
      sizes = (16, 64) if name == "tiny" else tuple(int(b) for b in args.batch_sizes.split(","))
      plan += [(name, b) for b in sizes]
  root = tempfile.mkdtemp(prefix="bench_vmap_")
  # As scaling.main: a persistent compilation cache, so sequential trials reuse the chunk that
  # the first one compiled (their LR and keys are runtime inputs). Fresh: no earlier run's hits.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  rows = []
  try:
    for name, batch_size in plan:
      rows.append(measure(name, batch_size, steps, root))
      print("row", json.dumps(rows[-1]), flush=True)   # kept if a later row is cut short
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print()
  print(f"{'sweep':<8} {'B':>5} {'M':>2} {'steps':>5} {'S trials/h':>10} {'V trials/h':>10}"
        f" {'V/S':>5} {'S train ex/s':>12} {'V train ex/s':>12} {'V/S':>5}"
        f" {'S wall/cpu s':>13} {'V wall/cpu s':>13}")
  for r in rows:
    train_ratio = f"{r['V/S train']:.2f}" if r["V/S train"] else "-"
    print(f"{r['sweep']:<8} {r['batch_size']:>5} {r['trials']:>2} {r['steps']:>5}"
          f" {r['S_trials_per_hour']:>10,.0f} {r['V_trials_per_hour']:>10,.0f}"
          f" {r['V/S trials']:>5.2f} {r['S_train_examples_per_sec']:>12,.0f}"
          f" {r['V_train_examples_per_sec']:>12,.0f} {train_ratio:>5}"
          f" {r['S_wall_s']:>6.1f}/{r['S_cpu_s']:<6.1f} {r['V_wall_s']:>6.1f}/{r['V_cpu_s']:<6.1f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
