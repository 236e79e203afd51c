"""Faults that must tell the truth: divergence, failed trials, reruns with another config, trial ids
that collide or escape the workdir, an offline reader beside a running trial, a full disk.

Bad input and faults seen from the command line end in one line on stderr that names the field
(or the file) and the fix, with no traceback; the signal tests are in test_checkpoint.py.
"""
import csv
import json
import logging as py_logging
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from scaling import sweep
from scaling.config import ConfigError
from scaling.training import checkpoint, metrics, train
from tests.test_checkpoint import abstract_state, cli_flags, small_state
from tests.tiny import read_records, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def cli(args: list[str], hooks: dict | None = None, prefix=()) -> subprocess.CompletedProcess:
  return subprocess.run([*prefix, sys.executable, *args], cwd=REPO, env={**ENV, **(hooks or {})},
                        capture_output=True, text=True, timeout=600)


def trial_cli(workdir, config, hooks=None, prefix=()) -> subprocess.CompletedProcess:
  return cli(["tests/harness.py", "--config=configs/mnist.py", f"--workdir={workdir}",
              *cli_flags(config)], hooks, prefix)


def last_line(process) -> str:
  lines = process.stderr.strip().splitlines()
  return lines[-1] if lines else ""


def assert_one_line_error(process, *words):
  assert process.returncode == 1, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  for word in words:
    assert word in last_line(process), process.stderr[-3000:]


def read_summary(directory) -> dict:
  with open(os.path.join(directory, "summary.json")) as f:
    return json.load(f)


# 8. Divergence: a non-finite loss, or one past divergence.loss_multiple x the initial loss.

def test_an_exploding_but_finite_loss_ends_diverged_with_where_and_why(tmp_path):
  """base_lr=1e6 on the tiny MLP: losses 4e19, 1e30, ..., finite, and the trial used to be `done`."""
  summary = train.run(tiny_config(base_lr=1e6), str(tmp_path))
  assert summary == read_summary(tmp_path)
  assert summary["status"] == "diverged"
  step = summary["diverged_at_step"]
  assert 0 < step < 24
  assert "divergence.loss_multiple=100 x the initial loss" in summary["diverged_reason"]
  assert f"at step {step}" in summary["diverged_reason"]
  records = read_records(tmp_path)
  assert records[-1]["step"] == step + 1          # logged up to the step that exploded, no further
  initial = float(re.search(r"initial loss (\S+)$", summary["diverged_reason"]).group(1))
  assert np.log(10) / 2 < initial < 2 * np.log(10)   # the threshold's unit: ~ln(classes)


def test_with_the_multiple_off_only_a_non_finite_loss_diverges(tmp_path):
  summary = train.run(tiny_config(base_lr=1e6, **{"divergence.loss_multiple": 0.0}), str(tmp_path))
  assert summary["status"] == "done" and summary["final"]["train/loss"] > 1e4   # today's default


@pytest.mark.parametrize("value", ["0.5", "1.0", "-3", "inf", "nan"])
def test_a_bad_loss_multiple_is_one_line_before_training(tmp_path, value):
  process = cli(["-m", "scaling.main", "--config=configs/mnist_sweep_tiny.py",
                 f"--workdir={tmp_path}", f"--config.divergence.loss_multiple={value}"])
  assert_one_line_error(process, "divergence.loss_multiple=", "invalid: use a finite number > 1")
  assert not os.path.exists(tmp_path / "trials")


# 10. A finished trial rerun with another config is refused naming the field.

def test_rerunning_a_finished_trial_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path / "trial")
  config = tiny_config()
  assert sweep.main(config, workdir)[0]["status"] == "done"
  before = {name: open(os.path.join(workdir, name)).read()
            for name in ("summary.json", "config.json", "metrics.jsonl")}
  with pytest.raises(ConfigError, match=r"base_lr was 0\.05, now 0\.1 \(1 field\(s\) differ\)"):
    sweep.main(tiny_config(base_lr=0.1), workdir)
  process = trial_cli(workdir, tiny_config(base_lr=0.1))
  assert_one_line_error(process, "base_lr was 0.05, now 0.1")
  assert before == {name: open(os.path.join(workdir, name)).read() for name in before}
  # The same config is skipped, and so is one that differs only where a resume may differ.
  assert sweep.main(tiny_config(eval_batch_size=100), workdir)[0]["status"] == "done"


