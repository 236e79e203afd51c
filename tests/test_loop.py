"""The training loop (scaling/training/loop.py) driven by a NumPy chunk: no model is compiled, so each test
runs in about a second, while the records, summaries and Orbax checkpoints are the real ones.

The fake chunk follows the loop's chunk protocol (chunk.Solo, vectorized.Vmapped): member i's
training loss at step s is scripted (`losses`), its state counts the steps it trained (a frozen
member's count stops), and its validation error falls with that count."""
import json
import math
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from scaling.training import cadence, checkpoint, loop, metrics, resources
from scaling.training import record as record_lib

TOTAL, EVAL_EVERY, LOG_EVERY, CHUNK = 20, 6, 4, 5


def spec(workdir, **overrides):
  fields = dict(workdir=str(workdir), batch_size=8, total_steps=TOTAL, eval_every_steps=EVAL_EVERY,
                log_every_steps=LOG_EVERY, chunk_steps=CHUNK, chunk_unroll=False,
                checkpoint_every_steps=6, eval_at_start=False, stop_at_target=False,
                tokens_per_example=0, noise_sizes=(4, 8), noise_ema_decay=0.9, loss_multiple=10.0,
                curvature_every_steps=0, curvature_density=False, curvature_top_only=False)
  return loop.LoopSpec(**{**fields, **overrides})


class FakeChunk:
  """`losses(i, s)`: member i's loss at step s (measured before the step's update)."""

  def __init__(self, losses, num_members, signal_at=None):
    self.losses, self.M, self.calls, self.signal_at = losses, num_members, [], signal_at

  def __call__(self, state, active_M, num_active, *, num_steps):
    start = int(state["step"][0])
    self.calls.append((start, int(num_active), num_steps, tuple(bool(a) for a in active_M)))
    if self.signal_at is not None and start + num_active == self.signal_at:
      os.kill(os.getpid(), signal.SIGTERM)   # arrives while this chunk "runs"
    loss_MxK = np.zeros((self.M, num_steps), np.float32)
    for i in range(self.M):
      loss_MxK[i, :num_active] = [self.losses(i, start + k) for k in range(num_active)]
    trained = state["trained"] + np.where(active_M, num_active, 0).astype(np.float32)
    metrics_MxK = {"train/loss": loss_MxK, "train/accuracy": 1 / (1 + loss_MxK),
                   "grad_norm": 2 * loss_MxK,
                   "lr": np.broadcast_to(np.arange(start, start + num_steps, dtype=np.float32),
                                         (self.M, num_steps)),
                   "noise/small_grad_sq": loss_MxK + 1.0, "noise/big_grad_sq": loss_MxK + 0.5}
    ends_M = {"param_norm": trained.copy()}
    return {"step": state["step"] + num_active, "trained": trained}, metrics_MxK, ends_M

  @staticmethod
  def to_host(outputs):
    return list(outputs)

  @staticmethod
  def member_state(state, i):
    return {"step": state["step"], "trained": state["trained"][i:i + 1]}


def valid_error(rates):
  """evaluate(member state) -> the error after `trained` steps at member i's learning rate."""
  def evaluate(state):
    trained = float(state["trained"][0])
    return {"valid/error": 1 / (1 + trained / 5), "valid/loss": 1 / (1 + trained)}
  del rates
  return evaluate


def members(tmp_path, M, *, target=0.0, stop_at_target=False, step=0, records=None, **overrides):
  config = ml_collections.ConfigDict({"target": {"metric": "valid/error", "value": target,
                                                 "stop_at_target": stop_at_target}})
  out = []
  for i in range(M):
    workdir = tmp_path / f"m{i}"
    os.makedirs(workdir, exist_ok=True)
    record = records[i] if records else record_lib.TrialRecord.new(config)
    record.step_cap = TOTAL
    out.append(loop.Member(
        spec(workdir, stop_at_target=stop_at_target, **overrides), record,
        checkpoint.Checkpoints(str(workdir / "checkpoints"), keep=5, asynchronous=False), step,
        cost=resources.ChunkCost(None, record.resources, 8)))
  return out, config


def initial(M):
  return {"step": np.zeros(1, np.int32), "trained": np.zeros(M, np.float32)}


def read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "summary.json")) as f:
    return records, json.load(f)


