"""experiments/goyal.py: the gradual warmup starts at the reference LR, every arm normalises over
the same BN batch, the `here` arms are inside every claim's pre-registered domain by construction,
the decision rules give each outcome on known numbers, and the smoke scale runs end to end."""
import types

import numpy as np
import pytest

from experiments import common, goyal
from scaling import sweep
from scaling.training import schedule, step
from tests.experiment_smoke import run_smoke

TRAIN_SPLIT = {"fashion_mnist": 60000, "mnist_tiny": 512}   # before the validation split
SMOKE = goyal.SCALES["smoke"]


def _trials(scale, arm, tmp_path):
  """(trial config, its plan) of every trial of one arm."""
  config = goyal.arm_config(scale, arm)
  d = config.dataset
  trials = sweep.expand(config, str(tmp_path))
  plans = sweep.validate(trials, d.train_size or TRAIN_SPLIT[d.name] - d.validation_size, 1)
  return [(t.config, p) for t, p in zip(trials, plans)]


def _lrs(config, plan, steps):
  lr_fn = schedule.learning_rate_fn(plan, config.decay, config.warmup.init_fraction)
  return [float(lr_fn(s)) for s in steps]


def test_gradual_warmup_goes_from_the_reference_lr_to_the_scaled_one(tmp_path):
  ref, large = SMOKE["batches"][0], SMOKE["batches"][-1]
  trials = _trials("smoke", "warmup", tmp_path)
  (c, plan), = [(c, p) for c, p in trials if c.batch_size == large]
  assert plan.warmup_steps > 1
  first, last = _lrs(c, plan, [0, plan.warmup_steps])
  assert first == pytest.approx(c.base_lr, rel=1e-6)                     # Goyal's eta
  assert last == pytest.approx(c.base_lr * large / ref, rel=1e-6)        # k * eta
  # The reference batch runs once per seed, flat at the reference LR.
  refs = [(c, p) for c, p in trials if c.batch_size == ref]
  assert sorted(c.seed for c, _ in refs) == list(SMOKE["ref_seeds"])
  assert _lrs(*refs[0], [0]) == pytest.approx([refs[0][0].base_lr], rel=1e-6)


def test_no_warmup_starts_at_the_scaled_lr_and_decays_when_the_warmup_arm_does(tmp_path):
  (cold, cold_plan), = _trials("smoke", "no_warmup", tmp_path)
  (warm, warm_plan), = [(c, p) for c, p in _trials("smoke", "warmup", tmp_path)
                        if c.batch_size == cold.batch_size]
  lrs_cold, lrs_warm = _lrs(cold, cold_plan, range(8)), _lrs(warm, warm_plan, range(8))
  assert lrs_cold[0] == pytest.approx(cold.base_lr * cold.batch_size / SMOKE["batches"][0])
  assert lrs_warm[0] < lrs_cold[0]
  assert lrs_cold[-1] == pytest.approx(lrs_warm[-1], rel=1e-6)   # same step decay afterwards


@pytest.mark.parametrize("scale", common.SCALES)
def test_every_trial_config_is_valid_with_goyals_bn_batch_in_every_arm(scale, tmp_path):
  s = goyal.SCALES[scale]
  for arm in goyal.ARMS:
    trials = _trials(scale, arm, tmp_path)
    for c, _ in trials:
      mb = step.plan_microbatches(c.batch_size, c.grad_groups, c.accumulation_steps, 1)
      bn_batch = c.model.ghost_batch_size if s["model"] == "resnet" else mb.microbatch_size
      assert bn_batch == goyal.BN_BATCH, (arm, c.batch_size)
      assert mb.microbatches // mb.accumulation_steps <= goyal.UNROLLED_GROUPS
    expected = (s["batches"] + (s["batches"][0],) * (len(s["ref_seeds"]) - 1)
                if arm == "warmup" else s[arm])
    assert sorted(c.batch_size for c, _ in trials) == sorted(expected)


@pytest.mark.parametrize("scale", ["here", "paper"])
def test_every_compared_arm_is_inside_the_domain_by_construction(scale, tmp_path):
  """Steps, warmup steps, seeds and the batch range that the claims need, from the resolved
  configs: only the tolerance is left to the run."""
  s = goyal.SCALES[scale]
  ref = s["batches"][0]
  arms = {arm: _trials(scale, arm, tmp_path) for arm in goyal.ARMS}
  for arm, trials in arms.items():
    for c, plan in trials:
      assert plan.total_steps >= goyal.MIN_STEPS, (arm, c.batch_size)
      if arm == "warmup" and c.batch_size > ref:
        assert plan.warmup_steps >= goyal.MIN_WARMUP_STEPS, c.batch_size
  assert sum(c.batch_size == ref for c, _ in arms["warmup"]) >= goyal.MIN_REF_SEEDS
  assert max(s["batches"]) >= goyal.LARGE_FACTOR * ref
  assert any(b >= goyal.LARGE_FACTOR * ref for b in s["no_warmup"])
  assert set(s["no_warmup"]) | set(s["no_scaling"]) <= set(s["batches"][1:])


