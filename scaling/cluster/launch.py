"""Slurm jobs from a config: one sbatch array per sweep, one array task per unfinished trial.

    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/sweep           # write
    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/sweep --submit # sbatch
    python -m scaling.launch --config=configs/mnist_sweep.py --workdir=runs/x --dry_run     # print

The config's `cluster` section (configs/mnist.py) says what a trial gets; `--config.cluster.*`
overrides it like any field, and every other `--config.*` override is passed on to the trials.
scaling/cluster/sbatch.py renders the script from the cluster section; it goes to
`<workdir>/slurm/sweep.sbatch` and each task logs to `<workdir>/slurm/trial-<index>.job-<array
job>.log`. Each task runs `python -m scaling.main
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
import os
import shutil
import subprocess
import sys

from scaling.cluster.sbatch import Cluster, check_paths, read_cluster, sbatch_script
from scaling.config import ConfigError, check_workdir

# Filesystems that other nodes can see (the workdir of a multi-node trial must be on one).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph",
                      "fuse.ceph", "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.sshfs")


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
  from scaling import sweep
  from scaling.training import train, vectorized   # imports JAX: after the cheap checks
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
