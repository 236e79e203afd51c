"""experiments/mccandlish.py: its decision rules on exact synthetic data, and the smoke run."""
import types

import numpy as np
import pytest

from experiments import common, mccandlish
from tests.experiment_smoke import run_smoke
from tests.test_experiments_shallue import B, curve, fit_of, rows_from_curve


def trial(b_simple_at_target=None, steps=1000, records=(), status="done", decay=0.99):
  return types.SimpleNamespace(
      reached=steps is not None, steps_to_target=steps, status=status, records=list(records),
      at_target={"noise/b_simple": b_simple_at_target}, config={"noise_scale": {"ema_decay": decay}})


def test_b_simple_at_target_skips_runs_shorter_than_three_ema_windows():
  trials = [trial(400.0, steps=1000), trial(200.0, steps=400), trial(5.0, steps=299),
            trial(1.0, steps=None)]
  assert mccandlish.b_simple_at_target(trials) == (300.0, 2)


def test_crit_vs_simple_factor_and_verdicts():
  fit = dict(b_crit=300.0, b_crit_lo=200.0, b_crit_hi=400.0)
  v = mccandlish.crit_vs_simple(fit, [trial(400.0)])
  assert v.outcome == common.CONFIRMED and "factor 0.75 [0.50, 1.00]" in v.evidence
  assert mccandlish.crit_vs_simple(fit, [trial(20_000.0)]).outcome == common.NOT_CONFIRMED
  assert mccandlish.crit_vs_simple(fit, [trial(3000.0)]).outcome == common.INCONCLUSIVE  # 0.067..0.13
  assert mccandlish.crit_vs_simple(fit, [trial(400.0, steps=10)]).outcome == common.INCONCLUSIVE


def records(b_simple_of_loss, n=12):
  loss = np.linspace(2.0, 0.2, n)
  return [{"step": 100 + 16 * i, "train/loss": float(x), "noise/b_simple": float(b_simple_of_loss(x))}
          for i, x in enumerate(loss)]


def test_grows_as_loss_falls():
  rising = [trial(records=records(lambda x: 50 / x)) for _ in range(3)]
  assert mccandlish.rank_correlation(rising[0]) == pytest.approx(-1.0)
  assert mccandlish.grows_as_loss_falls(rising).outcome == common.CONFIRMED
  falling = [trial(records=records(lambda x: 50 * x)) for _ in range(3)]
  assert mccandlish.grows_as_loss_falls(falling).outcome == common.NOT_CONFIRMED
  assert mccandlish.grows_as_loss_falls(rising[:2]).outcome == common.INCONCLUSIVE
  # records inside the first EMA window (100 steps) do not count: steps 0..176, 5 left after it
  early = trial(records=[dict(r, step=16 * i) for i, r in enumerate(records(lambda x: 50 / x))])
  assert mccandlish.rank_correlation(early) is None


def test_hyperbola_exact_and_perturbed():
  rows = rows_from_curve(B, curve(70.0, 300.0))
  v = mccandlish.hyperbola(rows, fit_of(rows))
  assert v.outcome == common.CONFIRMED and "rms factor 1.00" in v.evidence
  assert "product median 1.00" in v.evidence
  # every other point off by 2x: rms factor ~2 > 1.5
  bent = rows_from_curve(B, [s * (2.0 if i % 2 else 0.5) for i, s in enumerate(curve(70.0, 300.0))])
  assert mccandlish.hyperbola(bent, fit_of(bent)).outcome == common.NOT_CONFIRMED


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_reuses_or_runs_the_shallue_momentum_sweep(tmp_path, capsys, monkeypatch):
  momentum = "shallue/mnist_tiny/momentum"
  run_smoke(mccandlish, tmp_path, capsys, monkeypatch, claims=3, reports=(momentum,))
  assert not (tmp_path / "shallue" / "mnist_tiny" / "sgd").exists()
  # a second run trains nothing: every trial is already done
  _, second = run_smoke(mccandlish, tmp_path, capsys, monkeypatch, claims=3, reports=(momentum,))
  assert ": training" not in second and "already done, skipped" in second