def test_a_finished_sweep_trial_with_another_config_is_refused_before_any_training(tmp_path):
  c = tiny_config(**{"budget.length": 8.0})
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict({"batch_size": (16, 32)})
  sweep.main(c, str(tmp_path), trial="1")
  with c.unlocked():
    c.warmup.length = 2.0
  with pytest.raises(ConfigError, match=r"trials/bs=32 holds a different run: warmup.length was"
                                        r" 4.0, now 2.0"):
    sweep.main(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "trials" / "bs=16" / "summary.json")   # 0 did not run
  with open(tmp_path / "sweep.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["pending", "done"]


# 11. Trial ids: unique and one directory inside <workdir>/trials.

def sweep_of(**axes):
  c = tiny_config()
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict(axes)
  return c


def test_values_that_print_alike_get_different_ids(tmp_path):
  trials = sweep.expand(sweep_of(base_lr=(0.05, 0.05000001, 1e9)), str(tmp_path))
  assert [t.id for t in trials] == ["base_lr=0.05", "base_lr=0.05000001", "base_lr=1e+09"]
  assert len({t.directory for t in trials}) == 3


def test_no_value_writes_outside_the_workdir(tmp_path):
  c = tiny_config()
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict({"dataset": {"name": ("x/../../..", "..", "a b\n")}})
  trials = sweep.expand(c, str(tmp_path))
  assert [t.id for t in trials] == ["dataset.name=x%2F..%2F..%2F..", "dataset.name=..",
                                    "dataset.name=a%20b%0A"]
  for t in trials:
    assert os.path.dirname(t.directory) == os.path.join(str(tmp_path), "trials")
    assert os.path.basename(t.directory) == t.id and t.id not in (".", "..")
  assert sweep.select(trials, "dataset.name=x%2F..%2F..%2F..") == [trials[0]]


def test_ids_that_would_share_a_directory_are_refused(tmp_path):
  with pytest.raises(ConfigError, match=r"trials 0 and 1 would share the directory"
                                        r" trials/optimizer.name=Adam"):
    sweep.expand(sweep_of(optimizer={"name": ("adam", "Adam")}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"trials 0 and 1 would share the directory"
                                        r" trials/base_lr=1"):
    sweep.expand(sweep_of(base_lr=(1, 1.0)), str(tmp_path))


# 12. The offline measurement reads checkpoints and never touches them.

def test_a_read_only_reader_keeps_saves_in_progress_and_damaged_checkpoints(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  for step in (1, 2):
    ckpts.save(step, small_state(float(step)), {"step": step})
  ckpts.close()
  in_progress = tmp_path / f"3{checkpoint.TMP_MARKER}"       # another process's save
  shutil.copytree(tmp_path / "2", in_progress)
  os.remove(tmp_path / "2" / "state" / "_METADATA")           # and a damaged latest
  before = sorted(os.listdir(tmp_path))

  reader = checkpoint.Checkpoints(str(tmp_path), keep=3, read_only=True)
  step, _, book = reader.restore_latest(abstract_state())
  reader.close()
  assert (step, book) == (1, {"step": 1})
  assert sorted(os.listdir(tmp_path)) == before               # nothing removed, nothing moved


@pytest.fixture(scope="module")
def finished_trial(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("measured") / "trial")
  train.run(tiny_config(), workdir)
  return workdir


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_measure_checkpoint_beside_a_save_in_progress(finished_trial, tmp_path):
  workdir = str(tmp_path / "trial")
  shutil.copytree(finished_trial, workdir)
  in_progress = os.path.join(workdir, "checkpoints", f"32{checkpoint.TMP_MARKER}")
  shutil.copytree(os.path.join(workdir, "checkpoints", "24"), in_progress)
  process = cli(["-m", "scaling.measure_checkpoint", f"--workdir={workdir}", "--step=16",
                 "--nodensity"])
  assert process.returncode == 0, process.stderr[-3000:]
  assert os.path.isdir(in_progress)                            # used to be deleted
  with open(os.path.join(workdir, "curvature_16.json")) as f:
    assert json.load(f)["step"] == 16


@pytest.mark.parametrize("flags,words", [
    (["--workdir={missing}"], ["--workdir=", "is not a directory"]),
    (["--workdir={trial}", "--step=abc"], ["--step=abc is not a step"]),
    (["--workdir={trial}", "--step=7"], ["--step=7: no usable checkpoint", "[8, 16, 24]"]),
    (["--workdir={empty}"], ["has no config.json"]),
])
def test_measure_checkpoint_bad_input_is_one_line(finished_trial, tmp_path, flags, words):
  os.makedirs(tmp_path / "empty")
  paths = dict(missing=tmp_path / "missing", trial=finished_trial, empty=tmp_path / "empty")
  process = cli(["-m", "scaling.measure_checkpoint", *[f.format(**paths) for f in flags]])
  assert_one_line_error(process, *words)


# 13. A trial that crashes is `failed`, the sweep goes on, a rerun retries it.

def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  c = tiny_config(**{"budget.length": 8.0})
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict({"batch_size": (16, 32)})
  run = train.run

  def fail_first(config, workdir, trial_id, sweep_axes):
    if trial_id == "bs=16":
      raise RuntimeError("lost the file system\nsecond line")
    return run(config, workdir, trial_id, sweep_axes)
  monkeypatch.setattr(train, "run", fail_first)
  summaries = sweep.main(c, str(tmp_path))
  assert [s["status"] for s in summaries] == ["failed", "done"]
  failed_dir = tmp_path / "trials" / "bs=16"
  assert read_summary(failed_dir)["failed_reason"] == "RuntimeError: lost the file system"
  assert "Traceback" in (failed_dir / "traceback.txt").read_text()
  with open(tmp_path / "sweep.csv") as f:
    assert [r["status"] for r in csv.DictReader(f)] == ["failed", "done"]

  monkeypatch.setattr(train, "run", run)                     # the cause went away: retried
  assert [s["status"] for s in sweep.main(c, str(tmp_path))] == ["done", "done"]


def test_the_cli_exits_nonzero_naming_the_failed_trials(tmp_path):
  process = cli(["tests/harness.py", "--config=configs/mnist_sweep_tiny.py", f"--workdir={tmp_path}",
                 "--config.budget.length=8", "--config.grad_groups=8",
                 "--config.sweep.batch_size=(16,32)",
                 "--config.sweep.lr_multiplier=(2.0,)", "--config.sweep.seed=(0,)"],
                {"SCALING_TEST_FAIL": "bs=16,lr_multiplier=2,seed=0"})
  assert_one_line_error(process, "1 trial(s) failed", "bs=16,lr_multiplier=2,seed=0")
  assert "[1] bs=32,lr_multiplier=2,seed=0: training" in process.stdout        # went on
  assert read_summary(tmp_path / "trials" / "bs=32,lr_multiplier=2,seed=0")["status"] == "done"


# Disk full: one line when it happens, temporary files removed, nothing earlier lost.

def test_metrics_writes_on_a_full_disk_are_one_line(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), batch_size=8, total_steps=10)
  writer._jsonl.close()
  writer._jsonl = open("/dev/full", "a")                     # every flush: ENOSPC
  writer.write(1, {"train/loss": 1.0})
  with pytest.raises(metrics.DiskFull, match="disk full while writing metrics.jsonl"):
    writer.flush()
  with pytest.raises(metrics.DiskFull, match="disk full while writing summary.json"):
    with metrics.reporting_disk_full("summary.json", str(tmp_path)):
      raise OSError(28, "No space left on device")


def _unshare_works() -> bool:
  return shutil.which("unshare") is not None and subprocess.run(
      ["unshare", "-m", "true"], capture_output=True).returncode == 0


def run_on_small_disk(tmp_path, size: str, config) -> subprocess.CompletedProcess:
  """The trial on a tmpfs of `size` (a private mount namespace); its files are copied to
  tmp_path/kept when it ends."""
  disk, kept = tmp_path / "disk", tmp_path / "kept"
  os.makedirs(disk)
  script = (f"mount -t tmpfs -o size={size} tmpfs {disk} && \"$@\"; rc=$?; "
            f"cp -a {disk}/trial {kept}; exit $rc")
  args = [sys.executable, "tests/harness.py", "--config=configs/mnist.py",
          f"--workdir={disk}/trial", *cli_flags(config)]
  process = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args], cwd=REPO, env=ENV,
                           capture_output=True, text=True, timeout=600)
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(kept) for n in dirs + files
               if ".tmp" in n or checkpoint.TMP_MARKER in n]
  assert leftovers == []
  return process