def close(group):
  for m in group:
    m.ckpts.close()


def test_chunks_end_at_every_record_and_evaluation_and_records_follow_the_cadence(tmp_path):
  group, _ = members(tmp_path, 1)
  fake = FakeChunk(lambda i, s: 2.0 * math.exp(-s / 10), 1)
  [summary] = loop.train_loop(group, initial(1), 0, fake, evaluate=valid_error(None))
  close(group)
  # Chunk boundaries: every chunk_steps, every train record and every evaluation, nothing else.
  ends = sorted({s for s in range(1, TOTAL + 1) if cadence.due(s, LOG_EVERY, TOTAL)
                 or cadence.due(s, EVAL_EVERY, TOTAL)})
  bounds, start = [], 0
  for end in ends:
    while start < end:
      bounds.append((start, min(start + CHUNK, end) - start))
      start = min(start + CHUNK, end)
  assert [(s, n) for s, n, *_ in fake.calls] == bounds
  assert all(num_steps == CHUNK for _, _, num_steps, _ in fake.calls)   # rolled: one program
  records, on_disk = read(group[0].spec.workdir)
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "valid/error" in r]
  assert [r["step"] for r in train] == [s for s in range(1, TOTAL + 1) if cadence.due(s, LOG_EVERY, TOTAL)]
  assert [r["step"] for r in evals] == [s for s in range(1, TOTAL + 1) if cadence.due(s, EVAL_EVERY, TOTAL)]
  # A train record averages the losses of the steps since the previous one (losses are measured
  # before each step's update: steps first+0 .. step-1), and carries its own step's end metrics.
  previous = 0
  for r in train:
    expected = np.mean([2.0 * math.exp(-s / 10) for s in range(previous, r["step"])])
    assert r["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert r["param_norm"] == r["step"]
    assert r["lr"] == r["step"] - 1
    previous = r["step"]
  assert summary == on_disk and summary["status"] == "done" and summary["step"] == TOTAL
  assert summary["stop_reason"] == "budget"
  assert group[0].ckpts.steps() == [6, 12, 18, 20]   # every 6 steps, and the last


def test_a_diverged_member_is_frozen_while_the_others_train_on(tmp_path):
  """Member 1's loss is NaN from step 7: it diverges at step 7 (its 8th step), its files end
  there, and every later chunk masks it; members 0 and 2 run to the end."""
  group, _ = members(tmp_path, 3)
  fake = FakeChunk(lambda i, s: math.nan if i == 1 and s >= 7 else 1.0, 3)
  summaries = loop.train_loop(group, initial(3), 0, fake, evaluate=valid_error(None))
  close(group)
  assert [s["status"] for s in summaries] == ["done", "diverged", "done"]
  assert summaries[1]["diverged_at_step"] == 7 and summaries[1]["step"] == 8
  assert "train/loss is nan at step 7" in summaries[1]["diverged_reason"]
  assert summaries[1]["stop_reason"] == "diverged" and summaries[0]["step"] == TOTAL
  # Divergence is seen when the segment (6 -> 12) is fetched: later chunks freeze member 1.
  assert all(active == (True, False, True) for start, *_, active in fake.calls if start >= 12)
  assert all(active == (True, True, True) for start, *_, active in fake.calls if start < 12)
  records, _ = read(group[1].spec.workdir)
  assert records[-1]["step"] == 8 and math.isnan(records[-1]["train/loss"])
  assert group[1].ckpts.steps() == [6]   # no checkpoint of a diverged state
  assert group[0].ckpts.steps() == group[2].ckpts.steps() == [6, 12, 18, 20]
  # The divergence unit is the first step's loss; a loss past loss_multiple x it diverges too.
  group, _ = members(tmp_path / "multiple", 1)
  fake = FakeChunk(lambda i, s: 2.0 if s < 3 else 25.0, 1)
  [summary] = loop.train_loop(group, initial(1), 0, fake, evaluate=valid_error(None))
  close(group)
  assert summary["diverged_at_step"] == 3 and "exceeds divergence.loss_multiple=10" in summary[
      "diverged_reason"]


def test_a_member_at_its_target_stops_there_and_the_rest_go_on(tmp_path):
  """valid/error = 1/(1 + trained/5) < 0.3 first after 12 trained steps (eval at 12): with
  stop_at_target every member stops at 12; a member that diverged before is not revived."""
  group, _ = members(tmp_path, 2, target=0.3, stop_at_target=True)
  fake = FakeChunk(lambda i, s: math.inf if i == 1 and s == 2 else 1.0, 2)
  summaries = loop.train_loop(group, initial(2), 0, fake, evaluate=valid_error(None))
  close(group)
  assert summaries[0]["status"] == "done" and summaries[0]["stop_reason"] == "target"
  assert summaries[0]["target"]["step"] == 12 and summaries[0]["step"] == 12
  assert summaries[0]["target"]["examples"] == 12 * 8 and "noise/b_simple" in summaries[0][
      "target"]["at"]
  assert summaries[1]["status"] == "diverged" and summaries[1]["step"] == 3
  assert max(start + n for start, n, *_ in fake.calls) == 12   # nothing trains past the target
  assert group[0].ckpts.steps() == [6, 12]
  # Without stop_at_target the target is recorded and training goes on to the cap.
  group, _ = members(tmp_path / "on", 1, target=0.3)
  [summary] = loop.train_loop(group, initial(1), 0, FakeChunk(lambda i, s: 1.0, 1),
                              evaluate=valid_error(None))
  close(group)
  assert summary["target"]["reached"] and summary["target"]["step"] == 12
  assert summary["step"] == TOTAL and summary["stop_reason"] == "budget"


def test_sigterm_between_chunks_checkpoints_every_running_member_and_resumes_exactly(tmp_path):
  """A SIGTERM during the chunk that ends at step 8: the loop dispatches nothing more, saves
  each running member at 8 and exits with 128 + 15. Restored from those checkpoints (real
  Orbax) and run on, the members' records and summaries equal an uninterrupted run's."""
  losses = lambda i, s: (1.0 + i) * math.exp(-s / 7)
  whole, _ = members(tmp_path / "whole", 2)
  loop.train_loop(whole, initial(2), 0, FakeChunk(losses, 2), evaluate=valid_error(None))
  close(whole)

  group, config = members(tmp_path / "cut", 2)
  fake = FakeChunk(losses, 2, signal_at=8)
  with pytest.raises(loop.Preempted) as stopped:
    loop.train_loop(group, initial(2), 0, fake, evaluate=valid_error(None))
  close(group)
  assert stopped.value.code == 128 + signal.SIGTERM
  assert max(start + n for start, n, *_ in fake.calls) == 8
  for m in group:
    _, summary = read(m.spec.workdir)
    assert summary["status"] == "preempted" and summary["step"] == 8
    assert m.ckpts.steps() == [6, 8]

  states, records = [], []
  for m in group:
    ckpts = checkpoint.Checkpoints(str(tmp_path / "cut" / os.path.basename(m.spec.workdir) /
                                       "checkpoints"), keep=5, asynchronous=False)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {
        "step": np.zeros(1, np.int32), "trained": np.zeros(1, np.float32)})
    step, state, saved = ckpts.restore_latest(abstract)
    ckpts.close()
    assert step == 8
    states.append(state)
    records.append(record_lib.TrialRecord.restored(saved, config))
    metrics.truncate_after(os.path.join(m.spec.workdir, "metrics.jsonl"), step, LOG_EVERY)
  resumed, _ = members(tmp_path / "cut", 2, step=8, records=records)
  state = {"step": np.asarray(states[0]["step"]),
           "trained": np.concatenate([np.asarray(s["trained"]) for s in states])}
  loop.train_loop(resumed, state, 8, FakeChunk(losses, 2), evaluate=valid_error(None))
  close(resumed)
  untimed = lambda r: {k: v for k, v in r.items() if k not in ("wall_time", "examples_per_sec")}
  for a, b in zip(whole, resumed):
    (records_a, summary_a), (records_b, summary_b) = read(a.spec.workdir), read(b.spec.workdir)
    assert [untimed(r) for r in records_a] == [untimed(r) for r in records_b]
    for key in ("status", "step", "target", "final", "best", "noise", "stop_reason"):
      assert summary_a[key] == summary_b[key], key


