"""Orbax checkpoints of a trial: the train state plus the loop's bookkeeping, resumed exactly.

A checkpoint at step S holds params, optimizer state, BatchNorm statistics and the step (the data
order and every RNG are pure functions of (seed, step), so the step *is* the data position and the
RNG state), plus a JSON record of the loop's bookkeeping (target reached?, best errors, noise-scale
moving averages, elapsed time). Orbax writes each step into a temporary directory and renames it
when complete, so a kill mid-save never leaves a half-written checkpoint that looks finished (the
leftover temporary directory is deleted by the next run); saves are asynchronous, so only the
device-to-host copy blocks the loop. A latest checkpoint that is damaged anyway (truncated file,
missing metadata) is reported in one warning line, moved aside to `corrupt-<step>` (else Orbax
refuses to save that step again) and the one before it is used. Orbax's own tracebacks about
the damage are kept out of the log: the warning line says it.

A full disk during a save is one `metrics.DiskFull` line at the save that hit it (or at the next
save or wait, since saves finish in the background); its temporary directory is removed and the
checkpoints before it are kept. Offline readers (`scaling.measure_checkpoint`) open the directory
with `read_only=True`: they never delete a temporary directory, which may be another process's
save in progress, nor move a damaged checkpoint aside.
"""
import contextlib
import json
import logging as py_logging
import os
import shutil
import sys
import time

import jax
from absl import logging


def _quiet_type_handler_override(record) -> bool:
  """A logging filter: drops the warning Orbax logs at import ('Type handler registry type ...
  overriding jax.Array'), a registration detail that would stand before every one-line error."""
  return not record.getMessage().startswith("Type handler registry type")


# Installed before Orbax is imported: it logs the warning while its modules load.
py_logging.getLogger("absl").addFilter(_quiet_type_handler_override)
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils

from scaling.config import ConfigError
from scaling.training import metrics

# The train state is small and replicated. Orbax's default replica-parallel save has every device
# write a slice of each array, which compiles a slicing op per array and device before the first
# save (benchmarks/README.md: one replica writes each checkpoint array) and gains nothing here:
# one replica writes each array instead.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


TMP_MARKER = ".orbax-checkpoint-tmp"   # Orbax's suffix for a save in progress


def _quiet_orbax_about(record) -> bool:
  """A logging filter: drops Orbax's records (with their tracebacks) about a full disk; the
  trial reports it in one line."""
  if "orbax" not in record.pathname:
    return True
  texts = [record.getMessage()] + ([str(record.exc_info[1])] if record.exc_info else [])
  return not any(metrics.mentions_disk_full(t) for t in texts)


def _quiet_abandoned_reads(record) -> bool:
  """A logging filter for asyncio: drops its "Task (or Future) exception was never retrieved"
  report (with a traceback) of a TensorStore read of a damaged checkpoint (DATA_LOSS) that Orbax
  abandoned after the first failed read; the fallback to an earlier checkpoint already warns in
  one line. Appears in ~1 of 10 restores of a damaged checkpoint, when the task or future is
  collected after the restore failed."""
  text = record.getMessage()
  return not ("exception was never retrieved" in text and "DATA_LOSS" in text)


def _drop_closed_loop_noise(previous_hook):
  """sys.unraisablehook that drops TensorStore's "Event loop is closed" callbacks, which print a
  traceback after Orbax abandons the reads of a damaged checkpoint or the writes of a save that
  failed; others go to `previous_hook`."""
  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous_hook(unraisable)
  hook.drops_closed_loop_noise = True
  return hook


