"""LR scaling rules, warmup/decay arithmetic and budgets, against hand-computed numbers."""
import numpy as np
import pytest

from configs import mnist
from scaling import schedule
from scaling.config import ConfigError
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


@pytest.mark.parametrize("overrides,field", [
    (dict(lr_rule="cubic"), "lr_rule='cubic'"),
    (dict(**{"decay.name": "exp"}), "decay.name='exp'"),
    (dict(**{"warmup.length": 10.0}), "warmup (")])
def test_bad_schedules_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=None) as error:
    schedule.make_plan(config(**overrides), 55_000)
  assert field in str(error.value) and "\n" not in str(error.value)
