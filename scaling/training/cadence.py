"""When things happen along a trial's steps: the one answer the jitted chunk and the host loop use.

A trial's steps are counted as steps done (1 after the first update). Its log records and
evaluations come every `every` steps and at the last step (`due`; big_vision's `itstime`); the loop
runs each segment up to the next of them (`next_due`). Checkpoints and scheduled curvature come at
the first evaluation at or past each multiple of their own period (`crossed`), so their period
need not be a multiple of the evaluations'.
"""


def due(steps_done, every: int, total_steps: int):
  """Whether something of period `every` happens after `steps_done` steps: at every multiple of
  `every` and at the last step. Works on Python ints, numpy and jax arrays alike (the jitted chunk
  asks it of a traced step)."""
  return (steps_done % every == 0) | (steps_done == total_steps)


def next_due(step: int, every: int, total_steps: int) -> int:
  """The first step after `step` at which `due` holds."""
  return min(total_steps, (step // every + 1) * every)


def crossed(step: int, previous: int, every: int) -> bool:
  """Whether a multiple of `every` lies in (previous, step]: the first step at or past each
  multiple since the last time (at `previous`) it happened. `every` 0 = never."""
  return every > 0 and step // every > previous // every
