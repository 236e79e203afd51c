"""experiments/shallue.py: its decision rules on exact synthetic curves, and the smoke run."""
import math

import numpy as np
import pytest

from configs import mnist_sweep
from experiments import common, shallue
from scaling.analysis import study
from tests.experiment_smoke import run_smoke


def rows_from_curve(batch_sizes, steps, lrs=None, optimizer="momentum", edge="",
                    spread=(0.95, 1.0, 1.05)):
  """best_per_batch-like rows for an exact steps curve, one setting per batch size: its seeds at
  `spread` x the curve (median: the curve)."""
  rows, e_ref = [], None
  for i, (b, s) in enumerate(zip(batch_sizes, steps)):
    e_ref = e_ref or s * b
    rows.append(dict(group=f"none/{optimizer}", lr_rule="none", optimizer=optimizer, batch_size=b,
                     outcome="reached", steps_to_target=float(s), lr=lrs[i] if lrs else 0.1,
                     lr_at_edge=edge, perfect_scaling=s * b / e_ref <= 1.2,
                     b_simple_at_target=None, b_simple_at_target_source="", best_setting="{}",
                     _seed_steps={"{}": float(s) * np.array(spread)}))
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


def exact(rows):
  """The rows with every seed on the curve: the seed bootstrap's interval is the exact fit."""
  for r in rows:
    r["_seed_steps"] = {"{}": np.full(3, r["steps_to_target"])}
  return rows


def test_three_regimes_confirmed_on_an_exact_mccandlish_curve():
  rows = exact(rows_from_curve(B, curve(70.0, 300.0)))
  fit = fit_of(rows)
  assert fit["b_crit"] == pytest.approx(300.0, rel=1e-9)
  assert (fit["b_crit_lo"], fit["b_crit_hi"]) == pytest.approx((300.0, 300.0), rel=1e-9)
  v = shallue.three_regimes(rows, fit)
  assert v.outcome == common.CONFIRMED, v.line()
  # E(64)/E(32) = 2 (1 + 300/64) / (1 + 300/32) = 1.096 <= 1.2 < E(128)/E(32) = 1.289
  assert "B=32..64" in v.evidence
  # S(2048)/S(8192) = (1 + 300/2048) / (1 + 300/8192) = 1.106, exact seeds: interval a point
  assert "S(2048)/S(8192)=1.11 [1.11, 1.11]" in v.evidence and "seed bootstrap" in v.evidence


def test_flat_means_no_significant_rise_or_fall_within_the_seed_spread():
  rows = rows_from_curve(B, curve(70.0, 300.0))   # seeds at 0.95, 1, 1.05 x the curve
  quarter, top = rows[-3], rows[-1]
  ratio, lo, hi, flat = shallue.flat_ratio(quarter, top)
  assert (lo, hi) == pytest.approx((1.106 * 0.95 / 1.05, 1.106 * 1.05 / 0.95), abs=1e-3)
  assert flat is True     # [1.00, 1.22]: within [0.8, 1.25]
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.CONFIRMED

  def steps(quarter_steps, top_steps):   # seeds at 0.95, 1, 1.05 x these
    for r, s in ((quarter, quarter_steps), (top, top_steps)):
      r["_seed_steps"], r["steps_to_target"] = {"{}": s * np.array([0.95, 1.0, 1.05])}, s
    return shallue.flat_ratio(quarter, top)

  # Steps rise 70 -> 93 (the old rule, ratio <= 1.25, called it flat): [0.68, 0.83] straddles 0.8.
  assert steps(70.0, 93.0)[1:] == pytest.approx((0.681, 0.832, None), abs=1e-3)
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.INCONCLUSIVE
  assert steps(60.0, 93.0)[3] is False    # a significant rise: [0.58, 0.71] below 0.8
  assert shallue.three_regimes(rows, fit_of(rows)).outcome == common.NOT_CONFIRMED
  assert steps(93.0, 60.0)[3] is False    # a significant fall: [1.40, 1.71] above 1.25
  assert steps(80.0, 80.0)[1:] == pytest.approx((0.905, 1.105, True), abs=1e-3)


def test_three_regimes_is_not_tested_with_two_seeds_or_an_edge_optimum_at_an_end_read():
  rows = rows_from_curve(B, curve(70.0, 300.0), spread=(0.98, 1.02))
  v = shallue.three_regimes(rows, fit_of(rows))
  assert v.outcome == common.INCONCLUSIVE, v.line()
  assert v.evidence.startswith("not tested: seeds at B_max/4 and B_max (2048, 8192) 2, need >= 3")
  rows = rows_from_curve(B, curve(70.0, 300.0))
  rows[-1]["lr_at_edge"] = "lr_multiplier=2 (top of 0.5..2)"
  rows[3]["lr_at_edge"] = "high"   # B = 256: not read by the rule
  v = shallue.three_regimes(rows, fit_of(rows))
  assert v.evidence.startswith("not tested: LR optima at a grid edge among the batch sizes read"
                               " (B_min, 2 B_min, B_max/4, B_max) 8192:lr_multiplier=2"), v.line()


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
  v = shallue.three_regimes(rows, fit_of(rows))
  assert v.evidence.startswith("not tested: batch sizes reached 3, need >= 4"), v.line()


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
  assert v.evidence.startswith(
      "not tested: batch sizes reached with a bracketed LR optimum (of 9 reached; at the grid"
      " edge: 512:high 1024:high 2048:high 4096:high 8192:high) 4, need >= 5"), v.line()
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


def test_momentum_extends_is_not_tested_where_a_compared_optimum_sits_at_a_grid_edge():
  m = rows_from_curve(B, curve(70.0, 1000.0))
  s = rows_from_curve(B[::2], curve(300.0, 100.0)[::2], optimizer="sgd")
  m[1]["lr_at_edge"] = "top"   # B = 64: not run with SGD, so not compared
  s[2]["lr_at_edge"] = "bottom"   # B = 512
  v = shallue.momentum_extends(fit_of(m), fit_of(s), m, s)
  assert v.evidence.startswith("not tested: LR optima at a grid edge among the batch sizes compared"
                               " (32 128 512 2048 8192) sgd 512:bottom, need none"), v.line()


def test_b_crit_interval_needs_three_seeds_for_the_seed_bootstrap():
  rows = rows_from_curve(B, [s * (1.3 if i % 2 else 0.8) for i, s in enumerate(curve(70.0, 300.0))])
  assert shallue.b_crit_interval(fit_of(rows))[2] == "seed bootstrap"
  for r in rows:
    r["_seed_steps"] = {"{}": r["_seed_steps"]["{}"][:2]}
  fit = fit_of(rows)
  assert shallue.b_crit_interval(fit) == (fit["b_crit_batchboot_lo"], fit["b_crit_batchboot_hi"],
                                          "batch-size bootstrap")


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
