"""The default study (configs/mnist_sweep.py) run as an experiment, so that its numbers are
recorded with their provenance like a paper's rerun (experiments/tables.py):

    python -m experiments.default_study --workdir=runs/default_study [--scale=smoke|here]
    python -m experiments.tables --record=default_study --workdir=runs/default_study

`here` is configs/mnist_sweep.py itself (what `python -m scaling.main` runs), `smoke` the tiny
sweep on the committed 512-image slice; there is no `paper` scale (the study is not a paper's).
After the sweep it measures B_simple at the frozen parameters of each batch size's best trials at
their target checkpoints (McCandlish et al.'s estimators over NOISE_DRAWS independent draws), so
that the report's "B_simple at target" does not come from the lagging EMA. It states no claim of
its own: its findings (the report's opening sentences) go to <workdir>/findings.json beside
verdicts.json (no verdicts, the provenance).
"""
import os

from configs import mnist_sweep, mnist_sweep_tiny
from experiments import common
from scaling import measure_checkpoint
from scaling.analysis import findings, report, results, study
from scaling.config import ConfigError
from scaling.training import metrics

CONFIGS = {"smoke": mnist_sweep_tiny, "here": mnist_sweep}
# Independent draws of the frozen-parameter noise scale per best trial (its SE ~ 1/sqrt(draws)).
NOISE_DRAWS = {"smoke": 10, "here": 200}


def measure_b_simple_at_target(trials, num_draws: int) -> int:
  """B_simple at frozen parameters (measure_checkpoint.measure_noise: noise_<step>.json) at the
  target checkpoint of every trial of each batch size's best setting that stopped at its target,
  where not measured yet; the report then uses it instead of the lagging EMA. Returns how many
  were measured."""
  best = {(r["group"], r["batch_size"], r["best_setting"]) for r in study.best_per_batch(trials)
          if r["outcome"] == "reached"}
  measured = 0
  for t in trials:
    if ((t.group, t.batch_size, t.setting_key) in best and t.reached and t.stop_reason == "target"
        and not os.path.exists(os.path.join(t.path, f"noise_{t.steps_to_target}.json"))):
      config, model, splits, _, step, state = measure_checkpoint.restore(t.path)
      if step == t.steps_to_target:   # the checkpoint is the target's (it stopped there)
        measure_checkpoint.measure_noise(t.path, config, model, splits, step, state, num_draws)
        measured += 1
  return measured


def run(args) -> list[common.Verdict]:
  if args.scale not in CONFIGS:
    raise ConfigError(f"--scale={args.scale}: the default study runs at smoke or here (it is not"
                      " a paper's, so it has no paper scale)")
  trials = common.run_sweep(CONFIGS[args.scale].get_config(), args.workdir)
  if measure_b_simple_at_target(trials, NOISE_DRAWS[args.scale]):
    report.write_report(args.workdir)
    trials = results.load_trials(args.workdir)
  rows = study.best_per_batch(trials)
  sentences = findings.findings(trials, rows, study.fit_table(rows))
  for sentence in sentences:
    print(sentence)
  metrics.write_json(f"{args.workdir}/findings.json",
                     {"findings": sentences, "report": f"{results.REPORT_DIR}/index.html"})
  return []


if __name__ == "__main__":
  common.main(run)
