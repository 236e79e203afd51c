"""Vectorised trials (scaling/training/vectorized.py): one vmapped program, results of solo runs.

One sweep of three members runs vectorised (module fixture), then its members alone with
train.run (A in the default run, B and C and a solo resume in the heavy tier): member A (seed 0,
lr x1) trains to the end of the budget, B (seed 1, lr x2) reaches its target at step 16 and stops
there (stop_at_target), C (seed 0, lr x1000) diverges in its first steps. A must finish as alone
(up to float32 rounding, below) although B and C stop beside it. A and B, cut back to their
step-8 checkpoints, resume together as one group and end where the uninterrupted group of three
ended (default run).

Tolerance. A member runs a solo run's float32 operations on its own inputs, but not bit for bit:
vmap gives every operation a leading member axis, and XLA compiles the batched shapes with other
kernels and other summation orders, on XLA:CPU too (at the default study's shapes a bias gradient,
a sum over a microbatch, differs from the solo one in its last bits). Two orders of a sum of n
float32 terms differ by at most 2 (n - 1) 2^-24 of the sum of the terms' magnitudes: 9.3e-5 for
the MLP's longest sum (n = 784 pixels), hence RTOL = 1e-4. One step is held to that bound
(`test_a_vmapped_step_is_a_solo_step_up_to_float32_rounding`): each leaf to RTOL of its largest
magnitude, the scale of its terms, since a sum that cancels has no relative bound. Along a run the
differences are carried and grow like any perturbation; over the 24 steps of these runs they stay
within that one-step bound, so records, summaries and checkpoints are compared to rtol RTOL (atol
ATOL for values near 0). Error rates and step counts are compared so too, i.e. exactly: a rounding
changes them only where it flips a prediction or moves a target crossing.
"""
import functools
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from scaling import sharding, sweep
from scaling.config import ConfigError
from scaling.training import checkpoint, resources, train, vectorized
from scaling.training import step as steplib
from tests.tiny import read_records, tiny_config

RTOL, ATOL = 1e-4, 1e-7   # float32 rounding, on every backend: see the module docstring
# Differ between any two runs of the same trial: timings.
TIMED = ("wall_time", "examples_per_sec")


