"""LR scaling rules, warmup/decay arithmetic and budgets, against hand-computed numbers."""
import os
from fractions import Fraction

import numpy as np
import pytest

from configs import mnist
from scaling.config import ConfigError
from scaling.training import schedule
from tests.tiny import override


def config(**overrides):
  return override(mnist.get_config(), **overrides)


@pytest.mark.parametrize("rule,power,expected", [
    ("none", 0, 0.1), ("sqrt", 0, 0.2), ("linear", 0, 0.4), ("power", 0.75, 0.1 * 4 ** 0.75)])
def test_scaling_rules(rule, power, expected):
  plan = schedule.make_plan(config(lr_rule=rule, lr_power=float(power), base_lr=0.1,
                                   batch_size=512, reference_batch_size=128), 55_000)
  assert plan.lr == pytest.approx(expected, rel=1e-12)


def test_budget_in_epochs_examples_and_steps():
  # 3 epochs of 55,000 at batch 512 = 165,000 / 512 = 322.27 -> 323 steps (rounded up).
  assert schedule.make_plan(config(batch_size=512), 55_000).total_steps == 323
  c = config(batch_size=512)
  c.warmup.length = 0.0
  c.budget.unit, c.budget.length = "examples", 1024.0
  assert schedule.make_plan(c, 55_000).total_steps == 2
  c.budget.unit, c.budget.length = "steps", 7.0
  plan = schedule.make_plan(c, 55_000)
  assert (plan.total_steps, plan.steps_per_epoch) == (7, 107)


def test_warmup_then_cosine_values():
  c = config(batch_size=256, base_lr=0.1, lr_rule="linear", reference_batch_size=128)
  c.budget.unit, c.budget.length = "steps", 110.0
  c.warmup.unit, c.warmup.length, c.warmup.init_fraction = "steps", 10.0, 0.1
  plan = schedule.make_plan(c, 55_000)
  lr = schedule.learning_rate_fn(plan, c.decay, c.warmup.init_fraction)
  peak = 0.2
  assert float(lr(0)) == pytest.approx(0.1 * peak)
  assert float(lr(5)) == pytest.approx(0.1 * peak + 0.5 * 0.9 * peak)   # linear warmup
  assert float(lr(10)) == pytest.approx(peak)
  assert float(lr(60)) == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-7)


def test_step_and_linear_decay():
  c = config(batch_size=128, base_lr=0.1)
  c.budget.unit, c.budget.length = "steps", 100.0
  c.warmup.length = 0.0
  c.decay.name, c.decay.boundaries, c.decay.factor = "step", (0.5, 0.75), 0.1
  plan = schedule.make_plan(c, 55_000)
  lr = schedule.learning_rate_fn(plan, c.decay, 0.0)
  assert [float(lr(s)) for s in (0, 49, 50, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])
  c.decay.name, c.decay.final_fraction = "linear", 0.0
  lr = schedule.learning_rate_fn(plan, c.decay, 0.0)
  assert float(lr(50)) == pytest.approx(0.05)


def goyal_lr(step, *, peak, init_fraction, warmup, total, boundaries, factor):
  """Goyal et al.'s schedule from its definition, in exact fractions: linear warmup from
  init_fraction x peak, then peak x factor^(boundaries b with c >= b x decay steps), c counting
  the steps after warmup."""
  if step < warmup:
    return init_fraction * peak + Fraction(step, warmup) * (1 - init_fraction) * peak
  c, decay_steps = step - warmup, max(1, total - warmup)
  return peak * Fraction(factor) ** sum(c >= b * decay_steps for b in boundaries)


