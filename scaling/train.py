"""One trial: config -> data -> model -> jitted step loop -> metrics -> checkpoints -> summary.json.

`run(config, workdir)` is the whole trial. The training data live on the devices (replicated; they
are small), each epoch's order is a device-side permutation from (seed, epoch) made at the epoch's
first step and carried between chunks, and `chunk_steps` steps run per dispatch in one loop, so
Python overhead does not dominate small batches.
Per-step metrics stay on the device until the next evaluation, so dispatch never waits for them.
`chunk_unroll` unrolls that scan: XLA:CPU runs convolutions inside a loop ~10x slower than
unrolled (measured, benchmarks/bench_step.py), and inside a lax.cond as slowly, so CNN configs on
CPU unroll short chunks and compile one per distinct length.
A training set too large for that (`dataset.placement`) is read per batch on the host in the same
order instead (scaling/data/host.py: `HostChunk` stands in for the jitted chunk).
"""
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from scaling import checkpoint, data, models, schedule, sharding, step as steplib
from scaling import measure as measure_lib
from scaling import bookkeeping, memory, noise_scale, progress, resources
from scaling import metrics as metrics_lib
from scaling.config import ConfigError, check_fields
from scaling.metrics import write_json


epoch_order = data.host.epoch_order   # one order for both placements of the training set


def gather_examples(arrays, idx_B, data_key, epoch, *, pixel_scale):
  """Examples idx_B of the device-resident (images, labels) -> a float batch."""
  del data_key, epoch   # the order alone decides an image batch
  images_NxX, labels_N = arrays
  return images_NxX[idx_B].astype(jnp.float32) * pixel_scale, labels_N[idx_B]


@flax.struct.dataclass
class TrialInputs:
  """What differs between the trials of an LR grid or of several seeds without changing a shape:
  arguments of the compiled chunk, not constants baked into it, so those trials share one
  compilation (in-process and in the persistent cache)."""
  peak_lr: jax.Array       # float32 scalar: plan.lr; the step scales the schedule's shape by it
  data_key: jax.Array      # each epoch's order
  augment_key: jax.Array   # the augmentations (folded with the step)
  init_params: object      # the initial parameters: the distance from them is logged

  @classmethod
  def of(cls, plan: schedule.Plan, seed: int, init_params) -> "TrialInputs":
    return cls(peak_lr=jnp.float32(plan.lr), data_key=jax.random.PRNGKey(seed + 1_000_003),
               augment_key=jax.random.PRNGKey(seed + 2_000_003), init_params=init_params)


def chunk_end_metrics(params, init_params) -> dict:
  """Measured once per chunk (the loop ends a chunk at every log record): the parameter norm and
  the distance from the initial parameters (Hoffer et al. 2017: it grows like log(steps))."""
  return {"param_norm": steplib.param_norm(params),
          "param_distance_from_init": jnp.sqrt(noise_scale.sq_norm(
              jax.tree.map(jnp.subtract, params, init_params)))}


