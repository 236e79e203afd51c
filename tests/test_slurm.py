"""`python -m scaling.launch` against a real Slurm: a single-node cluster on this machine
(tests/slurm_cluster.sh: munged, slurmctld and slurmd as root, no systemd, stopped afterwards).

1. The tiny sweep as an array, 2 trials at a time: every trial done, sweep.csv and the status
   view list them all, and launching again submits nothing.
2. A 2-task srun step (2 processes x 2 CPU devices, gloo, jax.distributed from Slurm's
   environment) gives the numbers of one process with 4 devices.
3. SIGTERM to a running array task (scancel --signal=TERM): the trial checkpoints and stops as
   `preempted`, the task requeues itself and the trial resumes and finishes.

About 2 minutes on 2 busy cores, most of it starting Python and compiling in each task: heavy
tier (`python3 -m pytest -m heavy`, CI's second pass), not the default run. Without Slurm (or
without root) it skips, except under CI=true, where Slurm is installed (Debian) and a cluster that
does not start is a failure. Every wait is bounded.
"""
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests import agree
from tests import test_multiprocess as multiprocess

pytestmark = pytest.mark.heavy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_SCRIPT = os.path.join(REPO, "tests", "slurm_cluster.sh")
JOB_TIMEOUT_S = 300
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
IN_CI = os.environ.get("CI", "").lower() == "true"
DAEMONS = ("sbatch", "squeue", "scancel", "slurmctld", "slurmd", "munged")
# Each trial: 2 fake CPU devices, this interpreter, this checkout.
SETUP = (f"cd {shlex.quote(REPO)} && export JAX_PLATFORMS=cpu"
         " XLA_FLAGS=--xla_force_host_platform_device_count=2")
CLUSTER_FLAGS = [f"--config.cluster.python={sys.executable}", f"--config.cluster.setup={SETUP}",
                 "--config.cluster.cpus_per_task=1", "--config.cluster.time=00:15:00",
                 "--config.cluster.signal_seconds=60"]
# Four trials of the tiny sweep (bs 32, 64 x two LR multipliers, one seed), each run to its full
# step budget so that every trial ends at total_steps.
FOUR_TRIALS = ("--config.sweep.batch_size=(32, 64)", "--config.sweep.lr_multiplier=(0.5, 2.0)",
               "--config.sweep.seed=(0,)", "--config.target.stop_at_target=False")


