"""Checkpoints and exact resume: a killed, preempted or damaged trial ends as if never interrupted.

The trials are real CLI processes (`python -m scaling.main`) on the committed MNIST slice. One
uninterrupted run is the reference; every interrupted run must reproduce its metrics.jsonl
(all but wall-clock fields) and its final train state bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import mnist
from scaling import sharding, sweep
from scaling.config import ConfigError
from scaling.training import checkpoint
from tests import agree
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 160, 40          # checkpoints at 40, 80, 120, 160; the last 3 are kept
WALL_CLOCK = ("wall_time", "examples_per_sec")


def trial_config(**overrides):
  return tiny_config(**{"budget.length": float(STEPS), "checkpoint.every_steps": EVERY,
                        **overrides})


def cli_flags(config) -> list[str]:
  """--config.x=y for every field where `config` differs from configs/mnist.py."""
  default = dict(sweep._leaves(mnist.get_config().to_dict()))
  return [f"--config.{k}={v}" for k, v in sweep._leaves(config.to_dict()) if default.get(k) != v]


def start(workdir, hooks=None, **overrides) -> subprocess.Popen:
  """The trial as a CLI process; `hooks` (tests/harness.py's variables) signal it at known steps."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             **(hooks or {}))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "..", os.path.basename(workdir) + ".log"), "a") as log:
    return subprocess.Popen(
        [sys.executable, "tests/harness.py", "--config=configs/mnist.py", f"--workdir={workdir}",
         *cli_flags(trial_config(**overrides))],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def output(workdir) -> str:
  with open(os.path.join(workdir, "..", os.path.basename(workdir) + ".log")) as f:
    return f.read()


def finish(workdir, **overrides) -> str:
  """Runs the trial in `workdir` to its end; returns what the process printed."""
  process = start(workdir, **overrides)
  assert process.wait(timeout=300) == 0, output(workdir)[-3000:]
  return output(workdir)


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def final_state(workdir):
  """The last checkpoint's train state as numpy arrays, whatever device count wrote it."""
  path = os.path.join(workdir, "checkpoints", str(checkpoint_steps(workdir)[-1]), "state")
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in f]


def summary(workdir) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def assert_same_run(workdir, reference):
  """Bit-identical: every metrics record (JSON text, so NaN == NaN), the final state, the summary."""
  got, want = records(workdir), records(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want]    # none duplicated or missing
  for a, b in zip(got, want):
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
  got_state, want_state = final_state(workdir), final_state(reference)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(a, b)
  assert strip_timings(summary(workdir)) == strip_timings(summary(reference))


def strip_timings(s):
  """A summary without its wall-clock measurements (which no resume reproduces), as JSON text."""
  s = {k: v for k, v in s.items() if k not in ("wall_time", "compile_seconds", "examples_per_sec",
                                                  "compilations")}
  if "at" in s["target"]:   # the wall time at which the target was reached
    s["target"] = {**s["target"], "at": {k: v for k, v in s["target"]["at"].items()
                                         if k != "wall_time"}}
  return json.dumps(s, sort_keys=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted trial."""
  workdir = str(tmp_path_factory.mktemp("reference") / "trial")
  finish(workdir)
  assert summary(workdir)["status"] == "done" and summary(workdir)["step"] == STEPS
  assert checkpoint_steps(workdir) == [80, 120, 160]
  return workdir


def copy_interrupted(reference, workdir, last_step):
  """A copy of the reference as a kill after checkpoint `last_step` would have left it."""
  shutil.copytree(reference, workdir)
  for step in checkpoint_steps(workdir):
    if step > last_step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  os.remove(os.path.join(workdir, "summary.json"))


def test_sigkill_then_rerun_resumes_and_matches_the_uninterrupted_run(reference, tmp_path):
  workdir = str(tmp_path / "trial")
  process = start(workdir, {"SCALING_TEST_SIGNAL_AFTER_SAVE": f"{EVERY}:KILL"})
  assert process.wait(timeout=300) == -signal.SIGKILL
  assert summary(workdir)["status"] == "running"
  assert checkpoint_steps(workdir) == [EVERY]

  printed = finish(workdir)
  assert f"from step {EVERY}" in printed
  assert summary(workdir)["status"] == "done"
  assert_same_run(workdir, reference)


def preempt(workdir, hook: str, stop_step: int, **overrides) -> dict:
  """Runs the trial with a SIGTERM hook; checks it stopped at `stop_step`, saved, exited 143."""
  process = start(workdir, {hook: f"{stop_step}:TERM"}, **overrides)
  assert process.wait(timeout=300) == 128 + signal.SIGTERM, output(workdir)[-3000:]
  preempted = summary(workdir)
  assert (preempted["status"], preempted["step"]) == ("preempted", stop_step)
  assert checkpoint_steps(workdir)[-1] == stop_step     # saved where it stopped
  assert "Traceback" not in output(workdir)
  assert output(workdir).strip().splitlines()[-1].startswith(f"stopped by signal 15 at step {stop_step}")
  return preempted


def test_sigterm_between_evaluations_saves_exits_143_and_a_rerun_finishes_the_same(reference,
                                                                                   tmp_path):
  """Evaluations every 8 steps, chunks of 4: step 44 is a chunk boundary between two of them."""
  workdir = str(tmp_path / "trial")
  preempt(workdir, "SCALING_TEST_SIGNAL", 44)
  assert f"from step 44" in finish(workdir)
  assert summary(workdir)["status"] == "done"
  assert_same_run(workdir, reference)


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_sigterm_right_after_a_checkpoint_exits_143_and_a_rerun_finishes_the_same(reference,
                                                                                  tmp_path):
  """The stop finds its step saved already (it used to fail saving it again, status `running`)."""
  workdir = str(tmp_path / "trial")
  preempt(workdir, "SCALING_TEST_SIGNAL_AFTER_SAVE", EVERY)
  assert checkpoint_steps(workdir) == [EVERY]
  assert f"from step {EVERY}" in finish(workdir)
  assert_same_run(workdir, reference)


def test_truncated_latest_checkpoint_warns_once_and_resumes_from_the_previous(reference, tmp_path):
  workdir = str(tmp_path / "trial")
  copy_interrupted(reference, workdir, last_step=120)
  manifest = os.path.join(workdir, "checkpoints", "120", "state", "manifest.ocdbt")
  os.truncate(manifest, os.path.getsize(manifest) // 2)

  printed = finish(workdir)
  warnings = [line for line in printed.splitlines() if "unusable" in line]
  assert len(warnings) == 1 and "step 120" in warnings[0], printed
  assert "from step 80" in printed
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt-120"))
  assert checkpoint_steps(workdir) == [80, 120, 160]             # 120 saved again
  assert_same_run(workdir, reference)


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_restores_across_device_counts_8_to_1_to_8(reference, tmp_path):
  """Same global batch and grad_groups: only the reduction order differs, so numbers agree to
  float tolerance, the noise-scale EMAs to what their conditioning implies (tests/agree.py, as in
  test_train's 1-vs-8-device test), not bit for bit."""
  workdir = str(tmp_path / "trial")
  copy_interrupted(reference, workdir, last_step=80)                # saved on 8 devices
  assert "from step 80" in finish(workdir, num_devices=1)
  assert json.load(open(os.path.join(workdir, "config.json")))["derived"]["num_devices"] == 1
  shutil.rmtree(os.path.join(workdir, "checkpoints", "160"))       # 120 was saved on 1 device
  os.remove(os.path.join(workdir, "summary.json"))
  assert "from step 120" in finish(workdir)

  assert summary(workdir)["status"] == "done"
  config = trial_config()
  agree.assert_records_agree(records(workdir), records(reference), rtol=2e-4, atol=1e-6,
                             b_small=config.batch_size // config.grad_groups,
                             b_big=config.batch_size)
  for a, b in zip(jax.tree.leaves(final_state(workdir)), jax.tree.leaves(final_state(reference))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_a_different_run_is_refused_but_harmless_fields_may_change(reference, tmp_path):
  workdir = str(tmp_path / "trial")
  copy_interrupted(reference, workdir, last_step=120)
  with pytest.raises(ConfigError) as error:
    sweep.main(trial_config(batch_size=64), workdir)
  message = str(error.value)
  assert "\n" not in message and "batch_size was 32, now 64" in message
  assert checkpoint_steps(workdir) == [80, 120]                     # nothing touched

  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  harmless = json.loads(json.dumps(saved))
  harmless.update(num_devices=1, chunk_steps=2, eval_batch_size=100)
  harmless["checkpoint"]["every_steps"] = 7
  harmless["dataset"]["data_dir"] = "/elsewhere"
  harmless["derived"]["num_devices"] = 1
  checkpoint.check_same_run(os.path.join(workdir, "config.json"), harmless)
  for field, value in (("base_lr", 0.1), ("model", {**saved["model"], "widths": [64]})):
    with pytest.raises(ConfigError, match=field):
      checkpoint.check_same_run(os.path.join(workdir, "config.json"), {**saved, field: value})
  # The sweep's definition may grow around a finished trial (its own values are its fields).
  zipped = {**saved, "sweep_zip": {"batch_size": [32, 64], "base_lr": [0.05, 0.1]}}
  (tmp_path / "zipped.json").write_text(json.dumps(zipped))
  checkpoint.check_same_run(str(tmp_path / "zipped.json"), {
      **zipped, "sweep_zip": {"batch_size": [32, 64, 128], "base_lr": [0.05, 0.12, 0.2]}})
  # A field added to the framework after the trial ran (absent from its config.json) takes the
  # default that keeps the old behaviour: finished work stays usable; a changed value does not.
  newer = {**saved, "curvature": {**saved["curvature"], "added_since": "default"}}
  checkpoint.check_same_run(os.path.join(workdir, "config.json"), newer)
  with pytest.raises(ConfigError, match="curvature.every_steps"):
    checkpoint.check_same_run(os.path.join(workdir, "config.json"), {
        **newer, "curvature": {**newer["curvature"], "every_steps": 12345}})


# The Checkpoints class on its own, with a small state (no training).

def small_state(value):
  params = {"w": jnp.full((4, 3), value), "b": jnp.zeros(3)}
  return {"step": jnp.int32(value), "params": params,
          "opt_state": optax.sgd(0.1, momentum=0.9).init(params)}


def abstract_state():
  """Shapes, dtypes and shardings to restore into (replicated on every device)."""
  replicated = sharding.replicated(sharding.make_mesh())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      jax.eval_shape(lambda: small_state(0.0)))


def test_keeps_the_last_k_and_saves_the_bookkeeping_as_it_was(tmp_path):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  book = {"best": {"valid/error": 0.5}, "noise": float("nan")}
  for step in (1, 2, 3):
    ckpts.save(step, small_state(float(step)), book)
    book["best"]["valid/error"] -= 0.1      # mutated while the save may still be running
  ckpts.close()
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=2)
  assert ckpts.steps() == [2, 3]
  step, state, restored = ckpts.restore_latest(abstract_state())
  assert step == 3 and float(state["params"]["w"][0, 0]) == 3.0
  assert restored["best"]["valid/error"] == pytest.approx(0.3) and np.isnan(restored["noise"])
  assert type(state["opt_state"][0]).__name__ == "TraceState"    # optax's namedtuples kept
  ckpts.close()


def test_damaged_checkpoints_fall_back_one_warning_each_then_restart(tmp_path, caplog):
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  for step in (1, 2):
    ckpts.save(step, small_state(float(step)), {"step": step})
  ckpts.close()
  os.remove(tmp_path / "2" / "state" / "_METADATA")                # missing metadata

  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  step, _, book = ckpts.restore_latest(abstract_state())
  assert (step, book) == (1, {"step": 1})
  (warning,) = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
  assert "step 2" in warning and os.path.isdir(tmp_path / "corrupt-2")
  ckpts.save(2, small_state(2.0), {"step": 2})                      # the step is free again
  ckpts.wait()
  assert ckpts.steps() == [1, 2]
  ckpts.close()

  for step in (1, 2):
    with open(tmp_path / str(step) / "state" / "_METADATA", "w") as f:
      f.write("{")
  caplog.clear()
  ckpts = checkpoint.Checkpoints(str(tmp_path), keep=3)
  assert ckpts.restore_latest(abstract_state()) is None
  ckpts.close()
  messages = [r.getMessage() for r in caplog.records]
  assert sum("unusable" in m for m in messages) == 2
  assert any("restarting the trial from scratch" in m for m in messages)
