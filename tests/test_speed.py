"""Speed: compile once per program shape; a runtime peak LR; per-step overhead; the planner."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mnist
from scaling import sharding
from scaling.training import chunk, loop, schedule, step as steplib, train
from tests.tiny import read_records, tiny_config

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lars", "lamb")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_is_linear_in_its_learning_rate(name):
  """The step's runtime peak LR scales the update of the optimizer built at peak 1: the same
  trajectory as the optimizer built at the peak itself. Three steps of a quadratic with warmup
  and weight decay; float32 rounding of a few products per step (rtol 1e-5)."""
  opt = mnist.get_config().optimizer
  opt.name, opt.weight_decay = name, 1e-3
  shape = optax.linear_schedule(0.25, 1.0, 2)
  peak = 0.37
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, 0.1]])}
  grad_fn = jax.grad(lambda p: sum(jnp.sum((x - 0.1) ** 2 * (1 + x)) for x in jax.tree.leaves(p)))

  def trajectory(optimizer, scale):
    p, s = params, optimizer.init(params)
    for _ in range(3):
      u, s = optimizer.update(grad_fn(p), s, p)
      p = optax.apply_updates(p, jax.tree.map(lambda x: scale * x, u))
    return p

  expected = trajectory(steplib.make_optimizer(opt, lambda c: peak * shape(c)), 1.0)
  got = trajectory(steplib.make_optimizer(opt, shape), jnp.float32(peak))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert not np.allclose(expected["w"], params["w"])   # it moved


@contextlib.contextmanager
def persistent_cache(directory):
  """The persistent compilation cache in `directory` for this block (as scaling.main sets it)."""
  from jax._src import compilation_cache
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for n, v in saved.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.mark.heavy   # two trials: outside the default run's time budget
def test_trials_differing_in_lr_and_seed_share_one_compiled_chunk(tmp_path):
  """Two trials of an LR grid and two seeds: the second compiles nothing of its train chunk (the
  peak LR and the keys are runtime inputs); before, the LR was a constant of the program and the
  second trial compiled its chunk again."""
  overrides = {"budget.length": 8.0, "eval_every.length": 4.0, "checkpoint.every_steps": 0,
               "num_devices": 1}
  with persistent_cache(tmp_path / "cache"):
    first = train.run(tiny_config(**overrides), str(tmp_path / "a"))
    second = train.run(tiny_config(**overrides, lr_multiplier=2.0, seed=5), str(tmp_path / "b"))
  assert first["compilations"]["train_chunk"] == 1
  assert second["compilations"]["train_chunk"] == 0
  assert second["compilations"]["cache_hits"] >= 1
  assert first["final"]["train/loss"] != second["final"]["train/loss"]   # a different trial


def test_odd_remainders_reuse_the_one_compiled_chunk(tmp_path):
  """Chunks of 4 steps, evaluations every 6 and a budget of 14: chunk lengths 4, 2, 4, 2, 2 and
  records every 4 steps split them further. Before, each new length compiled anew (3 here); now the
  chunk takes its step count at run time: one compilation. Records keep their steps, and each
  carries the parameter norm after its own step: the last one equals the final state's norm."""
  config = tiny_config(**{"budget.length": 14.0, "eval_every.length": 6.0, "num_devices": 1,
                          "checkpoint.every_steps": 0, "grad_groups": 1})
  summary = train.run(config, str(tmp_path))
  assert summary["compilations"]["train_chunk"] == 1
  records = read_records(tmp_path)
  train_records = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train_records] == [4, 8, 12, 14]
  assert [r["step"] for r in records if "valid/error" in r] == [6, 12, 14]
  assert all("param_norm" in r for r in train_records)
  from scaling.training import checkpoint
  _, model, _, optimizer = train.build(config, train.load_data(config),
                                       sharding.make_mesh(1))
  abstract, _ = train.abstract_train_state(config, model, optimizer, train.load_data(config),
                                           sharding.make_mesh(1))
  _, state, _ = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), 1).restore_latest(abstract)
  assert train_records[-1]["param_norm"] == pytest.approx(
      float(steplib.param_norm(state.params)), rel=1e-6)


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_memory_planner_reports_the_compiled_step_analysis():
  """The planner's bytes are XLA's memory analysis of the step compiled on real arrays (here built
  independently: a concrete state and batch), and they grow with the batch."""
  import functools
  from scaling.training import memory
  config = tiny_config(**{"num_devices": 1, "grad_groups": 1})
  splits = train.load_data(config)
  mesh = sharding.make_mesh(1)
  _, model, lr_fn, optimizer = train.build(config, splits, mesh)
  state = sharding.put_replicated(
      steplib.init_state(model, optimizer, jax.random.PRNGKey(0), splits.train_images.shape[1:]),
      mesh)
  images = splits.train_images[:32].astype(np.float32)
  batch = sharding.put_batch((images, splits.train_labels[:32]), mesh)
  step = jax.jit(functools.partial(
      steplib.train_step, apply_fn=model.apply, optimizer=optimizer, lr_fn=lr_fn,
      microbatching=train.microbatching(config, 1), mesh=mesh, axis=sharding.DATA),
      donate_argnums=0)
  m = step.lower(state, *batch).compile().memory_analysis()
  expected = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
              + m.temp_size_in_bytes)
  assert train.step_memory_bytes(config, splits, 32) == expected
  bytes_of = functools.partial(train.step_memory_bytes, config, splits)
  assert bytes_of(64, None) > bytes_of(32, None)
  # A limit between the two: 32 fits, 64 does not.
  limit = (bytes_of(32, None) + bytes_of(64, None)) // 2
  assert memory.largest_power_of_two(bytes_of, 1, 64, limit, accumulation=False) == 32
  # With accumulation a batch of b runs b microbatches of one example and carries their gradient
  # sum (one more set of gradients): for this tiny MLP, whose batch is small next to its weights,
  # that can cost more than it saves. The plan is the largest b whose accumulated step fits.
  planned = memory.largest_power_of_two(bytes_of, 1, 64, limit, accumulation=True)
  assert planned is not None and bytes_of(planned, planned) <= limit
  assert all(bytes_of(b, b) > limit for b in (2, 4, 8, 16, 32, 64) if b > planned)


