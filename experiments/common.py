"""What every reproduction shares: the command line, running a sweep through the same code as
`python -m scaling.main`, the report, and verdict lines.

    python -m experiments.<paper> --workdir=DIR [--scale=smoke|here|paper]

`here` (the default) is the smaller faithful setup that finishes within 20 minutes on a 2-core CPU;
`smoke` runs in seconds (the test suite runs it, so no experiment rots: its verdicts are computed
but mean nothing); `paper` is the paper-sized setup, for accelerators. A verdict is CONFIRMED, NOT
CONFIRMED or INCONCLUSIVE, with the numbers that decided it and the rule that was applied; they are
printed and written to <workdir>/verdicts.json.
"""
import argparse
import dataclasses
import os
import sys
import time

import ml_collections

from scaling import metrics, report, results, sweep
from scaling.config import ConfigError, check_workdir

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


def parse_args(argv: list[str], description: str, add_arguments=None) -> argparse.Namespace:
  """add_arguments(parser), if given, adds an experiment's own options (e.g. a workdir to reuse)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", required=True, help="where the sweeps, report and verdicts go")
  parser.add_argument("--scale", choices=SCALES, default="here",
                      help="smoke: seconds (tests); here: <= 20 min on 2 CPU cores; paper: the "
                           "paper's sizes, for accelerators")
  if add_arguments:
    add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    check_workdir(args.workdir)
  except ConfigError as error:
    sys.exit(f"config error: {error}")
  return args


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[results.Trial]:
  """Runs (or resumes: finished trials are skipped) every trial of `config` under `workdir`,
  writes its report, and returns the loaded trials. A failed trial is reported, not raised."""
  sweep.main(config, workdir)
  report.write_report(workdir)
  return results.load_trials(workdir)


def finish(workdir: str, verdicts: list[Verdict], started: float) -> None:
  """Prints the verdict lines and writes them (with the wall time) to <workdir>/verdicts.json."""
  for v in verdicts:
    print(v.line())
  wall = time.time() - started
  print(f"wall time {wall:.0f} s; verdicts in {os.path.join(workdir, 'verdicts.json')}, each "
        f"sweep's report in its {results.REPORT_DIR}/index.html under {workdir}")
  metrics.write_json(os.path.join(workdir, "verdicts.json"),
                     {"wall_time_s": wall, "verdicts": [dataclasses.asdict(v) for v in verdicts]})


def main(run, argv: list[str], description: str, add_arguments=None) -> None:
  """Entry point of an experiment module: `run(args) -> list[Verdict]`; bad input is one line."""
  args = parse_args(argv, description, add_arguments)
  started = time.time()
  try:
    verdicts = run(args)
  except ConfigError as error:
    sys.exit(f"config error: {error}")
  finish(args.workdir, verdicts, started)
