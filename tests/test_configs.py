"""Every shipped config (configs/*.py, whoever added it) lists its trials on 1, 2, 4 and 8 devices
and trains its first steps on 8 fake devices: no config may assume a device count.

Training the first steps compiles the config's model (a ResNet: most of a minute on 2 cores), so
the default run trains one config per model family (FAMILY_REPRESENTATIVES, or a family's first
config in sorted order when it has none listed) and the heavy tier (`pytest -m heavy`, CI's
second pass) the others, and every config of the families in HEAVY_FAMILIES (the ResNet's
compile alone is ~25 s; its 1-vs-8-device step test is heavy too)."""
import glob
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from scaling import sweep
from scaling.training import train
from tests.tiny import override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))
# Train examples left after the configs' validation hold-out, so listing needs no download.
LISTED_SIZES = {("mnist", 5000): 55_000, ("fashion_mnist", 5000): 55_000}
_TINY_IMAGES = {"dataset.name": "mnist_tiny", "dataset.validation_size": 100}   # same shape
SMALL_DATA = {"mnist": _TINY_IMAGES, "fashion_mnist": _TINY_IMAGES,
              "shakespeare": {"dataset.name": "shakespeare_tiny"}}   # the committed slice


# The cheapest shipped config of each model family (tiny data where there is a choice).
FAMILY_REPRESENTATIVES = {"cnn": "mnist", "mlp": "mnist_sweep_tiny", "resnet": "resnet_mnist",
                          "transformer": "shakespeare_sweep_tiny"}
HEAVY_FAMILIES = {"resnet"}


def get_config(name):
  return importlib.import_module(f"configs.{name}").get_config()


class _Sized:
  def __init__(self, n):
    self.train_labels = np.zeros(n, np.int32)
    self.num_train = n


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_config_lists_its_trials(name, num_devices, tmp_path, monkeypatch, capsys):
  config = get_config(name)
  config.num_devices = num_devices
  real_load = train.load_data
  sized = LISTED_SIZES.get((config.dataset.name, config.dataset.validation_size))
  monkeypatch.setattr(train, "load_data", lambda d: _Sized(sized) if sized else real_load(d))
  sweep.main(config, str(tmp_path), list_only=True)
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split() == ["index", "batch", "lr", "warmup", "steps", "id"]
  assert len(lines) == 1 + len(sweep.expand(config, str(tmp_path)))


def test_list_trials_prints_only_the_table_on_a_new_machine(tmp_path):
  """Scripts parse --list_trials' stdout: a data set prepared for the first time (TFDS prints its
  banners on stdout) must not add lines there; the wait is explained on stderr instead."""
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
  command = [sys.executable, "-m", "scaling.main", "--config=configs/mnist_sweep_tiny.py",
             f"--workdir={tmp_path / 'sweep'}", "--list_trials", "--compilation_cache="]
  first, again = (subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=300) for _ in range(2))
  assert first.returncode == 0, first.stderr[-2000:]
  lines = first.stdout.splitlines()
  assert lines[0].split() == ["index", "batch", "lr", "warmup", "steps", "id"]
  trials = sweep.expand(get_config("mnist_sweep_tiny"), str(tmp_path / "sweep"))
  assert [line.split()[-1] for line in lines[1:]] == [t.id for t in trials]
  assert "Preparing data set 'mnist_tiny'" in first.stderr
  assert again.stdout == first.stdout and "Preparing" not in again.stderr   # prepared once


def _first_steps_params():
  """Every config; those other than their model family's representative marked heavy."""
  families = {}
  for name in CONFIGS:
    families.setdefault(get_config(name).model.name, []).append(name)
  params = []
  for family, names in families.items():
    representative = FAMILY_REPRESENTATIVES.get(family)
    if representative not in names:
      representative = names[0]
    default = (representative,) if family not in HEAVY_FAMILIES else ()
    params += [pytest.param(n, marks=() if n in default else pytest.mark.heavy) for n in names]
  return sorted(params, key=lambda p: p.values[0])


@pytest.mark.parametrize("name", _first_steps_params())
def test_config_trains_its_first_steps_on_eight_devices(name, tmp_path):
  """The config's first trial as shipped, on tiny data where it reads MNIST-like images, a
  shallow ResNet, two steps; nothing else changed (grad_groups, batch size, augmentation...)."""
  trial = sweep.expand(get_config(name), str(tmp_path))[0]
  config = override(trial.config, **{
      "num_devices": 8, "budget.unit": "steps", "budget.length": 2.0, "warmup.unit": "steps",
      "warmup.length": 1.0, "eval_every.unit": "steps", "eval_every.length": 2.0,
      "chunk_steps": 1, "curvature.enabled": False, "train_eval_size": 64,
      "eval_batch_size": 256, "checkpoint.every_steps": 0})
  if config.dataset.name in SMALL_DATA:
    override(config, **SMALL_DATA[config.dataset.name])
  if config.model.name == "resnet":
    config.model.depth = 8
  summary = train.run(config, str(tmp_path / "trial"))
  assert summary["status"] == "done" and summary["step"] == 2
  assert np.isfinite(summary["final"]["train/loss"])
  derived = json.load(open(tmp_path / "trial" / "config.json"))["derived"]
  groups = derived["microbatching"]["groups"]
  assert groups % 8 == 0 and groups >= config.grad_groups
  assert derived["microbatching"]["microbatch_size"] * groups == config.batch_size
