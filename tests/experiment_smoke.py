"""One smoke run of an experiment module (`--scale=smoke` in a temporary workdir) and the checks
every experiment promises: one well-formed verdict line per claim, printed and in verdicts.json
(the same lines), and each sweep's report. A smoke run can test no claim, so every line must say
INCONCLUSIVE and name the domain conditions it did not meet ("not tested: ...")."""
import json
import os

from experiments import common
from scaling.analysis import results, sweep_plots, trial_plots

OUTCOMES = (common.CONFIRMED, common.NOT_CONFIRMED, common.INCONCLUSIVE)


def run_smoke(module, workdir, capsys, monkeypatch, *, claims: int, reports=("",), argv=()):
  """Runs `module` at --scale=smoke under `workdir`; checks that stdout and verdicts.json hold the
  same `claims` verdicts, each with an outcome, a claim, evidence and a rule, and that every
  <workdir>/<report>/report/index.html exists. Returns (verdicts as saved, stdout)."""
  # Without the PNGs: ~8 CPU-s a report, and write_report turns a failing plot into a note, so a
  # broken plot could not fail this test anyway (the plots have their own tests).
  monkeypatch.setattr(sweep_plots, "PLOTS", [])
  monkeypatch.setattr(trial_plots, "SINGLE_TRIAL_PLOTS", [])
  args = common.parse_args([f"--workdir={workdir}", "--scale=smoke", *argv],
                           getattr(module, "add_flags", None))
  common.run_experiment(module.run, args)
  out = capsys.readouterr().out
  printed = [line for line in out.splitlines() if line.split(":")[0] in OUTCOMES]
  with open(os.path.join(workdir, "verdicts.json")) as f:
    saved = json.load(f)["verdicts"]
  assert len(printed) == len(saved) == claims, out
  for line, verdict in zip(printed, saved):
    assert verdict["outcome"] == common.INCONCLUSIVE, verdict
    assert verdict["evidence"].startswith("not tested: "), verdict
    assert all(isinstance(verdict[k], str) and verdict[k] for k in ("claim", "evidence", "rule"))
    assert line == common.Verdict(**verdict).line()
  for report in reports:
    assert os.path.isfile(os.path.join(workdir, report, results.REPORT_DIR, "index.html")), report
  return saved, out
