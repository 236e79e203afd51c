"""Sweep expansion, trial selection, skip-done, locking, and a real tiny sweep end to end."""
import csv
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import mnist_sweep
from scaling import sweep
from scaling.config import ConfigError
from tests.test_report import check_report
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expansion_order_ids_and_directories(tmp_path):
  trials = sweep.expand(mnist_sweep.get_config(), str(tmp_path))
  assert len(trials) == 60
  assert [t.id for t in trials[:3]] == [
      "lr_multiplier=0.5,seed=0,base_lr=0.018,bs=16,budget.length=5101,eval_every.length=80",
      "lr_multiplier=0.5,seed=0,base_lr=0.021,bs=32,budget.length=2701,eval_every.length=40",
      "lr_multiplier=0.5,seed=0,base_lr=0.06,bs=64,budget.length=1501,eval_every.length=24"]
  assert trials[5].config.batch_size == 512 and trials[5].overrides == {
      "lr_multiplier": 0.5, "seed": 0, "base_lr": 0.2, "batch_size": 512, "budget.length": 451.0,
      "eval_every.length": 8.0}
  assert trials[5].directory == os.path.join(str(tmp_path), "trials", trials[5].id)
  # Expanding again gives the same index -> trial mapping (what a cluster array job relies on).
  assert [t.id for t in sweep.expand(mnist_sweep.get_config(), str(tmp_path))] == [
      t.id for t in trials]


def test_zipped_axes_and_nested_fields(tmp_path):
  c = tiny_config()
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict({"optimizer": {"name": ("momentum", "adam")}})
    c.sweep_zip = ml_collections.ConfigDict({"batch_size": (16, 64), "base_lr": (0.1, 0.4)})
  trials = sweep.expand(c, str(tmp_path))
  assert [t.id for t in trials] == [
      "optimizer.name=momentum,base_lr=0.1,bs=16", "optimizer.name=momentum,base_lr=0.4,bs=64",
      "optimizer.name=adam,base_lr=0.1,bs=16", "optimizer.name=adam,base_lr=0.4,bs=64"]
  assert trials[3].config.optimizer.name == "adam" and trials[3].config.base_lr == 0.4


@pytest.mark.parametrize("axes,message", [
    ({"batch_sise": (16, 32)}, "sweep axis 'batch_sise' is not a config field"),
    ({"batch_size": ()}, "sweep.batch_size is an empty axis"),
    ({"model": {"depth": (1, 2)}}, "sweep axis 'model.depth' is not a config field"),
])
def test_bad_axes_fail_before_training(tmp_path, axes, message):
  c = tiny_config()
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict(axes)
  with pytest.raises(ConfigError, match=message):
    sweep.main(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "trials")


@pytest.mark.parametrize("field,values,message", [
    ("batch_size", (32, 12), r"trial 1 \(bs=12\): batch_size=12 is not divisible by the 8 devices"),
    ("lr_rule", ("linear", "cubic"), r"lr_rule='cubic' is unknown"),
    ("optimizer.name", ("sgd", "adagrad"), r"optimizer.name='adagrad' is unknown"),
])
def test_invalid_trials_fail_before_any_training(tmp_path, field, values, message):
  c = tiny_config()
  with c.unlocked():
    node = c.sweep
    *parents, leaf = field.split(".")
    for p in parents:
      node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = values
  with pytest.raises(ConfigError, match=message):
    sweep.main(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "trials")


def test_warmup_longer_than_run_is_rejected(tmp_path):
  with pytest.raises(ConfigError, match=r"warmup \(40 steps\) is longer than the run \(24 steps"):
    sweep.main(tiny_config(**{"warmup.length": 40.0}), str(tmp_path))


def test_trial_selection_by_index_and_id(tmp_path):
  trials = sweep.expand(mnist_sweep.get_config(), str(tmp_path))
  seventh = "lr_multiplier=0.5,seed=0,base_lr=0.28,bs=2048,budget.length=338,eval_every.length=4"
  assert sweep.select(trials, "7")[0].id == seventh
  assert sweep.select(trials, seventh)[0].index == 7
  with pytest.raises(ConfigError, match="--trial=99 matches no trial"):
    sweep.select(trials, "99")


