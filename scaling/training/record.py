"""A trial's running record: what the training loop keeps of one trial between evaluations.

Host-side Python numbers, saved in every checkpoint as JSON (exact resume): the status, the target
and when it was reached, the best and last evaluations, the windowed train metrics, the
noise-scale EMA, the cost so far; summary.json is written from it. `TrialRecord.absorb` folds a
segment's per-step train metrics in (divergence, the noise EMA, train records every
log_every_steps), `record_eval` an evaluation, `summary` makes summary.json.

The checkpointed JSON keeps the layout of the dict this record replaced, so the checkpoints of
earlier versions restore (fields they lack start at their defaults).
"""
import dataclasses
import math

import numpy as np

from scaling.measurement import noise_scale as noise_scale_lib
from scaling.training import cadence
from scaling.training import resources as resources_lib


def target_reached(value: float, target_value: float) -> bool:
  return math.isfinite(value) and value < target_value   # Shallue et al.: strictly better


@dataclasses.dataclass
class Target:
  """The target a trial runs to (config.target) and where it first got there."""
  metric: str
  value: float
  stop_at_target: bool
  reached: bool = False
  step: int | None = None
  examples: int | None = None
  tokens: int | None = None   # a language model's examples x context length
  at: dict | None = None      # wall time, noise scale and curvature when first reached

  def as_dict(self) -> dict:
    d = {"metric": self.metric, "value": self.value, "reached": self.reached, "step": self.step,
         "examples": self.examples, "stop_at_target": self.stop_at_target}
    if self.tokens is not None:
      d["tokens"] = self.tokens
    if self.at is not None:
      d["at"] = self.at
    return d


