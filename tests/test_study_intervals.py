"""scaling.analysis.study's reported interval resamples seeds at fixed batch sizes; S excludes warmup; a
tuned LR at the edge of its grid is INCONCLUSIVE in the findings. Synthetic Trial records with
known steps, no files, no JAX."""
import math

import numpy as np
import pytest

from scaling.analysis import findings, results, study

S_MIN, B_CRIT = 1000.0, 512.0
BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Each batch size's point sits off the curve by a fixed factor: scatter that resampling batch
# sizes sees and redrawing seeds does not.
OFF_CURVE = (1.0, 1.08, 0.93, 1.05, 0.95, 1.1, 0.97, 1.04, 0.96)


def true_steps(bs):
  return S_MIN * (1 + B_CRIT / bs)


def make_trial(bs, seed, steps, warmup=0, mult=1.0, config=None):
  """A finished trial whose interpolated steps to target (counted from step 0) are `steps`."""
  return results.Trial(
      trial_id=f"bs={bs},seed={seed},lr_multiplier={mult:g}", path="",
      config={"derived": {"warmup_steps": warmup}} if config is None else config, summary=None,
      records=[], batch_size=bs, lr_rule="sqrt", optimizer="sgd", base_lr=0.1,
      lr=0.1 * math.sqrt(bs / 128) * mult, seed=seed, status="done",
      target_metric="valid/error", target_value=0.01, steps_to_target=math.ceil(steps),
      examples_to_target=math.ceil(steps) * bs, steps_interpolated=float(steps),
      final={"valid/error": 0.009}, best={}, wall_time=1.0, diverged_at_step=None, notes=[],
      setting={"lr_multiplier": mult}, lr_multiplier=mult, group="sqrt/sgd")


def study_trials(seed_factors, warmup=lambda bs: 0, mults=(0.5, 1.0, 2.0), best=lambda bs: 1.0):
  """Trials at BATCH_SIZES, one per (LR multiplier, seed): the best multiplier's S is
  true_steps x OFF_CURVE x seed_factors(bs)[seed], the others' 1.3 x that (same seeds)."""
  trials = []
  for bs, off in zip(BATCH_SIZES, OFF_CURVE):
    for seed, factor in enumerate(seed_factors(bs)):
      for mult in mults:
        s = true_steps(bs) * off * factor * (1.0 if mult == best(bs) else 1.3)
        trials.append(make_trial(bs, seed, s + warmup(bs), warmup(bs), mult))
  return trials


def fit_of(trials, replicates=study.BOOTSTRAP_REPLICATES):
  rows = study.best_per_batch(trials)
  (fit,) = study.fit_table(rows, replicates)
  return rows, fit


def width(fit, name):
  return fit[f"{name}_hi"] - fit[f"{name}_lo"]


def test_seed_interval_has_zero_width_without_seed_noise():
  _, fit = fit_of(study_trials(lambda bs: (1.0, 1.0, 1.0)))
  for name in ("b_crit", "s_min", "e_min"):
    assert fit[f"{name}_lo"] == pytest.approx(fit[name], rel=1e-9)
    assert fit[f"{name}_hi"] == pytest.approx(fit[name], rel=1e-9)
  # The batch-size bootstrap, kept beside it, sees the points' scatter about the curve.
  assert width(fit, "b_crit_batchboot") > 0.1 * fit["b_crit"]
  assert fit["bootstrap_replicates"] == study.BOOTSTRAP_REPLICATES
  assert fit["few_seed_batch_sizes"] == "" and fit["seeds_per_batch"] == "3"


def test_seed_interval_widens_in_proportion_to_the_seed_noise():
  # Five seeds per batch size with fixed standard-normal draws; S's seed noise is lognormal with
  # sd sigma, so doubling sigma doubles every resampled median's log-deviation.
  z = {bs: np.random.default_rng(bs).standard_normal(5) for bs in BATCH_SIZES}
  fits = {}
  for sigma in (0.02, 0.04):
    _, fits[sigma] = fit_of(study_trials(lambda bs: np.exp(sigma * z[bs])))
  for name in ("b_crit", "s_min"):
    assert width(fits[0.02], name) > 0
    assert width(fits[0.04], name) / width(fits[0.02], name) == pytest.approx(2.0, rel=0.2)
    assert fits[0.02][f"{name}_lo"] < fits[0.02][name] < fits[0.02][f"{name}_hi"]
  # Deterministic: a fixed RNG seed, the same replicates.
  _, again = fit_of(study_trials(lambda bs: np.exp(0.02 * z[bs])))
  assert (again["b_crit_lo"], again["b_crit_hi"]) == (fits[0.02]["b_crit_lo"],
                                                      fits[0.02]["b_crit_hi"])


