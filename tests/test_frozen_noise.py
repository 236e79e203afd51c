"""The noise scale at frozen parameters (scaling/measurement/frozen_noise.py): against the exact |G|^2 and
tr(Sigma) of a small population from its per-example gradients, standard errors that match the
spread of repeated estimates, no dependence on the history before the checkpoint, and the offline
tool (`python -m scaling.measure_checkpoint --noise_draws=K`) on a trained tiny trial."""
import glob
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from scaling import measure_checkpoint
from scaling.analysis import results, study
from scaling.measurement import frozen_noise as fn
from scaling.training import step as steplib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXAMPLES, DIM, HIDDEN, CLASSES = 256, 10, 16, 4


@pytest.fixture(scope="module")
def population():
  """A tanh MLP (no BatchNorm) on 256 synthetic examples, float64, and the exact |G|^2 and
  tr(Sigma) (1/N covariance) of the population from its per-example gradients."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(NUM_EXAMPLES, DIM)))
    y = jnp.asarray(rng.integers(0, CLASSES, NUM_EXAMPLES))
    params = {"w1": jnp.asarray(rng.normal(size=(DIM, HIDDEN)) / np.sqrt(DIM)),
              "w2": jnp.asarray(rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN))}

    def loss(p, x_BxD, y_B):
      logits_BxC = jnp.tanh(x_BxD @ p["w1"]) @ p["w2"]
      return steplib.cross_entropy_B(logits_BxC, y_B).mean()

    per_example = lambda xi, yi: ravel_pytree(jax.grad(loss)(params, xi[None], yi[None]))[0]
    grads_NxP = jax.vmap(per_example)(x, y)
    mean_P = grads_NxP.mean(0)
    truth = {"g_sq": float(mean_P @ mean_P),
             "trace_sigma": float(jnp.sum((grads_NxP - mean_P) ** 2) / NUM_EXAMPLES)}
    truth["b_simple"] = truth["trace_sigma"] / truth["g_sq"]
    return dict(params=params, loss_fn=lambda p, idx_b, key: loss(p, x[idx_b], y[idx_b]),
                truth=truth)


def estimate(population, key, num_draws, b_small=16, b_big=64):
  with jax.enable_x64(True):
    return fn.frozen_noise_scale(population["loss_fn"], population["params"], key,
                                 num_examples=NUM_EXAMPLES, b_small=b_small, b_big=b_big,
                                 num_draws=num_draws, chunk=100)


def test_matches_per_example_ground_truth_within_its_own_standard_errors(population):
  """2000 draws of 4 groups of 16: |G|^2, tr(Sigma) and B_simple each within 4 of their reported
  standard errors of the exact values; and the tolerance is a real one (each SE is a few percent
  of its value, far smaller than the factor-of-(B/(B-b)) or b errors of a wrong estimator)."""
  result = estimate(population, jax.random.key(1), 2000)
  truth = population["truth"]
  for name in ("g_sq", "trace_sigma", "b_simple"):
    value, se = getattr(result, name), getattr(result, f"{name}_stderr")
    assert 0 < se < 0.1 * abs(truth[name]), (name, value, se, truth[name])
    assert abs(value - truth[name]) < 4 * se, (name, value, se, truth[name])
  assert (result.num_draws, result.b_small, result.b_big) == (2000, 16, 64)


def test_standard_errors_match_the_spread_of_repeated_estimates(population):
  """20 independent estimates of 100 draws each: the standard deviation of the 20 values is the
  standard error each reports (sampling spread of a 19-dof std: +-16%; the bounds are ~3 of it):
  an SE of the wrong scale (not over sqrt(D), or of the per-draw ratios) falls outside. (The delta
  method's covariance term moves the SE by 8% here, below what 20 repeats resolve.)"""
  results = [estimate(population, jax.random.key(100 + i), 100) for i in range(20)]
  for name in ("g_sq", "trace_sigma", "b_simple"):
    values = np.array([getattr(r, name) for r in results])
    reported = np.mean([getattr(r, f"{name}_stderr") for r in results])
    ratio = np.std(values, ddof=1) / reported
    assert 0.55 < ratio < 1.6, (name, ratio)


def test_chunking_does_not_change_the_draws(population):
  """Draw d comes from fold_in(key, d): 30 draws in chunks of 7 (the last cut) or 30 agree."""
  with jax.enable_x64(True):
    run = lambda chunk: fn.frozen_noise_scale(
        population["loss_fn"], population["params"], jax.random.key(3), num_examples=NUM_EXAMPLES,
        b_small=16, b_big=64, num_draws=30, chunk=chunk)
    a, b = run(7), run(30)
  np.testing.assert_allclose(np.array(a[:6]), np.array(b[:6]), rtol=1e-12)


# A trained tiny trial: the committed MNIST slice, an MLP with BatchNorm (so that running
# statistics exist and must not enter), batch 16 in G = 2 groups, stopped at its target.

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("frozen_noise") / "sweep")
  process = cli("scaling.main", "--config=configs/mnist_sweep_tiny.py", f"--workdir={workdir}",
                "--config.sweep.batch_size=(16,)", "--config.sweep.lr_multiplier=(2.0,)",
                "--config.sweep.seed=(0,)", "--config.model.batch_norm=True")
  assert process.returncode == 0, process.stderr[-3000:]
  (trial_dir,) = glob.glob(os.path.join(workdir, "trials", "*"))
  return trial_dir