def _which(name):
  return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _not_here(reason):
  if IN_CI:
    pytest.fail(f"CI=true but {reason}")
  pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
  """A running single-node Slurm; yields the environment its clients need (SLURM_CONF)."""
  if os.geteuid() != 0:
    _not_here("the Slurm test starts its own cluster and needs root")
  if not all(_which(d) for d in DAEMONS):
    if not IN_CI:
      pytest.skip("Slurm is not installed: run `tests/slurm_cluster.sh install` as root"
                  " (Debian packages slurmctld slurmd slurm-client munge) to run this test")
    subprocess.run([CLUSTER_SCRIPT, "install"], check=True, timeout=900)
  directory = tempfile.mkdtemp(prefix="scaling-slurm-", dir="/tmp")   # the munge user reaches it
  started = subprocess.run([CLUSTER_SCRIPT, "start", directory], capture_output=True, text=True,
                           timeout=180)
  try:
    if started.returncode:
      pytest.fail(f"could not start Slurm:\n{started.stdout}{started.stderr}")
    yield dict(os.environ, SLURM_CONF=os.path.join(directory, "slurm.conf"))
  finally:
    stopped = subprocess.run([CLUSTER_SCRIPT, "stop", directory], capture_output=True, text=True,
                             timeout=180)
    shutil.rmtree(directory, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr


def run(args, env, timeout=120):
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
  return result.stdout


def submit(env, config, workdir, *overrides):
  """python -m scaling.launch --submit -> (array job id, launcher output)."""
  out = run([sys.executable, "-m", "scaling.launch", f"--config={config}", f"--workdir={workdir}",
             "--submit", *CLUSTER_FLAGS, *overrides], env)
  match = re.search(r"^submitted job (\d+):", out, re.MULTILINE)
  assert match, out
  return match.group(1), out


def job_states(env, job):
  """{array task: state} of every task of `job`, finished ones included ({} if squeue failed)."""
  result = subprocess.run(
      ["squeue", "--noheader", f"--jobs={job}", "--states=all", "--format=%i %T"], env=env,
      capture_output=True, text=True, timeout=60)
  return dict(line.split() for line in result.stdout.splitlines()) if result.returncode == 0 else {}


def logs(workdir, tail=25):
  """The array tasks' logs (the last `tail` lines of each; None: all of them)."""
  texts = []
  for root, _, names in os.walk(os.path.join(workdir, "slurm")):
    for name in sorted(n for n in names if n.endswith(".log")):
      with open(os.path.join(root, name)) as f:
        lines = f.readlines()
      texts.append(f"== {name}\n" + "".join(lines[-tail:] if tail else lines))
  return "\n".join(texts)


def wait_for_job(env, job, workdir, timeout=JOB_TIMEOUT_S):
  """Polls until no task of `job` is active; returns (final states, most tasks running at once).
  On timeout the job is cancelled and the test fails with the tasks' logs."""
  deadline, most_running = time.monotonic() + timeout, 0
  while True:
    states = job_states(env, job)
    most_running = max(most_running, sum(s == "RUNNING" for s in states.values()))
    if states and not ACTIVE & set(states.values()):
      return states, most_running
    if time.monotonic() > deadline:
      subprocess.run(["scancel", job], env=env, timeout=60)
      pytest.fail(f"job {job} still {states} after {timeout}s\n{logs(workdir)}")
    time.sleep(0.5)


def wait_until(predicate, what, timeout, workdir):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs(workdir)}")
    time.sleep(0.1)


def status_view(workdir):
  return run([sys.executable, "-m", "scaling.status", f"--workdir={workdir}"], os.environ)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_array_of_the_tiny_sweep_two_at_a_time(slurm, tmp_path):
  workdir = str(tmp_path / "sweep")
  job, out = submit(slurm, "configs/mnist_sweep_tiny.py", workdir, *FOUR_TRIALS,
                    "--config.cluster.max_running=2")
  assert "#SBATCH --array=0-3%2" in out
  states, most_running = wait_for_job(slurm, job, workdir)
  assert sorted(states) == [f"{job}_{i}" for i in range(4)], states
  assert set(states.values()) == {"COMPLETED"}, f"{states}\n{logs(workdir)}"
  assert most_running == 2   # the node has room for more: the array's %2 held them back

  ids = [t["id"] for t in read_json(os.path.join(workdir, "sweep.json"))["trials"]]
  assert ids == ["bs=32,lr_multiplier=0.5,seed=0", "bs=32,lr_multiplier=2,seed=0",
                 "bs=64,lr_multiplier=0.5,seed=0", "bs=64,lr_multiplier=2,seed=0"]
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [(r["id"], r["status"]) for r in rows] == [(i, "done") for i in ids]
  totals = []
  for index, trial_id in enumerate(ids):
    directory = os.path.join(workdir, "trials", trial_id)
    total = read_json(os.path.join(directory, "config.json"))["derived"]["total_steps"]
    summary = read_json(os.path.join(directory, "summary.json"))
    assert summary["status"] == "done" and summary["step"] == total
    totals.append(total)
    assert os.path.exists(os.path.join(workdir, "slurm", f"trial-{index}.job-{job}.log"))

  view = status_view(workdir)
  print(view)   # the report quotes it: pytest -s
  lines = view.splitlines()
  for index, (trial_id, total) in enumerate(zip(ids, totals)):
    assert lines[1 + index].split()[:3] == [str(index), "done", f"{total}/{total}"]
    assert lines[1 + index].endswith(trial_id)
  assert lines[-1] == "4 trials: 4 done"

  again = run([sys.executable, "-m", "scaling.launch", "--config=configs/mnist_sweep_tiny.py",
               f"--workdir={workdir}", "--submit", *CLUSTER_FLAGS, *FOUR_TRIALS], slurm)
  assert again.strip() == f"all 4 trial(s) in {workdir} are done or diverged: nothing to submit"


