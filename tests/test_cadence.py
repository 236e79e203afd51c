"""The cadence helper against the rules it states, by brute force over small step ranges; the
jitted chunk asks the same function of a traced step."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from scaling.training import cadence

CASES = list(itertools.product(range(1, 8), range(1, 30)))   # (every, total_steps)


def test_due_is_every_multiple_and_the_last_step():
  for every, total in CASES:
    for s in range(1, total + 1):
      assert bool(cadence.due(s, every, total)) == (s % every == 0 or s == total), (s, every, total)


def test_next_due_is_the_first_due_step_after():
  for every, total in CASES:
    for s in range(total):
      expected = next(t for t in range(s + 1, total + 1) if cadence.due(t, every, total))
      assert cadence.next_due(s, every, total) == expected, (s, every, total)


def test_crossed_fires_once_per_multiple_at_the_first_step_past_it():
  """Evaluations every 3 steps, checkpoints every 4: a checkpoint at the first evaluation at or
  past each multiple of 4, once; every 0 never."""
  for every in (0, 1, 4, 5):
    last, fired = 0, []
    for step in range(3, 40, 3):
      if cadence.crossed(step, last, every):
        fired.append(step)
        last = step
    multiples = [m for m in range(every, 40, every) if m <= 39] if every else []
    expected = sorted({min(s for s in range(3, 40, 3) if s >= m) for m in multiples
                       if any(s >= m for s in range(3, 40, 3))})
    assert fired == expected, (every, fired, expected)


def test_due_of_arrays_and_traced_steps():
  steps = np.arange(1, 25)
  expected = (steps % 4 == 0) | (steps == 22)
  assert (cadence.due(steps, 4, 22) == expected).all()
  traced = jax.jit(jax.vmap(lambda s: cadence.due(s, 4, 22)))(jnp.asarray(steps))
  assert (np.asarray(traced) == expected).all()