def train_chunk(state, order_N, arrays, inputs: TrialInputs, num_active, *, num_steps,
                num_examples, batch_size, steps_per_epoch, gather, step_fn, shard_batch, unroll):
  """The first `num_active` (a runtime count, at most `num_steps`) of `num_steps` training steps,
  in one program: the shorter chunks at the end of a segment or before a log record reuse the
  compiled chunk instead of compiling one per length. `gather` (per data kind: `gather_examples`,
  `data.text.gather_windows`) builds each batch on the devices from the epoch's order.

  `order_N` is the order of the epoch `state.step` is in (CarriedOrder holds it between chunks);
  a step that starts an epoch makes the next one. Recomputing it at every chunk's start instead
  cost as much as ~8 steps at B = 16 on full MNIST (a shuffle of 55,000 indices).

  Returns the state, the order, the per-step metrics [num_steps] (zeros past num_active) and
  chunk_end_metrics after the last step.
  Rolled (`unroll` false): a loop of num_active iterations. Unrolled (XLA:CPU's convolutions are
  ~10x slower in loops): all num_steps steps, with no lax.cond around them (a step inside a cond
  is as slow as in a loop: 12x for the CNN's step, measured), so the caller passes num_steps =
  num_active (LoopSpec.chunk_length): one program per distinct length, at most chunk_steps.
  """
  n, data_key = num_examples, inputs.data_key

  def one_step(state, order_N):
    pos = state.step % steps_per_epoch
    order_N = jax.lax.cond(pos == 0, lambda: epoch_order(data_key, state.step // steps_per_epoch, n),
                           lambda: order_N)
    # Each device gathers only its own slice of the batch.
    idx_B = shard_batch(jax.lax.dynamic_slice_in_dim(order_N, pos * batch_size, batch_size))
    inputs_BxX, targets_B = gather(arrays, idx_B, data_key, state.step // steps_per_epoch)
    state, metrics = step_fn(state, inputs_BxX, targets_B, inputs.augment_key, inputs.peak_lr)
    return state, order_N, metrics

  zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype),
                       jax.eval_shape(one_step, state, order_N)[2])
  metrics_K = jax.tree.map(lambda z: jnp.zeros((num_steps, *z.shape), z.dtype), zeros)

  def body(i, carry):
    state, order_N, metrics_K = carry
    state, order_N, metrics = one_step(state, order_N)
    return state, order_N, jax.tree.map(lambda buf, m: buf.at[i].set(m), metrics_K, metrics)

  carry = (state, order_N, metrics_K)
  if unroll:
    for i in range(num_steps):
      carry = body(i, carry)
  else:
    carry = jax.lax.fori_loop(0, num_active, body, carry)
  state, order_N, metrics_K = carry
  return state, order_N, metrics_K, chunk_end_metrics(state.params, inputs.init_params)


class CarriedOrder:
  """A jitted chunk (`chunk(state, order, *args, num_steps=...)` -> (state, order, ...)) called
  as `chunk(state, *args, num_steps=...)` -> (state, ...): the epoch's order lives here between
  calls, in the buffers the previous chunk returned, and is computed only at the first call (a
  start or a resume) by `initial_order(state, *args)`."""

  def __init__(self, chunk, initial_order):
    self._chunk, self._initial_order, self._order = chunk, initial_order, None

  def _current(self, state, args):
    if self._order is None:
      self._order = self._initial_order(state, *args)
    return self._order

  def __call__(self, state, *args, num_steps: int):
    state, self._order, *out = self._chunk(state, self._current(state, args), *args,
                                           num_steps=num_steps)
    return (state, *out)

  def lower(self, state, *args, num_steps: int):
    return self._chunk.lower(state, self._current(state, args), *args, num_steps=num_steps)


