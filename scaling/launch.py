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
"""
import dataclasses
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys

from scaling.config import ConfigError, check_fields

PREEMPTED_EXIT = 143   # 128 + SIGTERM: what a trial exits with after its preemption checkpoint
# Filesystems that other nodes can see (the workdir of a multi-node trial must be on one).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph",
                      "fuse.ceph", "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.sshfs")
# Slurm's --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


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
  """Slurm's --time syntax -> seconds; ConfigError when it is not that syntax."""
  match = _TIME.match(time.strip())
  if not match:
    raise ConfigError(f"cluster.time={time!r} is not a Slurm time limit: use MM, HH:MM:SS or"
                      " D-HH:MM:SS (e.g. '04:00:00')")
  days, *parts = match.groups()
  parts = [int(p) for p in parts if p is not None]
  if days is not None:   # D-HH[:MM[:SS]]
    parts += [0] * (3 - len(parts))
    hours, minutes, seconds = parts
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
  if len(parts) == 1:    # minutes
    return parts[0] * 60
  if len(parts) == 2:    # MM:SS
    return parts[0] * 60 + parts[1]
  return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def read_cluster(config) -> Cluster:
  """config.cluster -> Cluster; a missing field or a value Slurm would refuse is a ConfigError."""
  if "cluster" not in config:
    raise ConfigError("the config has no cluster section: add one like configs/mnist.py's"
                      " (c.cluster = ConfigDict(dict(time=..., nodes=..., ...)))")
  section = config.cluster
  values = {}
  for field in dataclasses.fields(Cluster):
    if field.name not in section:
      raise ConfigError(f"cluster.{field.name} is missing from the config's cluster section:"
                        " add it (every field is documented in configs/mnist.py)")
    values[field.name] = section[field.name]
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


def sbatch_script(cluster: Cluster, *, job_name: str, indices: list[int], num_trials: int,
                  config_path: str, workdir: str, overrides: dict, chdir: str) -> str:
  """The sbatch array script: every #SBATCH line, the setup, the srun step, the requeue."""
  options = [f"--job-name={job_name}", f"--array={array_spec(indices, cluster.max_running)}",
             f"--output={os.path.join(workdir, 'slurm', 'trial-%a.job-%A.log')}",
             "--open-mode=append",          # a requeued task appends to the same log
             f"--chdir={chdir}",            # where `configs` imports from
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


def unfinished_trials(config, workdir: str):
  """(every trial of the sweep, those not done or diverged), from the trials' summary.json.
  Every trial's fields are checked first (no data, no devices: a login node can): a bad value
  fails here, not in every array task."""
  from scaling import sweep   # imports JAX: after the cheap checks
  trials = sweep.expand(config, workdir)
  for t in trials:
    try:
      check_fields(t.config)
    except ConfigError as error:
      prefix = f"trial {t.index} ({t.id}): " if t.overrides else ""
      raise ConfigError(prefix + str(error)) from None
  pending = [t for t in trials
             if (sweep.read_summary(t.directory) or {}).get("status") not in sweep.FINISHED]
  return trials, pending


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
  workdir, config_path = os.path.abspath(workdir), os.path.abspath(config_path)
  warning = shared_filesystem_warning(workdir, cluster.nodes)
  if warning:
    print(warning, file=sys.stderr)
  trials, pending = unfinished_trials(config, workdir)
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
  from absl import flags
  from ml_collections import config_flags
  del argv
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
