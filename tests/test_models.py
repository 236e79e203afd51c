"""Models: the CIFAR ResNet family (parameter count of He et al.'s ResNet-20), ghost batch norm
against flax's BatchNorm on each ghost batch, config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import resnet_mnist
from scaling import models
from scaling.config import ConfigError
from scaling.models.resnet import GhostBatchNorm
from scaling.training import train


def resnet_config(**fields):
  return ml_collections.ConfigDict({"name": "resnet", "depth": 20, "width": 16,
                                    "ghost_batch_size": 0, **fields})


def test_resnet20_has_he_et_al_parameter_count():
  """0.27M (He et al. 2016, Table 6). Here with 1x1 projection shortcuts and 1 input channel:
  stem 144 + 32, stage 1 3 x (2 x 2304 + 64), stage 2 14528 + 2 x 18560, stage 3 57728 +
  2 x 73984, dense 650 = 272,186."""
  model = models.build(resnet_config(), 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)),
                                                train=False))
  assert models.parameter_count(variables["params"]) == 272_186
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((4, 28, 28, 1)), train=False), variables)
  assert out.shape == (4, 10)
  deeper = models.build(resnet_config(depth=32), 10)
  assert deeper.depth == 32


@pytest.mark.parametrize("depth", [19, 21, 2])
def test_resnet_depth_must_be_6n_plus_2(depth):
  with pytest.raises(ConfigError, match=f"model.depth={depth}"):
    models.build(resnet_config(depth=depth), 10)


def test_ghost_batch_norm_is_flax_batch_norm_on_each_ghost_batch():
  x = jax.random.normal(jax.random.key(0), (32, 4, 4, 3)) * 3 + 1
  ghost = GhostBatchNorm(ghost_batch_size=8)
  variables = ghost.init(jax.random.key(1), x, train=False)
  y, updated = ghost.apply(variables, x, train=True, mutable=["batch_stats"])
  plain = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  plain_vars = plain.init(jax.random.key(1), x[:8])
  means, variances = [], []
  for i in range(4):
    yi, stats = plain.apply(plain_vars, x[8 * i:8 * (i + 1)], mutable=["batch_stats"])
    np.testing.assert_allclose(y[8 * i:8 * (i + 1)], yi, rtol=1e-5, atol=1e-5)
    means.append(stats["batch_stats"]["mean"])
    variances.append(stats["batch_stats"]["var"])
  # Running averages: the mean over ghost batches of what flax would record for each.
  np.testing.assert_allclose(updated["batch_stats"]["mean"], np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["var"], np.mean(variances, 0), rtol=1e-5)
  # A ghost batch's output does not depend on the others' examples.
  y2, _ = ghost.apply(variables, x.at[8:].set(0.0), train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(y2[:8], y[:8])
  # ghost_batch_size=0 is plain BN over everything passed in.
  y_all, _ = GhostBatchNorm(0).apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_all, plain.apply(plain_vars, x, mutable=["batch_stats"])[0],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"model.ghost_batch_size": 24}, "model.ghost_batch_size=24 does not divide the per-device"
                                     " microbatch of 16"),
    ({"accumulation_steps": 3}, "accumulation_steps=3 does not divide the per-device batch of 16"),
    ({"augment.crop_padding": -1}, "augment.crop_padding=-1"),
])
def test_bad_microbatch_fields_are_one_line_errors_before_training(fields, message):
  config = resnet_mnist.get_config()
  for key, value in fields.items():
    node, leaf = config, key
    if "." in key:
      parent, leaf = key.split(".")
      node = config[parent]
    node[leaf] = value
  with pytest.raises(ConfigError, match=message) as error:
    train.check_config(config, 55_000, 8)
  assert "\n" not in str(error.value)
