"""experiments/keskar.py, cohen.py, malladi.py: their decision rules on known numbers, their configs
at every scale valid before any training, and (heavy) the smoke runs end to end."""
import types

import pytest

from experiments import cohen, common, keskar, malladi
from scaling import sweep
from tests.experiment_smoke import run_smoke

PAPERS = {"keskar": keskar, "cohen": cohen, "malladi": malladi}
CLAIMS = {"keskar": 6, "cohen": 2, "malladi": 2}
TRAIN_SPLIT = {"mnist": 60000, "mnist_tiny": 512}   # before the validation split is held out


@pytest.mark.parametrize("name", sorted(PAPERS))
@pytest.mark.parametrize("scale", common.SCALES)
def test_every_trial_config_is_valid(name, scale, tmp_path):
  config = PAPERS[name].get_config(scale)
  trials = sweep.expand(config, str(tmp_path))
  d = config.dataset
  train_size = d.train_size or TRAIN_SPLIT[d.name] - d.validation_size
  assert len(sweep.validate(trials, train_size, 1)) == len(trials) >= 2


def test_keskar_compare_decides_by_ratio_and_separation():
  sb, lb = [1.0, 1.2, 1.1], [10.0, 12.0, 9.0]
  assert keskar.compare("c", sb, lb, larger="LB", ratio=3).outcome == common.CONFIRMED
  # Ratio 10 but one LB seed below one SB seed: INCONCLUSIVE.
  assert keskar.compare("c", [1.0, 1.0, 5.0], [4.0, 30.0, 30.0], larger="LB",
                        ratio=3).outcome == common.INCONCLUSIVE
  # Separated but ratio 1.5 < 3: INCONCLUSIVE; LB mean below SB's: NOT CONFIRMED.
  assert keskar.compare("c", [1.0, 1.1], [1.5, 1.6], larger="LB",
                        ratio=3).outcome == common.INCONCLUSIVE
  # One seed a side has no range: INCONCLUSIVE even at ratio 10.
  assert keskar.compare("c", [1.0], [10.0], larger="LB", ratio=3).outcome == common.INCONCLUSIVE
  assert keskar.compare("c", [2.0, 2.0], [1.0, 3.0], larger="LB",
                        ratio=1).outcome == common.NOT_CONFIRMED
  assert keskar.compare("c", [98.1, 98.0], [97.8, 97.9], larger="SB",
                        ratio=1).outcome == common.CONFIRMED


def _trial(lr, optimizer, sharpness, status="done"):
  records = [{"step": 10 * (i + 1), "curvature/top_eigenvalue": s} for i, s in enumerate(sharpness)]
  return types.SimpleNamespace(lr=lr, optimizer=optimizer, status=status, records=records)


def test_cohen_judge_reaches_hovers_or_not():
  # eta 0.1: T = 20. Rises, crosses 18 at the third measurement, then hovers around 20.
  assert cohen.judge(_trial(0.1, "sgd", [5, 12, 19, 21, 20, 19, 22, 20]))[0] is True
  # Crosses and keeps climbing to 2 T: does not hover.
  assert cohen.judge(_trial(0.1, "sgd", [5, 19, 30, 35, 40, 40, 40]))[0] is False
  # Never reaches 0.9 T: INCONCLUSIVE.
  assert cohen.judge(_trial(0.1, "sgd", [5, 8, 10, 12, 15, 16]))[0] is None
  # Momentum 0.9: T = 3.8 / eta = 38; hovering at 20 (= 2/eta) is not hovering at T.
  assert cohen.judge(_trial(0.1, "momentum", [5, 19, 20, 21, 20, 20, 20]))[0] is None
  assert cohen.judge(_trial(0.1, "momentum", [5, 30, 35, 38, 40, 37, 39]))[0] is True
  assert cohen.judge(_trial(0.1, "sgd", [5], status="diverged"))[0] is False


def test_malladi_rule_and_deviation():
  b1, b2, eps = malladi.sde_adam(16)
  assert (b1, b2) == pytest.approx((0.84, 0.984)) and eps == pytest.approx(2.5e-9)
  assert malladi.sde_adam(1) == (malladi.BASE_B1, malladi.BASE_B2, malladi.BASE_EPS)
  base = {100: 2.0, 200: 1.0, 300: 0.5}
  # Shared example counts only: |1.1 - 1| / 1 and |0.4 - 0.5| / 0.5 -> mean 0.15.
  assert malladi.deviation({200: 1.1, 300: 0.4, 400: 9.0}, base) == pytest.approx(0.15)


@pytest.mark.heavy   # CI's heavy pass
@pytest.mark.parametrize("name", sorted(PAPERS))
def test_smoke_run_prints_a_verdict_per_claim(name, tmp_path, capsys, monkeypatch):
  run_smoke(PAPERS[name], tmp_path, capsys, monkeypatch, claims=CLAIMS[name])
