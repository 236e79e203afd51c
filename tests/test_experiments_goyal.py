"""experiments/goyal.py: the gradual warmup starts at the reference LR, and the smoke scale runs
end to end (sweeps, reports, one verdict per claim, verdicts.json)."""
import pytest

from experiments import goyal
from scaling import sweep
from scaling.training import schedule
from tests.experiment_smoke import run_smoke


def _lr_at(trial_config, steps):
  plan = schedule.make_plan(trial_config, 412)   # mnist_tiny: 512 - 100 validation
  lr_fn = schedule.learning_rate_fn(plan, trial_config.decay, trial_config.warmup.init_fraction)
  return plan, [float(lr_fn(s)) for s in steps]


def test_gradual_warmup_goes_from_the_reference_lr_to_the_scaled_one(tmp_path):
  trials = sweep.expand(goyal.arm_config("smoke", "warmup"), str(tmp_path))
  large = [t for t in trials if t.config.batch_size == 128]
  assert len(large) == 1
  c = large[0].config
  warmup_steps = schedule.make_plan(c, 412).warmup_steps
  assert warmup_steps > 1
  _, (first, last) = _lr_at(c, [0, warmup_steps])
  assert first == pytest.approx(c.base_lr, rel=1e-6)                      # Goyal's eta
  assert last == pytest.approx(c.base_lr * 128 / 16, rel=1e-6)           # k * eta
  # The reference batch runs once per seed, flat at the reference LR.
  ref = [t for t in trials if t.config.batch_size == 16]
  assert sorted(t.config.seed for t in ref) == list(goyal.SCALES["smoke"]["ref_seeds"])
  assert _lr_at(ref[0].config, [0])[1] == pytest.approx([ref[0].config.base_lr], rel=1e-6)


def test_no_warmup_starts_at_the_scaled_lr_and_decays_when_the_warmup_arm_does(tmp_path):
  cold = sweep.expand(goyal.arm_config("smoke", "no_warmup"), str(tmp_path))[0].config
  warm = [t.config for t in sweep.expand(goyal.arm_config("smoke", "warmup"), str(tmp_path))
          if t.config.batch_size == cold.batch_size][0]
  _, lrs_cold = _lr_at(cold, range(0, 8))
  _, lrs_warm = _lr_at(warm, range(0, 8))
  assert lrs_cold[0] == pytest.approx(cold.base_lr * cold.batch_size / 16, rel=1e-6)
  assert lrs_warm[0] < lrs_cold[0]
  assert lrs_cold[-1] == pytest.approx(lrs_warm[-1], rel=1e-6)   # same step decay afterwards


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_runs_end_to_end_with_one_verdict_per_claim(tmp_path, capsys, monkeypatch):
  run_smoke(goyal, tmp_path, capsys, monkeypatch, claims=3, reports=goyal.ARMS)
