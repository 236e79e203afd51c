"""A trial's running record: the bookkeeping the training loop keeps between evaluations.

Plain host-side dicts and floats, saved in every checkpoint (exact resume): the target and when it
was reached, the best and last evaluations, the windowed train metrics, the noise-scale EMAs, and
the summary.json written from them.
"""

import math

import numpy as np

from scaling import cadence
from scaling import noise_scale as noise_scale_lib
from scaling import resources


def target_reached(value: float, target_value: float) -> bool:
  return math.isfinite(value) and value < target_value   # Shallue et al.: strictly better


def new_bookkeeping(config) -> dict:
  """The loop's running record; saved in every checkpoint so that a resume continues it exactly."""
  return {
      "status": "running", "elapsed": 0.0, "diverged_at_step": None, "diverged_reason": None,
      "initial_loss": None,   # the first step's training loss: the divergence threshold's unit
      "target": {"metric": config.target.metric, "value": config.target.value,
                 "reached": False, "step": None, "examples": None,
                 "stop_at_target": config.target.stop_at_target},
      "best": {}, "last_eval": {}, "last_train": {}, "curvature": {}, "last_curvature_step": 0,
      "last_checkpoint_step": 0,
      # Running sums of the train metrics since the last log record.
      "window": {"steps": 0, "sums": {}},
      # Bias-corrected EMAs of the noise-scale estimators' numerator and denominator.
      "noise": {"g_sq": 0.0, "trace_sigma": 0.0, "weight": 0.0},
  }


def noise_metrics(noise: dict) -> dict:
  """Bias-corrected EMAs -> |G|^2, tr(Sigma) and B_simple (McCandlish et al. 2018)."""
  if not noise["weight"] or not noise["g_sq"]:
    return {}
  g_sq, trace_sigma, b_simple = noise_scale_lib.noise_scale(noise_scale_lib.NoiseScaleEMA(**noise))
  return {"noise/grad_sq": g_sq, "noise/trace_sigma": trace_sigma, "noise/b_simple": b_simple}


def log_train(writer, book, metrics_K, first_step, count, *, diverged, examples_per_sec,
              spec, chunk_ends):
  """Folds `count` per-step metrics into the window; writes a record every log_every_steps.

  `chunk_ends` maps a chunk's last step to the metrics measured after it (chunk.chunk_end_metrics:
  param_norm, param_distance_from_init): the loop ends a chunk at every record, so a record's are
  those after its own step (a divergence record, mid-chunk, has none). Window sums run over slices (numpy), not step by step in Python: at small
  batches on a GPU the host's per-step work would be a visible share of the step time."""
  done_K = first_step + 1 + np.arange(count)
  record_K = cadence.due(done_K, spec.log_every_steps, spec.total_steps)
  if diverged:
    record_K[-1] = True
  begin = 0
  for end in [*(np.flatnonzero(record_K) + 1), count]:
    if end == begin:
      break
    window = book["window"]
    if spec.noise_sizes:
      for i in range(begin, end):
        # Host floats: the EMA is part of the checkpointed bookkeeping (exact resume).
        book["noise"] = noise_scale_lib.noise_scale_update(
            noise_scale_lib.NoiseScaleEMA(**book["noise"]),
            float(metrics_K["noise/small_grad_sq"][i]), float(metrics_K["noise/big_grad_sq"][i]),
            *spec.noise_sizes, decay=spec.noise_ema_decay)._asdict()
    for key in ("train/loss", "train/accuracy", "grad_norm"):
      window["sums"][key] = window["sums"].get(key, 0.0) + float(
          np.sum(metrics_K[key][begin:end], dtype=np.float64))
    window["steps"] += int(end - begin)
    if not record_K[end - 1]:
      break   # the rest of the window waits for the next chunk
    done = int(done_K[end - 1])
    record = {k: v / window["steps"] for k, v in window["sums"].items()}
    record.update(lr=float(metrics_K["lr"][end - 1]), examples_per_sec=examples_per_sec,
                  **noise_metrics(book["noise"]), **chunk_ends.get(done, {}))
    writer.write(done, record)
    book["last_train"] = {k: record[k] for k in ("train/loss", "train/accuracy")}
    book["window"] = {"steps": 0, "sums": {}}
    begin = end


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


def summary(book: dict, step: int, batch_size: int, tokens_per_example: int,
             cost: resources.ChunkCost) -> dict:
  tokens = {"tokens": step * batch_size * tokens_per_example} if tokens_per_example else {}
  target = book["target"]
  return {
      "status": book["status"], "step": step, "examples": step * batch_size, **tokens,
      "step_cap": book["step_cap"], **cost.summary(),
      "stop_reason": resources.stop_reason(book["status"], target["reached"],
                                           target.get("stop_at_target", False)),
      "wall_time": book["elapsed"], "diverged_at_step": book["diverged_at_step"],
      "diverged_reason": book["diverged_reason"],
      "target": book["target"], "final": {**book["last_train"], **book["last_eval"]}, "best": book["best"],
      "noise": noise_metrics(book["noise"]), "curvature": book["curvature"],
  }


def record_eval(book: dict, step: int, batch_size: int, results: dict,
                 tokens_per_example: int) -> bool:
  """Folds an evaluation into the bookkeeping; True when it is the first to reach the target."""
  book["last_eval"] = dict(results)
  for key in ("valid/error", "test/error", "valid/bpc", "test/bpc"):
    if key in results:
      book["best"][key] = min(book["best"].get(key, math.inf), results[key])
  target = book["target"]
  value = results.get(target["metric"])
  if not target["reached"] and value is not None and target_reached(value, target["value"]):
    target.update(reached=True, step=step, examples=step * batch_size)
    if tokens_per_example:
      target["tokens"] = step * batch_size * tokens_per_example
    return True
  return False
