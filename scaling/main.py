"""Entry point: a config file (and its overrides) -> a sweep of trials -> trial directories.

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --list_trials
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --trial=7

Bad input (a config file that does not load, a misspelt --config.<field>, a field's bad value, a
workdir that cannot be written) exits non-zero with one line, `config error: ...`, that names the
field and the fix, before any trial trains: never a traceback.
"""
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from scaling import config as config_lib
from scaling.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the sweep's (or trial's) outputs.")
_TRIAL = flags.DEFINE_string("trial", None, "Run only this trial: its index or its id.")
_LIST = flags.DEFINE_bool("list_trials", False, "Print the expanded trials and exit.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs (jax.distributed);"
    " on Slurm/TPU/MPI clusters pass --distributed and it is detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_CACHE = flags.DEFINE_string(
    "compilation_cache", "~/.cache/scaling/jax", "Persistent XLA compilation cache ('' = off):"
    " trials of a sweep and reruns reuse compiled steps instead of compiling again.")
_PLAN_MEMORY = flags.DEFINE_bool(
    "plan_memory", False, "Print each sweep batch size's per-device memory for one training step"
    " (XLA's compiled memory analysis, nothing runs) and the largest power-of-two batch that fits.")
_MEMORY_LIMIT = flags.DEFINE_float(
    "memory_limit_mib", 0, "Device memory to plan against in MiB (0 = the device's own limit,"
    " where the backend reports one).")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str) -> None:
  """A workdir that is a file, or where nothing can be created, fails before anything runs."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir={workdir}: {existing} is a file, not a directory:"
                      " choose another --workdir")
  try:   # os.access says yes to root even on read-only mounts: try it
    tempfile.TemporaryFile(dir=existing).close()
  except OSError as error:
    raise ConfigError(f"--workdir={workdir} is not writable ({error.strerror} in {existing}):"
                      " choose a directory you can write to") from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file it writes at INFO
  try:
    if not (_LIST.value or _PLAN_MEMORY.value):    # listing a sweep (someone else's, read-only) writes nothing
      check_workdir(_WORKDIR.value)
    if _DISTRIBUTED.value or _COORDINATOR.value:
      import jax
      from scaling import launch
      if not _COORDINATOR.value:   # detected from Slurm: its tasks must be the processes, else
        launch.check_slurm_processes(os.environ, _NUM_PROCESSES.value)   # initialize() waits
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CACHE.value:
      import jax
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from scaling import metrics, sweep
    if _PLAN_MEMORY.value:
      print("\n".join(sweep.plan_memory(_CONFIG.value, int(_MEMORY_LIMIT.value * 2**20) or None)))
      return
    try:
      summaries = sweep.main(_CONFIG.value, _WORKDIR.value, trial=_TRIAL.value,
                             list_only=_LIST.value)
    except metrics.DiskFull as error:   # one line, at the write that hit it
      sys.exit(f"error: {error}")
  except ConfigError as error:  # bad input: one line naming the field and the fix
    sys.exit(f"config error: {error}")
  failed = [s.get("trial_id", "?") for s in summaries if s.get("status") == "failed"]
  if failed:
    sys.exit(f"{len(failed)} trial(s) failed (reasons in their summary.json; a rerun retries"
             f" them): {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
