"""Curvature of a trial's saved checkpoint, offline: writes curvature_<step>.json in the trial dir;
with --noise_draws=K also the gradient noise scale at its parameters (noise_<step>.json).

    python -m scaling.measure_checkpoint --workdir=runs/x/trials/<id> [--step=latest] [--density]
        [--noise_draws=200] [--nocurvature]

Safe beside a running trial: the checkpoints are opened read-only (no temporary directory of a
save in progress is removed, no damaged checkpoint moved aside). Bad input (no --workdir, a missing
directory, `--step=abc`, a step that was not saved, a damaged config.json) is one line naming the
flag or the file, without a traceback.
"""
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from scaling import models, sharding, streams
from scaling.analysis import results
from scaling.config import ConfigError, parse_tool_flags
from scaling.measurement import frozen_noise, measure
from scaling.streams import Stream
from scaling.training import checkpoint, train
from scaling.training import step as steplib
from scaling.training.metrics import write_json


def trial_loss(config, model, splits, mesh):
  """A trial's training loss as the train step computes it, over examples idx_b of the training
  set: the gathered, scaled (and, as configured, augmented) images; BatchNorm in training mode
  with the group's own statistics (the running statistics are neither read nor updated), so the
  result depends on the parameters alone. The training data go onto `mesh`, replicated."""
  if splits.train_text is not None or splits.train_source:
    raise ConfigError("the frozen noise scale reads device-resident image data: text and"
                      " dataset.placement='host' are not supported")
  images_NxX, labels_N = sharding.put_replicated((splits.train_images, splits.train_labels), mesh)
  crop, flip = config.augment.crop_padding, config.augment.flip

  def loss_fn(params, idx_b, key):
    images = images_NxX[idx_b].astype(jnp.float32) * splits.pixel_scale
    if crop or flip:
      images = steplib.augment_images(key, images, crop_padding=crop, flip=flip)
    # No batch_stats passed: training-mode BatchNorm reads none (a state's running statistics
    # cannot enter), and mutable=... lets flax create the collection it would update.
    logits, _ = model.apply({"params": params}, images, train=True, mutable=["batch_stats"])
    return steplib.cross_entropy_B(logits, labels_N[idx_b]).mean()

  return loss_fn


def measure_trial(config, model, splits, state, *, num_draws: int, groups: int = 0,
                  trial_devices: int = 1, chunk: int = 10) -> dict:
  """{'noise/frozen_*': ...} at a trial's state: big batches of the trial's batch size cut into
  `groups` groups (0: the trial's G on `trial_devices` devices, from its microbatching, so that a
  BatchNorm model normalises over the trial's microbatch; at least 2), sampled as in the module
  docstring, on one device (the draws are small; replicated over a mesh they would run on every
  device). The key is the trial seed's FROZEN_NOISE stream, not folded with the step: checkpoints of one
  trial are measured on the same examples (common random numbers)."""
  b_big = config.batch_size
  groups = groups or max(2, steplib.plan_microbatches(
      b_big, config.grad_groups, config.accumulation_steps, trial_devices).groups)
  if b_big % groups:
    raise ConfigError(f"--noise_groups={groups} does not divide batch_size={b_big}")
  b_small = b_big // groups
  models.check_microbatch(config.model, b_small)
  mesh = sharding.make_mesh(1)
  params = sharding.put_replicated(sharding.to_host(state.params), mesh)
  key = streams.key(config.seed, Stream.FROZEN_NOISE)
  result = frozen_noise.frozen_noise_scale(trial_loss(config, model, splits, mesh), params, key,
                              num_examples=splits.num_train, b_small=b_small, b_big=b_big,
                              num_draws=num_draws, chunk=chunk, unroll=config.curvature.unroll)
  return {f"noise/frozen_{name}": value for name, value in result._asdict().items()}


def parse_step(step: str) -> int | None:
  """'latest' -> None, '120' -> 120; anything else is a ConfigError naming --step."""
  if step == "latest":
    return None
  if not step.isdigit():
    raise ConfigError(f"--step={step} is not a step: give a checkpoint step number or 'latest'")
  return int(step)


