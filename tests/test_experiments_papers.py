"""experiments/keskar.py, cohen.py, malladi.py: their decision rules on known numbers (each able to
say CONFIRMED, NOT CONFIRMED and INCONCLUSIVE), their configs at every scale valid before any
training, and (heavy) the smoke runs end to end."""
import json
import math
import os
import types

import pytest

from experiments import cohen, common, keskar, malladi
from scaling import sweep
from tests.experiment_smoke import run_smoke

PAPERS = {"keskar": keskar, "cohen": cohen, "malladi": malladi}
CLAIMS = {"keskar": 12, "cohen": 2, "malladi": 2}
TRAIN_SPLIT = {"mnist": 60000, "mnist_tiny": 512}   # before the validation split is held out
C, N, I = common.CONFIRMED, common.NOT_CONFIRMED, common.INCONCLUSIVE


@pytest.mark.parametrize("name", sorted(PAPERS))
@pytest.mark.parametrize("scale", common.SCALES)
def test_every_trial_config_is_valid(name, scale, tmp_path):
  config = PAPERS[name].get_config(scale)
  trials = sweep.expand(config, str(tmp_path))
  d = config.dataset
  train_size = d.train_size or TRAIN_SPLIT[d.name] - d.validation_size
  assert len(sweep.validate(trials, train_size, 1)) == len(trials) >= 2


# ---------------------------------------------------------------- Keskar

def _keskar_rows(values, **extra):
  """One row per value, every measure set to it (and the run trained to the target)."""
  keys = ("test_acc", "sign_sharpness", "invariant", "top_eig", "trace", "init_distance",
          *keskar.SHARPNESS_EPS)
  return [{**{k: v for k in keys}, "train_error": 0.001, **extra} for v in values]


def test_keskar_direction_needs_separated_seeds():
  ok = keskar.domain(_keskar_rows([1, 1, 1]), _keskar_rows([1, 1, 1]))
  outcome = lambda sb, lb, larger="LB": keskar.direction(
      "c", sb, lb, larger=larger, conditions=ok).outcome
  assert outcome([1.0, 1.2, 1.1], [3.0, 3.5, 3.2]) == C
  assert outcome([98.1, 98.0, 98.2], [97.8, 97.9, 97.7], larger="SB") == C
  # Means the paper's way, ranges overlapping: INCONCLUSIVE; mean not above: NOT CONFIRMED.
  assert outcome([1.0, 1.0, 5.0], [4.0, 30.0, 30.0]) == I
  assert outcome([2.0, 2.0, 2.0], [1.0, 3.0, 2.0]) == N
  assert outcome([97.8, 97.9, 97.7], [98.1, 98.0, 98.2], larger="SB") == N


def test_keskar_size_against_half_the_papers_effect():
  ok = keskar.domain(_keskar_rows([1, 1, 1]), _keskar_rows([1, 1, 1]))
  ratio = lambda sb, lb, paper: keskar.size("c", sb, lb, larger="LB", paper=paper, ratio=True,
                                            conditions=ok).outcome
  # Paper x167 at eps 1e-3: the bar is sqrt(167) = x12.9 on a log scale.
  assert math.isclose(167 ** keskar.FRACTION, math.exp(keskar.FRACTION * math.log(167)))
  assert ratio([1.0, 1.1, 1.2], [20.0, 25.0, 30.0], 167) == C            # x16.7 .. x30
  # The earlier `here` run (L-BFGS-B, eps 1e-3): x2.7 .. x4.0 over the seeds, far below.
  assert ratio([62.2, 60.8, 42.5], [169.6, 170.3, 129.8], 167) == N
  assert ratio([1.0, 1.0, 2.0], [10.0, 20.0, 30.0], 167) == I             # x5 .. x30
  assert ratio([0.0, 0.0, 0.5], [10.0, 20.0, 30.0], 167) == C            # x20 .. infinite
  diff = lambda sb, lb: keskar.size("c", sb, lb, larger="SB", paper=0.22, ratio=False,
                                    conditions=ok).outcome
  assert diff([98.0, 98.1, 98.2], [97.7, 97.8, 97.85]) == C              # 0.15 .. 0.5 >= 0.11
  assert diff([97.9, 97.9, 97.92], [97.85, 97.86, 97.87]) == N           # 0.03 .. 0.07
  assert diff([98.0, 98.1, 98.2], [97.95, 97.8, 97.7]) == I              # 0.05 .. 0.5


