"""Slurm jobs from a config: one sbatch array per sweep, one array task per unfinished trial.

    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/sweep           # write
    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/sweep --submit # sbatch
    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/x --dry_run     # print

The config's `cluster` section (configs/mnist.py) says what a trial gets; `--config.cluster.*`
overrides it like any field, and every other `--config.*` override is passed on to the trials.
The script goes to `<workdir>/slurm/sweep.sbatch` and each task logs to
`<workdir>/slurm/trial-<index>.job-<array job>.log`. Each task runs `python -m scaling.main
--trial=$SLURM_ARRAY_TASK_ID` as one `srun` step: one process, or nodes x tasks_per_node
processes that find their coordinator and rank in Slurm's environment (`--distributed`).
`--signal` sends the trial SIGTERM `signal_seconds` before its time limit: it saves a checkpoint
and exits with 143 (loop.Preempted), and the task requeues itself (`--requeue`) to resume from
it; `scancel --signal=TERM JOB_TASK` does the same by hand. Running the launcher again submits
only the trials that are not done or diverged.

Before it writes or submits anything, every trial passes the checks that `scaling.main` makes
before it trains (on the devices the cluster section gives a trial, not this machine's), and every
value that goes into the script must stay one value on its line: a bad one is one line,
`config error: ...`, instead of a script whose every task fails or runs what it should not.
"""
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys

from scaling.config import ConfigError, check_workdir

PREEMPTED_EXIT = 143   # 128 + SIGTERM: what a trial exits with after its preemption checkpoint
# Filesystems that other nodes can see (the workdir of a multi-node trial must be on one).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph",
                      "fuse.ceph", "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.sshfs")
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


def filesystem_type(path: str) -> str | None:
  """The type of the filesystem holding `path` (from /proc/mounts), None where unknown."""
  try:
    with open("/proc/mounts") as f:
      mounts = [line.split()[1:3] for line in f]
  except OSError:
    return None
  path = os.path.realpath(path)
  best, fstype = "", None
  for mount_point, kind in mounts:
    mount_point = mount_point.replace("\\040", " ")
    inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
    if inside and len(mount_point) >= len(best):
      best, fstype = mount_point, kind
  return fstype


def shared_filesystem_warning(workdir: str, nodes: int) -> str | None:
  """A one-line warning when a multi-node trial's workdir may be invisible to the other nodes."""
  if nodes <= 1:
    return None
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing) or "."
  fstype = filesystem_type(existing)
  if fstype in SHARED_FILESYSTEMS:
    return None
  what = f"a local filesystem ({fstype})" if fstype else "a filesystem of unknown type"
  return (f"warning: {workdir} is on {what}: with cluster.nodes={nodes} every node writes and"
          " reads it, put the workdir on a shared filesystem (NFS, Lustre, GPFS, ...)")


def trial_devices(config, cluster: Cluster) -> int:
  """The size of a trial's mesh on the compute nodes, which the trials are checked against here.
  This machine's devices do not say it (a login node often has none of the nodes' GPUs); the
  cluster section does where it asks for GPUs: nodes x gpus_per_node, one process per GPU or one
  process with all of a node's. Without GPUs a trial runs on CPU devices, as many per process as
  this process has: sbatch passes this environment (XLA_FLAGS with it) on to the tasks. What the
  section cannot say (a `setup` that sets XLA_FLAGS, GPUs asked for in extra_sbatch) is checked
  again by each trial at its start."""
  from scaling import sharding   # imports JAX: after the cheap checks
  if not cluster.gpus_per_node and cluster.processes == 1:
    return sharding.make_mesh(config.num_devices).size   # exactly scaling.main's mesh
  import jax
  if cluster.gpus_per_node:
    visible = cluster.nodes * cluster.gpus_per_node
    what = f"cluster.nodes={cluster.nodes} x cluster.gpus_per_node={cluster.gpus_per_node}"
  else:
    visible = cluster.processes * jax.local_device_count()
    what = (f"{cluster.processes} processes (cluster.nodes x cluster.tasks_per_node) x"
            f" {jax.local_device_count()} CPU devices")
  if config.num_devices > visible:
    raise ConfigError(f"num_devices={config.num_devices} but a trial has {visible} devices"
                      f" ({what}): use num_devices <= {visible} (0 = all), or more nodes or GPUs")
  return config.num_devices or visible


