"""Reruns of a sweep whose workdir holds earlier work, as a user meets them (`python -m
scaling.main` in a subprocess): a changed config is refused before any trial trains and leaves
sweep.json as it was; a damaged file of a trial is one line naming it and the fix, never a
traceback and never a restart that empties the trial's records; records lost before the resume
step are reported. Also the multi-process flags, the one-line promise after JAX is imported, and
the compilation cache a run uses (the environment's, so a test run never reads the user's).

One 2-trial sweep of the tiny config is trained once for the module (trial 1 only, ~10 s); each
case copies it before changing anything.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two trials (seeds 0 and 1) of one batch size and multiplier.
SWEEP = ["--config=configs/mnist_sweep_tiny.py", "--config.sweep.batch_size=(16,)",
         "--config.sweep.lr_multiplier=(2.0,)", "--config.sweep.seed=(0,1)",
         "--config.checkpoint.every_steps=6"]
TRIAL_1 = "bs=16,lr_multiplier=2,seed=1"


def run_main(workdir, *args, env=None):
  return subprocess.run([sys.executable, "-m", "scaling.main", f"--workdir={workdir}", *SWEEP,
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=env)


def assert_one_line(result, *names):
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 1, (result.returncode, result.stderr)
  last = result.stderr.strip().splitlines()[-1]
  for name in names:
    assert name in last, last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir whose trial 1 is done (checkpoints at its steps) and trial 0 never started."""
  workdir = tmp_path_factory.mktemp("trained") / "sweep"
  result = run_main(workdir, "--trial=1")
  assert result.returncode == 0, result.stderr
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / "sweep"
  shutil.copytree(trained, copy)
  return copy


def test_a_changed_config_is_refused_before_any_trial_trains(workdir):
  os.remove(_trial(workdir) / "summary.json")   # trial 1 preempted (its checkpoints kept)
  sweep_json = (workdir / "sweep.json").read_bytes()
  result = run_main(workdir, "--config.base_lr=0.1")
  assert_one_line(result, f"trials/{TRIAL_1}", "base_lr was 0.05, now 0.1")
  # Trial 0 comes first in the sweep: before, it trained to done under 0.1, then trial 1 refused.
  assert not os.path.exists(workdir / "trials" / "bs=16,lr_multiplier=2,seed=0" / "config.json")
  assert (workdir / "sweep.json").read_bytes() == sweep_json


def _trial(workdir):
  return workdir / "trials" / TRIAL_1


def _damage_summary_list(t):
  (t / "summary.json").write_text("[1]")


def _damage_summary_bytes(t):
  (t / "summary.json").write_bytes(b"\xff\xfe{")


def _damage_config_of_done(t):
  text = (t / "config.json").read_text()
  (t / "config.json").write_text(text[:len(text) // 2])


def _damage_config_of_preempted(t):   # no summary, checkpoints: a trial stopped mid-run
  os.remove(t / "summary.json")
  _damage_config_of_done(t)


def _lock_is_a_directory(t):
  os.remove(t / ".lock")
  os.mkdir(t / ".lock")


def _checkpoints_is_a_file(t):
  shutil.rmtree(t / "checkpoints")
  (t / "checkpoints").write_text("")


@pytest.mark.parametrize("damage,file,fix", [
    (_damage_summary_list, "summary.json", "delete it and rerun"),
    (_damage_summary_bytes, "summary.json", "delete it and rerun"),
    (_damage_config_of_done, "config.json", "train the trial again"),
    (_damage_config_of_preempted, "config.json", "resume the trial from its checkpoint"),
    (_lock_is_a_directory, ".lock", "move it out of the way"),
    (_checkpoints_is_a_file, "checkpoints", "move it out of the way"),
], ids=["summary [1]", "summary not UTF-8", "config.json of a done trial cut",
        "config.json of a preempted trial cut", ".lock a directory", "checkpoints a file"])
def test_a_damaged_trial_file_is_one_line_naming_it(workdir, damage, file, fix):
  trial = _trial(workdir)
  damage(trial)
  metrics = (trial / "metrics.jsonl").read_bytes()
  result = run_main(workdir, "--trial=1")
  assert_one_line(result, f"{trial / file} is", fix)
  assert (trial / "metrics.jsonl").read_bytes() == metrics   # never restarted at step 0


def test_records_lost_before_the_resume_step_are_reported(workdir):
  trial = _trial(workdir)
  os.remove(trial / "summary.json")   # as if preempted after its last checkpoint
  steps = sorted(int(n) for n in os.listdir(trial / "checkpoints") if n.isdigit())
  resume = steps[-1]
  records = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
  dropped = [r["step"] for r in records if "train/loss" in r and r["step"] in (3, 6)]
  assert dropped == [3, 6] and resume > 6
  (trial / "metrics.jsonl").write_text("".join(
      json.dumps(r) + "\n" for r in records if r["step"] not in dropped or "train/loss" not in r))
  result = run_main(workdir, "--trial=1")
  assert result.returncode == 0, result.stderr
  assert (f"lacks the train records of 2 step(s) before the resume step {resume} (steps 3..6)"
          in result.stderr), result.stderr


def test_an_intact_resume_reports_no_gap(workdir):
  trial = _trial(workdir)
  os.remove(trial / "summary.json")
  result = run_main(workdir, "--trial=1")
  assert result.returncode == 0, result.stderr
  assert "lacks the train records" not in result.stderr


def test_an_error_after_jax_is_imported_is_the_only_line(tmp_path):
  """Orbax's 'Type handler registry ... overriding jax.Array' warning came before every error
  found after JAX is imported."""
  result = run_main(tmp_path / "run", "--config.grad_groups=0", "--compilation_cache=")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
  assert result.stderr.startswith("config error: trial 0"), result.stderr


@pytest.mark.parametrize("flags,names", [
    (["--distributed"], ["--distributed", "--coordinator_address"]),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     ["--process_id=2", "0 .. --num_processes - 1"]),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=0", "--process_id=0"],
     ["--num_processes=0"]),
    (["--coordinator_address=not_an_address", "--num_processes=2", "--process_id=0"],
     ["--coordinator_address='not_an_address'", "host:port"]),
], ids=["distributed outside a cluster", "process_id too large", "no processes",
        "coordinator not host:port"])
