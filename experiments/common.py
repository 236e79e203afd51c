"""What every reproduction shares: the command line (absl flags, as in `python -m scaling.main`),
running a sweep through the same code as scaling.main, the report, and verdict lines.

    python -m experiments.<paper> --workdir=DIR [--scale=smoke|here|paper]

`here` (the default) is the smaller faithful setup that finishes within 20 minutes on a 2-core CPU;
`smoke` runs in seconds (the test suite runs it, so no experiment rots: its verdicts are computed
but mean nothing); `paper` is the paper-sized setup, for accelerators. A verdict is CONFIRMED, NOT
CONFIRMED or INCONCLUSIVE, with the numbers that decided it and the rule that was applied; they are
printed and written to <workdir>/verdicts.json.
"""
import dataclasses
import os
import sys
import time
import types

from absl import app, flags, logging
import ml_collections

from scaling import sweep
from scaling.analysis import report, results
from scaling.config import ConfigError, check_workdir
from scaling.training import metrics

SCALES = ("smoke", "here", "paper")
CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE = "CONFIRMED", "NOT CONFIRMED", "INCONCLUSIVE"


@dataclasses.dataclass(frozen=True)
class Verdict:
  claim: str      # the paper's claim, one sentence
  outcome: str    # CONFIRMED | NOT CONFIRMED | INCONCLUSIVE
  evidence: str   # the numbers that decided it
  rule: str       # the decision rule, e.g. "ratio > 3 with non-overlapping seed ranges"

  def line(self) -> str:
    return f"{self.outcome}: {self.claim} -- {self.evidence} [rule: {self.rule}]"


def decide(claim: str, holds: bool | None, evidence: str, rule: str) -> Verdict:
  """holds: True/False from the rule, None where the data cannot decide (too few points...)."""
  outcome = INCONCLUSIVE if holds is None else CONFIRMED if holds else NOT_CONFIRMED
  return Verdict(claim, outcome, evidence, rule)


def define_flags(flag_values: flags.FlagValues, add_flags=None,
                 module_name: str | None = None) -> list[str]:
  """Defines --workdir, --scale and, through add_flags(flag_values), an experiment's own flags
  (e.g. a workdir to reuse) on flag_values; returns their names. module_name: the module whose
  --help lists them (the one that runs), else the one that calls this."""
  before = set(flag_values)
  flags.DEFINE_string("workdir", None, "where the sweeps, report and verdicts go",
                      flag_values=flag_values, module_name=module_name)
  flags.DEFINE_enum("scale", "here", SCALES, "smoke: seconds (tests); here: <= 20 min on 2 CPU"
                    " cores; paper: the paper's sizes, for accelerators",
                    flag_values=flag_values, module_name=module_name)
  if add_flags:
    add_flags(flag_values)
  return sorted(set(flag_values) - before)


def parse_flags(argv: list[str], flag_values: flags.FlagValues,
                names: list[str]) -> types.SimpleNamespace:
  """Parses argv (argv[0]: the program) into flag_values, defined by define_flags, and returns
  the named flags' values. Bad input (an unknown flag, a value not among a flag's choices, no
  --workdir, a workdir that cannot be written, a positional argument) exits with one line."""
  paper = os.path.splitext(os.path.basename(argv[0]))[0]
  usage = (f"usage: python -m experiments.{paper} --workdir=DIR [--scale=smoke|here|paper];"
           " --help lists every flag")
  try:
    rest = flag_values(argv)
  except flags.Error as error:
    sys.exit(f"config error: {error} ({usage})")
  if rest[1:]:
    sys.exit(f"config error: unexpected argument {rest[1]!r}: every option is a flag,"
             f" --name=value ({usage})")
  if flag_values["workdir"].value is None:
    sys.exit("config error: --workdir is required: give the directory for the sweeps, report"
             f" and verdicts ({usage})")
  try:
    check_workdir(flag_values["workdir"].value)
  except ConfigError as error:
    sys.exit(f"config error: {error}")
  return types.SimpleNamespace(**{name: flag_values[name].value for name in names})


def parse_args(argv: list[str], add_flags=None) -> types.SimpleNamespace:
  """The flags of argv (without the program's name) as main parses them, in flags of their own:
  a test (or a notebook) can parse many command lines in one process."""
  flag_values = flags.FlagValues()
  names = define_flags(flag_values, add_flags)
  return parse_flags(["<paper>", *argv], flag_values, names)


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[results.Trial]:
  """Runs (or resumes: finished trials are skipped) every trial of `config` under `workdir`,
  writes its report, and returns the loaded trials. A failed trial is reported, not raised."""
  sweep.main(config, workdir)
  report.write_report(workdir)
  return results.load_trials(workdir)


def finish(workdir: str, verdicts: list[Verdict], started: float) -> None:
  """Prints the verdict lines and writes them (with the wall time) to <workdir>/verdicts.json,
  making the workdir if no sweep did (McCandlish's, given --shallue_workdir, runs none there)."""
  os.makedirs(workdir, exist_ok=True)
  for v in verdicts:
    print(v.line())
  wall = time.time() - started
  print(f"wall time {wall:.0f} s; verdicts in {os.path.join(workdir, 'verdicts.json')}, each "
        f"sweep's report in its {results.REPORT_DIR}/index.html under {workdir}")
  metrics.write_json(os.path.join(workdir, "verdicts.json"),
                     {"wall_time_s": wall, "verdicts": [dataclasses.asdict(v) for v in verdicts]})


def run_experiment(run, args: types.SimpleNamespace) -> None:
  """`run(args) -> list[Verdict]`, then the verdicts printed and saved; bad input is one line."""
  started = time.time()
  try:
    verdicts = run(args)
  except ConfigError as error:
    sys.exit(f"config error: {error}")
  finish(args.workdir, verdicts, started)


def main(run, add_flags=None) -> None:
  """Entry point of an experiment module, `common.main(run, add_flags)` under `if __name__ ==
  "__main__"`: absl flags, as in `python -m scaling.main`, listed by --help under the module."""
  names = define_flags(flags.FLAGS, add_flags, module_name=sys.argv[0])

  def main_with(args):
    logging.set_verbosity(logging.WARNING)   # Orbax logs every file it writes at INFO
    run_experiment(run, args)

  app.run(main_with, flags_parser=lambda argv: parse_flags(argv, flags.FLAGS, names))