def test_the_tolerance_floor_lets_the_run_see_the_papers_effects():
  assert goyal.GOYAL_TOLERANCE <= goyal.BREAKDOWN_EFFECT <= goyal.NO_WARMUP_EFFECT
  assert goyal.NO_WARMUP_EFFECT == pytest.approx(0.2484 - 0.2374)


def test_a_trial_is_read_at_the_end_of_its_warmup():
  records = [{"step": s, "examples": 64 * s, "valid/error": e}
             for s, e in ((10, 0.5), (20, 0.4), (30, 0.3))]
  trial = types.SimpleNamespace(
      batch_size=64, seed=1, lr=0.025, status="done", final={"valid/error": 0.2},
      config={"derived": {"warmup_steps": 15, "total_steps": 30}},
      series=lambda key: tuple(np.array(v, float) for v in zip(
          *[(r["step"], r["examples"], r[key]) for r in records])))
  assert goyal.result_of(trial) == goyal.Result(64, 1, 0.025, "done", 0.2, 0.4, 30, 15)
  assert goyal.result_of(types.SimpleNamespace(**{**vars(trial), "status": "diverged"})).final == 1


REF = 64


def scenario(warm=None, cold=None, flat=None, ref_errors=(0.100, 0.101, 0.102), steps=200,
             warmup_steps=40):
  """The verdicts of a run with these {batch: final error} (warmup arm), {batch: (early, final)}
  (no_warmup, against a warmup arm whose early error is 0.30) and {batch: final} (no_scaling)."""
  warm = {512: 0.103, 1024: 0.104, 2048: 0.130} if warm is None else warm
  cold = {512: (0.40, 0.104), 1024: (0.45, 0.11), 2048: (0.50, 0.14)} if cold is None else cold
  flat = {2048: 0.30} if flat is None else flat
  result = lambda b, final, early=0.30, seed=0: goyal.Result(
      b, seed, 0.1, "done", final, early, steps if b > REF else 100 * steps, warmup_steps)
  return [v.outcome for v in goyal.verdicts(REF, {
      "warmup": [result(REF, e, seed=i) for i, e in enumerate(ref_errors)]
                + [result(b, e) for b, e in warm.items()],
      "no_warmup": [result(b, final, early) for b, (early, final) in cold.items()],
      "no_scaling": [result(b, e) for b, e in flat.items()]})]


C, N, I = common.CONFIRMED, common.NOT_CONFIRMED, common.INCONCLUSIVE


def test_matching_up_to_a_large_batch_gives_each_outcome():
  assert scenario()[0] == C                                             # up to 16x, not 32x
  assert scenario(warm={512: 0.120, 1024: 0.104, 2048: 0.130})[0] == N  # 8x already out
  assert scenario(warm={512: 0.103, 1024: 0.104, 2048: 0.105})[0] == I  # no breakdown seen
  assert scenario(warm={128: 0.103, 256: 0.20})[0] == I                 # largest only 4x


def test_suffering_early_without_warmup_gives_each_outcome():
  assert scenario()[1] == C
  assert scenario(cold={512: (0.30, 0.10), 1024: (0.302, 0.11), 2048: (0.40, 0.14)})[1] == N
  assert scenario(cold={256: (0.50, 0.14)})[1] == I                     # no large batch compared


def test_needing_the_linear_rule_gives_each_outcome():
  assert scenario()[2] == C
  assert scenario(flat={512: 0.30, 2048: 0.131})[2] == N                # within tol at 2048
  assert scenario(flat={})[2] == I


def test_every_claim_outside_its_domain_is_not_tested():
  for run, unmet in ((scenario(ref_errors=(0.100, 0.101)), [0, 1, 2]),   # 2 seeds
                     (scenario(steps=50), [0, 1, 2]),
                     (scenario(warmup_steps=20), [0, 1]),
                     (scenario(ref_errors=(0.100, 0.104, 0.108)), [0, 1]),   # tolerance 0.016
                     (scenario(ref_errors=(0.100, 0.102, 0.1035)), [0])):    # tolerance 0.007
    assert [i for i, outcome in enumerate(run) if outcome == I] == unmet
  v = goyal.verdicts(REF, {"warmup": [goyal.Result(REF, 0, 0.1, "done", 0.1, 0.3, 100, 10)],
                           "no_warmup": [], "no_scaling": []})
  assert all(x.outcome == I and x.evidence.startswith("not tested: ") for x in v)


@pytest.mark.heavy   # CI's heavy pass
def test_smoke_runs_end_to_end_with_one_verdict_per_claim(tmp_path, capsys, monkeypatch):
  run_smoke(goyal, tmp_path, capsys, monkeypatch, claims=3, reports=goyal.ARMS)
