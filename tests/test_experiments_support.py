"""What the experiments added to the framework (and use): the distance from the initialization
(main's param_distance_from_init, read by keskar.py), the top-eigenvalue-only schedule of curvature measurements, and Keskar et al.'s
L-BFGS-B sharpness of a trial's curvature-subset loss (Measure.sharpness_lbfgsb)."""
import json
import os

import jax
import numpy as np
import optax
import pytest

from scaling import measure_checkpoint, streams
from scaling.config import ConfigError, check_fields
from scaling.measurement import measure
from scaling.streams import Stream
from scaling.training import train
from tests.tiny import tiny_config


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow    # manual (-m slow): outside CI's time budget
def test_logged_distance_from_init_is_the_checkpoints_and_lbfgsb_uses_the_subset(tmp_path):
  config = tiny_config(**{"num_devices": 1, "budget.length": 8.0})
  train.run(config, str(tmp_path))
  evals = [r for r in _records(tmp_path) if "param_distance_from_init" in r]
  _, model, splits, mesh, step, state = measure_checkpoint.restore(str(tmp_path))
  _, init = train.abstract_train_state(config, model, train.build(config, splits, mesh)[3],
                                       splits, mesh)
  init_params = init(streams.key(config.seed, Stream.INIT)).params
  flat = lambda p: np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
  expected = np.linalg.norm(flat(state.params) - flat(init_params))
  assert step == 8 and expected > 0
  # float32 sums of squares over ~26k entries: relative rounding ~1e-6.
  np.testing.assert_allclose(evals[-1]["param_distance_from_init"], expected, rtol=1e-5)

  # Keskar's L-BFGS-B sharpness through Measure: the loss it perturbs is the mean cross-entropy
  # of the first curvature.subset_size training examples in eval mode.
  n = config.curvature.subset_size
  images = splits.train_images[:n].astype(np.float32) * splits.pixel_scale
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                       train=False)
  loss = float(optax.softmax_cross_entropy_with_integer_labels(
      logits, splits.train_labels[:n]).mean())
  sharp = measure.Measure(config.curvature, model, splits, mesh, config.seed).sharpness_lbfgsb(
      state, eps=1e-3, max_iter=3)
  np.testing.assert_allclose(float(sharp.loss), loss, rtol=1e-5)
  assert float(sharp.max_loss) > loss   # a gradient step inside the box raises a positive loss


@pytest.mark.slow    # manual (-m slow): outside CI's time budget
def test_scheduled_top_eigenvalue_measures_only_it_and_everything_at_the_end(tmp_path):
  config = tiny_config(**{"num_devices": 1, "budget.length": 16.0, "eval_every.length": 4.0,
                          "curvature.enabled": True, "curvature.every_steps": 4,
                          "curvature.scheduled": "top_eigenvalue", "curvature.subset_size": 64,
                          "curvature.lanczos_steps": 4, "curvature.top_k": 1,
                          "curvature.max_probes": 2, "curvature.min_probes": 2,
                          "curvature.probe_chunk": 2, "curvature.density": False})
  train.run(config, str(tmp_path))
  measured = [r for r in _records(tmp_path) if "curvature/top_eigenvalue" in r]
  assert [r["step"] for r in measured] == [4, 8, 12, 16]
  assert all("curvature/hessian_trace" not in r for r in measured[:-1])
  assert "curvature/hessian_trace" in measured[-1] and "curvature/sharpness" in measured[-1]


def test_scheduled_must_name_a_known_set():
  config = tiny_config(**{"curvature.scheduled": "trace"})
  with pytest.raises(ConfigError, match="curvature.scheduled='trace' is invalid"):
    check_fields(config)


@pytest.mark.heavy   # trains a tiny trial: CI's heavy pass
def test_restore_takes_todays_config_for_a_trial_written_before_a_field(tmp_path):
  # keskar.py measures finished trials offline; one written before dataset.placement existed has
  # a config.json without it, which the loader needs: restore(config=...) takes the sweep's.
  config = tiny_config(**{"num_devices": 1, "budget.length": 8.0})
  train.run(config, str(tmp_path))
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["dataset"]["placement"]
  path.write_text(json.dumps(saved))
  with pytest.raises(AttributeError, match="placement"):
    measure_checkpoint.restore(str(tmp_path))
  restored_config, _, _, _, step, state = measure_checkpoint.restore(str(tmp_path), config=config)
  assert step == 8 and restored_config is config
  assert int(state.step) == 8
