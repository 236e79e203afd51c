"""The default study (configs/mnist_sweep.py) run as an experiment, so that its numbers are
recorded with their provenance like a paper's rerun (experiments/tables.py):

    python -m experiments.default_study --workdir=runs/default_study [--scale=smoke|here]
    python -m experiments.tables --record=default_study --workdir=runs/default_study

`here` is configs/mnist_sweep.py itself (what `python -m scaling.main` runs), `smoke` the tiny
sweep on the committed 512-image slice; there is no `paper` scale (the study is not a paper's).
It states no claim of its own: its findings (the report's opening sentences) go to
<workdir>/findings.json beside verdicts.json (no verdicts, the provenance).
"""
from configs import mnist_sweep, mnist_sweep_tiny
from experiments import common
from scaling.analysis import findings, results, study
from scaling.config import ConfigError
from scaling.training import metrics

CONFIGS = {"smoke": mnist_sweep_tiny, "here": mnist_sweep}


def run(args) -> list[common.Verdict]:
  if args.scale not in CONFIGS:
    raise ConfigError(f"--scale={args.scale}: the default study runs at smoke or here (it is not"
                      " a paper's, so it has no paper scale)")
  trials = common.run_sweep(CONFIGS[args.scale].get_config(), args.workdir)
  rows = study.best_per_batch(trials)
  sentences = findings.findings(trials, rows, study.fit_table(rows))
  for sentence in sentences:
    print(sentence)
  metrics.write_json(f"{args.workdir}/findings.json",
                     {"findings": sentences, "report": f"{results.REPORT_DIR}/index.html"})
  return []


if __name__ == "__main__":
  common.main(run)
