"""A config's `cluster` section -> the sbatch array script of a sweep (scaling/cluster/launch.py writes and
submits it).

`read_cluster` checks every value that goes into the script: each must stay one value on its line
(a line break would be a bare shell line that ends sbatch's reading of the #SBATCH directives; a
space splits an #SBATCH argument), `cluster.time` is Slurm's syntax with minutes and seconds under
60, `setup` one complete shell line. `sbatch_script` renders the array: one task per trial index,
`--signal` before the time limit, `--requeue` after a preemption exit.
"""
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import subprocess

from scaling.config import ConfigError

PREEMPTED_EXIT = 143   # 128 + SIGTERM: what a trial exits with after its preemption checkpoint
# Slurm's --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")
# Slurm's --mem: a number, in MB or with a unit K, M, G or T.
_MEM = re.compile(r"[0-9]+(?:[KMGTkmgt][Bb]?)?")
# What sbatch itself reads in an #SBATCH line: it splits the line at whitespace, takes quotes and
# backslashes away and ends it at a '#' (src/sbatch/opt.c, _get_argument).
_SBATCH_SPECIAL = " \"'#\\"


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The config's `cluster` section, checked (fields documented in configs/mnist.py)."""
  partition: str
  account: str
  time: str
  nodes: int
  tasks_per_node: int
  gpus_per_node: int
  cpus_per_task: int
  mem: str
  max_running: int
  signal_seconds: int
  max_requeues: int
  extra_sbatch: tuple
  setup: str
  python: str

  @property
  def processes(self) -> int:
    return self.nodes * self.tasks_per_node


def time_limit_seconds(time: str) -> int:
  """Slurm's --time syntax -> seconds; ConfigError when it is not that syntax, or when a minutes
  or seconds field is over 59 (hours over 23 after 'days-'): Slurm would carry it silently into
  the next unit, and `25:99:99` is a typo more often than 26:40:39."""
  match = _TIME.fullmatch(time)
  if not match:
    raise ConfigError(f"cluster.time={time!r} is not a Slurm time limit: use MM, HH:MM:SS or"
                      " D-HH:MM:SS (e.g. '04:00:00')")
  days, *parts = match.groups()
  parts = [int(p) for p in parts if p is not None]
  with_days = days is not None
  if with_days:            # D-HH[:MM[:SS]]
    days, (hours, minutes, seconds) = int(days), parts + [0] * (3 - len(parts))
  elif len(parts) == 3:    # HH:MM:SS
    days, (hours, minutes, seconds) = 0, parts
  else:                    # MM or MM:SS: any number of minutes
    days, hours, (minutes, seconds) = 0, 0, parts + [0] * (2 - len(parts))
  total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
  bounded = [("seconds", seconds, 60)]
  if with_days or len(parts) == 3:
    bounded.insert(0, ("minutes", minutes, 60))
  if with_days:
    bounded.insert(0, ("hours", hours, 24))
  for unit, value, limit in bounded:
    if value >= limit:
      d, rest = divmod(total, 86400)
      same = f"{d}-{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60:02d}"
      raise ConfigError(f"cluster.time={time!r} has {unit}={value}, over {limit - 1}: fix the"
                        f" typo, or write {same!r} if that is the limit you mean")
  return total


def check_printable(what: str, value: str, fix: str) -> None:
  """A line break (or another non-printing character) would end the script's line it is written
  on; in the header, a bare shell line there ends sbatch's reading of the #SBATCH directives."""
  bad = next((ch for ch in value if not ch.isprintable()), None)
  if bad is not None:
    raise ConfigError(f"{what}={value!r} has the non-printing character {bad!r}, which would"
                      f" break the sbatch script's lines: {fix}")


def check_sbatch_value(what: str, value: str, fix: str) -> None:
  """A value written bare into an #SBATCH line (a Slurm name or option): sbatch must read it as
  one argument, unchanged."""
  check_printable(what, value, fix)
  bad = next((ch for ch in value if ch in _SBATCH_SPECIAL), None)
  if bad is not None:
    raise ConfigError(f"{what}={value!r} has {bad!r}: sbatch splits #SBATCH lines at spaces and"
                      f" reads quotes, backslashes and '#' itself; {fix}")


def check_setup(setup: str) -> None:
  """`setup` is one line of the script's body, right before the trial's srun step: it may hold
  spaces, quotes, `&&`, but must end there, so that the srun step and the requeue after it stay
  the script's own lines."""
  fix = "give one line of shell, several commands joined with ' && '"
  check_printable("cluster.setup", setup, fix)
  if setup.rstrip().endswith("\\"):
    raise ConfigError(f"cluster.setup={setup!r} ends in a backslash, which would join the trial's"
                      " srun line to it: remove the backslash")
  bash = shutil.which("bash")
  if bash and setup.strip():   # an open quote, `(` or `if` would swallow the lines after it
    result = subprocess.run([bash, "-n"], input=setup + "\n", capture_output=True, text=True,
                            timeout=60)
    if result.returncode:
      reason = " ".join(result.stderr.strip().splitlines()[-1:])
      raise ConfigError(f"cluster.setup={setup!r} is not one complete shell command (bash -n:"
                        f" {reason}): close its quotes, brackets and `if`s")


