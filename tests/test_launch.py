"""The Slurm launcher's script and checks, and the status view, without a Slurm (tests/test_slurm.py
runs them against a real one)."""
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import mnist_sweep_tiny
from scaling.cluster import launch, sbatch, status
from scaling.config import ConfigError
from scaling.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mnist_sweep_tiny.py")


def tiny_sweep(**cluster):
  """The tiny sweep's config with a fixed 6-trial grid (bs x lr_rule: trial 0 is bs=16 linear,
  3 is bs=32 sqrt), whatever axes the tiny study itself tunes."""
  config = mnist_sweep_tiny.get_config()
  config.sweep = ml_collections.ConfigDict(dict(batch_size=(16, 32, 64),
                                                lr_rule=("linear", "sqrt")))
  config.cluster.update(cluster)
  return config


def script_lines(capsys, config, workdir, overrides=None, **kwargs):
  launch.launch(config, CONFIG, str(workdir), overrides or {}, submit_job=False, **kwargs)
  return capsys.readouterr().out.splitlines()


def sbatch_options(lines):
  return [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]


def write_summary(workdir, trial_id, status_name):
  directory = os.path.join(workdir, "trials", trial_id)
  os.makedirs(directory)
  with open(os.path.join(directory, "summary.json"), "w") as f:
    json.dump({"status": status_name, "step": 5}, f)


@pytest.mark.parametrize("indices, max_running, spec", [
    ([0, 1, 2, 5, 7, 8], 2, "0-2,5,7-8%2"), ([3], 0, "3"), ([0, 2, 4], 1, "0,2,4%1")])
def test_array_spec(indices, max_running, spec):
  assert sbatch.array_spec(indices, max_running) == spec


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("1:30", 90), ("04:00:00", 14400), ("1-0", 86400), ("2-03:04", 183840),
    ("1-02:03:04", 93784)])
def test_slurm_time_limits(text, seconds):
  assert sbatch.time_limit_seconds(text) == seconds


def test_script_lists_only_unfinished_trials_and_signals_before_the_limit(tmp_path, capsys):
  for trial_id, state in [("bs=16,lr_rule=linear", "done"), ("bs=32,lr_rule=sqrt", "diverged"),
                          ("bs=64,lr_rule=linear", "preempted")]:
    write_summary(tmp_path, trial_id, state)
  config = tiny_sweep(max_running=2, time="01:30:00", signal_seconds=120, partition="gpu",
                      extra_sbatch=("--qos=high",), setup="source venv/bin/activate")
  lines = script_lines(capsys, config, tmp_path, {"base_lr": 0.1, "sweep.batch_size": (16, 32, 64),
                                                  "cluster.max_running": 2})
  options = sbatch_options(lines)
  # Trials 0 (bs=16 linear) and 3 (bs=32 sqrt) are finished; preempted 4 and the rest are not.
  assert "--array=1-2,4-5%2" in options
  assert {"--time=01:30:00", "--signal=TERM@120", "--requeue", "--open-mode=append",
          "--partition=gpu", "--qos=high", "--nodes=1", "--ntasks-per-node=1",
          f"--output={tmp_path}/slurm/trial-%a.job-%A.log",
          f"--chdir={os.getcwd()}"} <= set(options)
  assert not [o for o in options if o.startswith(("--gpus", "--mem", "--account"))]
  body = [line for line in lines if line and not line.startswith("#")]
  assert body[1] == "source venv/bin/activate"
  step = body[2]
  assert step.startswith("srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=4 ")
  # Overrides go to the trials, the cluster's do not; one process needs no jax.distributed.
  assert (f"python3 -m scaling.main --config={CONFIG} --workdir={tmp_path} --config.base_lr=0.1"
          " '--config.sweep.batch_size=(16, 32, 64)' --trial=\"$SLURM_ARRAY_TASK_ID\"") in step
  assert "--distributed" not in step and "cluster" not in step
  assert 'if [ "$code" -eq 143 ] && [ "${SLURM_RESTART_COUNT:-0}" -lt 20 ]; then' in lines
  with open(tmp_path / "slurm" / "sweep.sbatch") as f:
    assert f.read().splitlines() == lines[:-2]   # then: "wrote ...", "submit it with ..."


def test_multi_node_trial_is_one_distributed_srun_step(tmp_path, capsys):
  config = tiny_sweep(nodes=2, tasks_per_node=4, gpus_per_node=4, mem="64G", account="proj")
  lines = script_lines(capsys, config, tmp_path / "new", dry_run=True)
  assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--mem=64G",
          "--account=proj", "--array=0-5%8"} <= set(sbatch_options(lines))
  step = next(line for line in lines if line.startswith("srun "))
  assert step.startswith("srun --nodes=2 --ntasks-per-node=4 ") and " --distributed " in step
  assert not os.path.exists(tmp_path / "new")   # a dry run writes nothing


