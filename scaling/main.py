"""Entry point: a config file (and its overrides) -> a sweep of trials -> trial directories.

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --list_trials
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --trial=7

Bad input (a config file that does not load, a misspelt --config.<field>, a field's bad value, a
workdir that cannot be written) exits non-zero with one line, `config error: ...`, that names the
field and the fix, before any trial trains: never a traceback.
"""
import math
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from scaling import config as config_lib
from scaling.config import ConfigError, check_workdir

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
    "compilation_cache", None, "Persistent XLA compilation cache ('' = off; default"
    " $JAX_COMPILATION_CACHE_DIR, else ~/.cache/scaling/jax): trials of a sweep and reruns reuse"
    " compiled steps instead of compiling again.")
_PLAN_MEMORY = flags.DEFINE_bool(
    "plan_memory", False, "Print each sweep batch size's per-device memory for one training step"
    " (XLA's compiled memory analysis, nothing runs) and the largest power-of-two batch that fits.")
_MEMORY_LIMIT = flags.DEFINE_float(
    "memory_limit_mib", 0, "Device memory to plan against in MiB (0 = the device's own limit,"
    " where the backend reports one).")
flags.mark_flags_as_required(["config", "workdir"])


def check_distributed_flags(coordinator, num_processes, process_id) -> None:
  """The multi-process flags, before jax.distributed.initialize() sees (and raises on) them."""
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f"--num_processes={num_processes} is invalid: use the number of processes"
                      " (>= 1) in the run")
  if process_id is not None and (process_id < 0 or (num_processes is not None
                                                    and process_id >= num_processes)):
    raise ConfigError(f"--process_id={process_id} is invalid: use 0 .. --num_processes - 1"
                      f" ({num_processes})" if num_processes else
                      f"--process_id={process_id} is invalid: use an index >= 0")
  if coordinator is not None and not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[\w.-]+):\d{1,5}",
                                                  coordinator):
    raise ConfigError(f"--coordinator_address={coordinator!r} is not host:port: give process 0's"
                      " address, e.g. --coordinator_address=127.0.0.1:1234")
  port = coordinator and coordinator.rsplit(":", 1)[-1]
  if port and port.isdigit() and not 1 <= int(port) <= 65535:
    raise ConfigError(f"--coordinator_address={coordinator!r} has port {port}: use a port in"
                      " 1..65535")
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ConfigError("--coordinator_address needs --num_processes and --process_id (outside a"
                      " cluster that jax.distributed detects): pass both")


def initialize_distributed(coordinator, num_processes, process_id) -> None:
  """jax.distributed.initialize(), with what it raises on a machine where it detects no cluster
  (no coordinator given, outside Slurm, TPU pods or MPI) as one line."""
  import jax
  from scaling.cluster import launch
  check_distributed_flags(coordinator, num_processes, process_id)
  if not coordinator:   # detected from Slurm: its tasks must be the processes, else
    launch.check_slurm_processes(os.environ, num_processes)   # initialize() waits
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except ValueError as error:
    reason = " ".join(str(error).split())[:200]
    raise ConfigError(f"--distributed: jax.distributed could not start ({reason}): outside a"
                      " cluster it detects (Slurm, TPU pods, MPI), pass --coordinator_address,"
                      " --num_processes and --process_id") from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file it writes at INFO
  try:
    if not (_LIST.value or _PLAN_MEMORY.value):    # listing a sweep (someone else's, read-only) writes nothing
      check_workdir(_WORKDIR.value)
    if _PLAN_MEMORY.value and not (math.isfinite(_MEMORY_LIMIT.value)
                                   and _MEMORY_LIMIT.value >= 0):
      raise ConfigError(f"--memory_limit_mib={_MEMORY_LIMIT.value} is invalid: use a device"
                        " memory in MiB > 0 (or 0: the device's own limit)")
    if not (_DISTRIBUTED.value or _COORDINATOR.value) and (
        _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None):
      raise ConfigError("--num_processes and --process_id act only in a multi-process run: add"
                        " --coordinator_address=HOST:PORT (or --distributed on a cluster), or"
                        " drop them")
    if _DISTRIBUTED.value or _COORDINATOR.value:
      initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    cache = (_CACHE.value if _CACHE.value is not None else
             os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/scaling/jax"))
    if cache:
      import jax
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from scaling import sweep
    from scaling.training import metrics
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
  except KeyboardInterrupt:   # outside a trial's loop (which checkpoints and exits 130 itself)
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  failed = [s.get("trial_id", "?") for s in summaries if s.get("status") == "failed"]
  if failed:
    sys.exit(f"{len(failed)} trial(s) failed (reasons in their summary.json; a rerun retries"
             f" them): {', '.join(failed)}")


if __name__ == "__main__":
  try:
    app.run(main, flags_parser=config_lib.parse_flags)
  except KeyboardInterrupt:   # while the config file loads
    print("interrupted", file=sys.stderr)
    sys.exit(130)