def test_the_estimate_depends_on_the_parameters_alone(trial):
  """The trained state, and a fresh one of another seed (step 0, its own optimizer state and
  initial BatchNorm statistics) given the trained parameters bit for bit: identical estimates.
  A measurement that read the running statistics (eval-mode BN) or folded the step into its key
  would differ; the fresh state's own parameters give another estimate."""
  config, model, splits, mesh, step, trained = measure_checkpoint.restore(trial)
  _, _, _, optimizer = train.build(config, splits, mesh)
  fresh = steplib.init_state(model, optimizer, jax.random.PRNGKey(7), splits.train_images.shape[1:])
  other_history = fresh.replace(params=jax.tree.map(jnp.copy, trained.params))
  differs = lambda a, b: not all(jax.tree.leaves(jax.tree.map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))
  assert step > 0 and int(other_history.step) == 0
  assert differs(trained.batch_stats, other_history.batch_stats)
  assert differs(trained.opt_state, other_history.opt_state)

  measure = lambda state: measure_checkpoint.measure_trial(config, model, splits, state, num_draws=8, groups=2)
  at_checkpoint = measure(trained)
  assert measure(other_history) == at_checkpoint
  assert measure(fresh) != at_checkpoint
  assert all(math.isfinite(v) for v in at_checkpoint.values())


def test_measure_checkpoint_writes_the_noise_scale_with_standard_errors(trial):
  process = cli("scaling.measure_checkpoint", f"--workdir={trial}", "--noise_draws=50",
                "--nocurvature")
  assert process.returncode == 0, process.stderr[-3000:]
  (path,) = glob.glob(os.path.join(trial, "noise_*.json"))
  with open(path) as f:
    noise = json.load(f)
  assert not glob.glob(os.path.join(trial, "curvature_*.json"))   # --nocurvature
  assert path.endswith(f"noise_{noise['step']}.json") and noise["step"] > 0
  for name in ("g_sq", "trace_sigma", "b_simple"):
    assert math.isfinite(noise[f"noise/frozen_{name}"]), noise
    assert 0 < noise[f"noise/frozen_{name}_stderr"] < math.inf, noise
  # The trial's own groups (config.json: G = 2 of batch 16).
  assert (noise["noise/frozen_num_draws"], noise["noise/frozen_b_small"],
          noise["noise/frozen_b_big"]) == (50, 8, 16)


def test_the_report_reads_b_simple_at_the_target_at_frozen_parameters(trial):
  """The trial stops at its target and checkpoints there: once measure_checkpoint has measured
  that checkpoint, the best-per-batch row and the fit take B_simple at frozen parameters (the EMA's
  value kept beside); without the file they fall back to the EMA, labelled so."""
  process = cli("scaling.measure_checkpoint", f"--workdir={trial}", "--noise_draws=20",
                "--nocurvature")
  assert process.returncode == 0, process.stderr[-3000:]
  (loaded,) = results.load_trials(os.path.dirname(os.path.dirname(trial)))
  (path,) = glob.glob(os.path.join(trial, "noise_*.json"))
  with open(path) as f:
    noise = json.load(f)
  assert loaded.reached and noise["step"] == loaded.steps_to_target
  (row,) = study.best_per_batch([loaded])
  assert row["b_simple_at_target_source"] == "frozen parameters"
  assert row["b_simple_at_target"] == noise["noise/frozen_b_simple"]
  assert row["b_simple_at_target_stderr"] == noise["noise/frozen_b_simple_stderr"]
  assert row["b_simple_ema_at_target"] == loaded.at_target["noise/b_simple"]
  assert row["b_simple_ema_at_target"] != row["b_simple_at_target"]
  os.rename(path, path + ".away")
  try:
    (row,) = study.best_per_batch(results.load_trials(os.path.dirname(os.path.dirname(trial))))
  finally:
    os.rename(path + ".away", path)
  assert row["b_simple_at_target_source"] == "EMA"
  assert row["b_simple_at_target"] == loaded.at_target["noise/b_simple"]


@pytest.mark.parametrize("flag,words", [("--noise_draws=1", "--noise_draws=1: give at least 2"),
                                        ("--noise_groups=3", "--noise_groups=3 does not divide")])
def test_bad_noise_flags_are_one_line(trial, flag, words):
  process = cli("scaling.measure_checkpoint", f"--workdir={trial}", flag, "--nocurvature",
                *(["--noise_draws=4"] if "groups" in flag else []))
  assert process.returncode == 1, process.stderr[-3000:]
  assert "Traceback" not in process.stderr and words in process.stderr.strip().splitlines()[-1]