def test_nothing_to_submit_when_every_trial_is_finished(tmp_path, capsys):
  config = tiny_sweep()
  for t in mnist_sweep_tiny.get_config().sweep.batch_size:
    for rule in ("linear", "sqrt"):
      write_summary(tmp_path, f"bs={t},lr_rule={rule}", "done")
  lines = script_lines(capsys, config, tmp_path)
  assert lines == [f"all 6 trial(s) in {tmp_path} are done or diverged: nothing to submit"]
  assert not os.path.exists(tmp_path / "slurm")


@pytest.mark.parametrize("cluster, message", [
    (dict(time="4h"), "cluster.time='4h' is not a Slurm time limit: use MM, HH:MM:SS"),
    (dict(time="5:00", signal_seconds=300), "cluster.signal_seconds=300 is not shorter than"),
    (dict(nodes=0), "cluster.nodes=0 must be >= 1"),
    (dict(max_running=-1), "cluster.max_running=-1 must be >= 0"),
    (dict(nodes=2, gpus_per_node=8), "cluster.tasks_per_node=1 with gpus_per_node=8: a"
     " multi-process trial runs one process per GPU, set tasks_per_node = gpus_per_node"),
    (dict(python=" "), "cluster.python is empty"),
])
def test_bad_cluster_fields(cluster, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    sbatch.read_cluster(tiny_sweep(**cluster))


def test_a_missing_cluster_field_or_section_is_named():
  config = mnist_sweep_tiny.get_config()
  with config.unlocked():
    config.cluster = ml_collections.ConfigDict(
        {k: v for k, v in config.cluster.items() if k != "time"})
  with pytest.raises(ConfigError, match=r"^cluster.time is missing from the config's cluster"):
    sbatch.read_cluster(config)
  with config.unlocked():
    del config["cluster"]
  with pytest.raises(ConfigError, match="^the config has no cluster section"):
    sbatch.read_cluster(config)


def test_missing_sbatch_is_one_line_that_names_dry_run(tmp_path):
  # PATH without sbatch: the CLI says how to get it, with no traceback and no workdir written.
  result = subprocess.run(
      [sys.executable, "-m", "scaling.launch", f"--config={CONFIG}", f"--workdir={tmp_path}/w",
       "--submit"], cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PATH=os.path.dirname(sys.executable)))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "config error: sbatch is not on PATH: run this on a Slurm login node, install Slurm's client"
      " (Debian: apt-get install slurm-client), or use --dry_run to print the script"]
  assert not os.path.exists(tmp_path / "w")


def test_multi_node_workdir_on_a_local_filesystem_warns(tmp_path, monkeypatch):
  assert launch.shared_filesystem_warning(str(tmp_path), nodes=1) is None
  monkeypatch.setattr(launch, "filesystem_type", lambda path: "ext4")
  assert launch.shared_filesystem_warning(str(tmp_path / "a" / "b"), nodes=2) == (
      f"warning: {tmp_path}/a/b is on a local filesystem (ext4): with cluster.nodes=2 every node"
      " writes and reads it, put the workdir on a shared filesystem (NFS, Lustre, GPFS, ...)")
  monkeypatch.setattr(launch, "filesystem_type", lambda path: "nfs4")
  assert launch.shared_filesystem_warning(str(tmp_path), nodes=2) is None


def test_filesystem_type_of_root_is_read_from_proc_mounts():
  if not os.path.exists("/proc/mounts"):
    pytest.skip("no /proc/mounts on this system")
  with open("/proc/mounts") as f:
    root_type = next(line.split()[2] for line in f if line.split()[1] == "/")
  assert launch.filesystem_type("/") == root_type


@pytest.mark.parametrize("environ, num_processes, message", [
    ({}, 4, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, None, "--distributed inside a Slurm job but"
     " outside srun: start one process per task with `srun python -m scaling.main ..."),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, 4,
     "--num_processes=4 but Slurm started 2 task(s) for this step: drop --num_processes"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"}, 2, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, None, None),
])
def test_distributed_processes_must_be_slurms_tasks(environ, num_processes, message):
  if message is None:
    launch.check_slurm_processes(environ, num_processes)
  else:
    with pytest.raises(ConfigError) as error:
      launch.check_slurm_processes(environ, num_processes)
    assert str(error.value).startswith(message)