def test_warmup_steps_are_not_part_of_s():
  z = {bs: np.random.default_rng(bs).standard_normal(3) for bs in BATCH_SIZES}
  noise = lambda bs: np.exp(0.05 * z[bs])
  rows_cold, cold = fit_of(study_trials(noise), replicates=200)
  # Warmup constant in steps, and warmup of one epoch of 6000 examples (6000/B steps).
  for warmup in (lambda bs: 50, lambda bs: 6000 // bs):
    rows_warm, warm = fit_of(study_trials(noise, warmup), replicates=200)
    for name in ("s_min", "b_crit", "e_min", "s_min_lo", "s_min_hi", "b_crit_lo", "b_crit_hi"):
      assert warm[name] == pytest.approx(cold[name], rel=1e-9), name
    for rc, rw in zip(rows_cold, rows_warm):
      assert rw["steps_to_target"] == pytest.approx(rc["steps_to_target"], rel=1e-12)
      assert rw["warmup_steps"] == warmup(rw["batch_size"])
  assert cold["s_min"] == pytest.approx(S_MIN, rel=0.1)
  trials = study_trials(noise, lambda bs: 50)
  text = " ".join(findings.findings(trials, rows_warm, [warm]))
  assert "steps to target after warmup" in text
  assert "less the warmup steps (B=16: 50 ... B=4096: 50)" in findings.protocol(trials)


def test_a_tuned_lr_at_the_edge_of_its_grid_is_inconclusive():
  # The best multiplier is the top of {0.5, 1, 2} at B >= 1024: not bracketed there.
  trials = study_trials(lambda bs: (1.0, 1.0, 1.0), best=lambda bs: 2.0 if bs >= 1024 else 1.0)
  rows, fit = fit_of(trials, replicates=50)
  sentence = [s for s in findings.findings(trials, rows, [fit]) if "tuned LR" in s][0]
  assert "INCONCLUSIVE" in sentence
  assert ("edge of its grid at 3 of 9 batch sizes (B = 1024, 2048, 4096: lr_multiplier=2 (top of"
          " 0.5..2))") in sentence
  # Bracketed everywhere: the slope stands, nothing is called inconclusive.
  trials = study_trials(lambda bs: (1.0, 1.0, 1.0))
  rows, fit = fit_of(trials, replicates=50)
  assert "INCONCLUSIVE" not in " ".join(findings.findings(trials, rows, [fit]))


def test_fewer_than_three_seeds_is_said_beside_the_interval():
  trials = study_trials(lambda bs: (0.97, 1.03))
  rows, fit = fit_of(trials, replicates=200)
  assert fit["few_seed_batch_sizes"] == " ".join(map(str, BATCH_SIZES))
  text = " ".join(findings.findings(trials, rows, [fit]))
  assert ("95% seed-bootstrap interval" in text and "batch sizes resampled too: [" in text)
  assert ("the seed intervals rest on fewer than 3 seeds at every fitted batch size (seeds per "
          "batch size: 2)") in text


def test_settings_sharing_seeds_are_resampled_together():
  """With paired seeds, a setting that repeats another's per-seed steps changes no replicate:
  one draw of seed indices serves both, so their medians tie in every replicate."""
  rng = np.random.default_rng(0)
  single, doubled = [], []
  for bs in BATCH_SIZES:
    steps = true_steps(bs) * np.exp(0.1 * rng.standard_normal(4))
    single.append((bs, {"a": steps}, True))
    doubled.append((bs, {"a": steps, "b": steps.copy()}, True))
  np.testing.assert_array_equal(study.seed_bootstrap_fit(single, 300),
                                study.seed_bootstrap_fit(doubled, 300))
  unpaired = [(bs, settings, False) for bs, settings, _ in doubled]
  assert not np.array_equal(study.seed_bootstrap_fit(single, 300),
                            study.seed_bootstrap_fit(unpaired, 300))


def test_a_target_reached_during_warmup_is_named_not_a_crash():
  """The smallest batch size reaches the target within its warmup (S = 0 after it), so no
  examples ratio exists: the findings say so (they raised a TypeError formatting None)."""
  trials = [make_trial(bs, seed, steps, warmup=20) for bs, steps in ((64, 15.0), (512, 18.0),
                                                                      (1024, 40.0))
            for seed in (0, 1)]
  rows = study.best_per_batch(trials)
  assert [r["examples_ratio"] for r in rows] == [None, None, 1.0]
  sentence = findings._regime_sentence(rows, study.PERFECT_SCALING_TOLERANCE)
  assert "cannot be judged: B = 64, 512 reached the target during warmup" in sentence, sentence
