"""Learning-rate scaling rules, warmup + decay schedules, and budgets turned into steps.

The scaling rule is the object of study, so it lives here in the open and every derived number
(peak LR, warmup steps, total steps) is returned to the caller to be written into config.json:

    lr = base_lr * (batch_size / reference_batch_size) ** power * lr_multiplier

with power 0 (`none`), 0.5 (`sqrt`), 1 (`linear`) or `lr_power` (`power`). `lr_multiplier`
(default 1) tunes the learning rate around the rule: a sweep axis
`sweep.lr_multiplier = (0.25, 0.5, 1, 2, 4)` is a learning-rate grid that moves with the batch size
(Shallue et al. 2018; McCandlish et al. 2018 tune the LR at every batch size), and the report takes
the best trial per batch size over it.
"""
import dataclasses
import math

import optax

from scaling.config import ConfigError

RULE_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
DURATION_UNITS = ("steps", "epochs", "examples")
DECAYS = ("constant", "cosine", "linear", "step")


def rule_power(lr_rule: str, lr_power: float) -> float:
  if lr_rule == "power":
    return float(lr_power)
  if lr_rule not in RULE_POWERS:
    raise ConfigError(f"lr_rule={lr_rule!r} is unknown: use one of {sorted(RULE_POWERS) + ['power']}"
                      " (with `power`, set lr_power)")
  return RULE_POWERS[lr_rule]


def scaled_lr(base_lr: float, batch_size: int, reference_batch_size: int, power: float) -> float:
  return base_lr * (batch_size / reference_batch_size) ** power


# Steps are int32 on the device (the step counter, the schedules' arguments).
MAX_STEPS = 2**31 - 1


def to_steps(length: float, unit: str, batch_size: int, train_examples: int, field: str) -> int:
  """A duration in steps, epochs or examples -> whole optimizer steps (rounded up) for this batch."""
  if unit not in DURATION_UNITS:
    raise ConfigError(f"{field}.unit={unit!r} is unknown: use one of {DURATION_UNITS}")
  if length < 0:
    raise ConfigError(f"{field}.length={length} is negative: use a length >= 0")
  if unit == "steps":
    return int(math.ceil(length))
  examples = length * train_examples if unit == "epochs" else length
  return int(math.ceil(examples / batch_size))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a trial derives from its config once, recorded in config.json under `derived`."""
  lr: float                # peak learning rate: the scaling rule's, times lr_multiplier
  lr_power: float
  rule_lr: float           # the scaling rule's learning rate before the multiplier
  lr_multiplier: float
  warmup_steps: int
  total_steps: int
  steps_per_epoch: int
  eval_every_steps: int
  log_every_steps: int


def make_plan(config, train_examples: int) -> Plan:
  """Resolves the scaling rule and every duration of `config` for its batch size."""
  bs = config.batch_size
  if bs <= 0:
    raise ConfigError(f"batch_size={bs} must be positive")
  if bs > train_examples:
    raise ConfigError(f"batch_size={bs} is larger than the {train_examples} training examples:"
                      " lower batch_size or dataset.validation_size")
  power = rule_power(config.lr_rule, config.lr_power)
  if not config.lr_multiplier > 0:
    raise ConfigError(f"lr_multiplier={config.lr_multiplier} must be > 0: it multiplies the rule's"
                      " learning rate (use e.g. sweep.lr_multiplier=(0.5, 1.0, 2.0))")
  steps = lambda d, field: to_steps(d.length, d.unit, bs, train_examples, field)
  total = steps(config.budget, "budget")
  if total <= 0:
    raise ConfigError(f"budget.length={config.budget.length} gives no steps: use a positive budget")
  if total > MAX_STEPS:
    raise ConfigError(f"budget.length={config.budget.length} gives {total:.4g} steps at batch size"
                      f" {bs}, more than the {MAX_STEPS} a trial's step counter (int32 on the"
                      " device) holds: shorten budget.length")
  warmup = steps(config.warmup, "warmup")
  if warmup > total:
    raise ConfigError(f"warmup ({warmup} steps) is longer than the run ({total} steps, the step cap"
                      " when target.stop_at_target): shorten warmup.length or lengthen budget.length")
  if config.decay.name not in DECAYS:
    raise ConfigError(f"decay.name={config.decay.name!r} is unknown: use one of {DECAYS}")
  rule_lr = scaled_lr(config.base_lr, bs, config.reference_batch_size, power)
  return Plan(
      lr=rule_lr * config.lr_multiplier,
      lr_power=power,
      rule_lr=rule_lr,
      lr_multiplier=float(config.lr_multiplier),
      warmup_steps=warmup,
      total_steps=total,
      steps_per_epoch=train_examples // bs,
      eval_every_steps=max(1, steps(config.eval_every, "eval_every")),
      log_every_steps=max(1, config.log_every_steps),
  )


def step_boundaries(fractions, factor: float, decay_steps: int) -> dict[int, float]:
  """{post-warmup step: scale} of a step decay: post-warmup step c is multiplied by `factor` once
  for every boundary b with c >= b * decay_steps (Goyal et al.: x0.1 from epoch 30 of 90 on).
  A boundary is the first step at or past its fraction (rounded up, after rounding away float
  noise such as 1/3 * 90 = 30.000000000000004), never earlier; boundaries that land on one step
  multiply there (as a dict keyed by step, they replaced each other: a few-step run lost a
  decay)."""
  scales = {}
  for b in fractions:
    at = math.ceil(round(b * decay_steps, 9))
    scales[at] = scales.get(at, 1.0) * factor
  return scales


def learning_rate_fn(plan: Plan, decay, warmup_init_fraction: float,
                     peak: float | None = None) -> optax.Schedule:
  """Linear warmup from init_fraction * lr to lr, then the chosen decay over the remaining steps.

  `peak` replaces plan.lr: peak=1 gives the schedule's shape, which the training step multiplies
  by its runtime peak LR (every schedule here is linear in the peak), so that trials differing
  only in their LR share one compiled step."""
  if peak is not None:
    plan = dataclasses.replace(plan, lr=peak)
  decay_steps = max(1, plan.total_steps - plan.warmup_steps)
  final = decay.final_fraction * plan.lr
  if decay.name == "constant":
    after = optax.constant_schedule(plan.lr)
  elif decay.name == "cosine":
    after = optax.cosine_decay_schedule(plan.lr, decay_steps, alpha=decay.final_fraction)
  elif decay.name == "linear":
    after = optax.linear_schedule(plan.lr, final, decay_steps)
  else:  # step: multiply by `factor` at each boundary, given as fractions of the post-warmup steps
    after = optax.piecewise_constant_schedule(plan.lr, step_boundaries(
        decay.boundaries, decay.factor, decay_steps))
  if plan.warmup_steps == 0:
    return after
  warm = optax.linear_schedule(warmup_init_fraction * plan.lr, plan.lr, plan.warmup_steps)
  return optax.join_schedules([warm, after], [plan.warmup_steps])