def test_keskar_verdicts_only_where_every_seed_is_at_a_minimum():
  sb, lb = _keskar_rows([1.0, 1.1, 1.2]), _keskar_rows([20.0, 25.0, 30.0])
  verdicts = keskar.verdicts(sb, lb)
  assert len(verdicts) == CLAIMS["keskar"]
  # LB larger everywhere: its claims hold, SB's (accuracy, distance) do not.
  assert [v.outcome for v in verdicts] == [N, N, C, C, C, C, C, C, C, C, C, N]
  for rows in ((sb[:2], lb), (sb, lb[:2])):                    # too few seeds a side
    assert {v.outcome for v in keskar.verdicts(*rows)} == {I}
  short = keskar.verdicts(sb, lb[:2] + _keskar_rows([30.0], train_error=0.02))
  assert all(v.outcome == I and "train_eval/error > 0.005 1, need <= 0" in v.evidence
             for v in short)
  empty = keskar.verdicts([], [])
  assert all(v.evidence.startswith("not tested: finished SB seeds 0") for v in empty)


# ---------------------------------------------------------------- Cohen

def _trial(lr, optimizer, sharpness, status="done"):
  records = [{"step": 5 * (i + 1), "curvature/top_eigenvalue": s} for i, s in enumerate(sharpness)]
  return types.SimpleNamespace(lr=lr, optimizer=optimizer, status=status, records=records)


RISES_AND_HOVERS = [5, 9, 12, 19, 21, 20, 19, 22, 20]   # eta 0.1: T = 20


def test_cohen_judge_tests_only_a_rise_from_below():
  holds, conditions, _ = cohen.judge(_trial(0.1, "sgd", RISES_AND_HOVERS))
  assert holds is True and all(c.met for c in conditions)
  # Crosses and keeps climbing to 2 T: does not hover.
  holds, conditions, _ = cohen.judge(_trial(0.1, "sgd", [5, 19, 30, 35, 40, 40, 40]))
  assert holds is False and all(c.met for c in conditions)
  # Starts above T and comes down to it (a catapult): not a test of progressive sharpening.
  holds, conditions, _ = cohen.judge(_trial(0.1, "sgd", [40, 21, 20, 19, 20, 20, 21]))
  assert holds is True and [c.what for c in conditions if not c.met] == [
      "sgd eta=0.1: first sharpness / T"]
  # Never reaches 0.9 T; reaches it too late for 5 measurements.
  for series in ([5, 8, 10, 12, 15, 16], [5, 8, 10, 12, 15, 19, 20]):
    holds, conditions, _ = cohen.judge(_trial(0.1, "sgd", series))
    assert not all(c.met for c in conditions)
  # Momentum: T = (2 + 2 beta) / eta; hovering at 2/eta = 20 is not reaching T.
  t = (2 + 2 * cohen.MOMENTUM) / 0.1
  assert t >= 20 / cohen.REACH * 1.1
  assert not all(c.met for c in cohen.judge(_trial(0.1, "momentum", RISES_AND_HOVERS))[1])
  holds, conditions, _ = cohen.judge(_trial(0.1, "momentum", [
      x * t for x in (0.2, 0.6, 0.95, 1.0, 1.05, 0.97, 1.0)]))
  assert holds is True and all(c.met for c in conditions)
  holds, conditions, _ = cohen.judge(_trial(0.1, "sgd", RISES_AND_HOVERS, "diverged"))
  assert holds is False and all(c.met for c in conditions)


def test_cohen_verdict_over_the_testable_runs():
  outcome = lambda *trials: cohen.verdict("c", [cohen.judge(t) for t in trials], 2).outcome
  hover, catapult = _trial(0.1, "sgd", RISES_AND_HOVERS), _trial(0.1, "sgd", [40] + [20] * 6)
  climb = _trial(0.1, "sgd", [5, 19, 30, 35, 40, 40, 40])
  assert outcome(hover, hover, catapult) == C       # the catapult is left out
  assert outcome(hover, climb) == N
  assert outcome(hover, _trial(0.1, "sgd", RISES_AND_HOVERS, "diverged")) == N
  v = cohen.verdict("c", [cohen.judge(t) for t in (hover, catapult)], 2)
  assert v.outcome == I and v.evidence.startswith("not tested: runs with the first measurement")
  assert "not testable: sgd eta=0.1: first sharpness / T 2, need <= 0.5" in v.evidence


# ---------------------------------------------------------------- Malladi

