"""Smoke tests of the benchmarks: each starts in its tiny mode and prints its table.

They check that the numbers were measured, not what they are (timings on a shared CPU mean little).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow    # manual (-m slow): outside CI's time budget
def test_bench_throughput_tiny_prints_its_table(tmp_path):
  out = tmp_path / "throughput.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/bench_throughput.py", "--tiny", "--methods=F,J", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("model") and "F/J" in line)
  assert lines[header + 1].split()[:2] == ["mlp", "16"]
  results = json.loads(out.read_text())
  assert results["framework_error"] is None and len(results["rows"]) == 1
  for row in results["rows"]:
    framework, bare = row["F"], row["J"]
    assert framework["status"] == "done", framework
    # One rate per segment, read back from the trial's metrics.jsonl: the first (compilation)
    # is left out of the median.
    assert len(framework["segments"]) == 3 and len(bare["segments"]) == 3
    assert framework["examples_per_sec"] > 0 and bare["examples_per_sec"] > 0
    assert row["F/J"] == framework["examples_per_sec"] / bare["examples_per_sec"]
  # XLA's FLOPs of one MLP step at B=16: the matmuls are 2 x weights x B forward, as much for the
  # weight gradients, and as much for the input gradients of every layer but the first (the
  # images need none). The momentum update adds a few FLOPs per parameter per step, bias, ReLU
  # and softmax a few per unit per example: ~5% at this batch size.
  mfu = results["mfu"][0]
  weights = [784 * 512, 512 * 512, 512 * 10]
  matmul_flops = 2 * 16 * (3 * sum(weights) - weights[0])
  assert matmul_flops <= mfu["step_flops"] < 1.1 * matmul_flops


@pytest.mark.heavy   # ~40 s of CPU: four tiny trials twice
def test_bench_vmap_tiny_prints_its_table(tmp_path):
  out = tmp_path / "vmap.json"
  result = subprocess.run([sys.executable, "benchmarks/bench_vmap.py", "--tiny", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  header = next(line for line in result.stdout.splitlines() if line.startswith("sweep"))
  assert "V/S" in header
  (row,) = json.loads(out.read_text())["rows"]
  assert (row["sweep"], row["batch_size"], row["trials"], row["statuses"]) == ("tiny", 16, 4, ["done"])
  assert row["V/S trials"] == row["V_trials_per_hour"] / row["S_trials_per_hour"] > 0


@pytest.mark.heavy   # ~30 s of CPU: compiles both models' gradients
def test_bench_kernels_tiny_prints_its_table(tmp_path):
  out = tmp_path / "kernels.json"
  result = subprocess.run(
      [sys.executable, "benchmarks/bench_kernels.py", "--tiny", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("kernel") and "J/T" in line)
  assert [line.split()[0] for line in lines[header + 1:header + 6]] == [
      "model/mlp", "model/cnn", "conv1", "conv2", "dense1"]
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == 5 and all(r["batch_size"] == 8 and r["jax_ms"] > 0 for r in rows)
