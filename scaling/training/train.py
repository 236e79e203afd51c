"""Trials: config -> data -> model -> compiled chunk -> the loop -> summary.json.

`run(config, workdir)` is one trial, `run_group` M >= 1 of them through one chunk program (a
trial alone is a group of one; scaling/training/vectorized.py vmaps the chunk over M): it builds what the
stages need and hands them to scaling/training/loop.py's train_loop.
The training data live on the devices (replicated; they are small) and `chunk_steps` steps run per
dispatch in one program (scaling/training/chunk.py), so Python overhead does not dominate small batches;
scaling/training/loop.py dispatches the chunks, evaluates, measures curvature, checkpoints and records.
`chunk_unroll` unrolls the chunk's steps: XLA:CPU runs convolutions inside a loop, or inside a
lax.cond, far slower than unrolled (benchmarks/README.md: unrolled chunks), so CNN configs on CPU
unroll short chunks and compile one per distinct length.
A training set too large for the devices (`dataset.placement`) is read per batch on the host in
the same order instead (scaling/data/host.py: `HostChunk` stands in for the jitted chunk).
"""
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from scaling import data, models, sharding, streams
from scaling.config import ConfigError, check_fields
from scaling.measurement import measure as measure_lib
from scaling.streams import Stream
from scaling.training import checkpoint, loop, schedule, step as steplib
from scaling.training import chunk as chunklib
from scaling.training import memory, resources, vectorized
from scaling.training import metrics as metrics_lib
from scaling.training import record as record_lib
from scaling.training.metrics import write_json


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


def load_data(config) -> data.Splits:
  """config.dataset -> Splits; text comes in windows of the Transformer's context length."""
  dataset = config.dataset
  try:
    return data.load(dataset.name, data_dir=dataset.data_dir or None,
                     validation_size=dataset.validation_size, train_size=dataset.train_size or None,
                     context_length=models.context_length(config.model), placement=dataset.placement,
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
      jax.eval_shape(init, streams.key(config.seed, Stream.INIT)))
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
  """(step, state, record) from the trial's latest checkpoint, else (0, fresh_state(), new);
  writes config.json and drops metrics.jsonl records past the step this run starts from."""
  restored = None
  if ckpts.steps():
    checkpoint.check_same_run(os.path.join(workdir, "config.json"), resolved)
    restored = ckpts.restore_latest(abstract_state)
  if restored:
    step, state, saved = restored
    record = record_lib.TrialRecord.restored(saved, config)
    print(f"resuming {workdir} from step {step} (restore {ckpts.last_restore_seconds:.2f}s)",
          flush=True)
  else:
    step, state, record = 0, fresh_state(), record_lib.TrialRecord.new(config)
  # Records past the restored step are rewritten by this run (all of them when starting afresh).
  path = os.path.join(workdir, "metrics.jsonl")
  missing = metrics_lib.truncate_after(path, step if restored else -1,
                                       resolved["derived"]["log_every_steps"])
  if missing:   # the run cannot write them again: say so, the report shows the gap
    print(f"warning: {path} lacks the train records of {len(missing)} step(s) before the resume"
          f" step {step} (steps {missing[0]}..{missing[-1]}): they were lost or removed while the"
          " trial was stopped; its curves have a gap there", file=sys.stderr, flush=True)
  write_json(os.path.join(workdir, "config.json"), resolved)
  return step, state, record


def device_train_data(splits, mesh):
  """(gather function, training arrays on the devices) for train_chunk; (None, None) when the
  training set is read per batch on the host instead (data.host.HostChunk)."""
  if splits.train_text is not None:  # random windows of the train text; fixed ones size an epoch
    gather = functools.partial(data.text.gather_windows, context_length=splits.context_length)
    return gather, sharding.put_replicated((splits.train_text,), mesh)
  if splits.train_source:
    return None, None
  gather = functools.partial(chunklib.gather_examples, pixel_scale=splits.pixel_scale)
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


def end_metrics(plan):
  """The chunk's end metrics (step, params, init_params) -> dict, measured at train records."""
  return functools.partial(chunklib.record_end_metrics, log_every_steps=plan.log_every_steps,
                           total_steps=plan.total_steps)


def chunk_function(config, plan, splits, mesh, gather, step_fn):
  """chunk.train_chunk(state, order_N, arrays, inputs, num_active, *, num_steps) of this trial's
  data and step (device-resident training data), not yet jitted."""
  return functools.partial(chunklib.train_chunk, num_examples=len(splits.train_labels),
                           batch_size=config.batch_size, steps_per_epoch=plan.steps_per_epoch,
                           gather=gather, step_fn=step_fn, end_metrics=end_metrics(plan),
                           unroll=config.chunk_unroll,
                           shard_batch=functools.partial(sharding.constrain_batch, mesh=mesh))


def run(config, workdir: str, trial_id: str = "trial", sweep_axes: dict | None = None,
        memory_limit_bytes: int | None = None) -> dict:
  """Trains one trial in `workdir`; returns the summary written to summary.json.

  `trial_id` and `sweep_axes` (dotted field -> value) name the trial within its sweep; they are
  recorded in config.json for the report. A trial whose training step cannot fit the device's
  memory (`memory_limit_bytes`, default the device's own limit where the backend reports one) is
  refused with a ConfigError before anything trains.
  """
  return run_group([config], [workdir], [trial_id], [sweep_axes], memory_limit_bytes)[0]