def test_malladi_rule_and_deviation():
  b1, b2, eps = malladi.sde_adam(16)
  assert (b1, b2) == pytest.approx((0.84, 0.984)) and eps == pytest.approx(2.5e-9)
  assert malladi.sde_adam(1) == (malladi.BASE_B1, malladi.BASE_B2, malladi.BASE_EPS)
  base = {100: 2.0, 200: 1.0, 300: 0.5}
  # Shared example counts only: |1.1 - 1| / 1 and |0.4 - 0.5| / 0.5 -> mean 0.15.
  assert malladi.deviation({200: 1.1, 300: 0.4, 400: 9.0}, base) == pytest.approx(0.15)


def test_malladi_larger_batches_differ_from_the_reference_in_seed_too():
  runs = malladi.runs(malladi.SCALES["here"])
  base_seeds = {seed for k, _, seed in runs if k == 1}
  assert base_seeds == {0, 1, 2}
  larger = [(k, rule, seed) for k, rule, seed in runs if k > 1]
  assert not {seed for _, _, seed in larger} & base_seeds
  # One seed per batch size, the same for both rules.
  assert len({seed for _, _, seed in larger}) == len(larger) // 2
  assert all(sum(1 for _, r, s in larger if s == seed) == 2 for _, _, seed in larger)


def _malladi(base_devs, sqrt, linear, points=10):
  devs = {"sqrt": dict(zip((64, 128, 256, 512), sqrt)),
          "linear": dict(zip((64, 128, 256, 512), linear))}
  return [v.outcome for v in malladi.verdicts(base_devs, devs, points, 32)]


def test_malladi_verdicts_all_outcomes():
  floor = [0.02, 0.03]                         # D_seed 0.025: tol = max(0.075, 0.05)
  assert _malladi(floor, [0.02, 0.04, 0.05, 0.07], [0.05, 0.1, 0.2, 0.3]) == [C, C]
  assert _malladi(floor, [0.02, 0.04, 0.05, 0.2], [0.05, 0.1, 0.2, 0.3]) == [N, C]
  # Sqrt deviates more than linear at the largest batch, beyond the floor.
  assert _malladi(floor, [0.02, 0.04, 0.05, 0.3], [0.05, 0.1, 0.2, 0.1]) == [N, N]
  # Within the floor of each other at the largest batch.
  assert _malladi(floor, [0.02, 0.04, 0.05, 0.29], [0.05, 0.1, 0.2, 0.3]) == [N, I]
  # The earlier `here` run: D_seed 0.078 (tol 0.235) above every D_linear: no power.
  old = _malladi([0.078], [0.026, 0.080, 0.166, 0.244], [0.050, 0.116, 0.145, 0.207])
  assert old == [I, I]
  v = malladi.verdicts([0.078, 0.078], {"sqrt": {512: 0.244}, "linear": {512: 0.207}}, 10, 32)
  assert v[0].evidence.startswith("not tested: tol 0.234, need < the largest D_linear (0.207)")
  assert v[1].outcome == I and not v[1].evidence.startswith("not tested")
  # Two seeds at B0 (one pair for the floor), or too few evaluation points: not tested.
  for outcome in (_malladi([0.02], [0.02] * 4, [0.3] * 4),
                  _malladi(floor, [0.02] * 4, [0.3] * 4, points=4)):
    assert outcome == [I, I]


# ---------------------------------------------------------------- the scales against the domains

def test_here_meets_the_domains_that_its_config_decides_and_smoke_misses_one():
  here, smoke = keskar.SCALES["here"], keskar.SCALES["smoke"]
  assert len(here["seeds"]) >= keskar.MIN_SEEDS > len(smoke["seeds"])
  for scale, expected in (("here", True), ("smoke", False)):
    s = malladi.SCALES[scale]
    enough = (len(s["base_seeds"]) >= malladi.MIN_BASE_SEEDS
              and s["examples"] // s["eval_examples"] >= malladi.MIN_POINTS)
    assert enough is expected
    s = cohen.SCALES[scale]
    # Room for MIN_AFTER measurements after reaching the threshold at the first measurement.
    assert (s["steps"] // s["every"] > cohen.MIN_AFTER) is expected


@pytest.mark.heavy   # CI's heavy pass
@pytest.mark.parametrize("name", sorted(PAPERS))
def test_smoke_run_prints_a_verdict_per_claim(name, tmp_path, capsys, monkeypatch):
  run_smoke(PAPERS[name], tmp_path, capsys, monkeypatch, claims=CLAIMS[name])
  if name == "keskar":   # the checkpoint measures, with the kernels' norm for the BN confound
    for root, _, files in os.walk(tmp_path):
      if "keskar_sharpness.json" in files:
        with open(os.path.join(root, "keskar_sharpness.json")) as f:
          assert json.load(f)["bn_kernel_sq_norm"] > 0
        break
    else:
      pytest.fail("no keskar_sharpness.json")
