"""experiments/shallue.py: its decision rules on exact synthetic curves, and the smoke run end to end."""
import math

import numpy as np
import pytest

from configs import mnist_sweep
from experiments import common, shallue
from scaling.analysis import study
from tests.experiment_smoke import run_smoke


def rows_from_curve(batch_sizes, steps, lrs=None, optimizer="momentum", edge=""):
  """best_per_batch-like rows for an exact steps curve (one seed, one setting per batch size)."""
  rows, e_ref = [], None
  for i, (b, s) in enumerate(zip(batch_sizes, steps)):
    e_ref = e_ref or s * b
    rows.append(dict(group=f"none/{optimizer}", lr_rule="none", optimizer=optimizer, batch_size=b,
                     outcome="reached", steps_to_target=float(s), lr=lrs[i] if lrs else 0.1,
                     lr_at_edge=edge, perfect_scaling=s * b / e_ref <= 1.2,
                     b_simple_at_target=None, _seed_steps={"{}": np.array([float(s)])}))
  held = True   # perfect scaling holds up to the first batch size where it fails
  for r in rows:
    held = held and r["perfect_scaling"]
    r["perfect_scaling"] = held
  return rows


B = [2**k for k in range(5, 14)]   # 32 .. 8192


def curve(s_min, b_crit):
  return [s_min * (1 + b_crit / b) for b in B]


def fit_of(rows):
  return study.fit_table(rows, replicates=200)[0]


def test_three_regimes_confirmed_on_an_exact_mccandlish_curve():
  rows = rows_from_curve(B, curve(70.0, 300.0))
  fit = fit_of(rows)
  assert fit["b_crit"] == pytest.approx(300.0, rel=1e-9)
  assert (fit["b_crit_lo"], fit["b_crit_hi"]) == pytest.approx((300.0, 300.0), rel=1e-9)
  v = shallue.three_regimes(rows, fit)
  assert v.outcome == common.CONFIRMED, v.line()
  # E(64)/E(32) = 2 (1 + 300/64) / (1 + 300/32) = 1.096 <= 1.2 < E(128)/E(32) = 1.289
  assert "B=32..64" in v.evidence
  # S(2048)/S(8192) = (1 + 300/2048) / (1 + 300/8192) = 1.106
  assert "S(2048)/S(8192)=1.11" in v.evidence


def test_three_regimes_not_confirmed_without_a_maximal_parallelism_regime():
  # B_crit = 4000: at B_max = 8192 the steps still fall (S(2048)/S(8192) = 2.22)
  rows = rows_from_curve(B, curve(70.0, 4000.0))
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.NOT_CONFIRMED
  # perfect scaling throughout: S_min fits <= 0, B_crit is NaN
  rows = rows_from_curve(B, [1e5 / b for b in B])
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.NOT_CONFIRMED


def test_three_regimes_not_confirmed_without_perfect_scaling():
  rows = rows_from_curve(B, curve(70.0, 40.0))   # B_crit near B_min: diminishing from the start
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.NOT_CONFIRMED


def test_three_regimes_inconclusive_with_too_few_batch_sizes():
  rows = rows_from_curve(B[:3], curve(70.0, 300.0)[:3])
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.INCONCLUSIVE


def test_loglog_slope_is_exact_and_its_error_never_below_the_grid():
  slope, se = shallue.loglog_slope([32, 64, 128, 256], [0.1, 0.2, 0.4, 0.8])
  assert slope == pytest.approx(1.0, abs=1e-12)
  # exact data: the grid's error, log2(2)/sqrt(12)/sqrt(sum (x - mean)^2) with x = 0,1,2,3 (Sxx = 5)
  assert se == pytest.approx(1 / math.sqrt(12) / math.sqrt(5), rel=1e-12)


