"""The launcher refuses, before it writes or submits anything, what would fail in every array task
(scaling.main's own checks of every trial) and what would break the sbatch script (a value that
ends an #SBATCH line or splits it). Each kind runs once as a user meets it (`python -m
scaling.launch ... --dry_run`), the rest of the values through launch.launch and read_cluster."""
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import mnist_sweep_tiny
from scaling.cluster import launch, sbatch
from scaling.config import ConfigError
from scaling.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mnist_sweep_tiny.py")


def tiny_sweep(**cluster):
  config = mnist_sweep_tiny.get_config()
  config.cluster.update(cluster)
  return config


def retyped_cluster(**cluster):
  """The tiny sweep with a cluster section written anew, as a config file may (its fields then
  take any type)."""
  config = mnist_sweep_tiny.get_config()
  with config.unlocked():
    config.cluster = ml_collections.ConfigDict({**config.cluster.to_dict(), **cluster})
  return config


@pytest.fixture(scope="module", autouse=True)
def prepared_data():
  """The tiny data set prepared before the launcher runs: a first use prints its progress."""
  train.load_data(mnist_sweep_tiny.get_config())


def set_field(config, dotted, value):
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def run_launcher(workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "scaling.launch", f"--config={CONFIG}", f"--workdir={workdir}",
       "--dry_run", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_config_error(result, *names):
  """Exit status 1 and one line on stderr, `config error: ...`, naming every one of `names`."""
  assert result.returncode == 1, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("config error: "), result.stderr
  for name in names:
    assert name in lines[0], lines[0]
  assert "#SBATCH" not in result.stdout   # no script printed either


def sbatch_arguments(line):
  """The arguments sbatch reads from one `#SBATCH ...` line (Slurm's _get_argument in
  src/sbatch/opt.c): split at whitespace, '...' and "..." quote, a backslash escapes the next
  character, an unquoted '#' starts a comment."""
  args, i, text = [], 0, line.removeprefix("#SBATCH")
  while True:
    while i < len(text) and text[i].isspace():
      i += 1
    if i == len(text):
      return args
    arg, quote = "", None
    while i < len(text) and (quote or not text[i].isspace()):
      ch = text[i]
      i += 1
      if ch == "\\" and i < len(text):
        arg, i = arg + text[i], i + 1
      elif quote:
        arg += "" if ch == quote else ch
        quote = None if ch == quote else quote
      elif ch in "'\"":
        quote = ch
      elif ch == "#":
        i = len(text)
      else:
        arg += ch
    assert quote is None, f"sbatch would stop at an unmatched {quote} in {line!r}"
    args.append(arg)


# The checks scaling.main makes of every trial, made by the launcher.

def test_a_value_every_trial_would_refuse_is_one_line_and_writes_nothing(tmp_path):
  result = run_launcher(tmp_path / "w", "--config.lr_rule=cubic")
  assert_one_line_config_error(result, "lr_rule='cubic' is unknown")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("field, value, cluster, message", [
    ("lr_rule", "cubic", {}, "lr_rule='cubic' is unknown"),
    ("optimizer.name", "nosuch", {}, "optimizer.name='nosuch' is unknown"),
    ("model.name", "nosuch", {}, "model.name='nosuch' is unknown"),
    ("dataset.name", "nosuch", {}, "dataset.name='nosuch' is not prepared"),
    ("decay.name", "bogus", {}, "decay.name='bogus' is unknown"),
    ("warmup.length", 1000.0, {}, "warmup (1000 steps) is longer than the run"),
    ("sweep.batch_size", (100000,), {}, "batch_size=100000 is larger than the 412 training"),
    # One GPU per trial: 3 gradient groups need 3 microbatches, which do not divide 16.
    ("grad_groups", 3, dict(gpus_per_node=1), "grad_groups=3 needs 3 microbatches per device"),
    # 2 nodes x 4 GPUs: a batch of 12 does not split over the 8 devices of a trial.
    ("sweep.batch_size", (12,), dict(nodes=2, tasks_per_node=4, gpus_per_node=4),
     "batch_size=12 is not divisible by the 8 devices"),
    ("num_devices", 16, dict(nodes=2, tasks_per_node=4, gpus_per_node=4),
     "num_devices=16 but a trial has 8 devices (cluster.nodes=2 x cluster.gpus_per_node=4)"),
])
def test_the_launcher_runs_the_checks_of_scaling_main(tmp_path, capsys, field, value, cluster,
                                                      message):
  config = tiny_sweep(**cluster)
  set_field(config, field, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    launch.launch(config, CONFIG, str(tmp_path / "w"), {})
  assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("field, value, cluster", [
    ("grad_groups", 3, {}),   # CPU trials of this process's 8 devices: 1 microbatch per device
    ("vectorize_trials", 2, {}),
    ("dataset.placement", "host", dict(gpus_per_node=1)),
])
def test_values_that_pass_the_checks_give_a_script(tmp_path, capsys, field, value, cluster):
  config = tiny_sweep(**cluster)
  set_field(config, field, value)
  launch.launch(config, CONFIG, str(tmp_path / "w"), {}, dry_run=True)
  assert "#SBATCH --array=0-11%8" in capsys.readouterr().out


def test_vectorised_trials_with_the_train_set_on_the_host_are_refused(tmp_path, capsys):
  config = tiny_sweep()
  config.vectorize_trials, config.dataset.placement = 2, "host"
  with pytest.raises(ConfigError, match=r"^vectorize_trials=2 needs the training set on the"):
    launch.launch(config, CONFIG, str(tmp_path / "w"), {})
  assert capsys.readouterr().out == "" and not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("cluster, num_devices, devices", [
    (dict(gpus_per_node=4), 0, 4),                                  # one process, all 4 GPUs
    (dict(nodes=2, tasks_per_node=4, gpus_per_node=4), 0, 8),       # one process per GPU
    (dict(nodes=2, tasks_per_node=4, gpus_per_node=4), 2, 2),
    (dict(), 0, 8),                      # CPU: this process's mesh (tests: 8 fake CPU devices)
    (dict(), 3, 3),
    (dict(nodes=2), 0, 16),              # CPU, 2 processes of 8 devices each
])
def test_a_trial_is_checked_against_the_devices_it_gets_on_the_cluster(cluster, num_devices,
                                                                       devices):
  config = tiny_sweep(**cluster)
  config.num_devices = num_devices
  assert launch.trial_devices(config, sbatch.read_cluster(config)) == devices


# Values that would break the sbatch script.

def test_a_line_break_in_a_cluster_field_is_one_line_and_writes_nothing(tmp_path):
  result = run_launcher(tmp_path / "w", "--config.cluster.partition=gpu\ntouch INJECTED")
  assert_one_line_config_error(result, "cluster.partition='gpu\\ntouch INJECTED'")
  assert not os.path.exists(tmp_path / "w") and not os.path.exists(os.path.join(REPO, "INJECTED"))


@pytest.mark.parametrize("cluster, message", [
    (dict(partition="gpu\ntouch INJECTED"), "cluster.partition='gpu\\ntouch INJECTED' has the"
     " non-printing character '\\n'"),
    (dict(partition="gpu debug"), "cluster.partition='gpu debug' has ' ': sbatch splits"),
    (dict(partition="gpu#a"), "cluster.partition='gpu#a' has '#'"),
    (dict(account="proj\r"), "cluster.account='proj\\r' has the non-printing character '\\r'"),
    (dict(account="my proj"), "cluster.account='my proj' has ' '"),
    (dict(mem="64G\n#SBATCH --x"), "cluster.mem='64G\\n#SBATCH --x' is not a Slurm memory size"),
    (dict(mem="64 G"), "cluster.mem='64 G' is not a Slurm memory size"),
    (dict(time="04:00:00\ntouch INJECTED"), "cluster.time='04:00:00\\ntouch INJECTED' is not a"
     " Slurm time limit"),
    (dict(time=" 04:00:00"), "cluster.time=' 04:00:00' is not a Slurm time limit"),
    (dict(time="25:99:99"), "cluster.time='25:99:99' has minutes=99"),
    (dict(time="4:00:60"), "cluster.time='4:00:60' has seconds=60"),
    (dict(time="10:75"), "cluster.time='10:75' has seconds=75"),
    (dict(time="1-24"), "cluster.time='1-24' has hours=24"),
    (dict(time="1-02:60"), "cluster.time='1-02:60' has minutes=60"),
    (dict(time="٣"), "cluster.time='٣' is not a Slurm time limit"),
    (dict(extra_sbatch=("--qos=high\ntouch INJECTED",)), "cluster.extra_sbatch[0]="
     "'--qos=high\\ntouch INJECTED' has the non-printing character '\\n'"),
    (dict(extra_sbatch=("--qos=high", "--comment=a b")), "cluster.extra_sbatch[1]="
     "'--comment=a b' has ' '"),
    (dict(extra_sbatch=("qos=high",)), "cluster.extra_sbatch[0]='qos=high' is not an sbatch"
     " option"),
    (dict(setup="module load cuda\ntouch INJECTED"), "cluster.setup='module load cuda\\ntouch"
     " INJECTED' has the non-printing character '\\n'"),
    (dict(setup="source venv/bin/activate \\"), "cluster.setup='source venv/bin/activate \\\\'"
     " ends in a backslash"),
    (dict(setup="echo 'unclosed"), "cluster.setup=\"echo 'unclosed\" is not one complete shell"
     " command"),
    (dict(python="python3\n"), "cluster.python='python3\\n' has the non-printing character"),
])
def test_values_that_would_break_the_script_are_refused(cluster, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    sbatch.read_cluster(tiny_sweep(**cluster))


@pytest.mark.parametrize("cluster, message", [
    (dict(extra_sbatch="--qos=high"), "cluster.extra_sbatch='--qos=high' must be a tuple"),
    (dict(extra_sbatch=(None,)), "cluster.extra_sbatch[0]=None is not an sbatch option"),
    (dict(partition=None), "cluster.partition=None must be a string"),
    (dict(nodes="2"), "cluster.nodes='2' must be an integer"),
    (dict(nodes=True), "cluster.nodes=True must be an integer"),
])
def test_a_cluster_field_of_the_wrong_type_is_refused(cluster, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    sbatch.read_cluster(retyped_cluster(**cluster))


@pytest.mark.parametrize("text, seconds", [
    ("25:00:00", 90000), ("0:59", 59), ("90:30", 5430), ("3-23:59:59", 345599), ("2-0", 172800)])
def test_slurm_time_limits_with_units_in_range(text, seconds):
  assert sbatch.time_limit_seconds(text) == seconds


def test_every_sbatch_line_reads_back_as_the_values_written(tmp_path, capsys, monkeypatch):
  """Paths are the user's: a space, a '#', quotes or a '%' in them stay inside their option."""
  chdir = tmp_path / "it's here #1"
  chdir.mkdir()
  monkeypatch.chdir(chdir)
  workdir = tmp_path / 'my "runs" 100%'
  config = tiny_sweep(partition="gpu,debug", account="proj-1", mem="64G",
                      extra_sbatch=("--qos=high", "--constraint=a100|h100"),
                      setup="source 'my venv/bin/activate' && module load cuda")
  launch.launch(config, CONFIG, str(workdir), {})
  with open(workdir / "slurm" / "sweep.sbatch") as f:
    lines = f.read().splitlines()
  header = [sbatch_arguments(line) for line in lines if line.startswith("#SBATCH")]
  assert all(len(args) == 1 for args in header), header
  options = [args[0] for args in header]
  assert {f"--output={tmp_path}/my \"runs\" 100%%/slurm/trial-%a.job-%A.log",
          f"--chdir={chdir}", "--job-name=scaling-my \"runs\" 100%", "--partition=gpu,debug",
          "--account=proj-1", "--mem=64G", "--qos=high", "--constraint=a100|h100",
          "--requeue", "--signal=TERM@300"} <= set(options)
  # sbatch reads directives up to the first command: every one is above it.
  first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
  assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
  assert "source 'my venv/bin/activate' && module load cuda" in lines
  result = subprocess.run(["bash", "-n", str(workdir / "slurm" / "sweep.sbatch")],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("workdir, message", [
    ("runs/a\nb", "--workdir='runs/a\\nb' has the non-printing character '\\n'"),
    ("runs\\a", "--workdir='{tmp_path}/runs\\\\a' has a backslash"),
])
def test_a_workdir_that_would_break_the_script_is_refused(tmp_path, capsys, monkeypatch, workdir,
                                                          message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match="^" + re.escape(message.format(tmp_path=tmp_path))):
    launch.launch(tiny_sweep(), CONFIG, workdir, {})
  assert capsys.readouterr().out == "" and os.listdir(tmp_path) == []