def test_a_trial_that_cannot_fit_is_refused_before_training(tmp_path):
  config = tiny_config(**{"num_devices": 1})
  with pytest.raises(train.ConfigError, match=r"batch_size=32 needs [\d.,]+ MiB per device") as e:
    train.run(config, str(tmp_path), memory_limit_bytes=1000)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_largest_power_of_two_skips_batches_the_config_cannot_hold():
  """Batches too small for the config (grad_groups=2 needs 2 examples) are skipped, not a stop."""
  from scaling.training import memory

  def bytes_of(batch, k):
    if batch < 2:
      raise train.ConfigError("grad_groups=2 ...")
    return 100 * batch // (k or 1)
  assert memory.largest_power_of_two(bytes_of, 1, 1000, 1000, accumulation=False) == 8
  assert memory.largest_power_of_two(bytes_of, 1, 1000, 1000, accumulation=True) == 512


def _count(jaxpr, primitive, inside_cond=False):
  """(eqns of `primitive` outside any cond, inside a cond's branches) in a jaxpr, recursively."""
  outside = inside = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      inside, outside = (inside + 1, outside) if inside_cond else (inside, outside + 1)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      o, i = _count(sub, primitive, inside_cond or eqn.primitive.name == "cond")
      outside, inside = outside + o, inside + i
  return outside, inside


def _chunk_and_inputs(**fields):
  """The tiny trial's train_chunk as train.run builds it (not jitted), and its arguments."""
  config = tiny_config(**{"num_devices": 1, **fields})
  mesh = sharding.make_mesh(config.num_devices)
  splits = train.load_data(config)
  plan, model, _, optimizer = train.build(config, splits, mesh)
  _, init = train.abstract_train_state(config, model, optimizer, splits, mesh)
  state = jax.jit(init)(jax.random.PRNGKey(0))
  gather, arrays = train.device_train_data(splits, mesh)
  chunk_fn = train.chunk_function(config, plan, splits, mesh, gather,
                                  train.step_function(config, plan, model, mesh))
  inputs = chunk.TrialInputs.of(plan, 0, state.params)
  order_N = jnp.arange(len(splits.train_labels), dtype=jnp.int32)
  return chunk_fn, (state, order_N, arrays, inputs)