def test_two_task_srun_trial_matches_one_process(slurm, tmp_path):
  # test_multiprocess's trial (an MLP on the MNIST slice) and its comparison (tests/agree.py),
  # without the curvature that test_multiprocess already compares (it is slow to compile).
  no_curvature = "--config.curvature.enabled=False"
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  job, out = submit(slurm, "configs/mnist.py", two, "--config.cluster.tasks_per_node=2",
                    *multiprocess.FLAGS[1:], no_curvature)
  assert " --distributed " in out
  reference = [multiprocess.start(one, 4, str(tmp_path / "one.log"), [no_curvature])]
  states, _ = wait_for_job(slurm, job, two)
  codes = multiprocess.wait_all(reference, JOB_TIMEOUT_S)
  assert codes == [0], multiprocess.tail(str(tmp_path / "one.log"))
  assert states == {f"{job}_0": "COMPLETED"}, f"{states}\n{logs(two)}"

  # Two processes of 2 devices each trained it together.
  assert read_json(os.path.join(two, "config.json"))["derived"]["num_devices"] == 4
  assert "Rank 1 is connected" in logs(two, tail=None)
  assert not [r for r in multiprocess.read_records(two) if "curvature/loss" in r]
  a, b = multiprocess.read_records(one), multiprocess.read_records(two)
  assert len(a) >= 6
  agree.assert_records_agree(b, a, b_small=multiprocess.B // multiprocess.G, b_big=multiprocess.B,
                             rtol=1e-5, atol=1e-7)
  assert read_json(os.path.join(two, "summary.json"))["status"] == "done"


def test_sigterm_preempts_a_trial_and_the_requeued_task_finishes_it(slurm, tmp_path):
  workdir = str(tmp_path / "sweep")
  trial = os.path.join(workdir, "trials", "bs=16,lr_multiplier=0.5,seed=0")
  job, _ = submit(slurm, "configs/mnist_sweep_tiny.py", workdir, "--config.sweep.batch_size=(16,)",
                  "--config.sweep.lr_multiplier=(0.5,)", "--config.sweep.seed=(0,)",
                  "--config.target.stop_at_target=False", "--config.budget.length=2575",
                  "--config.eval_every.length=125", "--config.checkpoint.every_steps=50")
  task = f"{job}_0"
  # The trial's SIGTERM handler is in place once it writes a checkpoint (step 125 of 2,575).
  # Freeze it there (SIGSTOP) so that the SIGTERM lands mid-training however fast this machine
  # is, then let it go on.
  checkpoints = os.path.join(trial, "checkpoints")
  wait_until(lambda: os.path.isdir(checkpoints) and os.listdir(checkpoints), "a checkpoint",
             JOB_TIMEOUT_S, workdir)
  for sig in ("STOP", "TERM", "CONT"):
    run(["scancel", f"--signal={sig}", task], slurm)
  summary_path = os.path.join(trial, "summary.json")
  wait_until(lambda: (read_json(summary_path) if os.path.exists(summary_path) else {}).get(
      "status") == "preempted", "the trial to stop as preempted", 120, workdir)
  preempted = read_json(summary_path)
  total = read_json(os.path.join(trial, "config.json"))["derived"]["total_steps"]
  assert 0 < preempted["step"] < total
  view = status_view(workdir)
  assert view.splitlines()[-1] == "1 trial: 1 preempted", view

  states, _ = wait_for_job(slurm, job, workdir)
  assert states == {task: "COMPLETED"}, f"{states}\n{logs(workdir)}"
  log = logs(workdir, tail=None)
  assert "trial 0 preempted: requeued" in log and "restart 1" in log, log
  assert f"from step {preempted['step']} " in log, log
  summary = read_json(summary_path)
  assert summary["status"] == "done" and summary["step"] == total
  steps = [r["step"] for r in multiprocess.read_records(trial) if "valid/error" in r]
  assert steps == sorted(set(steps)) and steps[-1] == total   # resumed, nothing written twice
  assert status_view(workdir).splitlines()[-1] == "1 trial: 1 done"
