"""experiments/hoffer.py: the arms are what the paper prescribes (sqrt rule, ghost BN of the SB's BN
batch, the SB's number of steps, every seed in every arm), the configs are valid at every scale,
the decision rules give each outcome on known numbers, and the smoke scale runs end to end."""
import math

import numpy as np
import pytest

from experiments import common, hoffer
from scaling import sweep
from scaling.training import schedule, step
from tests.experiment_smoke import run_smoke

TRAIN_SPLIT = {"fashion_mnist": 60000, "mnist_tiny": 512}   # before the validation split


def test_arms_follow_the_paper(tmp_path):
  s = hoffer.SCALES["here"]
  trials = sweep.expand(hoffer.get_config("here"), str(tmp_path))
  plans, bn_batch, seeds = {}, {}, {}
  for t in trials:
    c = t.config
    arm = ("sb" if c.batch_size == s["sb"] else "lb" if c.lr_rule == "none" else
           "lb_hoffer" if c.budget.length > s["epochs"] else "lb_sqrt_gbn")
    plans[arm] = schedule.make_plan(c, s["train_size"])
    bn_batch[arm] = step.plan_microbatches(c.batch_size, c.grad_groups, 1, 1).microbatch_size
    seeds.setdefault(arm, []).append(c.seed)
    assert c.train_eval_size >= hoffer.MIN_TRAIN_EVAL and c.eval_at_start
  assert all(len(set(v)) >= hoffer.SEEDS_PER_ARM for v in seeds.values()) and len(seeds) == 4
  k = s["lb"] / s["sb"]
  assert plans["lb"].lr == pytest.approx(plans["sb"].lr)
  assert plans["lb_sqrt_gbn"].lr == pytest.approx(plans["sb"].lr * math.sqrt(k))
  assert plans["lb_hoffer"].lr == pytest.approx(plans["sb"].lr * math.sqrt(k))
  assert plans["lb_hoffer"].total_steps == plans["sb"].total_steps          # regime adaptation
  assert plans["lb_sqrt_gbn"].total_steps * k == plans["sb"].total_steps    # same epochs
  assert bn_batch["lb_hoffer"] == bn_batch["lb_sqrt_gbn"] == bn_batch["sb"]  # ghost BN
  assert bn_batch["lb"] == s["lb"] // 2
  for plan in plans.values():   # EVALS_PER_RUN evaluations in every arm
    assert plan.total_steps == hoffer.EVALS_PER_RUN * plan.eval_every_steps
  # The constant-LR half of the SB's run spans the decades the diffusion claim needs.
  assert math.log10(plans["sb"].total_steps / 2) >= hoffer.MIN_DECADES


@pytest.mark.parametrize("scale", common.SCALES)
def test_every_trial_config_is_valid(scale, tmp_path):
  config = hoffer.get_config(scale)
  trials = sweep.expand(config, str(tmp_path))
  d = config.dataset
  train_size = d.train_size or TRAIN_SPLIT[d.name] - d.validation_size
  assert len(sweep.validate(trials, train_size, 1)) == len(trials) == 4 * len(
      hoffer.SCALES[scale]["seeds"])


def test_validation_error_is_read_where_the_training_error_reaches_the_level():
  train, valid = np.array([0.9, 0.30, 0.20, 0.10]), np.array([0.9, 0.32, 0.24, 0.16])
  assert hoffer.at_training_error(train, valid, 0.25) == pytest.approx((0.28, 0.10))
  assert hoffer.at_training_error(train, valid, 0.10) == pytest.approx((0.16, 0.10))
  assert hoffer.at_training_error(train, valid, 0.95) == (0.9, math.inf)   # not bracketed
  assert all(map(math.isnan, hoffer.at_training_error(train, valid, 0.05)))   # never reached


def closing(sb, lb, full, seeds=3, train_eval=2000, bracket=0.02):
  return hoffer.closing_verdicts(hoffer.gap_closed(sb, lb, full), seeds, train_eval, bracket, "e")


def outcomes(verdicts):
  return [v.outcome for v in verdicts]