def _chunk_jaxpr(num_steps, **fields):
  """The jaxpr of the tiny trial's train_chunk of num_steps steps."""
  chunk_fn, args = _chunk_and_inputs(**fields)
  return jax.make_jaxpr(lambda *a: chunk_fn(*a, num_steps=num_steps))(
      *args, np.int32(num_steps)).jaxpr


def test_a_one_device_step_runs_no_all_reduce():
  """XLA:CPU runs an all-reduce over a one-device mesh as a copy of every gradient (~3% of the
  CNN's step at B = 32): the step all-reduces only over more than one device."""
  assert _count(_chunk_jaxpr(2, num_devices=1), "psum") == (0, 0)
  outside, inside = _count(_chunk_jaxpr(2, num_devices=2), "psum")
  assert outside > 0 and inside == 0   # the gradient sums' all-reduce, in each step


def test_end_metrics_are_measured_only_after_a_chunk_that_ends_a_record():
  """The parameter norm and the distance from the initial parameters reduce over every weight
  (~3% of the CNN's 4-step chunk on CPU when measured after each), and only a train record reads
  them: after a chunk ending elsewhere they are zeros; after one ending at a record, exact."""
  chunk_fn, (state, order_N, arrays, inputs) = _chunk_and_inputs(**{"log_every_steps": 4})
  run = jax.jit(chunk_fn, static_argnames="num_steps")
  initial = state.params
  state, order_N, _, ends = run(state, order_N, arrays, inputs, np.int32(3), num_steps=4)
  assert int(state.step) == 3 and ends == {"param_norm": 0.0, "param_distance_from_init": 0.0}
  state, order_N, _, ends = run(state, order_N, arrays, inputs, np.int32(1), num_steps=4)
  assert int(state.step) == 4
  expected_distance = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
                                  zip(jax.tree.leaves(state.params), jax.tree.leaves(initial))))
  assert float(ends["param_norm"]) == pytest.approx(float(steplib.param_norm(state.params)),
                                                    rel=1e-6)
  assert float(ends["param_distance_from_init"]) == pytest.approx(expected_distance, rel=1e-5)
  assert expected_distance > 0


def test_the_epoch_order_is_shuffled_only_when_an_epoch_starts():
  """The chunk takes the epoch's order and returns it (chunk.CarriedOrder holds it between
  chunks): the shuffle of all N indices (a sort) happens only in the epoch-start cond, not at
  every chunk's start, where on full MNIST it cost as much as ~8 steps at B = 16."""
  assert _count(_chunk_jaxpr(4), "sort") == (0, 1)


def test_unrolled_steps_are_not_inside_a_cond():
  """XLA:CPU runs a convolution step inside a lax.cond ~12x slower (as inside a loop), so the
  unrolled chunk runs each of its steps unconditionally (the loop compiles its length) and only
  the epoch's new order sits in a cond: every matmul of the 3 steps is outside one."""
  outside, inside = _count(_chunk_jaxpr(3, chunk_unroll=True), "dot_general")
  assert inside == 0 and outside > 0 and outside % 3 == 0
  config = tiny_config(chunk_unroll=True, chunk_steps=4)
  spec = loop.LoopSpec.of(config, schedule.make_plan(config, 1000), "", 1)
  assert [spec.chunk_length(n) for n in (1, 3, 4)] == [1, 3, 4]
  rolled = tiny_config(chunk_steps=4)
  spec = loop.LoopSpec.of(rolled, schedule.make_plan(rolled, 1000), "", 1)
  assert [spec.chunk_length(n) for n in (1, 3, 4)] == [4, 4, 4]   # one program for every length