def _sweep_config(**overrides):
  # Log records every 3 steps: chunks of 3, 2 (to an evaluation) and 1 step of chunk_steps=4, so
  # the padded steps (num_active < num_steps) run vmapped too.
  c = tiny_config(**{"num_devices": 2, "grad_groups": 2, "vectorize_trials": 3,
                     "log_every_steps": 3, **overrides})
  # Validation errors (100 examples) at steps 8, 16, 24: A 0.46 0.44 0.37, B 0.43 0.32 0.27, so
  # A reaches 0.40 at its last evaluation and B stops at 16, each 3 examples clear of it.
  c.target.value, c.target.stop_at_target = 0.40, True
  c.sweep_zip = ml_collections.ConfigDict(dict(seed=(0, 1, 0), lr_multiplier=(1.0, 2.0, 1000.0)))
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The vectorised sweep, and member A alone (the others alone in the heavy tests)."""
  root = tmp_path_factory.mktemp("vectorized")
  config = _sweep_config()
  before = resources.compile_counts()
  vectorized_summaries = sweep.main(config, str(root / "sweep"))
  compiled = resources.compile_counts() - before
  trials = sweep.expand(config, str(root / "sweep"))
  return (root, trials, vectorized_summaries, {trials[0].id: _solo(root, trials[0])},
          compiled)


def _solo(root, t):
  return train.run(t.config, str(root / "solo" / t.id), trial_id=t.id, sweep_axes=t.overrides)


def _assert_close(actual, expected, where):
  """Nested dicts/lists of numbers equal to the tolerance above; strings and None exactly."""
  if isinstance(expected, dict):
    assert sorted(actual) == sorted(expected), where
    for key in expected:
      if key not in TIMED and not key.startswith("cost/"):
        _assert_close(actual[key], expected[key], f"{where}.{key}")
  elif isinstance(expected, list):
    assert len(actual) == len(expected), where
    for i, (a, e) in enumerate(zip(actual, expected)):
      _assert_close(a, e, f"{where}[{i}]")
  elif isinstance(expected, float) and not isinstance(actual, str):
    assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL) or (
        math.isnan(actual) and math.isnan(expected)), (where, actual, expected)
  else:
    assert actual == expected, (where, actual, expected)


# The summary's fields that describe the run's results (the rest are timings and memory).
RESULT_FIELDS = ("status", "step", "examples", "step_cap", "stop_reason", "diverged_at_step",
                 "diverged_reason", "target", "final", "best", "noise", "curvature")


def _assert_equal_runs(member_dir, solo_dir, solo_summary, where):
  on_disk = sweep.read_summary(member_dir)
  for field in RESULT_FIELDS:
    _assert_close(on_disk[field], solo_summary[field], f"{where} summary.{field}")
  _assert_close(read_records(member_dir), read_records(solo_dir), f"{where} metrics.jsonl")
  # config.json as a solo run writes it: a solo rerun or resume accepts the directory.
  with open(os.path.join(member_dir, "config.json")) as f, \
       open(os.path.join(solo_dir, "config.json")) as g:
    assert json.load(f) == json.load(g)


def test_members_stop_or_diverge_alone_and_the_others_equal_solo_runs(runs):
  root, trials, summaries, solo, compiled = runs
  assert [s["status"] for s in summaries] == ["done", "done", "diverged"]
  # One program trained all three (their LRs and keys are its inputs), however long each chunk:
  # compiled, or loaded from the session's persistent cache; no solo chunk.
  assert compiled["vectorized_chunk", "compiled"] + compiled["vectorized_chunk", "cache_hit"] == 1
  assert compiled["train_chunk", "compiled"] + compiled["train_chunk", "cache_hit"] == 0
  for t, summary in zip(trials, summaries):
    assert sweep.read_summary(t.directory) == json.loads(json.dumps(summary))
    assert summary["noise"]   # per member: grad_groups=2
  a, b, c = summaries
  assert (a["step"], a["stop_reason"], a["target"]["step"]) == (24, "target", 24)
  # B reached its target at step 16 and stopped there, with its last checkpoint.
  assert (b["step"], b["stop_reason"], b["target"]["step"]) == (16, "target", 16)
  assert max(r["step"] for r in read_records(trials[1].directory)) == 16
  assert sorted(os.listdir(os.path.join(trials[1].directory, "checkpoints"))) == ["16", "8"]
  # C diverged in its first chunk, is recorded so, and saved nothing.
  assert c["stop_reason"] == "diverged" and c["step"] == c["diverged_at_step"] + 1 < 8
  assert f"at step {c['diverged_at_step']}" in c["diverged_reason"]
  assert os.listdir(os.path.join(trials[2].directory, "checkpoints")) == []
  # A trained on beside them as alone: every record, the summary, config.json.
  t = trials[0]
  _assert_equal_runs(t.directory, str(root / "solo" / t.id), solo[t.id], t.id)


def test_a_vmapped_step_is_a_solo_step_up_to_float32_rounding():
  """At the default study's shapes (MLP 784-128-128-10, two microbatches, one device), one vmapped
  step of two members, each with its own state and batch, against each member's solo step: every
  output (parameters, momentum: the gradient, metrics) within float32 rounding."""
  config = tiny_config(num_devices=1, grad_groups=2, **{"model.widths": (128, 128)})
  splits = train.load_data(config)
  mesh = sharding.make_mesh(1)
  plan, model, _, optimizer = train.build(config, splits, mesh)
  step_fn = train.step_function(config, plan, model, mesh)
  _, init = train.abstract_train_state(config, model, optimizer, splits, mesh)
  B, lr = config.batch_size, np.float32(config.base_lr)
  members = [(init(jax.random.PRNGKey(m)).replace(step=np.int32(10)),   # past the warmup
              splits.train_images[m * B:(m + 1) * B].astype(np.float32) * splits.pixel_scale,
              splits.train_labels[m * B:(m + 1) * B]) for m in range(2)]
  step = lambda state, images, labels: step_fn(state, images, labels, None, lr)
  vmapped = jax.jit(jax.vmap(step))(*jax.tree.map(lambda *m: np.stack(m), *members))
  for m, member in enumerate(members):
    solo = jax.jit(step)(*member)
    for (path, expected), actual in zip(jax.tree_util.tree_leaves_with_path(solo),
                                        jax.tree.leaves(vmapped)):
      expected = np.asarray(expected, np.float64)
      np.testing.assert_allclose(np.asarray(actual[m], np.float64), expected, rtol=0,
                                 atol=RTOL * np.abs(expected).max(),
                                 err_msg=f"member {m} {jax.tree_util.keystr(path)}")


@pytest.mark.heavy
def test_stopped_and_diverged_members_equal_their_solo_runs(runs):
  root, trials, *_ = runs
  for t in trials[1:]:
    _assert_equal_runs(t.directory, str(root / "solo" / t.id), _solo(root, t), t.id)


def _restore(directory, config):
  splits = train.load_data(config)
  mesh = sharding.make_mesh(config.num_devices)
  _, model, _, optimizer = train.build(config, splits, mesh)
  abstract, _ = train.abstract_train_state(config, model, optimizer, splits, mesh)
  ckpts = checkpoint.Checkpoints(os.path.join(directory, "checkpoints"), 3, read_only=True)
  try:
    return ckpts.steps(), ckpts.restore_latest(abstract)
  finally:
    ckpts.close()


@pytest.mark.heavy
def test_member_checkpoints_equal_solo_ones_and_a_solo_run_resumes_them(runs):
  root, trials, summaries, solo, _ = runs
  t = trials[0]
  member_steps, (step, member_state, member_book) = _restore(t.directory, t.config)
  solo_steps, (_, solo_state, solo_book) = _restore(str(root / "solo" / t.id), t.config)
  assert member_steps == solo_steps == [8, 16, 24] and step == 24
  jax.tree.map(lambda m, s: np.testing.assert_allclose(m, s, rtol=RTOL, atol=ATOL),
               member_state, solo_state)
  assert member_book["noise"] == pytest.approx(solo_book["noise"], rel=RTOL)
  # Member A without its last checkpoint and summary: a solo run resumes it from step 16 and
  # ends where the solo run from scratch ended.
  resumed = str(root / "resumed")
  shutil.copytree(t.directory, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "24"))
  os.remove(os.path.join(resumed, "summary.json"))
  summary = train.run(t.config, resumed, trial_id=t.id, sweep_axes=t.overrides)
  for field in RESULT_FIELDS:
    _assert_close(summary[field], solo[t.id][field], f"resumed summary.{field}")
  _assert_close(read_records(resumed), read_records(str(root / "solo" / t.id)),
                "resumed metrics.jsonl")


def test_a_group_resumed_mid_way_ends_as_the_uninterrupted_one(runs, tmp_path, capsys):
  """A and B lose their checkpoints after step 8 and their summaries (as if the group were
  stopped at step 12): rerun vectorised, both resume from step 8 in one group and end exactly as
  the uninterrupted group did: every record, the summaries, the last checkpoints."""
  root, trials, summaries, *_ = runs
  members = trials[:2]
  dirs = [str(tmp_path / t.id) for t in members]
  for t, d in zip(members, dirs):
    shutil.copytree(t.directory, d)
    for step in os.listdir(os.path.join(d, "checkpoints")):
      if int(step) > 8:
        shutil.rmtree(os.path.join(d, "checkpoints", step))
    os.remove(os.path.join(d, "summary.json"))
  resumed = train.run_group([t.config for t in members], dirs, [t.id for t in members],
                           [t.overrides for t in members])
  assert capsys.readouterr().out.count("from step 8 ") == 2
  for t, d, summary in zip(members, dirs, resumed):
    for field in RESULT_FIELDS:
      _assert_close(summary[field], summaries[t.index][field], f"resumed {t.id} summary.{field}")
    _assert_close(read_records(d), read_records(t.directory), f"resumed {t.id} metrics.jsonl")
    assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == sorted(
        os.listdir(os.path.join(t.directory, "checkpoints")))


def test_a_rerun_skips_the_finished_members(runs, capsys):
  root, trials, summaries, *_ = runs
  again = sweep.main(_sweep_config(), str(root / "sweep"))
  assert [s["status"] for s in again] == ["done", "done", "diverged"]
  assert capsys.readouterr().out.count(": already ") == 3   # "[i] id: already done, skipped"


def test_groups_share_everything_but_seed_and_lr():
  c = tiny_config(vectorize_trials=3)
  c.sweep = ml_collections.ConfigDict(dict(batch_size=(16, 32), lr_multiplier=(1.0, 2.0),
                                           seed=(0, 1)))
  trials = sweep.expand(c, "/nonexistent")
  groups = vectorized.groups(trials, 3)
  # Per batch size, 4 trials (2 LRs x 2 seeds) in index order, at most 3 per program.
  assert [[t.index for t in g] for g in groups] == [[0, 1, 2], [3], [4, 5, 6], [7]]
  assert {t.config.batch_size for t in groups[2]} == {32}


def test_bad_input_is_one_line_before_training(tmp_path):
  c = _sweep_config(vectorize_trials=-1)
  with pytest.raises(ConfigError, match=r"vectorize_trials=-1 is invalid: use an integer >= 0"):
    sweep.main(c, str(tmp_path / "a"))
  c = _sweep_config()
  c.sweep = ml_collections.ConfigDict(dict(vectorize_trials=(2, 4)))
  with pytest.raises(ConfigError, match=r"^sweep.vectorize_trials: .* not an axis"):
    sweep.main(c, str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="differ only in seed, base_lr, lr_multiplier"):
    train.run_group([tiny_config(), tiny_config(batch_size=16)],
                   [str(tmp_path / "c"), str(tmp_path / "d")])
  # The host data path (one order per trial read on the host) is not vectorised.
  with pytest.raises(ConfigError, match=r"^vectorize_trials=3 needs the training set on the"
                     r" devices, but dataset.placement='host' .*: set dataset.placement='device'"):
    sweep.main(_sweep_config(**{"dataset.placement": "host"}), str(tmp_path / "e"))
  assert not os.path.exists(tmp_path / "a" / "trials")
  assert not os.path.exists(tmp_path / "c")
  assert not os.path.exists(tmp_path / "e" / "trials")


def test_a_frozen_member_keeps_its_state_while_the_others_train():
  """vectorized_chunk masks the update of inactive members (a stand-in chunk adds its input per
  active step), advances every member by the group's num_active, and hands every member one
  unbatched step counter (see its docstring)."""
  def chunk_fn(state, order_N, arrays, inputs, num_active, *, num_steps):
    # As train_chunk's new epoch order: a cond on the step (true here: step 4 is even).
    delta = jax.lax.cond(state.step % 2 == 0, lambda: num_active * inputs, lambda: 0 * inputs)
    new = state.replace(params=jax.tree.map(lambda x: x + delta, state.params),
                        step=state.step + num_active)
    ends = {"param_norm": jax.numpy.sum(new.params["w"])}
    return new, order_N + 1, {"train/loss": jax.numpy.full((num_steps,), inputs)}, ends
  w = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], np.float32)
  state_M = steplib.TrainState(step=np.array([4, 4, 4], np.int32), params={"w": w},
                               batch_stats={}, opt_state={"mu": w})
  inputs_M = np.array([0.5, np.nan, 1.0], np.float32)   # member 1 would turn NaN
  order_MxN = np.arange(6, dtype=np.int32).reshape(3, 2)
  new_M, order_MxN, metrics_MxK, ends_M = vectorized.vectorized_chunk(
      state_M, order_MxN, inputs_M, np.array([True, False, True]), None, np.int32(2),
      num_steps=3, chunk_fn=chunk_fn)
  np.testing.assert_array_equal(order_MxN, np.arange(1, 7).reshape(3, 2))   # each its own
  np.testing.assert_array_equal(new_M.params["w"], [[2, 2], [2, 2], [5, 5]])
  np.testing.assert_array_equal(new_M.opt_state["mu"], w)
  np.testing.assert_array_equal(new_M.step, [6, 6, 6])
  assert metrics_MxK["train/loss"].shape == (3, 3)
  np.testing.assert_array_equal(ends_M["param_norm"], [4, np.nan, 10])
  # With a batched step vmap would turn the cond into a select that runs both branches.
  jaxpr = jax.make_jaxpr(functools.partial(vectorized.vectorized_chunk, num_steps=3,
                                           chunk_fn=chunk_fn))(state_M, order_MxN, inputs_M,
                                                               np.array([True] * 3), None,
                                                               np.int32(2))
  assert "cond[" in str(jaxpr)


@pytest.mark.heavy
def test_curvature_per_member_equals_solo(tmp_path):
  """Each member's curvature (its own key and Lanczos warm start) as alone, on 1 device."""
  configs = [tiny_config(seed=s, lr_multiplier=m, num_devices=1, **{
      "curvature.enabled": True, "curvature.every_steps": 8, "curvature.density": False,
      "budget.length": 16.0}) for s, m in ((0, 1.0), (1, 2.0))]
  summaries = train.run_group(configs, [str(tmp_path / f"v{i}") for i in range(2)])
  for i, c in enumerate(configs):
    solo = train.run(c, str(tmp_path / f"s{i}"))
    assert summaries[i]["curvature"]["curvature/hessian_trace_probes"] >= 20
    _assert_close(summaries[i]["curvature"], solo["curvature"], f"member {i} curvature")
    curvature_records = lambda d: [{k: v for k, v in r.items() if k.startswith("curvature/")}
                                   for r in read_records(d) if "curvature/top_eigenvalue" in r]
    assert len(curvature_records(str(tmp_path / f"v{i}"))) == 2
    _assert_close(curvature_records(str(tmp_path / f"v{i}")),
                  curvature_records(str(tmp_path / f"s{i}")), f"member {i} records")
