"""Training data on the host (scaling/data/host.py): the device path's trial, exact resume,
a prefetcher that reads ahead in order, and one-line errors for what it cannot read."""
import json
import os
import time

import jax
import numpy as np
import pytest

from scaling import data, sharding
from scaling.config import ConfigError, check_fields
from scaling.data import host
from scaling.training import chunk, loop, train
from tests.tiny import read_records, tiny_config

# mnist_tiny: 412 train examples at batch 32 = 12 steps per epoch; 16 steps cross into epoch 1,
# and the preempted run stops at step 8, mid-epoch.
STEPS, STOP_AT = 16, 8


def _config(placement):
  # One evaluation, at the end; checkpoints only where the run stops (cheap runs).
  return tiny_config(**{"dataset.placement": placement, "num_devices": 2,
                        "budget.length": float(STEPS), "eval_every.length": float(STEPS),
                        "train_eval_size": 0, "checkpoint.every_steps": 0})


def _losses(records):
  """{(step, metric): value} of every loss logged (train and evaluation)."""
  return {(r["step"], k): v for r in records for k, v in r.items() if k.endswith("/loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The device path straight through; the host path preempted mid-epoch, then resumed."""
  root = tmp_path_factory.mktemp("host_data")
  workdirs = {name: str(root / name) for name in ("device", "host")}
  train.run(_config("device"), workdirs["device"])
  requested = loop.StopRequest.requested
  try:   # a preemption at a chunk boundary inside the first epoch, then a rerun from its checkpoint
    loop.StopRequest.requested = lambda self, step: step == STOP_AT
    with pytest.raises(loop.Preempted):
      train.run(_config("host"), workdirs["host"])
  finally:
    loop.StopRequest.requested = requested
  with open(os.path.join(workdirs["host"], "summary.json")) as f:
    assert json.load(f)["step"] == STOP_AT
  summary = train.run(_config("host"), workdirs["host"])
  assert summary["status"] == "done" and summary["step"] == STEPS
  return workdirs


def test_host_path_resumed_mid_epoch_trains_the_device_paths_trial(runs):
  device, on_host = _losses(read_records(runs["device"])), _losses(read_records(runs["host"]))
  # train/loss every 4 steps, before (4, 8) and after (12, 16) the resume; evaluations at 16.
  assert {step for step, _ in device} == {4, 8, 12, 16} and device.keys() == on_host.keys()
  # Same examples in the same order: equal up to float32 rounding (~1e-7 per operation; XLA
  # fuses the two programs differently). One batch read wrong (a resume at the wrong position,
  # another permutation) moves the loss by ~1e-2.
  for key in device:
    assert on_host[key] == pytest.approx(device[key], rel=1e-5), key
  with open(os.path.join(runs["host"], "config.json")) as f:
    assert json.load(f)["derived"]["data_placement"] == "host"


class _CountingSource:
  """A RecordSource over arrays that counts the steps read and can fail at one read."""

  def __init__(self, n, fail_at_read=None):
    self.images_N, self.labels_N = np.arange(n * 2).reshape(n, 2), np.arange(n) % 10
    self.reads, self.fail_at_read = 0, fail_at_read
    self.source = host.RecordSource(read=self._read, num_examples=n)

  def _read(self, index):
    self.reads += 1
    if self.reads == self.fail_at_read:
      raise OSError("disk gone")
    return self.images_N[index], self.labels_N[index]


def test_prefetcher_reads_ahead_in_the_epoch_order():
  n, B, rows = 50, 8, np.array([2, 3, 4, 5])   # this "process" holds rows 2..5 of each batch
  counting = _CountingSource(n)
  key = jax.random.PRNGKey(7)
  steps_per_epoch = n // B   # 6: steps 4..9 cross an epoch boundary
  prefetcher = host.Prefetcher(counting.source, key, batch_size=B, steps_per_epoch=steps_per_epoch,
                               rows=rows, start_step=4, depth=3)
  try:
    deadline = time.monotonic() + 30
    while counting.reads < 4 and time.monotonic() < deadline:   # reads with nobody asking
      time.sleep(0.01)
    time.sleep(0.05)
    # `depth` steps in the queue and one more in the thread, waiting for room: no further.
    assert counting.reads == 3 + 1
    images, labels = prefetcher.take(2)
    images2, labels2 = prefetcher.take(4)
  finally:
    prefetcher.close()
  images, labels = np.concatenate([images, images2]), np.concatenate([labels, labels2])
  assert images.shape == (6, 4, 2) and labels.shape == (6, 4)
  for k, step in enumerate(range(4, 10)):
    epoch, pos = divmod(step, steps_per_epoch)
    order_N = np.asarray(chunk.epoch_order(key, epoch, n))
    np.testing.assert_array_equal(labels[k], counting.labels_N[order_N[pos * B + rows]])
    np.testing.assert_array_equal(images[k], counting.images_N[order_N[pos * B + rows]])


def test_prefetcher_raises_a_read_error_in_the_loop():
  counting = _CountingSource(50, fail_at_read=2)
  prefetcher = host.Prefetcher(counting.source, jax.random.PRNGKey(0), batch_size=8,
                               steps_per_epoch=6, rows=np.arange(8), start_step=0, depth=2)
  try:
    prefetcher.take(1)
    with pytest.raises(OSError, match="disk gone"):
      prefetcher.take(1)
  finally:
    prefetcher.close()
  assert not prefetcher._thread.is_alive()


def test_process_rows_cover_the_batch_in_order():
  mesh = sharding.make_mesh(4)
  rows = sharding.process_rows(mesh, 16)
  np.testing.assert_array_equal(rows, np.arange(16))   # one process holds every row
  placed = sharding.put_process_rows(np.arange(32).reshape(2, 16), mesh, 16)
  assert placed.shape == (2, 16) and len(placed.addressable_shards) == 4
  np.testing.assert_array_equal(np.asarray(placed), np.arange(32).reshape(2, 16))


def test_bad_placement_is_one_line(tmp_path):
  config = _config("sideways")
  with pytest.raises(ConfigError, match=r"dataset.placement='sideways' is invalid: use 'auto'"):
    check_fields(config)
  with pytest.raises(ConfigError, match=r"^dataset.placement='sideways' is invalid"):
    train.run(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")   # refused before anything is written


def test_host_path_needs_array_record_examples(tmp_path):
  for name in ("digits", "shakespeare_tiny"):
    with pytest.raises(ConfigError, match=rf"^dataset.placement='host' reads image examples from"
                                          rf" array_record files, which '{name}' does not have"):
      data.load(name, validation_size=0, context_length=16 if name != "digits" else 0,
                placement="host")
  # 'auto' keeps such small sets on the device.
  assert data.load("shakespeare_tiny", validation_size=0, context_length=16,
                   placement="auto").train_source is None


def test_auto_places_a_set_above_the_device_fraction_on_the_host(monkeypatch):
  monkeypatch.setattr(host, "device_memory_bytes", lambda: 1_000_000)
  # 412 train examples of 28 * 28 + 4 bytes = 324,656 bytes: above 30% of 1 MB, below 40%.
  big = data.load("mnist_tiny", validation_size=100, placement="auto", device_fraction=0.3,
                  head_size=50)
  small = data.load("mnist_tiny", validation_size=100, placement="auto", device_fraction=0.4)
  assert big.train_source is not None and small.train_source is None
  assert big.num_train == small.num_train == 412 and len(big.train_labels) == 50
  np.testing.assert_array_equal(big.train_labels, small.train_labels[:50])
  np.testing.assert_array_equal(big.valid_images, small.valid_images)
  images, labels = big.train_source.read(np.array([7, 3]))
  np.testing.assert_array_equal(images, small.train_images[[7, 3]])
  np.testing.assert_array_equal(labels, small.train_labels[[7, 3]])


@pytest.mark.slow    # manual (-m slow): outside CI's time budget
def test_two_processes_reading_their_rows_match_one_process_on_device(tmp_path):
  """Each of two processes (2 devices each) reads only its 16 rows of each batch of 32 from the
  array_record files; together they train one process's device-path trial (4 devices)."""
  from tests import agree, test_multiprocess as mp
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  distributed = [f"--coordinator_address=127.0.0.1:{mp.free_port()}", "--num_processes=2"]
  logs = [str(tmp_path / f"{name}.log") for name in ("one", "p0", "p1")]
  procs = [mp.start(one, 4, logs[0], ["--config.dataset.placement=device"])]
  for i in range(2):
    procs.append(mp.start(two, 2, logs[1 + i], [*distributed, f"--process_id={i}",
                                                "--config.dataset.placement=host"]))
  codes = mp.wait_all(procs, mp.TIMEOUT_S)
  assert codes == [0, 0, 0], "\n".join(f"== {log} (exit {c})\n{mp.tail(log)}"
                                       for log, c in zip(logs, codes))
  with open(os.path.join(two, "config.json")) as f:
    assert json.load(f)["derived"]["data_placement"] == "host"
  agree.assert_records_agree(mp.read_records(two), mp.read_records(one), b_small=mp.B // mp.G,
                             b_big=mp.B, rtol=1e-5, atol=1e-7)