@dataclasses.dataclass
class TrialRecord:
  """One trial's running record (module docstring). `resources` is resources.ChunkCost's."""
  target: Target
  status: str = "running"         # running | done | diverged | preempted
  elapsed: float = 0.0            # wall seconds, continued across resumes
  step_cap: int = 0
  diverged_at_step: int | None = None
  diverged_reason: str | None = None
  initial_loss: float | None = None   # the first step's training loss: the divergence unit
  best: dict = dataclasses.field(default_factory=dict)
  last_eval: dict = dataclasses.field(default_factory=dict)
  last_train: dict = dataclasses.field(default_factory=dict)
  curvature: dict = dataclasses.field(default_factory=dict)
  last_curvature_step: int = 0
  last_checkpoint_step: int = 0
  # Running sums of the train metrics since the last train record.
  window: dict = dataclasses.field(default_factory=lambda: {"steps": 0, "sums": {}})
  # The noise-scale estimators' EMAs (noise_scale.NoiseScaleEMA's fields), not bias-corrected.
  noise: dict = dataclasses.field(
      default_factory=lambda: {"g_sq": 0.0, "trace_sigma": 0.0, "weight": 0.0})
  resources: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def new(cls, config) -> "TrialRecord":
    t = config.target
    return cls(target=Target(t.metric, t.value, t.stop_at_target))

  @classmethod
  def restored(cls, saved: dict, config) -> "TrialRecord":
    """The record of a checkpoint, running again; one that had stopped at its target is done."""
    fields = {f.name for f in dataclasses.fields(cls)}
    record = cls(**{**vars(cls.new(config)), **{k: v for k, v in saved.items() if k in fields},
                    "target": Target(**saved["target"]) if "target" in saved else
                    cls.new(config).target, "status": "running"})
    if record.target.reached and record.target.stop_at_target:
      record.status = "done"   # it had stopped there (its summary.json was lost)
    return record

  def as_dict(self) -> dict:
    """What a checkpoint holds (JSON)."""
    return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "target": self.target.as_dict()}

  def noise_metrics(self) -> dict:
    """Bias-corrected EMAs -> |G|^2, tr(Sigma) and B_simple (McCandlish et al. 2018)."""
    if not self.noise["weight"] or not self.noise["g_sq"]:
      return {}
    g_sq, trace_sigma, b_simple = noise_scale_lib.noise_scale(
        noise_scale_lib.NoiseScaleEMA(**self.noise))
    return {"noise/grad_sq": g_sq, "noise/trace_sigma": trace_sigma, "noise/b_simple": b_simple}

  def absorb(self, writer, metrics_K: dict, first_step: int, spec, *, examples_per_sec: float,
             chunk_ends: dict) -> int:
    """Folds the per-step train metrics of steps first_step+1.. (one segment) in: the first
    step's loss sets the divergence unit, a diverged step ends the trial there (a result, not a
    crash: where and why are recorded), the rest goes to the train records. Returns how many
    steps count (up to and including a diverged one)."""
    losses_K = metrics_K["train/loss"]
    if self.initial_loss is None:
      self.initial_loss = float(losses_K[0])
    diverged = first_divergence(losses_K, first_step, self.initial_loss, spec.loss_multiple)
    count = diverged[0] + 1 if diverged else len(losses_K)
    self._log_train(writer, metrics_K, first_step, count, diverged=bool(diverged),
                    examples_per_sec=examples_per_sec, spec=spec, chunk_ends=chunk_ends)
    if diverged:
      self.status, self.diverged_at_step = "diverged", first_step + diverged[0]
      self.diverged_reason = diverged[1]
    return count

  def _log_train(self, writer, metrics_K, first_step, count, *, diverged, examples_per_sec,
                 spec, chunk_ends):
    """Folds `count` per-step metrics into the window; writes a record every log_every_steps.

    `chunk_ends` maps a chunk's last step to the metrics measured after it
    (chunk.chunk_end_metrics: param_norm, param_distance_from_init): the loop ends a chunk at
    every record, so a record's are those after its own step (a divergence record, mid-chunk,
    has none). Window sums run over slices (numpy), not step by step in Python: at small batches
    on a GPU the host's per-step work would be a visible share of the step time."""
    done_K = first_step + 1 + np.arange(count)
    record_K = cadence.due(done_K, spec.log_every_steps, spec.total_steps)
    if diverged:
      record_K[-1] = True
    begin = 0
    for end in [*(np.flatnonzero(record_K) + 1), count]:
      if end == begin:
        break
      if spec.noise_sizes:
        for i in range(begin, end):
          # Host floats: the EMA is part of the checkpointed record (exact resume).
          self.noise = noise_scale_lib.noise_scale_update(
              noise_scale_lib.NoiseScaleEMA(**self.noise),
              float(metrics_K["noise/small_grad_sq"][i]), float(metrics_K["noise/big_grad_sq"][i]),
              *spec.noise_sizes, decay=spec.noise_ema_decay)._asdict()
      sums = self.window["sums"]
      for key in ("train/loss", "train/accuracy", "grad_norm"):
        sums[key] = sums.get(key, 0.0) + float(np.sum(metrics_K[key][begin:end], dtype=np.float64))
      self.window["steps"] += int(end - begin)
      if not record_K[end - 1]:
        break   # the rest of the window waits for the next segment
      done = int(done_K[end - 1])
      record = {k: v / self.window["steps"] for k, v in sums.items()}
      record.update(lr=float(metrics_K["lr"][end - 1]), examples_per_sec=examples_per_sec,
                    **self.noise_metrics(), **chunk_ends.get(done, {}))
      writer.write(done, record)
      self.last_train = {k: record[k] for k in ("train/loss", "train/accuracy")}
      self.window = {"steps": 0, "sums": {}}
      begin = end

  def record_eval(self, step: int, batch_size: int, results: dict,
                  tokens_per_example: int) -> bool:
    """Folds an evaluation in; True when it is the first to reach the target."""
    self.last_eval = dict(results)
    for key in ("valid/error", "test/error", "valid/bpc", "test/bpc"):
      if key in results:
        self.best[key] = min(self.best.get(key, math.inf), results[key])
    target, value = self.target, results.get(self.target.metric)
    if target.reached or value is None or not target_reached(value, target.value):
      return False
    target.reached, target.step, target.examples = True, step, step * batch_size
    if tokens_per_example:
      target.tokens = step * batch_size * tokens_per_example
    return True

  def summary(self, step: int, batch_size: int, tokens_per_example: int,
              cost: resources_lib.ChunkCost) -> dict:
    """summary.json of the trial standing at `step`."""
    tokens = {"tokens": step * batch_size * tokens_per_example} if tokens_per_example else {}
    return {
        "status": self.status, "step": step, "examples": step * batch_size, **tokens,
        "step_cap": self.step_cap, **cost.summary(),
        "stop_reason": resources_lib.stop_reason(self.status, self.target.reached,
                                             self.target.stop_at_target),
        "wall_time": self.elapsed, "diverged_at_step": self.diverged_at_step,
        "diverged_reason": self.diverged_reason, "target": self.target.as_dict(),
        "final": {**self.last_train, **self.last_eval}, "best": self.best,
        "noise": self.noise_metrics(), "curvature": self.curvature,
    }


def first_divergence(losses_K: np.ndarray, first_step: int, initial_loss: float,
                     loss_multiple: float) -> tuple[int, str] | None:
  """(index into losses_K, why) of the first step whose training loss is non-finite or above
  `loss_multiple` x the initial loss (0 = that test off); None if every step is healthy.

  Step k's loss is measured before its update, on its batch. A multiple, not an absolute value:
  the initial loss is ~ln(classes) for any data set and model, and the multiple says "exploded"."""
  limit = loss_multiple * initial_loss if loss_multiple else math.inf
  bad = np.flatnonzero(~np.isfinite(losses_K) | (losses_K > limit))
  if not bad.size:
    return None
  i = int(bad[0])
  loss = float(losses_K[i])
  if not math.isfinite(loss):
    return i, f"train/loss is {loss} at step {first_step + i}"
  return i, (f"train/loss {loss:.4g} at step {first_step + i} exceeds divergence.loss_multiple="
             f"{loss_multiple:g} x the initial loss {initial_loss:.4g}")