def test_distributed_outside_srun_fails_at_once(tmp_path):
  """Without the check, jax.distributed.initialize() waits minutes for a second process."""
  env = dict(os.environ, SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0")
  env.pop("SLURM_STEP_ID", None)
  result = subprocess.run(
      [sys.executable, "-m", "scaling.main", "--config=configs/mnist.py",
       f"--workdir={tmp_path}", "--distributed"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      "config error: --distributed inside a Slurm job but outside srun")


def test_changing_the_cluster_section_does_not_block_a_resume(tmp_path):
  config = mnist_sweep_tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config.cluster.time, config.cluster.nodes = "2-00:00:00", 2
  checkpoint.check_same_run(str(tmp_path / "config.json"), json.loads(config.to_json_best_effort()))


# The status view: a workdir written by hand, every state a trial can be in.
def _trial(workdir, trial_id, summary=None, total=None, records=(), partial_line=False):
  directory = os.path.join(workdir, "trials", trial_id)
  os.makedirs(directory)
  if total is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump({"trial_id": trial_id, "derived": {"total_steps": total}}, f)
  if summary is not None:
    with open(os.path.join(directory, "summary.json"), "w") as f:
      json.dump(summary, f)
  with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    if partial_line:
      f.write('{"step": 99, "valid/er')   # a live trial mid-write


def _sweep_workdir(tmp_path):
  ids = ["a", "b", "c", "d", "e"]
  with open(tmp_path / "sweep.json", "w") as f:
    json.dump({"trials": [{"index": i, "id": t, "directory": f"trials/{t}"}
                          for i, t in enumerate(ids)]}, f)
  _trial(tmp_path, "a", {"status": "done", "step": 40, "wall_time": 3725.4,
                         "target": {"step": 24}}, total=40,
         records=[{"step": 20, "wall_time": 1.0, "valid/error": 0.5},
                  {"step": 40, "wall_time": 3725.0, "valid/error": 0.25}])
  _trial(tmp_path, "b", {"status": "diverged", "step": 13, "wall_time": 2.0,
                         "target": {"step": None}}, total=40,
         records=[{"step": 13, "wall_time": 2.0, "train/loss": float("nan")}])
  _trial(tmp_path, "c", {"status": "running", "step": 20, "wall_time": 5.0}, total=80,
         records=[{"step": 20, "wall_time": 5.0, "valid/error": 0.4},
                  {"step": 25, "wall_time": 6.5, "train/loss": 1.0}], partial_line=True)
  _trial(tmp_path, "d", total=80)   # started: config.json, no evaluation yet
  return ids                          # "e": no directory yet


def test_status_lists_every_trial_with_steps_target_error_and_time(tmp_path):
  _sweep_workdir(tmp_path)
  rows = status.sweep_status(str(tmp_path))
  got = [(r.index, r.id, r.status, r.step, r.total_steps, r.steps_to_target, r.valid_error,
          r.wall_time) for r in rows]
  assert got == [(0, "a", "done", 40, 40, 24, 0.25, 3725.4),
                 (1, "b", "diverged", 13, 40, None, None, 2.0),
                 (2, "c", "running", 25, 80, None, 0.4, 6.5),
                 (3, "d", "running", 0, 80, None, None, None),
                 (4, "e", "pending", 0, None, None, None, None)]
  table = status.format_table(rows, now=rows[0].updated + 125).splitlines()
  assert table[1].split() == ["0", "done", "40/40", "24", "0.2500", "1:02:05", "2m", "ago", "a"]
  assert table[5].split() == ["4", "pending", "0/?", "-", "-", "-", "-", "e"]
  assert table[-1] == "5 trials: 1 done, 1 diverged, 2 running, 1 pending"


def test_status_cli_reads_only_the_workdir_and_imports_no_jax(tmp_path):
  _sweep_workdir(tmp_path)
  before = {p: os.stat(p).st_mtime_ns for p in map(str, tmp_path.rglob("*"))}
  code = ("import runpy, sys\n"
          f"sys.argv = ['status', '--workdir={tmp_path}']\n"
          "try:\n  runpy.run_module('scaling.cluster.status', run_name='__main__')\n"
          "finally:\n  print('jax imported' if 'jax' in sys.modules else 'no jax')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-2:] == [
      "5 trials: 1 done, 1 diverged, 2 running, 1 pending", "no jax"]
  assert {p: os.stat(p).st_mtime_ns for p in map(str, tmp_path.rglob("*"))} == before


def test_status_of_a_single_run_and_of_an_empty_workdir(tmp_path):
  assert status.sweep_status(str(tmp_path)) == []
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"trial_id": "trial", "derived": {"total_steps": 24}}, f)
  with open(tmp_path / "summary.json", "w") as f:
    json.dump({"status": "preempted", "step": 8, "wall_time": 1.0}, f)
  (row,) = status.sweep_status(str(tmp_path))
  assert (row.index, row.id, row.status, row.step, row.total_steps) == (None, "trial", "preempted",
                                                                       8, 24)


def test_misspelt_cluster_field_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "scaling.launch", f"--config={CONFIG}", f"--workdir={tmp_path}",
       "--config.cluster.tme=5", "--dry_run"], cwd=REPO, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"config error: --config.cluster.tme: {CONFIG} has no field 'cluster.tme': did you mean"
      " --config.cluster.time?"]


def test_a_bad_field_of_one_trial_fails_before_any_script(tmp_path, capsys):
  config = tiny_sweep()
  config.sweep = ml_collections.ConfigDict(dict(batch_size=(16,), warmup=dict(length=(0.5, -1.0))))
  with pytest.raises(ConfigError, match=r"^trial 1 \(bs=16,warmup.length=-1\): warmup.length=-1.0"
                                        " is invalid: use a finite number >= 0$"):
    launch.launch(config, CONFIG, str(tmp_path), {}, submit_job=False)
  assert capsys.readouterr().out == "" and not os.listdir(tmp_path)