def test_a_trial_running_elsewhere_is_locked(tmp_path):
  first, second = sweep.TrialLock(str(tmp_path)), sweep.TrialLock(str(tmp_path))
  assert first.acquire() and not second.acquire()
  first.release()
  assert second.acquire()
  second.release()


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  """4 real trials: batch 16/32 x a sane and a diverging base LR."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  c = tiny_config()
  with c.unlocked():
    c.sweep = ml_collections.ConfigDict({"batch_size": (16, 32), "base_lr": (0.05, 1e9)})
  summaries = sweep.main(c, workdir)
  return c, workdir, summaries


def test_tiny_sweep_writes_sweep_csv_and_goes_on_after_divergence(tiny_sweep):
  _, workdir, summaries = tiny_sweep
  assert [s["status"] for s in summaries] == ["done", "done", "diverged", "diverged"]
  with open(os.path.join(workdir, "sweep.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["id"] for r in rows] == ["base_lr=0.05,bs=16", "base_lr=0.05,bs=32",
                                     "base_lr=1e+09,bs=16", "base_lr=1e+09,bs=32"]
  assert [r["status"] for r in rows] == ["done", "done", "diverged", "diverged"]
  assert float(rows[1]["lr"]) == pytest.approx(0.05) and float(rows[0]["lr"]) == pytest.approx(0.025)
  assert float(rows[0]["final_valid_error"]) < 0.6 and rows[0]["steps_to_target"] == ""
  for trial in sweep.expand(tiny_sweep[0], workdir):
    config = json.load(open(os.path.join(trial.directory, "config.json")))
    assert config["trial_id"] == trial.id and config["sweep_axes"] == trial.overrides
    assert sorted(n for n in os.listdir(trial.directory) if not n.startswith("events")) == [
        ".lock", "checkpoints", "config.json", "metrics.jsonl", "summary.json"]


def test_rerun_skips_finished_trials(tiny_sweep, capsys):
  config, workdir, _ = tiny_sweep
  before = os.path.getmtime(os.path.join(workdir, "trials", "base_lr=0.05,bs=16", "metrics.jsonl"))
  summaries = sweep.main(config, workdir)
  out = capsys.readouterr().out
  assert sum(line.endswith(", skipped") for line in out.splitlines()) == 4
  assert "sweep: 4 trial(s): done 0, skipped 4, diverged 0, failed 0" in out
  assert [s["status"] for s in summaries] == ["done", "done", "diverged", "diverged"]
  after = os.path.getmtime(os.path.join(workdir, "trials", "base_lr=0.05,bs=16", "metrics.jsonl"))
  assert before == after


def test_report_of_a_real_tiny_sweep(tiny_sweep):
  check_report(tiny_sweep[1])


def test_cli_lists_trials_and_two_processes_run_different_trials(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "scaling.main", "--config=configs/mnist_sweep_tiny.py",
          f"--workdir={tmp_path}", "--config.budget.length=12.0", "--config.checkpoint.every_steps=0"]
  listing = subprocess.run(base + ["--list_trials"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
  assert listing.returncode == 0, listing.stderr[-1000:]
  lines = listing.stdout.strip().splitlines()
  assert lines[1].split() == ["0", "16", "0.01768", "3", "12", "bs=16,lr_multiplier=0.5,seed=0"]
  assert len(lines) == 13
  workers = [subprocess.Popen(base + [f"--trial={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 5)]
  for w in workers:
    _, err = w.communicate(timeout=300)
    assert w.returncode == 0, err[-1000:]
  with open(tmp_path / "sweep.csv") as f:
    status = {r["index"]: r["status"] for r in csv.DictReader(f)}
  assert status == {str(i): "done" if i in (0, 5) else "pending" for i in range(12)}
