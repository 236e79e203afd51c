"""experiments/mccandlish.py: its decision rules on exact synthetic numbers (each able to say
CONFIRMED, NOT CONFIRMED and INCONCLUSIVE), its ladder config at every scale, and the smoke run."""
import types

import pytest

from experiments import common, mccandlish, shallue
from scaling import sweep
from tests.experiment_smoke import run_smoke
from tests.test_experiments_shallue import B, curve, exact, fit_of, rows_from_curve

C, N, I = common.CONFIRMED, common.NOT_CONFIRMED, common.INCONCLUSIVE
TRAIN_SPLIT = {"mnist": 60000, "fashion_mnist": 60000, "mnist_tiny": 512}


def trial(b_simple_at_target=None, steps=1000, decay=0.99):
  return types.SimpleNamespace(reached=steps is not None, steps_to_target=steps,
                               at_target={"noise/b_simple": b_simple_at_target},
                               config={"noise_scale": {"ema_decay": decay}})


def test_ema_trace_at_target_skips_runs_shorter_than_three_ema_windows():
  trials = [trial(400.0, steps=1000), trial(200.0, steps=400), trial(5.0, steps=299),
            trial(1.0, steps=None)]
  assert mccandlish.b_simple_at_target(trials) == (300.0, 2)


def frozen(values, rel_se=0.05):
  return {b: (v, rel_se * v) for b, v in zip(B, values)}


def test_crit_vs_simple_reads_frozen_b_simple_at_the_target():
  rows = exact(rows_from_curve(B, curve(70.0, 300.0)))   # B_crit = 300 exactly (seed bootstrap)
  fit = fit_of(rows)
  v = mccandlish.crit_vs_simple(fit, rows, frozen([400.0] * 9), (50.0, 4))
  assert v.outcome == C, v.line()
  assert "factor 0.75 [0.75, 0.75]" in v.evidence and "EMA trace (lagging" in v.evidence
  assert mccandlish.crit_vs_simple(fit, rows, frozen([20_000.0] * 9)).outcome == N
  # the median's bootstrap interval over batch sizes straddles 10x: 300 / [2000, 4000]
  spread = frozen([2000.0, 2000.0, 2000.0, 2000.0, 3000.0, 4000.0, 4000.0, 4000.0, 4000.0])
  v = mccandlish.crit_vs_simple(fit, rows, spread)
  assert v.outcome == I and not v.evidence.startswith("not tested"), v.line()


def test_crit_vs_simple_domain():
  rows = exact(rows_from_curve(B, curve(70.0, 300.0)))
  fit = fit_of(rows)
  v = mccandlish.crit_vs_simple(fit, rows, frozen([400.0] * 9, rel_se=0.3))
  assert v.evidence.startswith(
      "not tested: largest relative SE of frozen B_simple 0.3, need <= 0.2"), v.line()
  v = mccandlish.crit_vs_simple(fit, rows, frozen([400.0] * 4))
  assert v.evidence.startswith("not tested: batch sizes measured at frozen parameters 4, need >= 5")
  for r in rows[:5]:
    r["lr_at_edge"] = "lr_multiplier=0.5 (bottom of 0.5..2)"
  v = mccandlish.crit_vs_simple(fit, rows, frozen([400.0] * 9))
  assert v.evidence.startswith("not tested: batch sizes reached with a bracketed LR optimum 4,"
                               " need >= 5"), v.line()


def ladder(b_simple, se=10.0, losses=(0.4, 0.3, 0.2, 0.15, 0.1)):
  return [(400 * (i + 1), loss, b, se) for i, (loss, b) in enumerate(zip(losses, b_simple))]