needs_unshare = pytest.mark.skipif(not _unshare_works(),
                                   reason="needs `unshare -m` to mount a small tmpfs")


@pytest.mark.heavy   # a CLI trial on a tmpfs, then a CLI rerun
@needs_unshare
def test_a_full_disk_during_a_save_is_one_line_and_a_rerun_resumes(tmp_path):
  """A 600 KiB tmpfs holds the tiny trial's first checkpoints but not all of them."""
  config = tiny_config(**{"budget.length": 64.0, "checkpoint.keep": 10})
  process = run_on_small_disk(tmp_path, "600k", config)
  assert_one_line_error(process, "disk full while saving the checkpoint of step")
  kept = tmp_path / "kept"
  saved = sorted(int(n) for n in os.listdir(kept / "checkpoints") if n.isdigit())
  assert saved and saved[-1] < 64
  # Nothing earlier lost: the rerun on a roomy disk resumes from the latest and finishes.
  rerun = trial_cli(str(kept), config)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"from step {saved[-1]}" in rerun.stdout
  assert read_summary(kept)["status"] == "done"


@pytest.mark.heavy   # a CLI trial on a tmpfs
@needs_unshare
def test_a_full_disk_during_metrics_writes_is_one_line_not_a_hang(tmp_path):
  """20 KiB fill up with metrics and TensorBoard events long before the end (no checkpoints):
  tensorboardX's writer thread dies, and its queue used to block the loop forever."""
  config = tiny_config(**{"budget.length": 400.0, "checkpoint.every_steps": 0,
                          "eval_every.length": 40.0})
  process = run_on_small_disk(tmp_path, "20k", config)
  assert_one_line_error(process, "disk full while writing")