def initial_order(steps_per_epoch, num_examples, mesh):
  """(state, arrays, inputs, ...) -> the order of the epoch state.step is in, replicated."""
  order = jax.jit(lambda key, step: epoch_order(key, step // steps_per_epoch, num_examples),
                  out_shardings=sharding.replicated(mesh))
  return lambda state, arrays, inputs, *_: order(inputs.data_key, state.step)


def _padded_eval_set(images, labels, eval_batch, mesh):
  """[N, ...] -> [M, E, ...] chunks padded with masked-out examples, sharded on E."""
  n = len(labels)
  m = max(1, math.ceil(n / eval_batch))
  pad = m * eval_batch - n
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  chunked = (images.reshape(m, eval_batch, *images.shape[1:]),
             labels.reshape(m, eval_batch, *labels.shape[1:]),
             mask.reshape(m, eval_batch))
  return sharding.put_eval(chunked, mesh)


def context_length(config) -> int:
  """Tokens per example: the Transformer's context length; 0 for the image models."""
  return config.model.context_length if config.model.name == "transformer" else 0


def load_data(config) -> data.Splits:
  """config.dataset -> Splits; text comes in windows of the Transformer's context length."""
  dataset = config.dataset
  try:
    return data.load(dataset.name, data_dir=dataset.data_dir or None,
                     validation_size=dataset.validation_size, train_size=dataset.train_size or None,
                     context_length=context_length(config), placement=dataset.placement,
                     device_fraction=dataset.device_fraction, head_size=max(
                         config.train_eval_size, config.curvature.subset_size))
  except (ValueError, FileNotFoundError) as error:  # data.load's errors name the field already
    raise ConfigError(str(error)) from None


def check_config(config, num_train: int, num_devices: int) -> schedule.Plan:
  """Every check that needs no training, so that a sweep fails before its first trial starts."""
  check_fields(config)
  micro = microbatching(config, num_devices)
  models.check_microbatch(config.model, micro.microbatch_size)
  if config.augment.crop_padding < 0:
    raise ConfigError(f"augment.crop_padding={config.augment.crop_padding} must be >= 0"
                      " (0 = no crops)")
  if config.chunk_steps < 1:
    raise ConfigError(f"chunk_steps={config.chunk_steps} must be >= 1")
  plan = schedule.make_plan(config, num_train)
  steplib.make_optimizer(config.optimizer, 0.1)
  models.build(config.model, 10)
  return plan


def microbatching(config, num_devices: int) -> steplib.Microbatching:
  return steplib.plan_microbatches(config.batch_size, config.grad_groups,
                                   config.accumulation_steps, num_devices)


def resolved_config(config, plan: schedule.Plan, num_devices: int, num_params: int) -> dict:
  resolved = json.loads(config.to_json_best_effort())
  resolved["derived"] = {**vars(plan), "num_devices": num_devices, "num_params": num_params,
                         "lr_rule_power": plan.lr_power,
                         "microbatching": vars(microbatching(config, num_devices))}
  return resolved


def build(config, splits, mesh):
  """(plan, model, learning-rate schedule, optimizer) of a trial: everything its state depends on."""
  plan = check_config(config, splits.num_train, mesh.size)
  model = models.build(config.model, splits.num_classes)
  lr_fn = schedule.learning_rate_fn(plan, config.decay, config.warmup.init_fraction)
  return plan, model, lr_fn, steplib.make_optimizer(config.optimizer, lr_fn)


def abstract_train_state(config, model, optimizer, splits, mesh):
  """(shapes, dtypes and shardings of the TrainState, its init function of the PRNG key)."""
  init = functools.partial(steplib.init_state, model, optimizer,
                           image_shape=splits.train_images.shape[1:])
  state_sharding = sharding.replicated(mesh)
  abstract_state = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=state_sharding),
      jax.eval_shape(init, jax.random.PRNGKey(config.seed)))
  return abstract_state, init


def step_memory_bytes(config, splits, batch_size: int, accumulation_steps: int | None = None) -> int:
  """Per-device bytes of one compiled training step of `config` at `batch_size` (compile only)."""
  config = config.copy_and_resolve_references()
  config.batch_size = batch_size
  if accumulation_steps is not None:
    config.accumulation_steps = accumulation_steps
  mesh = sharding.make_mesh(config.num_devices)
  _, model, lr_fn, optimizer = build(config, splits, mesh)
  abstract_state, _ = abstract_train_state(config, model, optimizer, splits, mesh)
  step_fn = functools.partial(
      steplib.train_step, apply_fn=model.apply, optimizer=optimizer, lr_fn=lr_fn,
      microbatching=microbatching(config, mesh.size), mesh=mesh, axis=sharding.DATA)
  x_shape = (batch_size, *splits.train_images.shape[1:])
  batch = sharding.batch_sharded(mesh)
  x_dtype = jnp.float32 if splits.train_text is None else splits.train_images.dtype  # tokens
  images = jax.ShapeDtypeStruct(x_shape, x_dtype, sharding=batch)
  labels = jax.ShapeDtypeStruct((batch_size, *splits.train_labels.shape[1:]),
                                splits.train_labels.dtype, sharding=batch)
  m = jax.jit(step_fn, donate_argnums=0).lower(abstract_state, images, labels).compile(
      ).memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def trial_record(config, plan, mesh, splits, abstract_state, trial_id: str,
                 sweep_axes: dict | None) -> dict:
  """What config.json holds: the resolved config, its derived numbers, the trial's name."""
  num_params = models.parameter_count(abstract_state.params)
  resolved = resolved_config(config, plan, mesh.size, num_params)
  if splits.context_length:
    resolved["derived"]["tokens_per_step"] = config.batch_size * splits.context_length
  resolved["derived"]["data_placement"] = "host" if splits.train_source else "device"
  resolved.update(trial_id=trial_id, sweep_axes=dict(sweep_axes or {}))
  return resolved


