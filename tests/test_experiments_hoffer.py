"""experiments/hoffer.py: the arms are what the paper prescribes (sqrt rule, ghost BN of the SB's BN
batch, the SB's number of steps), and the smoke scale runs end to end."""
import math

import pytest

from experiments import hoffer
from scaling import sweep
from scaling.training import schedule, step
from tests.experiment_smoke import run_smoke


def test_arms_follow_the_paper(tmp_path):
  s = hoffer.SCALES["here"]
  trials = sweep.expand(hoffer.get_config("here"), str(tmp_path))
  train_examples = s["train_size"]
  plans, bn_batch = {}, {}
  for t in trials:
    c = t.config
    arm = ("sb" if c.batch_size == s["sb"] else "lb" if c.lr_rule == "none" else
           "lb_hoffer" if c.budget.length > s["epochs"] else "lb_sqrt_gbn")
    plans[arm] = schedule.make_plan(c, train_examples)
    bn_batch[arm] = step.plan_microbatches(c.batch_size, c.grad_groups, 1, 1).microbatch_size
  k = s["lb"] / s["sb"]
  assert plans["lb"].lr == pytest.approx(plans["sb"].lr)
  assert plans["lb_sqrt_gbn"].lr == pytest.approx(plans["sb"].lr * math.sqrt(k))
  assert plans["lb_hoffer"].lr == pytest.approx(plans["sb"].lr * math.sqrt(k))
  assert plans["lb_hoffer"].total_steps == plans["sb"].total_steps          # regime adaptation
  assert plans["lb_sqrt_gbn"].total_steps * k == plans["sb"].total_steps    # same epochs
  assert bn_batch["lb_hoffer"] == bn_batch["lb_sqrt_gbn"] == bn_batch["sb"]  # ghost BN
  assert bn_batch["lb"] == s["lb"] // 2


def test_log_fit_tells_log_growth_from_a_random_walk():
  t = [float(x) for x in range(1, 200)]
  log_fit = hoffer.log_fit(t, [3 + 2 * math.log(x) for x in t])
  assert log_fit["log"] == pytest.approx((2.0, 1.0))
  walk_fit = hoffer.log_fit(t, [math.sqrt(x) for x in t])
  assert walk_fit["sqrt"][1] == pytest.approx(1.0) and walk_fit["log"][1] < 0.99


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_runs_end_to_end_with_one_verdict_per_claim(tmp_path, capsys, monkeypatch):
  run_smoke(hoffer, tmp_path, capsys, monkeypatch, claims=2)
