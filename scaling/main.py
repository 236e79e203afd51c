"""Entry point: a config file (and its overrides) -> a sweep of trials -> trial directories.

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --list_trials
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --trial=7
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file it writes at INFO
  if _DISTRIBUTED.value or _COORDINATOR.value:
    import jax
    from scaling import launch
    try:   # detected from Slurm: its tasks must be the processes, else initialize() waits for ever
      if not _COORDINATOR.value:
        launch.check_slurm_processes(os.environ, _NUM_PROCESSES.value)
    except ConfigError as error:
      sys.exit(f"config error: {error}")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _CACHE.value:
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from scaling import sweep
  try:
    sweep.main(_CONFIG.value, _WORKDIR.value, trial=_TRIAL.value, list_only=_LIST.value)
  except ConfigError as error:  # bad input: one line naming the field and the fix
    sys.exit(f"config error: {error}")


if __name__ == "__main__":
  app.run(main)
