"""A real two-process run under jax.distributed gives the numbers of one process with 4 devices.

Two local processes with 2 fake CPU devices each (gloo collectives) train the same tiny trial as
one process with 4 fake devices, all three started at once. The metrics must agree, only process 0
may write files, and the Orbax checkpoints (written by both processes together) must be complete.
Three processes that each compile the trial and its curvature: heavy tier (`pytest -m heavy`, CI's
second pass, beside tests/test_slurm.py's 2-task srun trial).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import agree
from tests.tiny import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
FLAGS = [
    "--config=configs/mnist.py",
    "--config.dataset.name=mnist_tiny", "--config.dataset.validation_size=100",
    "--config.model.name=mlp", "--config.model.widths=(64,)",
    "--config.batch_size=32", "--config.grad_groups=4",
    "--config.base_lr=0.05", "--config.reference_batch_size=32",
    "--config.budget.unit=steps", "--config.budget.length=24",
    "--config.warmup.unit=steps", "--config.warmup.length=4",
    "--config.eval_every.unit=steps", "--config.eval_every.length=8",
    "--config.log_every_steps=4", "--config.chunk_steps=4", "--config.chunk_unroll=False",
    "--config.checkpoint.every_steps=8", "--config.train_eval_size=100",
    "--config.eval_batch_size=100",
    # Curvature is measured on the same mesh: small, but checked too.
    "--config.curvature.enabled=True", "--config.curvature.subset_size=100",
    "--config.curvature.max_probes=4", "--config.curvature.min_probes=4",
    "--config.curvature.probe_chunk=4", "--config.curvature.lanczos_steps=5",
    "--config.curvature.top_k=1", "--config.curvature.sharpness_steps=2",
    "--config.curvature.density_starts=1", "--config.curvature.density_steps=5",
]
B, G = 32, 4   # --config.batch_size, --config.grad_groups above


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, devices, log_path, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  log = open(log_path, "w")
  # Own process group: a failed test kills the child and anything it started.
  return subprocess.Popen([sys.executable, "-m", "scaling.main", *FLAGS, f"--workdir={workdir}",
                           *extra], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True), log


def wait_all(procs, timeout):
  """Exit codes; kills every child still running on timeout or when one fails."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p, _ in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
        break
      time.sleep(0.2)
  finally:
    for p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
      log.close()
  return [p.returncode for p, _ in procs]


def tail(path, n=30):
  with open(path) as f:
    return "".join(f.readlines()[-n:])


@pytest.mark.heavy
def test_two_processes_match_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = free_port()
  distributed = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  logs = [str(tmp_path / f"{name}.log") for name in ("one", "p0", "p1")]
  procs = [start(one, 4, logs[0])]
  for i in range(2):
    procs.append(start(two, 2, logs[1 + i], [*distributed, f"--process_id={i}"]))
  codes = wait_all(procs, TIMEOUT_S)
  assert codes == [0, 0, 0], "\n".join(f"== {log} (exit {c})\n{tail(log)}"
                                       for log, c in zip(logs, codes))

  a, b = read_records(one), read_records(two)
  assert len(a) >= 6 and any("curvature/hessian_trace" in r for r in a)
  # Plain quantities to 1e-5; noise scale and sharpness to what their conditioning implies.
  agree.assert_records_agree(b, a, b_small=B // G, b_big=B, rtol=1e-5, atol=1e-7)

  for workdir in (one, two):
    with open(os.path.join(workdir, "summary.json")) as f:
      summary = json.load(f)
    assert summary["status"] == "done" and summary["step"] == 24
    with open(os.path.join(workdir, "config.json")) as f:
      assert json.load(f)["derived"]["num_devices"] == 4
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24", "8"]
  # Process 1 wrote nothing of its own: one event file, no leftover temporary files.
  names = os.listdir(two)
  assert sum(n.startswith("events.out.tfevents") for n in names) == 1, names
  assert not [n for n in names if ".tmp" in n], names
  assert sorted(n for n in names if not n.startswith("events")) == sorted(
      n for n in os.listdir(one) if not n.startswith("events"))