class Checkpoints:

  def __init__(self, directory: str, keep: int, asynchronous: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=asynchronous,
                                             cleanup_tmp_directories=True)
    py_logging.getLogger("absl").addFilter(_quiet_orbax_about)   # idempotent
    py_logging.getLogger("asyncio").addFilter(_quiet_abandoned_reads)
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
      sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving = None   # the step of the save that may still be running
    self.last_save_seconds = 0.0
    self.last_restore_seconds = 0.0

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, bookkeeping: dict) -> None:
    """Starts an (asynchronous) save; the previous one is finished first by Orbax."""
    start = time.perf_counter()
    # Orbax serialises the JSON in the background: snapshot it now, the loop keeps mutating it.
    bookkeeping = json.loads(json.dumps(bookkeeping))
    self.wait()   # a full disk in the previous save is reported as that save's
    self._saving = step
    with self._disk_full_cleaned(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), bookkeeping=ocp.args.JsonSave(bookkeeping)),
          force=True)
    self.last_save_seconds = time.perf_counter() - start

  def wait(self) -> None:
    with self._disk_full_cleaned(self._saving):
      self._manager.wait_until_finished()
    self._saving = None

  @contextlib.contextmanager
  def _disk_full_cleaned(self, step: int):
    """DiskFull for a save that ran out of space, after removing its temporary directory."""
    try:
      yield
    except Exception as error:
      if not metrics.is_disk_full(error):
        raise
      self._saving = None
      if jax.process_index() == 0:
        for name in os.listdir(self.directory):
          if name.startswith(f"{step}{TMP_MARKER}"):
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      raise metrics.DiskFull(
          f"disk full while saving the checkpoint of step {step} in {self.directory}: free"
          " space and rerun (earlier checkpoints are kept; the trial resumes from the latest)"
      ) from None

  def restore_latest(self, abstract_state, at_most: int | None = None):
    """(step, state, bookkeeping) from the newest usable checkpoint (at or before step `at_most`
    if given), or None if there is none. Read-only (offline readers): a damaged checkpoint is
    reported but never moved aside.

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
        if self.read_only:
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
    try:
      self.wait()
    finally:
      self._manager.close()


# The sweep's definition (`sweep`, `sweep_zip`) may grow or move around a trial: its own values
# are in its other fields.
RESUME_MAY_CHANGE = ("num_devices", "checkpoint", "dataset.data_dir", "sweep", "sweep_zip",
                     "derived.num_devices",
                     "derived.microbatching", "chunk_steps", "eval_batch_size", "cluster",
                     # both placements of the training set read the same order
                     "dataset.placement", "dataset.device_fraction", "derived.data_placement",
                     # a group trains vmapped or alone to the same numbers, up to float32 rounding
                     "vectorize_trials")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


class DifferentRun(ConfigError):
  """A trial directory holds the run of another config."""


def read_trial_config(config_path: str, finished: bool = False) -> dict:
  """A trial's config.json as a dict, or ConfigError naming the damaged file and the fix."""
  try:
    with open(config_path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as error:   # truncated, not UTF-8, not JSON, a directory
    saved, reason = None, " ".join(str(error).split())[:120]
  else:
    reason = ("it is empty" if saved == {} else
              f"it holds {type(saved).__name__}, not the trial's config")
  if isinstance(saved, dict) and saved:
    return saved
  fix = (f"delete {os.path.dirname(config_path)} and rerun to train the trial again" if finished
         else "delete it and rerun to resume the trial from its checkpoint under the current"
         " config")
  raise ConfigError(f"{config_path} is damaged ({reason}): it records what the trial ran with;"
                    f" restore it from a copy, or {fix}")


def check_same_run(config_path: str, resolved: dict, ignore: tuple[str, ...] = (),
                   finished: bool = False) -> None:
  """Refuses to resume (or rerun) a trial directory written by a different run (batch size, LR,
  model, ...); `ignore` adds fields to RESUME_MAY_CHANGE (e.g. `derived`, when comparing configs
  before a plan is made). Only fields both configs hold are compared: a field added to the
  framework since the trial ran defaults to the behaviour it ran with (the rule for every new
  field), and a removed one no longer acts, so neither makes finished work unusable."""
  if not os.path.exists(config_path):
    return
  saved = _flatten(read_trial_config(config_path, finished))
  current = _flatten(resolved)
  may_change = RESUME_MAY_CHANGE + tuple(ignore)
  allowed = lambda key: any(key == p or key.startswith(p + ".") for p in may_change)
  changed = sorted(k for k in set(saved) & set(current)
                   if not allowed(k) and saved[k] != current[k])
  if changed:
    key = changed[0]
    raise DifferentRun(
        f"{os.path.dirname(config_path)} holds a different run: {key} was "
        f"{saved.get(key)!r}, now {current.get(key)!r} ({len(changed)} field(s) differ); "
        "use a new --workdir or restore the original config")