def load_trial_config(workdir: str) -> ml_collections.ConfigDict:
  """The trial's own config (config.json), as the trial ran it; ConfigError naming a damaged one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is not a directory: give a trial directory"
                      " (the one holding config.json and checkpoints/)")
  if not os.path.lexists(path):
    raise ConfigError(f"--workdir={workdir} has no config.json: give a trial directory"
                      " (in a sweep, <workdir>/trials/<id>)")
  summary = results.read_json(os.path.join(workdir, "summary.json"))
  finished = isinstance(summary, dict) and summary.get("status") in results.FINISHED
  resolved = checkpoint.read_trial_config(path, finished)   # not JSON, not an object, empty
  for key in ("derived", "trial_id", "sweep_axes"):
    resolved.pop(key, None)
  return ml_collections.ConfigDict(resolved)


def restore(workdir: str, step_flag: str = "latest", config=None):
  """A trial's checkpoint -> (config, model, splits, mesh, step, state), read-only. `config`: the
  trial's config in today's schema (e.g. from sweep.expand, whose resume check passed), for a
  trial written before a field was added; default: its config.json as written."""
  at_most = parse_step(step_flag)
  config = config if config is not None else load_trial_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ConfigError(f"--workdir={workdir} has no checkpoints/: the trial saved none yet")
  mesh = sharding.make_mesh(config.num_devices)
  splits = train.load_data(config)
  _, model, _, optimizer = train.build(config, splits, mesh)
  abstract_state, _ = train.abstract_train_state(config, model, optimizer, splits, mesh)
  ckpts = checkpoint.Checkpoints(directory, config.checkpoint.keep, read_only=True)
  try:
    restored = ckpts.restore_latest(abstract_state, at_most)
    steps = ckpts.steps()
  finally:
    ckpts.close()
  if restored is None or (at_most is not None and restored[0] != at_most):
    raise ConfigError(f"--step={step_flag}: no usable checkpoint at that step in {directory}"
                      f" (saved steps: {steps})")
  step, state, _ = restored
  return config, model, splits, mesh, step, state


def trial_groups(workdir: str) -> int:
  """The G the trial trained with (config.json's derived.microbatching.groups), 0 if unknown."""
  resolved = results.read_json(os.path.join(workdir, "config.json"))
  derived = resolved.get("derived", {}) if isinstance(resolved, dict) else {}
  return int(derived.get("microbatching", {}).get("groups", 0))


def measure_noise(workdir: str, config, model, splits, step: int, state, num_draws: int,
                  groups: int = 0) -> dict:
  """The noise scale at the checkpoint's parameters (scaling/measurement/frozen_noise.py), written to
  noise_<step>.json: |G|^2, tr(Sigma), B_simple with standard errors over `num_draws` draws of
  the trial's batch size in `groups` groups (0: the trial's own G, at least 2)."""
  if num_draws < 2:
    raise ConfigError(f"--noise_draws={num_draws}: give at least 2 draws (0 = no noise scale)")
  if groups < 0:
    raise ConfigError(f"--noise_groups={groups} must be >= 0 (0 = the trial's groups)")
  noise = measure_trial(config, model, splits, state, num_draws=num_draws,
                                     groups=groups or max(2, trial_groups(workdir)))
  out = os.path.join(workdir, f"noise_{step}.json")
  write_json(out, {"step": step, **noise})
  print(json.dumps(noise, indent=1))
  print(f"wrote {out}")
  return noise


def measure_checkpoint(workdir: str, step_flag: str, density: bool, curvature: bool = True,
                       noise_draws: int = 0, noise_groups: int = 0) -> dict:
  """Curvature (curvature_<step>.json, unless not `curvature`) and, with noise_draws > 0, the
  frozen-parameter noise scale (noise_<step>.json) of one checkpoint -> both results in one dict."""
  config, model, splits, mesh, step, state = restore(workdir, step_flag)
  found = {}
  if noise_draws:
    found.update(measure_noise(workdir, config, model, splits, step, state, noise_draws,
                               noise_groups))
  if not curvature:
    return found
  results = measure.Measure(config.curvature, model, splits, mesh, config.seed)(
      state, step, density=density)
  spectrum = results.pop("curvature/density", None)
  out = os.path.join(workdir, f"curvature_{step}.json")
  write_json(out, {"step": step, **results})
  if spectrum:
    np.savez(os.path.join(workdir, f"density_{step}.npz"), **spectrum)
  print(json.dumps(results, indent=1))
  print(f"wrote {out}")
  return {**found, **results}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # Orbax logs every file it reads at INFO
  try:
    measure_checkpoint(flags.FLAGS.workdir, flags.FLAGS.step, flags.FLAGS.density,
                       flags.FLAGS.curvature, flags.FLAGS.noise_draws, flags.FLAGS.noise_groups)
  except ConfigError as error:  # bad input: one line naming the flag and the fix
    sys.exit(f"error: {error}")


USAGE = ("python -m scaling.measure_checkpoint --workdir=<workdir>/trials/<id> [--step=latest]"
         " [--noise_draws=K]")


if __name__ == "__main__":
  # Defined here, not at import: scaling.main defines --workdir too.
  flags.DEFINE_string("workdir", None, "A trial directory (with config.json and checkpoints/).")
  flags.DEFINE_string("step", "latest", "Checkpoint step to evaluate, or 'latest'.")
  flags.DEFINE_bool("density", True, "Also estimate the spectral density (stochastic Lanczos).")
  flags.DEFINE_bool("curvature", True,
                    "Measure the curvature (--nocurvature: the noise scale only).")
  flags.DEFINE_integer("noise_draws", 0, "Also the noise scale at the checkpoint's parameters from"
                       " this many independent big batches (0 = off): noise_<step>.json.")
  flags.DEFINE_integer("noise_groups", 0, "Groups per big batch for the noise scale (0 = the"
                       " trial's own).")
  app.run(main, flags_parser=lambda argv: parse_tool_flags(
      argv, "error", USAGE, "give a trial directory"))