def checked_trials(config, workdir: str, cluster: Cluster) -> list:
  """Every trial of the sweep, through the checks scaling.main makes before it trains (the calls
  of sweep.main: expand, the mesh, the data, validate, vectorized.check_sweep), on the trial's
  devices: a bad value fails here, once, not at the start of every array task."""
  from scaling import sweep, train, vectorized   # imports JAX: after the cheap checks
  trials = sweep.expand(config, workdir)
  devices = trial_devices(config, cluster)
  splits = train.load_data(config)
  sweep.validate(trials, splits.num_train, devices)
  vectorized.check_sweep(config, splits)
  for t in trials:   # what each task would refuse at its start: a changed config, damaged files
    sweep.check_trial_directory(t)
  sweep.check_sweep_unchanged(trials, trials, workdir)
  return trials


def unfinished_trials(trials: list) -> list:
  """Those of `trials` not done or diverged, from their summary.json."""
  from scaling import sweep
  return [t for t in trials
          if (sweep.read_summary(t.directory) or {}).get("status") not in sweep.FINISHED]


def submit(script_path: str) -> str:
  """sbatch -> the array's job id."""
  result = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True,
                          timeout=120)
  if result.returncode:
    raise ConfigError(f"sbatch refused {script_path}: {result.stderr.strip()}")
  return result.stdout.strip().split(";")[0]


def launch(config, config_path: str, workdir: str, overrides: dict, *, submit_job: bool = False,
           dry_run: bool = False) -> str | None:
  """Writes (unless dry_run) and prints the script; returns the job id when submitted."""
  cluster = read_cluster(config)
  if submit_job and not dry_run and not shutil.which("sbatch"):
    raise ConfigError("sbatch is not on PATH: run this on a Slurm login node, install Slurm's"
                      " client (Debian: apt-get install slurm-client), or use --dry_run to print"
                      " the script")
  if not workdir:
    raise ConfigError("--workdir is empty: give the sweep's directory, e.g. --workdir=runs/x")
  if not dry_run:   # --dry_run writes nothing, so it may print the script of anyone's workdir
    check_workdir(workdir)
  check_paths(workdir, config_path, os.getcwd())
  workdir, config_path = os.path.abspath(workdir), os.path.abspath(config_path)
  trials = checked_trials(config, workdir, cluster)
  warning = shared_filesystem_warning(workdir, cluster.nodes)
  if warning:
    print(warning, file=sys.stderr)
  pending = unfinished_trials(trials)
  if not pending:
    print(f"all {len(trials)} trial(s) in {workdir} are done or diverged: nothing to submit")
    return None
  job_name = "scaling-" + os.path.basename(workdir.rstrip("/"))
  script = sbatch_script(cluster, job_name=job_name, indices=[t.index for t in pending],
                         num_trials=len(trials), config_path=config_path, workdir=workdir,
                         overrides=overrides, chdir=os.getcwd())
  print(script, end="")
  if dry_run:
    return None
  path = os.path.join(workdir, "slurm", "sweep.sbatch")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}")
  if not submit_job:
    print(f"submit it with: sbatch {path}   (or rerun with --submit)")
    return None
  job = submit(path)
  running = f", {cluster.max_running} at a time" if cluster.max_running else ""
  print(f"submitted job {job}: {len(pending)} trial(s){running}; logs in"
        f" {os.path.dirname(path)}; progress: python -m scaling.status --workdir={workdir}")
  return job


def check_slurm_processes(environ, num_processes: int | None) -> None:
  """Before jax.distributed.initialize() inside a Slurm job: the processes must be Slurm's tasks,
  else initialize() waits minutes for processes that never come."""
  if "SLURM_JOB_ID" not in environ:
    return
  if "SLURM_STEP_ID" not in environ:
    raise ConfigError("--distributed inside a Slurm job but outside srun: start one process per"
                      " task with `srun python -m scaling.main ... --distributed`"
                      " (python -m scaling.launch writes that script)")
  tasks = int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")))
  if num_processes is not None and num_processes != tasks:
    raise ConfigError(f"--num_processes={num_processes} but Slurm started {tasks} task(s) for this"
                      " step: drop --num_processes (read from Slurm) or"
                      f" srun --ntasks={num_processes}")


def main(argv):
  from absl import flags, logging
  from ml_collections import config_flags
  del argv
  logging.set_verbosity(logging.WARNING)   # as scaling.main: TFDS logs every data set it opens
  config_flag = flags.FLAGS["config"]
  try:
    launch(config_flag.value, config_flags.get_config_filename(config_flag), flags.FLAGS.workdir,
           config_flags.get_override_values(config_flag), submit_job=flags.FLAGS.submit,
           dry_run=flags.FLAGS.dry_run)
  except ConfigError as error:  # bad input: one line naming the field and the fix
    sys.exit(f"config error: {error}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  from scaling import config as config_lib
  config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The sweep's directory: shared by every node.")
  flags.DEFINE_bool("submit", False, "Submit the script with sbatch and print the job id.")
  flags.DEFINE_bool("dry_run", False, "Only print the script: write and submit nothing.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=config_lib.parse_flags)