def read_cluster(config) -> Cluster:
  """config.cluster -> Cluster; a missing field or a value Slurm would refuse, or that would break
  the sbatch script (a line break, a space in a name), is a ConfigError."""
  if "cluster" not in config:
    raise ConfigError("the config has no cluster section: add one like configs/mnist.py's"
                      " (c.cluster = ConfigDict(dict(time=..., nodes=..., ...)))")
  section = config.cluster
  values = {}
  for field in dataclasses.fields(Cluster):
    if field.name not in section:
      raise ConfigError(f"cluster.{field.name} is missing from the config's cluster section:"
                        " add it (every field is documented in configs/mnist.py)")
    value = values[field.name] = section[field.name]
    if field.type is int and (not isinstance(value, int) or isinstance(value, bool)):
      raise ConfigError(f"cluster.{field.name}={value!r} must be an integer")
    if field.type is str and not isinstance(value, str):
      raise ConfigError(f"cluster.{field.name}={value!r} must be a string (configs/mnist.py says"
                        " what an empty one means)")
  cluster = Cluster(**values)
  limit = time_limit_seconds(cluster.time)
  if limit <= 0:
    raise ConfigError(f"cluster.time={cluster.time!r} is zero: give each trial a time limit")
  for name in ("nodes", "tasks_per_node", "cpus_per_task"):
    if getattr(cluster, name) < 1:
      raise ConfigError(f"cluster.{name}={getattr(cluster, name)} must be >= 1")
  for name in ("gpus_per_node", "max_running", "signal_seconds", "max_requeues"):
    if getattr(cluster, name) < 0:
      raise ConfigError(f"cluster.{name}={getattr(cluster, name)} must be >= 0")
  if cluster.signal_seconds >= limit:
    raise ConfigError(f"cluster.signal_seconds={cluster.signal_seconds} is not shorter than"
                      f" cluster.time={cluster.time!r} ({limit} s): lower it or raise the limit")
  gpus, tasks = cluster.gpus_per_node, cluster.tasks_per_node
  if cluster.processes > 1 and gpus and tasks != gpus:
    # JAX on Slurm gives each process the one GPU numbered $SLURM_LOCALID.
    raise ConfigError(f"cluster.tasks_per_node={cluster.tasks_per_node} with gpus_per_node="
                      f"{cluster.gpus_per_node}: a multi-process trial runs one process per GPU,"
                      " set tasks_per_node = gpus_per_node")
  check_sbatch_value("cluster.partition", cluster.partition, "name partitions as `sinfo` lists"
                     " them, several as a comma list ('gpu,debug')")
  check_sbatch_value("cluster.account", cluster.account, "name one account as `sacctmgr show"
                     " associations user=$USER` lists it")
  if cluster.mem and not _MEM.fullmatch(cluster.mem):
    raise ConfigError(f"cluster.mem={cluster.mem!r} is not a Slurm memory size: use a number with"
                      " K, M, G or T ('64G'; a number alone is MB) or '' for the partition's"
                      " default")
  if not isinstance(cluster.extra_sbatch, (tuple, list)):
    raise ConfigError(f"cluster.extra_sbatch={cluster.extra_sbatch!r} must be a tuple of sbatch"
                      " options, e.g. ('--qos=high', '--constraint=a100')")
  for i, option in enumerate(cluster.extra_sbatch):
    what = f"cluster.extra_sbatch[{i}]"
    if not isinstance(option, str) or not option.startswith("-"):
      raise ConfigError(f"{what}={option!r} is not an sbatch option: write it as on sbatch's"
                        " command line, e.g. '--qos=high'")
    check_sbatch_value(what, option, "give one option per item, e.g. ('--qos=high',"
                       " '--constraint=a100'), values without spaces")
  check_setup(cluster.setup)
  check_printable("cluster.python", cluster.python, "name the compute nodes' interpreter")
  if not cluster.python.strip():
    raise ConfigError("cluster.python is empty: name the compute nodes' interpreter ('python3')")
  return cluster


