"""The default single trial: Shallue et al. 2018's simple CNN on MNIST, momentum SGD with warmup.

    python -m scaling.main --config=configs/mnist.py --workdir=runs/mnist
    python -m scaling.main --config=configs/mnist.py --workdir=runs/x \\
        --config.batch_size=2048 --config.lr_rule=sqrt

Expected: about 99% test accuracy after 3 epochs (validation error under 1%, Shallue's target).
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = ml_collections.ConfigDict(dict(
      name="mnist",           # mnist | fashion_mnist | digits | mnist_tiny | any prepared TFDS name
      data_dir="",            # '' = $TFDS_DATA_DIR, else TFDS's default
      validation_size=5000,   # held out from the end of train (Shallue et al.)
      train_size=0,           # 0 = all remaining training examples
      # Training set on every device (fast, small sets) or read per batch from the data set's
      # array_record files on the host (scaling/data/host.py): auto | device | host. auto = host
      # when the training set exceeds device_fraction of one device's memory.
      placement="auto",
      device_fraction=0.25,
  ))
  c.model = ml_collections.ConfigDict(dict(name="cnn", widths=(512, 512), batch_norm=False))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="momentum",        # sgd | momentum | nesterov | adam | adamw | lars | lamb
      momentum=0.9, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, trust_coefficient=0.001))

  # The object of study: lr = base_lr * (batch_size / reference_batch_size) ** power * lr_multiplier.
  c.batch_size = 128
  c.base_lr = 0.02
  c.reference_batch_size = 128
  c.lr_rule = "linear"        # none | sqrt | linear | power (then lr_power is the exponent)
  c.lr_power = 1.0
  c.lr_multiplier = 1.0       # times the rule's LR: sweep it to tune the LR at every batch size
  # Durations are {length, unit} with unit steps | epochs | examples, turned into steps once.
  c.warmup = ml_collections.ConfigDict(dict(length=0.5, unit="epochs", init_fraction=0.0))
  c.decay = ml_collections.ConfigDict(dict(
      name="cosine",          # constant | cosine | linear | step
      final_fraction=0.0, boundaries=(0.5, 0.75), factor=0.1))
  c.budget = ml_collections.ConfigDict(dict(length=3.0, unit="epochs"))

  # Random crops of the image padded by crop_padding pixels, left-right flips: on the device,
  # inside the jitted step, from (seed, step). Off for digits (a flipped digit is another symbol).
  c.augment = ml_collections.ConfigDict(dict(crop_padding=0, flip=False))

  c.target = ml_collections.ConfigDict(dict(metric="valid/error", value=0.01, stop_at_target=False))
  # Diverged = a non-finite training loss, or one above loss_multiple x the first step's loss
  # (0 = only non-finite). 100: the initial cross-entropy is ~ln(classes) = 2.3, so 230 means
  # logits wrong by hundreds, which no trial comes back from; healthy high-LR trials spike only
  # a few times their initial loss (warmup, catapult phase), far below it.
  c.divergence = ml_collections.ConfigDict(dict(loss_multiple=100.0))
  c.eval_every = ml_collections.ConfigDict(dict(length=0.25, unit="epochs"))
  c.eval_at_start = False
  c.eval_batch_size = 1000
  c.train_eval_size = 5000    # fixed train subset evaluated like valid/test: generalization gap
  c.log_every_steps = 50

  c.num_devices = 0           # 0 = every visible device
  # The noise scale's small batch is B/G with G = grad_groups rounded up to a multiple of the
  # device count (and of accumulation_steps): config.json's derived.microbatching has the G used.
  # The CNN/MLP's BN statistics are per group of B/G; the ResNet's per model.ghost_batch_size.
  c.grad_groups = 8
  c.accumulation_steps = 1    # K > 1: the groups run as K sequential steps (memory / K, slower on CPU)
  c.chunk_steps = 4           # training steps per dispatch (one lax.scan)
  c.chunk_unroll = True       # unroll it: XLA:CPU runs convolutions in loops ~10x slower
  # Sweeps: train up to this many trials that differ only in seed, base_lr or lr_multiplier in
  # one vmapped program (scaling/training/vectorized.py); each still writes its own directory. 0 or 1: off.
  c.vectorize_trials = 0

  c.noise_scale = ml_collections.ConfigDict(dict(ema_decay=0.99))
  # Sharpness of the training loss on a fixed train subset (eval-mode BN), at the end of the trial
  # and every `every_steps` (0 = only at the end); the density only at the end. Off for this CNN
  # on CPU: the estimators iterate in lax loops, where XLA:CPU runs convolutions 15-40x slower;
  # `unroll` traces the loops into straight-line code instead (fast, but long to compile).
  # On for the MLP sweep (configs/mnist_sweep.py) and meant for accelerators.
  c.curvature = ml_collections.ConfigDict(dict(
      enabled=False, every_steps=0, subset_size=1024, unroll=False,
      # What the every_steps measurements compute: 'all', or 'top_eigenvalue' (warm-started
      # Lanczos only: cheap enough to follow the sharpness every few steps, Cohen et al. 2021).
      # At the target and at the end everything is measured.
      scheduled="all",
      # Hutchinson: stop at standard error <= trace_tol * |trace|, after min_probes, at most
      # max_probes (whole chunks of probe_chunk).
      max_probes=100, probe_chunk=10, trace_tol=0.05, min_probes=20,
      lanczos_steps=20, top_k=3,                            # top eigenvalues
      sharpness_eps=1e-3, sharpness_steps=10,               # Keskar et al.'s epsilon-sharpness
      density=True, density_starts=4, density_steps=30))    # stochastic Lanczos quadrature
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, asynchronous=True))
  # Slurm jobs from this config (`python -m scaling.launch`, README "Clusters"): one array task
  # per unfinished trial, each trial one `srun` step of nodes x tasks_per_node processes (more
  # than one: jax.distributed, coordinator and rank from Slurm's environment). Only the launcher
  # reads it; a trial's numbers never depend on it.
  c.cluster = ml_collections.ConfigDict(dict(
      partition="",           # '' = the cluster's default partition
      account="",             # '' = your default account
      time="04:00:00",        # time limit per trial (Slurm's --time: MM, HH:MM:SS or D-HH:MM:SS)
      nodes=1,                # nodes per trial
      tasks_per_node=1,       # processes per node: 1, or one per GPU (then = gpus_per_node)
      gpus_per_node=0,        # every task sees all of them; JAX takes GPU number $SLURM_LOCALID
      cpus_per_task=4,
      mem="",                 # memory per node, e.g. '64G'; '' = the partition's default
      max_running=8,          # array tasks (trials) running at once; 0 = no limit
      signal_seconds=300,     # SIGTERM this long before the time limit: checkpoint, then requeue
      max_requeues=20,        # a trial preempted more often than this stays stopped (a loop guard)
      extra_sbatch=(),        # more sbatch options, e.g. ('--qos=high', '--constraint=a100')
      setup="",               # shell run before each trial: module load ..., source venv/bin/activate
      python="python3",       # the interpreter on the compute nodes (after setup)
  ))
  # Sweep axes mirror the config's fields; every leaf is a tuple of values (see configs/mnist_sweep.py).
  c.sweep = ml_collections.ConfigDict()       # grid axes; empty: a single trial in the workdir
  c.sweep_zip = ml_collections.ConfigDict()   # equal-length axes that vary together
  return c