def test_a_record_restores_the_checkpoints_of_the_dict_it_replaced():
  """The checkpointed JSON of an earlier version (a dict with these keys; fields added since
  missing) restores; a trial that had stopped at its target restores as done."""
  config = ml_collections.ConfigDict({"target": {"metric": "valid/error", "value": 0.1,
                                                 "stop_at_target": True}})
  saved = {"status": "preempted", "elapsed": 12.5, "diverged_at_step": None,
           "diverged_reason": None, "initial_loss": 2.3,
           "target": {"metric": "valid/error", "value": 0.1, "reached": False, "step": None,
                      "examples": None, "stop_at_target": True},
           "best": {"valid/error": 0.2}, "last_eval": {"valid/error": 0.2}, "last_train": {},
           "curvature": {}, "last_curvature_step": 0, "last_checkpoint_step": 40,
           "window": {"steps": 2, "sums": {"train/loss": 4.0}},
           "noise": {"g_sq": 1.0, "trace_sigma": 2.0, "weight": 0.5}}
  record = record_lib.TrialRecord.restored(saved, config)
  assert record.status == "running" and record.resources == {} and record.step_cap == 0
  assert {k: v for k, v in record.as_dict().items() if k in saved and k != "status"} == {
      k: v for k, v in saved.items() if k != "status"}
  reached = {**saved, "target": {**saved["target"], "reached": True, "step": 40,
                                 "examples": 5120, "at": {"wall_time": 3.0}}}
  record = record_lib.TrialRecord.restored(reached, config)
  assert record.status == "done" and record.target.at == {"wall_time": 3.0}
  assert record_lib.TrialRecord.restored(record.as_dict(), config).as_dict() == record.as_dict()