def array_spec(indices: list[int], max_running: int) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (+ '%N': at most N tasks at once)."""
  ranges, start = [], None
  for i, index in enumerate(indices):
    start = index if start is None else start
    if i + 1 == len(indices) or indices[i + 1] != index + 1:
      ranges.append(str(index) if index == start else f"{start}-{index}")
      start = None
  return ",".join(ranges) + (f"%{max_running}" if max_running else "")


def override_args(overrides: dict) -> list[str]:
  """The command line's --config.* overrides (except cluster.*), as the trials' flags."""
  args = []
  for key, value in overrides.items():
    if key == "cluster" or key.startswith("cluster."):
      continue
    text = value if isinstance(value, str) else repr(value)   # tuples parse back from repr
    args.append(f"--config.{key}={text}")
  return args


def trial_command(cluster: Cluster, config_path: str, workdir: str, overrides: dict) -> str:
  """The srun step of one trial: the array task's index is the trial's index."""
  srun = ["srun", f"--nodes={cluster.nodes}", f"--ntasks-per-node={cluster.tasks_per_node}",
          f"--cpus-per-task={cluster.cpus_per_task}",
          # One failed process fails the step instead of leaving the others in a collective.
          "--kill-on-bad-exit=1"]
  main = [cluster.python, "-m", "scaling.main", f"--config={config_path}",
          f"--workdir={workdir}", *override_args(overrides)]
  if cluster.processes > 1:
    main.append("--distributed")
  return " ".join(shlex.quote(a) for a in srun + main) + ' --trial="$SLURM_ARRAY_TASK_ID"'


def sbatch_word(value: str) -> str:
  """`value` as one argument of an #SBATCH line, as sbatch reads it back: in double quotes with a
  backslash before each quote, backslash and '#' where it has any of those or a space (a line
  break cannot be quoted there: check_printable refuses it first)."""
  if not any(ch in _SBATCH_SPECIAL for ch in value):
    return value
  return '"' + re.sub(r"([\"'#\\])", r"\\\1", value) + '"'


def check_paths(workdir: str, config_path: str, chdir: str) -> None:
  """The paths that the script holds: none may break its lines, and a backslash in the log path
  would stop Slurm from filling in its %a and %A."""
  check_printable("--workdir", workdir, "choose a --workdir without one")
  check_printable("--config", config_path, "rename the config file")
  check_printable("the current directory", chdir, "run the launcher from a directory whose path"
                  " has none")
  if "\\" in os.path.abspath(workdir):
    raise ConfigError(f"--workdir={os.path.abspath(workdir)!r} has a backslash, which stops Slurm"
                      " from naming the trials' logs (%a, %A): choose a --workdir without one")


def sbatch_script(cluster: Cluster, *, job_name: str, indices: list[int], num_trials: int,
                  config_path: str, workdir: str, overrides: dict, chdir: str) -> str:
  """The sbatch array script: every #SBATCH line, the setup, the srun step, the requeue."""
  log = os.path.join(workdir.replace("%", "%%"), "slurm", "trial-%a.job-%A.log")   # %% = '%'
  options = [f"--job-name={sbatch_word(job_name)}",
             f"--array={array_spec(indices, cluster.max_running)}",
             f"--output={sbatch_word(log)}",
             "--open-mode=append",          # a requeued task appends to the same log
             f"--chdir={sbatch_word(chdir)}",   # where `configs` imports from
             f"--time={cluster.time}", f"--nodes={cluster.nodes}",
             f"--ntasks-per-node={cluster.tasks_per_node}",
             f"--cpus-per-task={cluster.cpus_per_task}"]
  if cluster.gpus_per_node:
    options.append(f"--gpus-per-node={cluster.gpus_per_node}")
  if cluster.mem:
    options.append(f"--mem={cluster.mem}")
  if cluster.partition:
    options.append(f"--partition={cluster.partition}")
  if cluster.account:
    options.append(f"--account={cluster.account}")
  if cluster.signal_seconds:
    # No 'B:': the signal goes to the srun step (the trial), not to this shell.
    options.append(f"--signal=TERM@{cluster.signal_seconds}")
  options.append("--requeue")
  options.extend(cluster.extra_sbatch)
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [
      "#!/bin/bash",
      f"# Written by `python -m scaling.launch` at {now}: {len(indices)} unfinished of the"
      f" {num_trials} trial(s)",
      f"# of {config_path}. Run the launcher again to submit the trials still unfinished.",
      *(f"#SBATCH {option}" for option in options),
      "",
      'echo "$(date -u +%FT%TZ) trial $SLURM_ARRAY_TASK_ID: job ${SLURM_ARRAY_JOB_ID}_'
      '${SLURM_ARRAY_TASK_ID} on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"',
  ]
  if cluster.setup.strip():
    lines.append(cluster.setup.strip())
  lines += [
      trial_command(cluster, config_path, workdir, overrides),
      "code=$?",
      f"# {PREEMPTED_EXIT} = 128 + SIGTERM: the trial saved a checkpoint and stopped (time limit",
      "# near, scancel --signal=TERM, preemption). Requeue this task: it resumes from there.",
      f'if [ "$code" -eq {PREEMPTED_EXIT} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt'
      f' {cluster.max_requeues} ]; then',
      '  echo "$(date -u +%FT%TZ) trial $SLURM_ARRAY_TASK_ID preempted: requeued"',
      '  scontrol requeue "$SLURM_JOB_ID"',
      "fi",
      'exit "$code"',
      "",
  ]
  return "\n".join(lines)
