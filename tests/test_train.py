"""One real trial end to end on the committed MNIST slice: outputs, device invariance, errors."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from scaling import train
from scaling.config import ConfigError
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def tensorboard_tags(workdir):
  """Parses the TFRecord-framed event file with tensorboardX's own proto: scalar tags -> count."""
  from tensorboardX.proto import event_pb2
  (name,) = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
  tags = {}
  with open(os.path.join(workdir, name), "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      for value in event.summary.value:
        tags[value.tag] = tags.get(value.tag, 0) + 1
  return tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trial"))
  summary = train.run(tiny_config(**{"budget.length": 48.0, "curvature.enabled": True}), workdir)
  return workdir, summary


def test_trial_learns_and_writes_every_output(trained):
  workdir, summary = trained
  records = read_records(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert losses[-1] < 0.6 * losses[0]
  assert summary["status"] == "done" and summary["step"] == 48
  assert summary["final"]["valid/error"] < 0.5       # 10 classes: chance is 0.9
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == list(range(4, 49, 4))               # every log_every_steps, none missing
  assert [r["step"] for r in records if "valid/error" in r] == list(range(8, 49, 8))
  assert all(r["examples"] == 32 * r["step"] for r in records)
  last_train = [r for r in records if "train/loss" in r][-1]
  for key in ("lr", "grad_norm", "param_norm", "examples_per_sec", "noise/b_simple"):
    assert key in last_train, key
  # Curvature is measured at the end (curvature.every_steps=0), with its cost, and the density.
  (curv,) = [r for r in records if "curvature/hessian_trace" in r]
  assert curv["step"] == 48 and summary["curvature"]["curvature/top_eigenvalue"] > 0
  assert curv["curvature/eigenvalues"][0] >= curv["curvature/eigenvalues"][1] > 0
  assert curv["curvature/hessian_trace"] > curv["curvature/top_eigenvalue"]
  assert curv["curvature/sharpness"] > 0 and curv["cost/trace_in_steps"] > 0
  density = np.load(os.path.join(workdir, "density_48.npz"))
  grid = density["grid"]
  assert np.sum(density["density"]) * (grid[1] - grid[0]) == pytest.approx(1, rel=1e-3)
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["derived"]["total_steps"] == 48 and config["derived"]["lr"] == 0.05
  assert config["derived"]["warmup_steps"] == 4
  tags = tensorboard_tags(workdir)
  assert tags["train/loss"] == 12 and tags["valid/error"] == 6


def test_logged_lr_follows_the_schedule(trained):
  workdir, _ = trained
  lrs = {r["step"]: r["lr"] for r in read_records(workdir) if "lr" in r}
  # `lr` of the record at step s is the LR used by step s-1 (0-based): warmup of 4 steps to 0.05.
  assert lrs[4] == pytest.approx(0.05 * 3 / 4)
  assert lrs[48] < lrs[8] < 0.05


def test_one_and_eight_devices_agree(tmp_path):
  """Same global batch, same groups (BatchNorm per group): numbers agree to float tolerance."""
  results = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f"d{devices}")
    train.run(tiny_config(num_devices=devices, **{"model.batch_norm": True}), workdir)
    results[devices] = read_records(workdir)
  assert len(results[1]) == len(results[8])
  for one, eight in zip(results[1], results[8]):
    for key, value in one.items():
      if key not in ("wall_time", "examples_per_sec") and not key.startswith("cost/"):
        np.testing.assert_allclose(eight[key], value, rtol=2e-4, atol=1e-6, err_msg=key)


def test_target_is_recorded_and_can_stop_the_trial(tmp_path):
  summary = train.run(tiny_config(**{"target.value": 0.85, "target.stop_at_target": True}),
                      str(tmp_path))
  target = summary["target"]
  assert target["reached"] and target["step"] == 8 and target["examples"] == 256
  assert summary["status"] == "done" and summary["step"] == 8


def test_nan_loss_is_a_diverged_result(tmp_path):
  # Only a non-finite loss counts (the loss-multiple test would stop it before NaN).
  summary = train.run(tiny_config(base_lr=1e9, **{"divergence.loss_multiple": 0.0}), str(tmp_path))
  assert summary["status"] == "diverged" and "train/loss is nan" in summary["diverged_reason"]
  assert summary["diverged_at_step"] is not None and summary["diverged_at_step"] < 24
  assert json.load(open(tmp_path / "summary.json"))["status"] == "diverged"
  last = read_records(str(tmp_path))[-1]
  assert not np.isfinite(last["train/loss"])


def test_indivisible_batch_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by the 8 devices"):
    train.run(tiny_config(batch_size=12), str(tmp_path))
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "scaling.main", "--config=configs/mnist.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_rejects_a_misspelt_field_and_an_indivisible_batch(tmp_path):
  typo = _cli(f"--workdir={tmp_path}", "--config.batch_sise=64")
  assert typo.returncode != 0 and "batch_sise" in typo.stderr
  bad = _cli(f"--workdir={tmp_path}", "--config.dataset.name=mnist_tiny",
             "--config.dataset.validation_size=100", "--config.batch_size=100")
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == (
      "config error: batch_size=100 is not divisible by the 8 devices: use a multiple of 8")
  assert "Traceback" not in bad.stderr


@pytest.mark.slow
def test_default_mnist_config_reaches_97_percent(tmp_path):
  """The README's single-trial command on real MNIST (3 epochs of the CNN: ~minutes here)."""
  result = subprocess.run(
      [sys.executable, "-m", "scaling.main", "--config=configs/mnist.py", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=3600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["status"] == "done"
  assert 1 - summary["final"]["test/error"] >= 0.97