def test_gap_closing_rules_give_each_outcome():
  sb, lb = [0.140, 0.142, 0.144], [0.180, 0.182, 0.184]   # naive gap 0.04, SE ~0.0016
  assert outcomes(closing(sb, lb, [0.142, 0.143, 0.144])) == [common.CONFIRMED] * 2   # ~97 %
  # ~25 % closed: narrower, but far from most of it.
  assert outcomes(closing(sb, lb, [0.171, 0.172, 0.173])) == [common.CONFIRMED,
                                                              common.NOT_CONFIRMED]
  # Wider than the naive gap: not even narrowed.
  assert outcomes(closing(sb, lb, [0.190, 0.192, 0.194])) == [common.NOT_CONFIRMED] * 2
  # Half closed, within the seeds' spread of it: the magnitude cannot be told.
  assert outcomes(closing(sb, lb, [0.150, 0.162, 0.174])) == [common.CONFIRMED,
                                                              common.INCONCLUSIVE]
  gap = hoffer.gap_closed(sb, lb, [0.150, 0.162, 0.174])
  assert gap["lo"] < hoffer.MOST < gap["hi"] and gap["closed"] == pytest.approx(0.5)


@pytest.mark.parametrize("case, unmet", [
    (dict(seeds=2), "finished seeds in the smallest arm 2"),
    (dict(train_eval=0), "training examples evaluated"),
    (dict(bracket=math.inf), "largest training-error drop"),
    (dict(lb=[0.141, 0.145, 0.139]), "naive LB gap to SB"),   # no gap to close
])
def test_gap_closing_is_not_tested_outside_its_domain(case, unmet):
  args = dict(sb=[0.140, 0.142, 0.144], lb=[0.180, 0.182, 0.184], full=[0.142, 0.143, 0.144])
  args.update(case)
  for v in closing(**args):
    assert v.outcome == common.INCONCLUSIVE and v.evidence.startswith("not tested: ")
    assert unmet in v.evidence, v.evidence


def test_log_fit_tells_log_growth_from_a_random_walk():
  t = [float(x) for x in range(1, 200)]
  log_fit = hoffer.log_fit(t, [3 + 2 * math.log(x) for x in t])
  assert log_fit["log"] == pytest.approx((2.0, 1.0))
  walk_fit = hoffer.log_fit(t, [math.sqrt(x) for x in t])
  assert walk_fit["sqrt"][1] == pytest.approx(1.0) and walk_fit["log"][1] < 0.99


@pytest.mark.parametrize("sb, ra, decades, outcome", [
    ([(0.98, 0.86), (0.985, 0.85), (0.982, 0.87)], [(0.97, 0.8), (0.975, 0.8), (0.972, 0.8)],
     2.1, common.CONFIRMED),
    ([(0.98, 0.86), (0.985, 0.85), (0.982, 0.87)], [(0.93, 0.76), (0.94, 0.75), (0.935, 0.77)],
     2.1, common.NOT_CONFIRMED),     # the regime-adapted run's log fit falls short
    ([(0.98, 0.99), (0.985, 0.99), (0.982, 0.99)], [(0.97, 0.8), (0.975, 0.8), (0.972, 0.8)],
     2.1, common.NOT_CONFIRMED),     # a random walk fits better
    ([(0.98, 0.86), (0.985, 0.85), (0.982, 0.87)], [(0.99, 0.8), (0.90, 0.8), (0.96, 0.8)],
     2.1, common.INCONCLUSIVE),      # the seeds straddle the bar
    ([(0.98, 0.86), (0.985, 0.85), (0.982, 0.87)], [(0.97, 0.8), (0.975, 0.8), (0.972, 0.8)],
     1.0, common.INCONCLUSIVE),      # one decade: not tested
    ([(0.98, 0.86), (0.985, 0.85)], [(0.97, 0.8), (0.975, 0.8)], 2.1, common.INCONCLUSIVE),
])
def test_diffusion_rule_gives_each_outcome(sb, ra, decades, outcome):
  v = hoffer.diffusion_verdict({"sb": sb, "lb_hoffer": ra}, decades)
  assert v.outcome == outcome, v.line()
  assert v.evidence.startswith("not tested: ") == (decades < 1.5 or len(sb) < 3)


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_runs_end_to_end_with_one_verdict_per_claim(tmp_path, capsys, monkeypatch):
  run_smoke(hoffer, tmp_path, capsys, monkeypatch, claims=3)