@pytest.mark.parametrize("total,warmup", [(3, 1), (4, 1), (6, 1), (12, 3), (91, 1), (100, 10)])
def test_step_decay_is_goyals_schedule_at_every_step(total, warmup):
  """Goyal's boundaries (1/3, 2/3, 8/9 of the post-warmup steps): with few steps two boundaries
  fall on one step (they merged, a decay was lost) or a boundary rounded down to step 0 (the peak
  was never applied); with 90 decay steps, 1/3 x 90 is 30.000000000000004 in floats."""
  c = config(batch_size=128, base_lr=0.1)
  c.budget.unit, c.budget.length = "steps", float(total)
  c.warmup.unit, c.warmup.length, c.warmup.init_fraction = "steps", float(warmup), 0.1
  fractions = (Fraction(1, 3), Fraction(2, 3), Fraction(8, 9))
  c.decay.name, c.decay.boundaries, c.decay.factor = "step", tuple(map(float, fractions)), 0.1
  plan = schedule.make_plan(c, 55_000)
  lr = schedule.learning_rate_fn(plan, c.decay, c.warmup.init_fraction)
  expected = [goyal_lr(s, peak=Fraction(plan.lr), init_fraction=Fraction(1, 10), warmup=warmup,
                       total=total, boundaries=fractions, factor=Fraction(1, 10))
              for s in range(total)]
  # float32 schedules: each value to float32 rounding of its own size.
  assert [float(lr(s)) for s in range(total)] == pytest.approx([float(e) for e in expected],
                                                              rel=1e-6)


@pytest.mark.parametrize("overrides,field", [
    (dict(lr_rule="cubic"), "lr_rule='cubic'"),
    (dict(**{"decay.name": "exp"}), "decay.name='exp'"),
    (dict(**{"warmup.length": 10.0}), "warmup (")])
def test_bad_schedules_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=None) as error:
    schedule.make_plan(config(**overrides), 55_000)
  assert field in str(error.value) and "\n" not in str(error.value)


def test_lr_multiplier_scales_the_rule_and_is_recorded():
  plan = schedule.make_plan(config(lr_rule="sqrt", base_lr=0.1, batch_size=512,
                                   reference_batch_size=128, lr_multiplier=0.25), 55_000)
  assert plan.rule_lr == pytest.approx(0.2) and plan.lr == pytest.approx(0.05)
  assert plan.lr_multiplier == 0.25


@pytest.mark.parametrize("multiplier", [0.0, -1.0])
def test_nonpositive_lr_multiplier_is_a_config_error(multiplier):
  with pytest.raises(ConfigError, match=r"^lr_multiplier=.* must be > 0"):
    schedule.make_plan(config(lr_multiplier=multiplier), 55_000)


def test_step_cap_shorter_than_warmup_is_a_config_error():
  c = config(batch_size=128)
  c.target.stop_at_target = True
  c.budget.unit, c.budget.length = "steps", 10.0
  c.warmup.unit, c.warmup.length = "steps", 20.0
  with pytest.raises(ConfigError, match=r"warmup \(20 steps\) is longer than the run \(10 steps"):
    schedule.make_plan(c, 55_000)


@pytest.mark.parametrize("axis", ["lr_multiplier", "seed"])
def test_an_axis_that_expands_to_zero_trials_is_a_config_error(axis, tmp_path):
  import ml_collections
  from scaling import sweep
  c = config()
  c.sweep = ml_collections.ConfigDict({"batch_size": (64, 128), axis: ()})
  with pytest.raises(ConfigError, match=f"sweep.{axis} is an empty axis"):
    sweep.expand(c, str(tmp_path))


def test_bad_lr_grid_fails_in_the_cli_before_training(tmp_path):
  """One line, no traceback, no trial directory: the sweep is validated before any training."""
  import subprocess
  import sys
  repo = __file__.rsplit("/tests/", 1)[0]
  result = subprocess.run(
      [sys.executable, "-m", "scaling.main", "--config=configs/mnist_sweep_tiny.py",
       f"--workdir={tmp_path}", "--config.sweep.lr_multiplier=(1.0, -2.0)",
       "--config.num_devices=1"],
      cwd=repo, capture_output=True, text=True)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("config error: trial ") and "lr_multiplier=-2.0 is invalid" in last
  assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(tmp_path, "trials"))
