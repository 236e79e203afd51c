"""Bad input: exit status 1, one last line on stderr naming the field (or file) and the fix, no
traceback, and nothing written: it fails before any trial trains.

The command-line cases run the real entry points (`python -m scaling.main`, `python -m
scaling.report`) from the repo root with tests/conftest.py's environment. A config file's or an
override's error fires while the flags are parsed, before JAX is imported (about a second); a
field's value fails in the sweep's validation of every trial, before the first trains. The many
numeric fields are checked in-process through train.check_config, the call the sweep makes.
"""
import math
import os
import subprocess
import sys

import pytest

from configs import mnist, mnist_sweep, mnist_sweep_tiny
from scaling import data, sweep
from scaling.config import ConfigError, check_fields
from scaling.training import train
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/mnist_sweep_tiny.py"


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *names: str) -> None:
  assert "Traceback" not in result.stderr, result.stderr
  assert result.returncode == 1, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  for name in names:
    assert name in last, last


@pytest.fixture
def files(tmp_path):
  """Broken config files, a plain file, and a workdir path that does not exist yet."""
  (tmp_path / "syntax.py").write_text("def get_config():\n  return (\n")
  (tmp_path / "raises.py").write_text("import ml_collections\n\nraise RuntimeError('boom')\n")
  (tmp_path / "get_config_raises.py").write_text(
      "from configs import mnist\n\ndef get_config():\n  return mnist.get_config().no_such\n")
  (tmp_path / "no_get_config.py").write_text("batch_size = 64\n")
  (tmp_path / "config.json").write_text('{"batch_size": 64}\n')
  (tmp_path / "returns_dict.py").write_text("def get_config():\n  return {'batch_size': 64}\n")
  (tmp_path / "a_file").write_text("")
  (tmp_path / "exits.py").write_text("import sys\n\nsys.exit(3)\n")
  (tmp_path / "a:b.py").write_text("from configs.mnist import get_config\n")
  return tmp_path


# (command-line arguments after --workdir, what the last line must name). {tmp} is the fixture's.
MAIN_CASES = {
    "misspelt field": ([TINY, "--config.batch_sise=64"],
                       ["--config.batch_sise", "did you mean --config.batch_size?"]),
    "misspelt nested field": ([TINY, "--config.optimizer.nam=adam"],
                              ["--config.optimizer.nam", "--config.optimizer.name"]),
    "field of a value": ([TINY, "--config.batch_size.x=3"], ["--config.batch_size.x"]),
    "new sweep axis": (["--config=configs/mnist.py", "--config.sweep.batch_size=(64,128)"],
                       ["--config.sweep.batch_size", "no sweep axis 'batch_size'"]),
    "value of the wrong type": ([TINY, "--config.batch_size=abc"],
                                ["--config.batch_size=abc", "int"]),
    "missing config file": (["--config={tmp}/missing.py"], ["missing.py", "no such file"]),
    "config not python": (["--config={tmp}/config.json"], ["config.json", "not a Python file"]),
    "config syntax error": (["--config={tmp}/syntax.py"], ["syntax.py", "SyntaxError", "line 2"]),
    "config raises": (["--config={tmp}/raises.py"], ["raises.py", "RuntimeError: boom", "line 3"]),
    "get_config raises": (["--config={tmp}/get_config_raises.py"],
                          ["get_config_raises.py", "get_config() raised", "line 4"]),
    "no get_config": (["--config={tmp}/no_get_config.py"], ["no_get_config.py", "get_config()"]),
    "get_config not a ConfigDict": (["--config={tmp}/returns_dict.py"],
                                    ["returns_dict.py", "returned dict"]),
    "no --config": ([], ["--config is required"]),
    "workdir is a file": ([TINY, "--workdir={tmp}/a_file"], ["--workdir", "a_file is a file"]),
    "workdir under a file": ([TINY, "--workdir={tmp}/a_file/run"], ["--workdir", "is a file"]),
    "workdir unwritable": ([TINY, "--workdir=/proc/scaling_no_such/run"],
                           ["--workdir=/proc/scaling_no_such/run", "not writable"]),
    # Past the flags: these import JAX (~3-8 s each); the other fields are tested in-process below.
    "versioned dataset name": ([TINY, "--config.dataset.name=foo:1.0"], ["dataset.name='foo:1.0'"]),
    "field value": ([TINY, "--config.grad_groups=0"],
                    ["trial 0 (bs=16,", "grad_groups=0", "integer >= 1"]),
    # Input that was silently ignored: the sweep trained at the axis values, exit 0.
    "field a sweep axis sets": ([TINY, "--config.batch_size=0"],
                                ["--config.batch_size", "sweep axis sweep.batch_size",
                                 "--config.sweep.batch_size="]),
    "positional argument": ([TINY, "extra_positional"], ["unexpected argument 'extra_positional'"]),
    # ml_collections joined the two tuples: seeds 0, 1, 0.
    "override given twice": ([TINY, "--config.sweep.seed=(0,1)", "--config.sweep.seed=(0,)"],
                             ["--config.sweep.seed is given twice"]),
    "config file calls sys.exit": (["--config={tmp}/exits.py"], ["exits.py", "SystemExit: 3"]),
    "colon in the config path": (["--config={tmp}/a:b.py"], ["a:b.py", "a ':' ends the file's path"]),
    "empty workdir": ([TINY, "--workdir="], ["--workdir is empty"]),
    "memory limit nan": ([TINY, "--plan_memory", "--memory_limit_mib=nan"],
                         ["--memory_limit_mib=nan"]),
    "memory limit inf": ([TINY, "--plan_memory", "--memory_limit_mib=inf"],
                         ["--memory_limit_mib=inf"]),
    "memory limit negative": ([TINY, "--plan_memory", "--memory_limit_mib=-5"],
                              ["--memory_limit_mib=-5"]),
    "budget past the int32 step counter": (
        ["--config=configs/mnist.py", "--config.budget.length=1e10"],
        ["budget.length=10000000000.0", "2147483647", "shorten budget.length"]),
}