# Orbax's own tracebacks stay out of the checkpoint-fallback warning.

FALLBACK_SCRIPT = """
import os, shutil, sys
from tests.test_checkpoint import abstract_state, small_state
from scaling.training import checkpoint
root = sys.argv[1]
for attempt in range(5):   # TensorStore's late callbacks print only now and then
  directory = os.path.join(root, str(attempt))
  ckpts = checkpoint.Checkpoints(directory, keep=3)
  for step in (1, 2):
    ckpts.save(step, small_state(float(step)), {"step": step})
  ckpts.close()
  os.truncate(os.path.join(directory, "2", "state", "manifest.ocdbt"), 0)
  ckpts = checkpoint.Checkpoints(directory, keep=3)
  assert ckpts.restore_latest(abstract_state())[0] == 1
  ckpts.close()
"""


def test_a_damaged_checkpoint_warns_in_one_line_without_orbax_tracebacks(tmp_path):
  process = cli(["-c", FALLBACK_SCRIPT, str(tmp_path)])
  assert process.returncode == 0, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  warnings = [line for line in process.stderr.splitlines() if "unusable" in line]
  assert len(warnings) == 5 and all("step 2" in w for w in warnings)


def test_the_asyncio_filter_drops_only_abandoned_orbax_reads():
  """What asyncio logged in ~1 of 10 fallbacks (the test above failed on it now and then)."""
  def record(message):
    return py_logging.LogRecord("asyncio", py_logging.ERROR, __file__, 1, message, None, None)
  abandoned = ("Task exception was never retrieved\nfuture: <Task finished name='Task-783'"
               " coro=<async_deserialize() done, defined at .../orbax/checkpoint/_src/"
               "serialization/serialization.py:394> exception=ValueError('DATA_LOSS: Error"
               " opening \"cast\" driver')>")
  assert not checkpoint._quiet_abandoned_reads(record(abandoned))
  assert not checkpoint._quiet_abandoned_reads(record(
      "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
      "'DATA_LOSS: Error opening \"cast\" driver')>"))
  assert checkpoint._quiet_abandoned_reads(record(abandoned.replace("DATA_LOSS", "NOT_FOUND")))
  assert checkpoint._quiet_abandoned_reads(record("Task exception was never retrieved: other"))


def test_the_noise_filter_drops_only_closed_loop_callbacks():
  seen = []
  hook = checkpoint._drop_closed_loop_noise(seen.append)
  noise = type("U", (), {"exc_type": RuntimeError, "exc_value": RuntimeError("Event loop is closed")})
  other = type("U", (), {"exc_type": RuntimeError, "exc_value": RuntimeError("something else")})
  hook(noise)
  hook(other)
  assert seen == [other]
