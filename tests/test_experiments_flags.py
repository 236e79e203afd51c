"""The command line every experiment shares (experiments/common.py): absl flags, as in `python -m
scaling.main`, with --workdir required, --scale one of smoke|here|paper, and an experiment's own
flags beside them; bad input is one line on stderr, exit status 1, no traceback."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from experiments import common, mccandlish, shallue
from scaling.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_parse_args_reads_the_shared_flags_and_an_experiments_own(tmp_path):
  args = common.parse_args([f"--workdir={tmp_path}"])
  assert vars(args) == {"workdir": str(tmp_path), "scale": "here"}
  # Each call parses into flags of its own: a second experiment's flags in the same process.
  args = common.parse_args([f"--workdir={tmp_path}", "--scale=smoke", "--part=sgd"],
                           shallue.add_flags)
  assert vars(args) == {"workdir": str(tmp_path), "scale": "smoke", "part": "sgd"}
  args = common.parse_args([f"--workdir={tmp_path}"], mccandlish.add_flags)
  assert vars(args) == {"workdir": str(tmp_path), "scale": "here", "shallue_workdir": ""}


@pytest.mark.parametrize("argv, words", [
    (["--part=x"], ["--part=x", "all|momentum|sgd"]),
    (["positional"], ["unexpected argument 'positional'"]),
    (["--no_such_flag=1"], ["no_such_flag"]),
], ids=["bad_choice", "positional", "unknown_flag"])
def test_parse_args_refuses_bad_input_with_one_line(argv, words, tmp_path):
  with pytest.raises(SystemExit) as exit_:
    common.parse_args([f"--workdir={tmp_path}", *argv], shallue.add_flags)
  message = str(exit_.value.code)
  assert message.startswith("config error: ") and "\n" not in message
  assert all(word in message for word in words), message


@pytest.mark.parametrize("paper, workdir, scale, words", [
    ("cohen", True, "--scale=x", ["--scale=x", "smoke|here|paper"]),
    ("shallue", False, "--scale=smoke", ["--workdir is required", "experiments.shallue"]),
], ids=["bad_scale", "no_workdir"])
def test_a_bad_scale_and_a_missing_workdir_are_one_line_each(paper, workdir, scale, words,
                                                             tmp_path):
  argv = [f"--workdir={tmp_path}"] if workdir else []
  result = run_cli(f"experiments.{paper}", *argv, scale)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("config error: "), result.stderr
  assert all(word in lines[0] for word in words), lines[0]
  assert not os.listdir(tmp_path)


def test_help_lists_the_shared_flags_and_the_experiments_own():
  result = run_cli("experiments.shallue", "--help")
  assert "Traceback" not in result.stderr, result.stderr
  assert result.stdout.startswith(shallue.__doc__.splitlines()[0]), result.stdout
  for flag in ("--workdir", "--scale: <smoke|here|paper>", "--part: <all|momentum|sgd>"):
    assert flag in result.stdout, result.stdout


def test_verdicts_are_written_where_no_sweep_made_the_workdir(tmp_path, capsys):
  """McCandlish's run, given --shallue_workdir, trains nothing under its own --workdir."""
  workdir = tmp_path / "new" / "dir"
  verdict = common.decide("a claim", True, "the evidence", "the rule")
  common.run_experiment(lambda args: [verdict], common.parse_args([f"--workdir={workdir}"]))
  assert verdict.line() in capsys.readouterr().out
  with open(workdir / "verdicts.json") as f:
    assert json.load(f)["verdicts"] == [dataclasses.asdict(verdict)]


def test_a_config_error_of_a_run_is_one_line(tmp_path):
  def run(args):
    raise ConfigError("field=x is invalid: use y")

  with pytest.raises(SystemExit) as exit_:
    common.run_experiment(run, common.parse_args([f"--workdir={tmp_path}"]))
  assert exit_.value.code == "config error: field=x is invalid: use y"