def test_bad_distributed_flags_are_one_line(tmp_path, flags, names):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
  result = run_main(tmp_path / "run", *flags, env=env)
  assert_one_line(result, *names)


def test_the_compilation_cache_follows_the_environment(tmp_path):
  """--compilation_cache defaulted to ~/.cache/scaling/jax even with JAX_COMPILATION_CACHE_DIR
  set: every test's subprocess read and wrote the user's cache."""
  env = {**os.environ, "HOME": str(tmp_path / "home"),
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  result = run_main(tmp_path / "run", "--trial=0",
                    "--config.budget.length=6", env=env)
  assert result.returncode == 0, result.stderr
  assert os.listdir(tmp_path / "cache")
  assert not os.path.exists(tmp_path / "home" / ".cache" / "scaling")


def test_one_trial_of_a_changed_sweep_is_refused(workdir):
  """--trial=N (a Slurm array task) checked only its own directory: trial 0 trained under the new
  config beside trial 1's run of the old one, and the report merged them."""
  sweep_json = (workdir / "sweep.json").read_bytes()
  result = run_main(workdir, "--trial=0", "--config.model.widths=(32,)")
  assert_one_line(result, "--trial=0: the sweep's trial 1", "model.widths was [64], now [32]")
  assert not os.path.exists(workdir / "trials" / "bs=16,lr_multiplier=2,seed=0" / "config.json")
  assert (workdir / "sweep.json").read_bytes() == sweep_json


@pytest.mark.parametrize("name,make", [
    ("trials", lambda p: (shutil.rmtree(p), p.write_text(""))),
    ("sweep.json", lambda p: (os.remove(p), os.mkdir(p))),
    ("sweep.csv", lambda p: (os.remove(p), os.mkdir(p))),
], ids=["trials a file", "sweep.json a directory", "sweep.csv a directory"])
def test_a_sweep_file_of_the_wrong_kind_is_one_line(workdir, name, make):
  make(workdir / name)
  assert_one_line(run_main(workdir, "--trial=0"), f"{workdir / name} is", "move it out of the way")


def test_a_trial_that_stopped_at_its_target_is_not_trained_again(workdir):
  """With its summary.json lost, the resume trained one more segment past its target."""
  trial = _trial(workdir)
  summary = json.loads((trial / "summary.json").read_text())
  assert summary["stop_reason"] == "target", summary["stop_reason"]
  metrics = (trial / "metrics.jsonl").read_text()
  os.remove(trial / "summary.json")
  result = run_main(workdir, "--trial=1")
  assert result.returncode == 0, result.stderr
  assert (trial / "metrics.jsonl").read_text() == metrics
  again = json.loads((trial / "summary.json").read_text())
  assert (again["status"], again["step"]) == ("done", summary["step"])


def test_list_trials_lists_the_selected_trial(tmp_path):
  result = run_main(tmp_path / "run", "--list_trials", "--trial=1")
  lines = result.stdout.strip().splitlines()
  assert result.returncode == 0 and len(lines) == 2 and lines[1].endswith(TRIAL_1), result.stdout
  assert_one_line(run_main(tmp_path / "run", "--list_trials", "--trial=99"), "--trial=99")


@pytest.mark.parametrize("flags,names", [
    (["--num_processes=2"], ["--num_processes and --process_id act only"]),
    (["--coordinator_address=127.0.0.1:99999", "--num_processes=2", "--process_id=0"],
     ["port 99999"]),
], ids=["processes without a coordinator", "port out of range"])
def test_multi_process_flags_that_would_be_ignored_or_hang(tmp_path, flags, names):
  assert_one_line(run_main(tmp_path / "run", *flags), *names)


def run_tool(tool, *args):
  return subprocess.run([sys.executable, "-m", f"scaling.{tool}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_the_launcher_refuses_a_sweep_every_task_would_refuse(workdir):
  os.remove(_trial(workdir) / "summary.json")   # preempted
  result = run_tool("launch", f"--workdir={workdir}", *SWEEP, "--config.base_lr=0.1", "--dry_run")
  assert_one_line(result, "holds a different run", "base_lr was 0.05, now 0.1")
  assert_one_line(run_tool("launch", "--workdir=", *SWEEP, "--dry_run"), "--workdir is empty")


def test_the_report_on_a_directory_without_a_sweep_writes_nothing(tmp_path):
  assert_one_line(run_tool("report", f"--workdir={tmp_path}"), "holds no sweep or trial")
  assert os.listdir(tmp_path) == []


def test_a_report_file_that_is_a_directory_is_one_line(workdir):
  os.makedirs(workdir / "report" / "index.html")
  assert_one_line(run_tool("report", f"--workdir={workdir}"),
                  f"cannot write {workdir / 'report' / 'index.html'}")


@pytest.mark.parametrize("tool", ["status", "report", "measure_checkpoint"])
def test_a_tool_refuses_a_positional_argument(tmp_path, tool):
  assert_one_line(run_tool(tool, f"--workdir={tmp_path}", "stray"), "unexpected argument 'stray'")