@pytest.mark.parametrize("b_simple, expected", [
    ((100.0, 150.0, 220.0, 300.0, 400.0), C),   # grows as the loss falls: +300 = 21 SE
    ((400.0, 300.0, 220.0, 150.0, 100.0), N),   # falls as the loss falls
    ((200.0, 205.0, 198.0, 202.0, 210.0), I),   # constant within its SEs (a lagging EMA of this
                                                # would still read rho = -1)
    ((100.0, 160.0, 90.0, 150.0, 125.0), I),    # +25 = 1.8 SE
])
def test_grows_as_loss_falls(b_simple, expected):
  v = mccandlish.grows_as_loss_falls(ladder(b_simple))
  assert v.outcome == expected, v.line()
  assert not v.evidence.startswith("not tested")


def test_grows_as_loss_falls_domain():
  rising = (100.0, 150.0, 220.0, 300.0, 400.0)
  v = mccandlish.grows_as_loss_falls(ladder(rising)[:3])
  assert v.evidence.startswith("not tested: frozen-parameter ladder checkpoints 3, need >= 4")
  v = mccandlish.grows_as_loss_falls(ladder(rising, losses=(0.3, 0.28, 0.25, 0.2, 0.18)))
  assert v.evidence.startswith("not tested: ladder loss span (highest / lowest) 1.667, need >= 2")
  v = mccandlish.grows_as_loss_falls([])
  assert v.outcome == I and "no frozen-parameter ladder" in v.evidence, v.line()


def test_hyperbola_exact_perturbed_and_its_domain():
  rows = rows_from_curve(B, curve(70.0, 300.0))
  v = mccandlish.hyperbola(rows, fit_of(rows))
  assert v.outcome == C and "rms factor 1.00" in v.evidence
  assert "product median 1.00" in v.evidence
  # every other point off by 2x: rms factor ~2 > 1.5
  bent = rows_from_curve(B, [s * (2.0 if i % 2 else 0.5) for i, s in enumerate(curve(70.0, 300.0))])
  assert mccandlish.hyperbola(bent, fit_of(bent)).outcome == N
  # off by 1.3x: between 1.25 and 1.5
  off = rows_from_curve(B, [s * (1.3 if i % 2 else 1 / 1.3)
                            for i, s in enumerate(curve(70.0, 300.0))])
  assert mccandlish.hyperbola(off, fit_of(off)).outcome == I
  v = mccandlish.hyperbola(rows[:4], fit_of(rows[:4]))
  assert v.evidence.startswith("not tested: batch sizes reached with a bracketed LR optimum 4")


@pytest.mark.parametrize("scale", common.SCALES)
def test_ladder_config_is_valid_and_checkpoints_every_rung(scale, tmp_path):
  for (_, part), config in shallue.sweeps(scale, ("momentum",)).items():
    c = mccandlish.ladder_config(config, scale)
    every, count, _ = mccandlish.LADDER[scale]
    assert c.batch_size == min(config.sweep_zip.batch_size) and c.checkpoint.keep == count
    assert c.checkpoint.every_steps == c.eval_every.length == every and not c.target.stop_at_target
    trials = sweep.expand(c, str(tmp_path))
    d = c.dataset
    train_size = d.train_size or TRAIN_SPLIT[d.name] - d.validation_size
    assert len(sweep.validate(trials, train_size, 1)) == len(trials) == 1
    assert every % c.chunk_steps == 0   # evaluations (and checkpoints) at every multiple


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_reuses_or_runs_the_shallue_momentum_sweep(tmp_path, capsys, monkeypatch):
  momentum = "shallue/mnist_tiny/momentum"
  reports = (momentum, "ladder/mnist_tiny")
  run_smoke(mccandlish, tmp_path, capsys, monkeypatch, claims=3, reports=reports)
  assert not (tmp_path / "shallue" / "mnist_tiny" / "sgd").exists()
  assert len(list((tmp_path / "ladder" / "mnist_tiny").glob("noise_*.json"))) == 3
  # a second run trains and measures nothing: every trial is done, every measurement cached
  _, second = run_smoke(mccandlish, tmp_path, capsys, monkeypatch, claims=3, reports=reports)
  assert ": training" not in second and "already done, skipped" in second
  assert "wrote " not in second