def test_the_group_shares_its_cost_among_the_members_that_trained(tmp_path):
  """Member 1 diverges in the first segment (steps 0-6), which also compiled the chunk (its one
  length, chunk_steps): both share that compile time; the steady-state steps after it (6-20) are
  member 0's alone."""
  group, _ = members(tmp_path, 2)
  fake = FakeChunk(lambda i, s: math.nan if i == 1 and s >= 2 else 1.0, 2)
  loop.train_loop(group, initial(2), 0, fake, evaluate=valid_error(None))
  close(group)
  own = [m.record.resources for m in group]
  assert [r["train_steps"] for r in own] == [TOTAL - EVAL_EVERY, 0]
  assert own[0]["compile_seconds"] == own[1]["compile_seconds"] > 0
  assert own[1]["train_seconds"] == 0 < own[0]["train_seconds"]


def test_a_stop_does_not_wait_for_a_far_evaluation(tmp_path):
  """One evaluation, at the end: a SIGTERM during the chunk ending at step 8 stops the trial at 8
  (within about two chunks), not at the evaluation."""
  group, _ = members(tmp_path, 1, eval_every_steps=TOTAL, checkpoint_every_steps=0)
  fake = FakeChunk(lambda i, s: 1.0, 1, signal_at=8)
  with pytest.raises(loop.Preempted):
    loop.train_loop(group, initial(1), 0, fake, evaluate=valid_error(None))
  close(group)
  assert max(start + n for start, n, *_ in fake.calls) == 8
  records, summary = read(group[0].spec.workdir)
  assert [r["step"] for r in records] == [4, 8]   # train records only: no evaluation ran
  assert summary["status"] == "preempted" and group[0].ckpts.steps() == [8]


def test_a_stop_right_after_a_checkpoint_does_not_save_that_step_again(tmp_path):
  """The SIGTERM lands while the regular checkpoint of step 6 is saved, before the loop polls:
  the trial stops as preempted at 6 with that checkpoint (saving step 6 again used to crash with
  Orbax's StepAlreadyExistsError), and a rerun from it finishes."""
  group, config = members(tmp_path, 1)
  save = group[0].ckpts.save

  def save_then_sigterm(step, state, record):
    save(step, state, record)
    if step == 6:
      os.kill(os.getpid(), signal.SIGTERM)
  group[0].ckpts.save = save_then_sigterm
  with pytest.raises(loop.Preempted) as stopped:
    loop.train_loop(group, initial(1), 0, FakeChunk(lambda i, s: 1.0, 1),
                    evaluate=valid_error(None))
  assert stopped.value.code == 128 + signal.SIGTERM
  assert group[0].ckpts.steps() == [6]
  close(group)
  _, summary = read(group[0].spec.workdir)
  assert (summary["status"], summary["step"]) == ("preempted", 6)
