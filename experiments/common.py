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
import platform
import resource
import subprocess
import sys
import time
import types

from absl import app, flags, logging
import jax
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


@dataclasses.dataclass(frozen=True)
class Condition:
  """One condition under which a run can test a claim, stated before the run (in the module, as
  a constant, and in experiments/README.md): `what` must satisfy `needed`; `measured` is the value
  this run had. E.g. Condition("optimizer steps of the largest arm", 3, ">= 100", False)."""
  what: str
  measured: object
  needed: str
  met: bool

  def text(self) -> str:
    measured = f"{self.measured:.4g}" if isinstance(self.measured, float) else self.measured
    return f"{self.what} {measured}, need {self.needed}"


def at_least(what: str, measured, minimum) -> Condition:
  return Condition(what, measured, f">= {minimum:g}", measured >= minimum)


def at_most(what: str, measured, maximum) -> Condition:
  return Condition(what, measured, f"<= {maximum:g}", measured <= maximum)


def decide(claim: str, holds: bool | None, evidence: str, rule: str,
           domain: list[Condition] = ()) -> Verdict:
  """holds: True/False from the rule, None where the data cannot decide (too few points...).
  domain: the conditions under which this run can test the claim; where one is unmet the verdict
  is INCONCLUSIVE, its evidence opening with "not tested: <condition, measured value>" (the rule's
  numbers follow, for the record), whatever the rule said."""
  unmet = [c for c in domain if not c.met]
  if domain:
    rule += "; tested only where " + "; ".join(f"{c.what} {c.needed}" for c in domain)
  if unmet:
    return Verdict(claim, INCONCLUSIVE,
                   "not tested: " + "; ".join(c.text() for c in unmet) + " | " + evidence, rule)
  outcome = INCONCLUSIVE if holds is None else CONFIRMED if holds else NOT_CONFIRMED
  return Verdict(claim, outcome, evidence, rule)


def magnitude(measured: tuple[float, float], paper: float, fraction: float) -> bool | None:
  """The magnitude half of a claim whose paper gives a size: True when the measured effect's
  interval (lo, hi) lies at or above `fraction` x the paper's effect, False when it lies entirely
  below, None when it straddles. Effects are in the units the caller chose (a log ratio, points of
  error): the direction is a separate line."""
  lo, hi = measured
  bar = fraction * paper
  return True if lo >= bar else False if hi < bar else None


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


def provenance(started: float, scale: str) -> dict:
  """Where and when a run's numbers came from: the git commit (and whether the tree had
  uncommitted changes), the date, the machine and its load, the scale, wall time and CPU-seconds
  (this process and its children, user + sys)."""
  def git(*argv):
    try:
      return subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu_model)
  except OSError:
    pass
  usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
  return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain",
                                                                              "--untracked-files=no")),
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scale": scale,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model}),"
                     f" {jax.default_backend()} backend, {jax.device_count()} devices",
          # Other processes on the machine stretch the wall time (not the CPU-seconds much).
          "load_average": "{:.1f} (1 min), {:.1f} (15 min) at the end".format(*os.getloadavg()[::2]),
          "wall_time_s": round(time.time() - started, 1),
          "cpu_seconds": round(sum(u.ru_utime + u.ru_stime for u in usage), 1)}


def finish(workdir: str, verdicts: list[Verdict], started: float, scale: str = "") -> None:
  """Prints the verdict lines and writes them, with their provenance, to <workdir>/verdicts.json,
  making the workdir if no sweep did (McCandlish's, given --shallue_workdir, runs none there)."""
  os.makedirs(workdir, exist_ok=True)
  for v in verdicts:
    print(v.line())
  origin = provenance(started, scale)
  print(f"wall time {origin['wall_time_s']:.0f} s, {origin['cpu_seconds']:.0f} CPU-s; verdicts in"
        f" {os.path.join(workdir, 'verdicts.json')}, each sweep's report in its"
        f" {results.REPORT_DIR}/index.html under {workdir}")
  metrics.write_json(os.path.join(workdir, "verdicts.json"),
                     {"wall_time_s": origin["wall_time_s"], "provenance": origin,
                      "verdicts": [dataclasses.asdict(v) for v in verdicts]})


def run_experiment(run, args: types.SimpleNamespace) -> None:
  """`run(args) -> list[Verdict]`, then the verdicts printed and saved; bad input is one line."""
  started = time.time()
  try:
    verdicts = run(args)
  except ConfigError as error:
    sys.exit(f"config error: {error}")
  finish(args.workdir, verdicts, started, args.scale)


def main(run, add_flags=None) -> None:
  """Entry point of an experiment module, `common.main(run, add_flags)` under `if __name__ ==
  "__main__"`: absl flags, as in `python -m scaling.main`, listed by --help under the module."""
  names = define_flags(flags.FLAGS, add_flags, module_name=sys.argv[0])

  def main_with(args):
    logging.set_verbosity(logging.WARNING)   # Orbax logs every file it writes at INFO
    run_experiment(run, args)

  app.run(main_with, flags_parser=lambda argv: parse_flags(argv, flags.FLAGS, names))