def run_group(configs: list, workdirs: list[str], trial_ids: list[str] | None = None,
              sweep_axes: list[dict] | None = None,
              memory_limit_bytes: int | None = None) -> list[dict]:
  """Trains M >= 1 trials, each in its own workdir, through one chunk program: alone (M = 1), or
  vmapped (scaling/training/vectorized.py: configs that differ only in its VMAPPED_FIELDS). Returns their
  summaries. Members restored at different steps train as successive groups."""
  M, first = len(configs), configs[0]
  trial_ids, sweep_axes = trial_ids or ["trial"] * M, sweep_axes or [{}] * M
  mesh = sharding.make_mesh(first.num_devices)
  splits = load_data(first)
  if M > 1:
    vectorized.check_group(configs, splits)
  built = [build(c, splits, mesh) for c in configs]   # every config checked
  plan, model, _, optimizer = built[0]
  # M members hold about M times a solo step's buffers (states and activations).
  memory.check_fits(lambda b, k: M * step_memory_bytes(first, splits, b, k),
                    first.batch_size, memory_limit_bytes or memory.device_memory_bytes())
  abstract_state, init = abstract_train_state(first, model, optimizer, splits, mesh)
  init_fn = jax.jit(init, out_shardings=sharding.replicated(mesh))
  groups = microbatching(first, mesh.size).groups
  for workdir in workdirs:   # only once every check has passed: refused input writes nothing
    os.makedirs(workdir, exist_ok=True)
  evaluate = make_evaluate(first, splits, model, mesh)
  measure = (measure_lib.Measure(first.curvature, model, splits, mesh, first.seed)
             if first.curvature.enabled else None)
  members, states, inputs = [], [], []
  try:
    for config, workdir, (plan, *_), tid, axes in zip(configs, workdirs, built, trial_ids,
                                                      sweep_axes):
      resolved = trial_record(config, plan, mesh, splits, abstract_state, tid, axes)
      ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), config.checkpoint.keep,
                                     asynchronous=config.checkpoint.asynchronous)
      rng = streams.key(config.seed, Stream.INIT)
      step, state, record = start_or_resume(config, workdir, resolved, ckpts, abstract_state,
                                            lambda: init_fn(rng))
      record.step_cap = plan.total_steps
      members.append(loop.Member(
          loop.LoopSpec.of(config, plan, workdir, groups), record, ckpts, step,
          measure=measure and measure.for_seed(config.seed),
          cost=resources.ChunkCost(None, record.resources, config.batch_size)))
      states.append(state)
      # The initial parameters, rebuilt from the seed (a resumed run gets the same ones), in
      # their own buffers: the training state's are donated to the first chunk.
      inputs.append(chunklib.TrialInputs.of(plan, config.seed, init_fn(rng).params))
    new_chunk = _chunk_maker(first, plan, splits, model, mesh, vmapped=M > 1)
    by_step = {}   # members restored at different steps (one resumed alone before) train apart
    for i, m in enumerate(members):
      by_step.setdefault(m.step, []).append(i)
    for step, group in sorted(by_step.items()):
      chunk, state = new_chunk(step, [inputs[i] for i in group], [states[i] for i in group])
      try:
        loop.train_loop([members[i] for i in group], state, step, chunk, evaluate=evaluate)
      finally:
        chunk.close()
  finally:
    for m in members:
      m.ckpts.close()
  return [m.summary for m in members]


def _chunk_maker(config, plan, splits, model, mesh, *, vmapped: bool):
  """new_chunk(step, inputs, states) -> (the loop's chunk for members standing at `step`, their
  state): vectorized.Vmapped over the stacked states, else a trial alone (chunk.Solo) on the
  device-resident training set or, when that lives on the host, data.host.HostChunk."""
  step_fn = step_function(config, plan, model, mesh)   # the peak LR is an input
  gather, train_arrays = device_train_data(splits, mesh)
  if vmapped:
    return vectorized.chunk_maker(chunk_function(config, plan, splits, mesh, gather, step_fn),
                                  plan, splits, mesh, train_arrays)
  if splits.train_source:   # each process reads its rows of each batch, from `step` on
    def new_chunk(step, inputs, states):
      (inputs,), (state,) = inputs, states
      host = data.host.HostChunk(
          splits.train_source, inputs.data_key, mesh, batch_size=config.batch_size,
          steps_per_epoch=plan.steps_per_epoch, start_step=step, chunk_steps=config.chunk_steps,
          step_fn=step_fn, end_metrics=end_metrics(plan), pixel_scale=splits.pixel_scale,
          unroll=config.chunk_unroll)
      return chunklib.Solo(host, inputs, close=host.close), state
    return new_chunk
  program = jax.jit(chunk_function(config, plan, splits, mesh, gather, step_fn),
                    static_argnames="num_steps", donate_argnames=("state", "order_N"))
  order = chunklib.initial_order(plan.steps_per_epoch, len(splits.train_labels), mesh)

  def new_chunk(step, inputs, states):
    del step   # the state's own step counter places it in its epoch
    (inputs,), (state,) = inputs, states
    return chunklib.Solo(chunklib.CarriedOrder(program, order), train_arrays, inputs), state
  return new_chunk
