"""param_distance_from_init: logged at every log record, the norm of (params - initial params)."""
import jax
import numpy as np
import pytest

from scaling import streams
from scaling.analysis import results
from scaling.measurement import noise_scale
from scaling.streams import Stream
from scaling.training import checkpoint, train
from tests import tiny


def test_distance_from_init_is_zero_at_start_and_matches_the_final_checkpoint(tmp_path):
  c = tiny.tiny_config(num_devices=1, **{"budget.length": 8.0, "checkpoint.every_steps": 8})
  c.warmup.length = 0.0
  train.run(c, str(tmp_path))
  records = [r for r in results.read_metrics(str(tmp_path / "metrics.jsonl")) if "param_distance_from_init" in r]
  assert [r["step"] for r in records] == [4, 8]
  distances = [r["param_distance_from_init"] for r in records]
  assert 0 < distances[0] < distances[1]
  # Against the parameters themselves: the final checkpoint minus a fresh init from the seed.
  mesh = train.sharding.make_mesh(1)
  splits = train.load_data(c)
  plan, model, lr_fn, optimizer = train.build(c, splits, mesh)
  abstract, init = train.abstract_train_state(c, model, optimizer, splits, mesh)
  init_params = init(streams.key(c.seed, Stream.INIT)).params
  ckpts = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), 3, asynchronous=False)
  _, state, _ = ckpts.restore_latest(abstract)
  ckpts.close()
  expected = float(np.sqrt(noise_scale.sq_norm(jax.tree.map(np.subtract, state.params,
                                                            init_params))))
  assert distances[1] == pytest.approx(expected, rel=1e-5)