def start_or_resume(config, workdir: str, resolved: dict, ckpts, abstract_state, fresh_state):
  """(step, state, bookkeeping) from the trial's latest checkpoint, else (0, fresh_state(), new);
  writes config.json and drops metrics.jsonl records past the step this run starts from."""
  restored = None
  if ckpts.steps():
    checkpoint.check_same_run(os.path.join(workdir, "config.json"), resolved)
    restored = ckpts.restore_latest(abstract_state)
  if restored:
    step, state, book = restored
    # Fields added since the checkpoint was written start at their defaults.
    book = {**bookkeeping.new_bookkeeping(config), **book, "status": "running"}
    print(f"resuming {workdir} from step {step} (restore {ckpts.last_restore_seconds:.2f}s)",
          flush=True)
  else:
    step, state, book = 0, fresh_state(), bookkeeping.new_bookkeeping(config)
  # Records past the restored step are rewritten by this run (all of them when starting afresh).
  metrics_lib.truncate_after(os.path.join(workdir, "metrics.jsonl"), step if restored else -1)
  write_json(os.path.join(workdir, "config.json"), resolved)
  return step, state, book


def device_train_data(splits, mesh):
  """(gather function, training arrays on the devices) for train_chunk; (None, None) when the
  training set is read per batch on the host instead (data.host.HostChunk)."""
  if splits.train_text is not None:  # random windows of the train text; fixed ones size an epoch
    gather = functools.partial(data.text.gather_windows, context_length=splits.context_length)
    return gather, sharding.put_replicated((splits.train_text,), mesh)
  if splits.train_source:
    return None, None
  gather = functools.partial(gather_examples, pixel_scale=splits.pixel_scale)
  return gather, sharding.put_replicated((splits.train_images, splits.train_labels), mesh)


def make_evaluate(config, splits, model, mesh):
  """evaluate(state) -> {'<split>/loss': ..., '<split>/error': ...} over the eval splits."""
  eval_sets = {
      "valid": (splits.valid_images, splits.valid_labels),
      "test": (splits.test_images, splits.test_labels),
      "train_eval": (splits.train_images[:config.train_eval_size],
                     splits.train_labels[:config.train_eval_size]),
  }
  eval_sets = {k: v for k, v in eval_sets.items() if len(v[1])}
  # One chunk shape for every split (one compilation), no bigger than the largest split needs.
  largest = max(len(labels) for _, labels in eval_sets.values())
  eval_batch = math.ceil(min(config.eval_batch_size, largest) / mesh.size) * mesh.size
  eval_sets = {k: _padded_eval_set(*v, eval_batch, mesh) for k, v in eval_sets.items()}
  eval_fn = jax.jit(functools.partial(steplib.eval_sums, apply_fn=model.apply,
                                      pixel_scale=splits.pixel_scale))

  def evaluate(state):
    results = {}
    for split, (images, labels, mask) in eval_sets.items():
      sums = [eval_fn(state.params, state.batch_stats, images[i], labels[i], mask[i])
              for i in range(len(labels))]   # a Python loop: see chunk_unroll above
      loss, errors, count = np.sum(sharding.to_host(sums), axis=0)   # count: labels (tokens)
      results[f"{split}/loss"] = float(loss) / float(count)
      results[f"{split}/error"] = float(errors) / float(count)
      if splits.context_length:   # bits per character: the language-modelling unit
        results[f"{split}/bpc"] = results[f"{split}/loss"] / math.log(2)
    return results
  return evaluate


def step_function(config, plan, model, mesh):
  """The trial's steplib.train_step(state, inputs, targets, augment_key, peak_lr)."""
  # The step sees the schedule's shape (peak 1) and the peak LR as a runtime input (TrialInputs).
  lr_shape = schedule.learning_rate_fn(plan, config.decay, config.warmup.init_fraction, peak=1.0)
  return functools.partial(
      steplib.train_step, apply_fn=model.apply, lr_fn=lr_shape,
      optimizer=steplib.make_optimizer(config.optimizer, lr_shape),
      microbatching=microbatching(config, mesh.size), mesh=mesh, axis=sharding.DATA,
      crop_padding=config.augment.crop_padding, flip=config.augment.flip)


