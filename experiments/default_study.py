"""The default study (configs/mnist_sweep.py) run as an experiment, so that its numbers are
recorded with their provenance like a paper's rerun (experiments/tables.py):

    python -m experiments.default_study --workdir=runs/default_study [--scale=smoke|here]
    python -m experiments.tables --record=default_study --workdir=runs/default_study

`here` is configs/mnist_sweep.py itself (what `python -m scaling.main` runs), `smoke` the tiny
sweep on the committed 512-image slice; there is no `paper` scale (the study is not a paper's).
After the sweep it measures B_simple at the frozen parameters of each batch size's best trials at
their target checkpoints (McCandlish et al.'s estimators, with experiments/mccandlish.py's draws),
so that the report's "B_simple at target" does not come from the lagging EMA. It states no claim of
its own: its findings (the report's opening sentences) go to <workdir>/findings.json beside
verdicts.json (no verdicts, the provenance).
"""
from configs import mnist_sweep, mnist_sweep_tiny
from experiments import common, mccandlish
from scaling.analysis import findings, report, results, study
from scaling.config import ConfigError
from scaling.training import metrics

CONFIGS = {"smoke": mnist_sweep_tiny, "here": mnist_sweep}


def measure_b_simple_at_target(trials, scale: str) -> None:
  """B_simple at frozen parameters at the target checkpoint of every trial of each batch size's
  best setting that stopped at its target, with McCandlish's protocol (experiments/mccandlish.py:
  the same examples per draw at every batch size, so that the smallest batch sizes' estimates are
  as precise as the largest's), cached as noise_<step>.json: the report reads it there instead
  of the lagging EMA."""
  best = {(r["group"], r["batch_size"], r["best_setting"]) for r in study.best_per_batch(trials)
          if r["outcome"] == "reached"}
  for t in trials:
    # A trial that stopped at its target checkpointed at that step.
    if (t.group, t.batch_size, t.setting_key) in best and t.stop_reason == "target":
      mccandlish.frozen_b_simple(t.path, t.steps_to_target, scale)


def run(args) -> list[common.Verdict]:
  if args.scale not in CONFIGS:
    raise ConfigError(f"--scale={args.scale}: the default study runs at smoke or here (it is not"
                      " a paper's, so it has no paper scale)")
  trials = common.run_sweep(CONFIGS[args.scale].get_config(), args.workdir)
  measure_b_simple_at_target(trials, args.scale)
  report.write_report(args.workdir)
  trials = results.load_trials(args.workdir)
  rows = study.best_per_batch(trials)
  sentences = findings.findings(trials, rows, study.fit_table(rows))
  for sentence in sentences:
    print(sentence)
  # verdicts.json's CPU time is this process's: a resumed sweep's trials may have trained in
  # an earlier one. Their own wall times (summary.json) say what the whole study took.
  metrics.write_json(f"{args.workdir}/findings.json",
                     {"findings": sentences, "report": f"{results.REPORT_DIR}/index.html",
                      "trials": len(trials),
                      "trials_wall_time_s": round(sum(t.wall_time for t in trials), 1)})
  return []


if __name__ == "__main__":
  common.main(run)
