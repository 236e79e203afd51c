"""Orbax checkpoints of a trial: the train state plus the loop's bookkeeping, resumed exactly.

A checkpoint at step S holds params, optimizer state, BatchNorm statistics and the step (the data
order and every RNG are pure functions of (seed, step), so the step *is* the data position and the
RNG state), plus a JSON record of the loop's bookkeeping (target reached?, best errors, noise-scale
moving averages, elapsed time). Orbax writes each step into a temporary directory and renames it
when complete, so a kill mid-save never leaves a half-written checkpoint that looks finished (the
leftover temporary directory is deleted by the next run); saves are asynchronous, so only the
device-to-host copy blocks the loop. A latest checkpoint that is damaged anyway (truncated file,
missing metadata) is reported in one warning line, moved aside to `corrupt-<step>` (else Orbax
refuses to save that step again) and the one before it is used.
"""
import json
import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

# The train state is small and replicated. Orbax's default replica-parallel save has every device
# write a slice of each array, which compiles a slicing op per array and device (~7 s before the
# first save of the MNIST CNN on 8 CPU devices; benchmarks/bench_checkpoint.py) and gains nothing
# here: one replica writes each array instead.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpoints:

  def __init__(self, directory: str, keep: int, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=asynchronous,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_save_seconds = 0.0
    self.last_restore_seconds = 0.0

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, bookkeeping: dict) -> None:
    """Starts an (asynchronous) save; the previous one is finished first by Orbax."""
    start = time.perf_counter()
    # Orbax serialises the JSON in the background: snapshot it now, the loop keeps mutating it.
    bookkeeping = json.loads(json.dumps(bookkeeping))
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), bookkeeping=ocp.args.JsonSave(bookkeeping)),
        force=True)
    self.last_save_seconds = time.perf_counter() - start

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state, at_most: int | None = None, read_only: bool = False):
    """(step, state, bookkeeping) from the newest usable checkpoint (at or before step `at_most`
    if given), or None if there is none. `read_only` (offline readers) never moves a damaged
    checkpoint aside.

    `abstract_state` gives shapes, dtypes and shardings: restoring into it keeps optax's
    namedtuples and puts the arrays straight onto this run's mesh (any device count).
    """
    damaged = False
    for step in reversed([s for s in self.steps() if at_most is None or s <= at_most]):
      start = time.perf_counter()
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), bookkeeping=ocp.args.JsonRestore()))
        state = restored["state"]
        jax.block_until_ready(state)
      except Exception as error:  # a damaged checkpoint must not cost the run: fall back
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        if read_only:
          logging.warning("checkpoint at step %d is unusable (%s)", step, first_line)
          continue
        damaged, aside = True, self._move_aside(step)
        logging.warning("checkpoint at step %d is unusable (%s): moved to %s, trying an earlier"
                        " one", step, first_line, aside)
        continue
      self.last_restore_seconds = time.perf_counter() - start
      return step, state, dict(restored["bookkeeping"])
    if damaged:
      logging.warning("no usable checkpoint in %s: restarting the trial from scratch",
                      self.directory)
    return None

  def _move_aside(self, step: int) -> str:
    """Renames a damaged step directory so that the run can save that step again."""
    aside = os.path.join(self.directory, f"corrupt-{step}")
    if jax.process_index() == 0:
      if os.path.exists(aside):  # damaged twice at the same step: keep both
        aside = f"{aside}-{time.time_ns()}"
      os.rename(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint-move-aside-{step}")
    self._manager.reload()   # forget the step it had listed
    return aside

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