def chunk_function(config, plan, splits, mesh, gather, step_fn):
  """train_chunk(state, order_N, arrays, inputs, num_active, *, num_steps) of this trial's data
  and step (device-resident training data), not yet jitted."""
  return functools.partial(train_chunk, num_examples=len(splits.train_labels),
                           batch_size=config.batch_size, steps_per_epoch=plan.steps_per_epoch,
                           gather=gather, step_fn=step_fn, unroll=config.chunk_unroll,
                           shard_batch=functools.partial(sharding.constrain_batch, mesh=mesh))


def run(config, workdir: str, trial_id: str = "trial", sweep_axes: dict | None = None,
        memory_limit_bytes: int | None = None) -> dict:
  """Trains one trial in `workdir`; returns the summary written to summary.json.

  `trial_id` and `sweep_axes` (dotted field -> value) name the trial within its sweep; they are
  recorded in config.json for the report. A trial whose training step cannot fit the device's
  memory (`memory_limit_bytes`, default the device's own limit where the backend reports one) is
  refused with a ConfigError before anything trains.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.num_devices)
  splits = load_data(config)
  plan, model, _, optimizer = build(config, splits, mesh)
  memory.check_fits(functools.partial(step_memory_bytes, config, splits), config.batch_size,
                    memory_limit_bytes or memory.device_memory_bytes())
  abstract_state, init = abstract_train_state(config, model, optimizer, splits, mesh)
  init_fn = jax.jit(init, out_shardings=sharding.replicated(mesh))
  rng = jax.random.PRNGKey(config.seed)
  resolved = trial_record(config, plan, mesh, splits, abstract_state, trial_id, sweep_axes)

  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint.keep,
                                 asynchronous=config.checkpoint.asynchronous)
  step, state, book = start_or_resume(config, workdir, resolved, ckpts, abstract_state,
                                      lambda: init_fn(rng))
  # The initial parameters, rebuilt from the seed (a resumed run gets the same ones), in their own
  # buffers: the training state's are donated to the first chunk.
  inputs = TrialInputs.of(plan, config.seed, init_fn(rng).params)
  step_fn = step_function(config, plan, model, mesh)
  gather, train_arrays = device_train_data(splits, mesh)
  if splits.train_source:   # each process reads its rows of each batch, from `step` on
    chunk = data.host.HostChunk(
        splits.train_source, inputs.data_key, mesh, batch_size=config.batch_size,
        steps_per_epoch=plan.steps_per_epoch, start_step=step, chunk_steps=config.chunk_steps,
        step_fn=step_fn, end_metrics=chunk_end_metrics, pixel_scale=splits.pixel_scale,
        unroll=config.chunk_unroll)
    train_data = (inputs,)
  else:
    chunk = CarriedOrder(
        jax.jit(chunk_function(config, plan, splits, mesh, gather, step_fn),
                static_argnames="num_steps", donate_argnames=("state", "order_N")),
        initial_order(plan.steps_per_epoch, len(splits.train_labels), mesh))
    train_data = (train_arrays, inputs)
  chunk_fn = resources.ChunkCost(chunk, book.setdefault("resources", {}), config.batch_size)
  book["step_cap"] = plan.total_steps
  evaluate = make_evaluate(config, splits, model, mesh)

  measure = (measure_lib.Measure(config.curvature, model, splits, mesh, config.seed)
             if config.curvature.enabled else None)
  try:
    return _train_loop(LoopSpec.of(config, plan, workdir, microbatching(config, mesh.size).groups),
                       state, step, book, ckpts=ckpts, chunk_fn=chunk_fn, evaluate=evaluate,
                       measure_curvature=measure, train_data=train_data)
  finally:
    ckpts.close()
    if splits.train_source:
      chunk.close()


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """What the training loop needs of the config and the plan: no ConfigDict below `run`."""
  workdir: str
  batch_size: int
  total_steps: int
  eval_every_steps: int
  log_every_steps: int
  chunk_steps: int
  chunk_unroll: bool
  checkpoint_every_steps: int
  eval_at_start: bool
  stop_at_target: bool
  tokens_per_example: int               # the context length of a language model; 0 for images
  noise_sizes: tuple[int, int] | None   # (small, big) batch of the noise-scale estimators
  noise_ema_decay: float
  loss_multiple: float                  # diverged past this multiple of the initial loss (0: off)
  curvature_every_steps: int
  curvature_density: bool
  curvature_top_only: bool              # the every_steps measurements: top eigenvalue only

  @classmethod
  def of(cls, config, plan: schedule.Plan, workdir: str, groups: int) -> "LoopSpec":
    B, G = config.batch_size, groups   # G: derived.microbatching's noise-scale groups
    return cls(
        workdir=workdir, batch_size=B, total_steps=plan.total_steps,
        eval_every_steps=plan.eval_every_steps, log_every_steps=plan.log_every_steps,
        chunk_steps=config.chunk_steps, chunk_unroll=config.chunk_unroll,
        checkpoint_every_steps=config.checkpoint.every_steps,
        eval_at_start=config.eval_at_start, stop_at_target=config.target.stop_at_target,
        tokens_per_example=context_length(config), noise_sizes=(B // G, B) if G > 1 else None,
        noise_ema_decay=config.noise_scale.ema_decay,
        loss_multiple=config.divergence.loss_multiple,
        curvature_every_steps=config.curvature.every_steps,
        curvature_density=config.curvature.density,
        curvature_top_only=config.curvature.scheduled == "top_eigenvalue")

  def chunk_length(self, num_active: int) -> int:
    """The compiled chunk's (static) length for a chunk of num_active steps: chunk_steps, one
    program for every length, or, unrolled, num_active itself (train_chunk: no skipped steps)."""
    return num_active if self.chunk_unroll else self.chunk_steps


# Fields that may differ between a checkpointed run and its resumption without changing the run.
# The noise-scale groups follow the device count (derived.microbatching); the estimators stay
# unbiased.
def _crossed(step: int, previous: int, every: int) -> bool:
  """True at the first eval boundary at or after each multiple of `every` (0 = never)."""
  return every > 0 and step // every > previous // every


class _StopRequest:
  """SIGTERM/SIGINT set a flag; the loop polls it before every chunk it dispatches, saves a
  checkpoint where it stands and exits."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def requested(self, step: int) -> bool:
    """Whether to stop at `step` (every process agrees: a signal may reach only one of them)."""
    del step   # where the loop stands; tests/harness.py signals the process at a known step
    return sharding.any_process(self.signal is not None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Preempted(SystemExit):
  """Raised after a SIGTERM/SIGINT checkpoint; exits the process with 128 + signal number."""


def _train_loop(spec: LoopSpec, state, step, book, *, ckpts, chunk_fn, evaluate,
                measure_curvature, train_data):
  """Runs from `step` to the end of the budget (or target/divergence/preemption)."""
  B, T = spec.batch_size, spec.tokens_per_example
  tracker = progress.TrialProgress(
      B, spec.total_steps, step, eval_every=spec.eval_every_steps,
      stop_at_target=spec.stop_at_target,
      target=(book["target"]["metric"], book["target"]["value"]),
      curvature_every=spec.curvature_every_steps if measure_curvature else None)
  evaluate = tracker.timed("evaluation", evaluate)   # their measured cost goes into the ETA
  measure_curvature = measure_curvature and tracker.timed("curvature", measure_curvature)
  writer = metrics_lib.MetricsWriter(spec.workdir, B, spec.total_steps, step, book["elapsed"],
                                     tokens_per_example=T, tracker=tracker)
  summary_path = os.path.join(spec.workdir, "summary.json")

  def save(state, step):
    book["elapsed"] = writer.elapsed()
    book["last_checkpoint_step"] = step
    writer.flush()
    ckpts.save(step, state, book)

  with _StopRequest() as stop:
    if step == 0 and spec.eval_at_start:
      results = evaluate(state)
      writer.write(0, results)
      bookkeeping.record_eval(book, 0, B, results, T)
    while step < spec.total_steps and book["status"] == "running":
      # Dispatch the chunks up to the next evaluation, then fetch their metrics in one go. At
      # most one chunk waits in the queue, so a stop request is honoured within about two chunks.
      segment_end = min(spec.total_steps,
                        (step // spec.eval_every_steps + 1) * spec.eval_every_steps)
      chunks, started, stopping, start = [], time.perf_counter(), False, step
      while start < segment_end:
        if stop.requested(start):
          segment_end, stopping = start, True
          break
        # A chunk ends at a log record too: its parameter norm is the record's.
        end = min(start + spec.chunk_steps, segment_end,
                  (start // spec.log_every_steps + 1) * spec.log_every_steps)
        state, metrics_K, ends = chunk_fn(state, *train_data, np.int32(end - start),
                                          num_steps=spec.chunk_length(end - start))
        if chunks:
          jax.block_until_ready(chunks[-1])
        chunks.append((start, end, metrics_K, ends))
        start = end
      if chunks:
        fetched = jax.device_get([c[2:] for c in chunks])
        metrics_K = jax.tree.map(lambda *xs: np.concatenate(xs), *[
            jax.tree.map(lambda x: x[:end - start], m) for (start, end, *_), (m, _) in
            zip(chunks, fetched)])
        chunk_ends = {end: {k: float(v) for k, v in e.items()}
                      for (_, end, *_), (_, e) in zip(chunks, fetched)}
        n = segment_end - step
        seconds = time.perf_counter() - started
        compile_seconds = chunk_fn.segment_done(n, seconds)
        rate = writer.progress(segment_end, n, seconds - compile_seconds,
                               float(np.mean(metrics_K["train/loss"])))
        if book["initial_loss"] is None:
          book["initial_loss"] = float(metrics_K["train/loss"][0])
        diverged = bookkeeping.first_divergence(metrics_K["train/loss"], step, book["initial_loss"],
                                    spec.loss_multiple)
        count = diverged[0] + 1 if diverged else n
        bookkeeping.log_train(writer, book, metrics_K, step, count, diverged=bool(diverged),
                              examples_per_sec=rate, spec=spec, chunk_ends=chunk_ends)
        if diverged:  # a result, not a crash: record where and why, keep the sweep going
          book.update(status="diverged", diverged_at_step=step + diverged[0],
                      diverged_reason=diverged[1])
          step += count
          break
        step = segment_end
      if not stopping and (step % spec.eval_every_steps == 0 or step == spec.total_steps):
        results = evaluate(state)
        writer.write(step, results)
        newly_reached = bookkeeping.record_eval(book, step, B, results, T)
        if newly_reached:   # equal-loss comparisons across batch sizes (McCandlish et al. 2018)
          book["target"]["at"] = {"wall_time": writer.elapsed(), **bookkeeping.noise_metrics(book["noise"])}
        if spec.stop_at_target and book["target"]["reached"]:
          book["status"] = "done"
        finishing = step == spec.total_steps or book["status"] == "done"
        if measure_curvature and (finishing or newly_reached or _crossed(
            step, book["last_curvature_step"], spec.curvature_every_steps)):
          results = measure_curvature(state, step, step_seconds=B / rate,
                                      density=finishing and spec.curvature_density,
                                      top_only=spec.curvature_top_only and not (
                                          finishing or newly_reached))
          density = results.pop("curvature/density", None)
          if density and jax.process_index() == 0:
            np.savez(os.path.join(spec.workdir, f"density_{step}.npz"), **density)
          book["curvature"], book["last_curvature_step"] = results, step
          if newly_reached:
            book["target"]["at"].update(results)
          writer.write(step, results)
        if _crossed(step, book["last_checkpoint_step"], spec.checkpoint_every_steps):
          save(state, step)
        book["elapsed"] = writer.elapsed()
        writer.flush()   # metrics.jsonl is readable (the report, a person) at every evaluation
        write_json(summary_path, bookkeeping.summary(book, step, B, T, chunk_fn))
      # Every process stops together; a run that just finished (or stopped at its target) is done.
      if ((stopping or stop.requested(step)) and book["status"] == "running"
          and step < spec.total_steps):
        book["status"] = "preempted"   # saved below, unless this step's checkpoint just was
        break
    if book["status"] == "running":
      book["status"] = "done"
    # A stop right after a checkpoint finds its step saved already.
    if book["status"] in ("done", "preempted") and book["last_checkpoint_step"] != step:
      save(state, step)
    ckpts.wait()
    book["elapsed"] = writer.elapsed()
    writer.close()
    summary = bookkeeping.summary(book, step, B, T, chunk_fn)
    write_json(summary_path, summary)
  if book["status"] == "preempted":
    print(f"stopped by signal {stop.signal} at step {step}: checkpoint saved, rerun to resume",
          flush=True)
    raise Preempted(128 + (stop.signal or signal.SIGTERM))
  return summary
