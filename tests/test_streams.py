"""Named random streams: every use of randomness in a trial draws from its own stream."""
import types

import jax
import numpy as np

from scaling import streams
from scaling.streams import Stream
from scaling.training import chunk


def test_the_streams_of_any_seeds_are_distinct_and_init_is_the_root_key():
  keys = {(seed, s): tuple(np.asarray(jax.random.key_data(streams.key(seed, s))).ravel())
          for seed in range(8) for s in Stream}
  assert len(set(keys.values())) == len(keys)
  for seed in range(8):   # earlier checkpoints rebuild their initial parameters from the seed
    np.testing.assert_array_equal(streams.key(seed, Stream.INIT), jax.random.PRNGKey(seed))


def test_a_trial_draws_its_order_and_augmentation_from_their_streams():
  """Augmentation and the curvature probes once shared the key seed + 2_000_003."""
  inputs = chunk.TrialInputs.of(types.SimpleNamespace(lr=0.1), 3, None)
  np.testing.assert_array_equal(inputs.data_key, streams.key(3, Stream.DATA_ORDER))
  np.testing.assert_array_equal(inputs.augment_key, streams.key(3, Stream.AUGMENT))
  assert not np.array_equal(inputs.augment_key, streams.key(3, Stream.PROBES))