@pytest.mark.parametrize("lrs, expected", [
    ([0.01 * b / 32 for b in B], common.NOT_CONFIRMED),             # linear throughout
    ([0.01 * math.sqrt(b / 32) for b in B], common.NOT_CONFIRMED),  # sqrt throughout
    ([0.01 * min(b, 512) / 32 for b in B], common.CONFIRMED),       # linear, then flat
])
def test_lr_rule(lrs, expected):
  rows = rows_from_curve(B, curve(70.0, 300.0), lrs=lrs)
  assert shallue.lr_rule(rows).outcome == expected


def test_lr_rule_inconclusive_with_four_batch_sizes():
  rows = rows_from_curve(B[:4], curve(70.0, 300.0)[:4])
  assert shallue.lr_rule(rows).outcome == common.INCONCLUSIVE


def test_lr_rule_reads_bracketed_optima_only():
  """Linear then flat, as CONFIRMED above, but the flat part's optima sit at the grid's top edge
  (bounds: the best LR may lie above them): with 4 bracketed optima left it tests nothing; with
  those edge optima left out of a longer range the slope comes from bracketed ones alone."""
  lrs = [0.01 * min(b, 512) / 32 for b in B]
  rows = rows_from_curve(B, curve(70.0, 300.0), lrs=lrs)
  for r in rows[4:]:
    r["lr_at_edge"] = "high"
  v = shallue.lr_rule(rows)
  assert v.outcome == common.INCONCLUSIVE, v.line()
  assert "not tested: 4 of 9 batch sizes reached have a bracketed LR optimum, need 5" in v.evidence
  assert "8192:high" in v.evidence
  # Only 2048..8192 at the edge: the bracketed B = 32..1024 are linear up to 512, then one flat
  # step; within 2 SE the linear rule holds on both halves (32..128, 256..1024): NOT CONFIRMED.
  for r in rows[4:6]:
    r["lr_at_edge"] = ""
  v = shallue.lr_rule(rows)
  assert v.outcome == common.NOT_CONFIRMED, v.line()
  assert "left out at the grid edge: 2048:high 4096:high 8192:high" in v.evidence


def test_momentum_extends():
  m = rows_from_curve(B, curve(70.0, 1000.0))
  s = rows_from_curve(B, curve(300.0, 100.0), optimizer="sgd")
  fm, fs = fit_of(m), fit_of(s)
  assert fm["perfect_scaling_up_to"] > fs["perfect_scaling_up_to"]
  assert shallue.momentum_extends(fm, fs, m, s).outcome == common.CONFIRMED
  assert shallue.momentum_extends(fs, fm, s, m).outcome == common.NOT_CONFIRMED
  # the same curve twice: intervals overlap, extents equal
  assert shallue.momentum_extends(fm, fm, m, m).outcome == common.INCONCLUSIVE


def test_here_config_momentum_is_the_default_study_and_sgd_sits_beside_it():
  assert shallue.here_config("momentum").to_dict() == mnist_sweep.get_config().to_dict()
  c = shallue.here_config("sgd")
  assert c.optimizer.name == "sgd" and c.target.value == 0.04 and c.model.name == "mlp"
  assert c.sweep_zip.batch_size == (32, 128, 512, 2048, 8192)
  for b, lr in zip(c.sweep_zip.batch_size, c.sweep_zip.base_lr):
    i = mnist_sweep.BATCH_SIZES.index(b)   # SGD's centre: SGD_CENTRE_FACTOR x momentum's
    assert lr == pytest.approx(shallue.SGD_CENTRE_FACTOR * mnist_sweep.LR_CENTRES[i])
  paper = [shallue.paper_config(d, "momentum") for d in shallue.PAPER_TARGETS]
  assert [(p.model.name, p.target.value) for p in paper] == [("cnn", 0.01), ("cnn", 0.1)]


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
  run_smoke(shallue, tmp_path, capsys, monkeypatch, claims=3,
            reports=[f"mnist_tiny/{part}" for part in shallue.PARTS])
