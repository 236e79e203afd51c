"""A trial's random streams: one root key per seed, one named stream per use.

`key(seed, stream)` is `jax.random.fold_in(PRNGKey(seed), stream)`: the streams of a seed are
independent of one another and of every other seed's. (Seed arithmetic, seed + 2_000_003, once
gave the augmentations and the curvature probes the same key.) The initial parameters draw from
the root key itself, as they always have, so a checkpoint of an earlier version still rebuilds
its trial's initial parameters (the distance from them is logged); the other streams changed when
they were named: README, "Random streams".
"""
import enum

import jax


class Stream(enum.IntEnum):
  INIT = 0           # the initial parameters: the root key itself
  DATA_ORDER = 1     # each epoch's order of the training set (folded with the epoch)
  AUGMENT = 2        # the augmentations (folded with the step)
  PROBES = 3         # the curvature measurements' random vectors (folded with the step)
  FROZEN_NOISE = 4   # measure_checkpoint's draws of the frozen-parameter noise scale
  DROPOUT = 5        # reserved for a model with dropout (none of scaling.models has any)


def key(seed: int, stream: Stream) -> jax.Array:
  root = jax.random.PRNGKey(seed)
  return root if stream == Stream.INIT else jax.random.fold_in(root, int(stream))
