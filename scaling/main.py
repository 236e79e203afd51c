"""Entry point: a config file (and its overrides) -> a sweep of trials -> trial directories.

    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/mnist_sweep
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --list_trials
    python -m scaling.main --config=configs/mnist_sweep.py --workdir=runs/x --trial=7

Bad input (a config file that does not load, a misspelt --config.<field>, a field's bad value, a
workdir that cannot be written) exits non-zero with one line, `config error: ...`, that names the
field and the fix, before any trial trains: never a traceback.
"""
import os
import re
import sys
import tempfile

from absl import app, flags, logging
import ml_collections
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
flags.mark_flags_as_required(["config", "workdir"])


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in argv (ml_collections' own rule: `--config=X` or `--config X`)."""
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=|$)(.*)", arg)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return None


def _explain(error: Exception | None, argv: list[str]) -> str:
  """One line for a failed parse of the flags: the config file, else an override, else absl's."""
  spec = _config_spec(argv)
  if not spec:
    return "--config is required: pass a config file, e.g. --config=configs/mnist.py"
  try:
    config = config_lib.load_file(spec)
  except ConfigError as bad_file:
    return str(bad_file)
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    problem = match and config_lib.override_problem(config, match.group(1), spec)
    if problem:
      return problem
  message = str(error or "the config did not load").strip().splitlines()[0]
  if message.startswith("flag --workdir=None"):
    return "--workdir is required: pass the directory for the outputs, e.g. --workdir=runs/x"
  field = re.match(r"flag --config\.([\w.]+)=", message)
  if field:   # a value of the wrong type: say what the field holds
    value = config
    for name in field.group(1).split("."):
      value = value[name]
    message += (f": {field.group(1)} takes {type(value).__name__} values (the config file has"
                f" {value!r})")
  return message


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error of --config and --config.<field> as one line."""
  try:
    rest = flags.FLAGS(argv)
    # ml_collections defers an unreadable config file's error to the first use of the config.
    if isinstance(_CONFIG.value, ml_collections.ConfigDict):
      return rest
    error = None
  except Exception as parse_error:  # the config file runs here: whatever it raises is bad input
    error = parse_error
  sys.exit(f"config error: {_explain(error, argv)}")


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
    if not _LIST.value:    # listing a sweep (someone else's, read-only) writes nothing
      check_workdir(_WORKDIR.value)
    if _DISTRIBUTED.value or _COORDINATOR.value:
      import jax
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _CACHE.value:
      import jax
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from scaling import sweep
    sweep.main(_CONFIG.value, _WORKDIR.value, trial=_TRIAL.value, list_only=_LIST.value)
  except ConfigError as error:  # bad input: one line naming the field and the fix
    sys.exit(f"config error: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