@pytest.mark.parametrize("args,names", MAIN_CASES.values(), ids=MAIN_CASES.keys())
def test_main_bad_input_is_one_line(files, args, names):
  workdir = files / "run"
  args = [a.format(tmp=files) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={workdir}")
  assert_one_line_error(run_cli("scaling.main", "--compilation_cache=", *args), *names)
  assert not workdir.exists()   # nothing written: not even the workdir


def _trial_dir(tmp_path, config_json='{"batch_size": 64}', summary_json=None):
  trial = tmp_path / "sweep" / "trials" / "bs=64"
  trial.mkdir(parents=True)
  (trial / "config.json").write_text(config_json)
  if summary_json is not None:
    (trial / "summary.json").write_text(summary_json)
  return tmp_path / "sweep"


def test_report_on_missing_workdir_creates_nothing(tmp_path):
  result = run_cli("scaling.report", f"--workdir={tmp_path}/no_such_run")
  assert_one_line_error(result, f"--workdir={tmp_path}/no_such_run does not exist")
  assert not (tmp_path / "no_such_run").exists()


@pytest.mark.parametrize("config_json,summary_json,file,problem", [
    ('{"batch_size": ', None, "config.json", "not JSON"),
    ('{"batch_size": 64}', '{"status": "do', "summary.json", "not JSON"),
    ('{"batch_size": 64}', "[]", "summary.json", "not a JSON object"),
])
def test_report_on_corrupt_trial_file_names_it(tmp_path, config_json, summary_json, file, problem):
  workdir = _trial_dir(tmp_path, config_json, summary_json)
  result = run_cli("scaling.report", f"--workdir={workdir}")
  assert_one_line_error(result, os.path.join(str(workdir), "trials", "bs=64", file), problem,
                        "delete it and rerun that trial")
  assert not (workdir / "report").exists()


# (field, a value no trial can run correctly with): through train.check_config, as the sweep calls
# it for every trial before the first trains. Before the check, each was accepted or crashed.
BAD_VALUES = [
    ("reference_batch_size", 0), ("reference_batch_size", -32),
    ("base_lr", -0.1), ("base_lr", 0.0), ("base_lr", math.nan), ("base_lr", math.inf),
    ("lr_power", math.nan), ("warmup.length", math.nan), ("warmup.init_fraction", 2.0),
    ("decay.final_fraction", -1.0), ("decay.factor", 0.0), ("decay.boundaries", (0.5, 1.5)),
    ("budget.length", math.nan), ("budget.length", math.inf), ("eval_every.length", 0.0),
    ("optimizer.momentum", 1.0), ("optimizer.momentum", -0.1), ("optimizer.weight_decay", -1e-4),
    ("optimizer.b2", 1.0), ("optimizer.eps", 0.0), ("optimizer.trust_coefficient", 0.0),
    ("target.value", math.nan), ("eval_batch_size", 0), ("eval_batch_size", -5),
    ("train_eval_size", -1), ("log_every_steps", 0), ("log_every_steps", -1),
    ("num_devices", -1), ("grad_groups", 0), ("grad_groups", -8), ("noise_scale.ema_decay", 1.0),
    ("curvature.every_steps", -1), ("curvature.subset_size", 0), ("curvature.max_probes", 0),
    ("curvature.min_probes", 1), ("curvature.probe_chunk", 0), ("curvature.trace_tol", -1e-3),
    ("curvature.lanczos_steps", 0), ("curvature.top_k", 0), ("curvature.top_k", 21),
    ("curvature.sharpness_eps", 0.0), ("curvature.sharpness_steps", 0),
    ("curvature.density_starts", 0), ("curvature.density_steps", 0),
    ("checkpoint.every_steps", -1), ("checkpoint.keep", 0), ("model.widths", (32, 0)),
    ("target.metric", "valid/accuracy"), ("target.metric", "train/loss"),
    # Accepted before: an infinite multiplier entered the study as `diverged`; a seed past 64 bits
    # started and failed as OverflowError when its random keys were made.
    ("lr_multiplier", math.inf), ("lr_multiplier", math.nan), ("lr_multiplier", 0.0),
    ("seed", 2**64), ("seed", -1),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_field_value_is_one_line_naming_it(field, value):
  config = tiny_config(**{field: value})
  with pytest.raises(ConfigError) as error:
    train.check_config(config, num_train=412, num_devices=8)
  assert str(error.value).startswith(f"{field}="), error.value
  assert "\n" not in str(error.value)


def test_target_on_a_split_that_is_not_evaluated():
  config = tiny_config(**{"dataset.validation_size": 0, "target.metric": "valid/error"})
  with pytest.raises(ConfigError, match=r"^target.metric='valid/error' .* test/error"):
    train.check_config(config, num_train=512, num_devices=8)
  config = tiny_config(train_eval_size=0, **{"target.metric": "train_eval/loss"})
  with pytest.raises(ConfigError, match=r"^target.metric='train_eval/loss'"):
    train.check_config(config, num_train=412, num_devices=8)


@pytest.mark.parametrize("name,message", [
    ("", r"^dataset.name='' is empty"),
    ("mnist:3.0.0", r"^dataset.name='mnist:3.0.0': the project's 'mnist' has one version"),
    ("foo:1.0", r"^dataset.name='foo:1.0' cannot be built"),
])
def test_bad_dataset_name_is_one_line_naming_it(tmp_path, name, message):
  with pytest.raises(ConfigError, match=message) as error:
    data.load(name, data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


def test_shipped_configs_and_edge_values_pass():
  """The checks refuse nothing that runs: every trial of every shipped config, and the edges."""
  for module in (mnist, mnist_sweep, mnist_sweep_tiny):
    for trial in sweep.expand(module.get_config(), "unused"):
      check_fields(trial.config)
  check_fields(tiny_config(**{
      "warmup.length": 0.0, "train_eval_size": 0, "optimizer.momentum": 0.0, "grad_groups": 1,
      "checkpoint.every_steps": 0, "checkpoint.keep": 1, "curvature.every_steps": 0,
      "model.widths": (), "decay.final_fraction": 1.0, "curvature.top_k": 20,
      "target.metric": "test/loss"}))


@pytest.mark.parametrize("paper", ["goyal", "hoffer"])
def test_an_experiment_refuses_an_empty_workdir(paper):
  """Every experiment parses its flags in experiments.common (parse_flags): two of the seven
  stand for all."""
  assert_one_line_error(run_cli(f"experiments.{paper}", "--workdir=", "--scale=smoke"),
                        "--workdir is empty")
