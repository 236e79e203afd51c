"""Loading stage: a data set name -> uint8 numpy arrays, the validation split held out of train.

'mnist', 'fashion_mnist' and 'mnist_tiny' are prepared offline on first use by the project's own
TFDS builders (scaling/data/tfds_builders.py); 'digits' is scikit-learn's bundled 8x8 set; any other name
must already be prepared in the TFDS data dir, since no machine here can download a data set.

'shakespeare' and 'shakespeare_tiny' are text (scaling/data/text.py): the same Splits hold fixed
non-overlapping byte windows, inputs [M, T] in the *_images fields and next-byte targets [M, T] in
*_labels, and `train_text` holds the whole train text that training windows are drawn from.

Placement of the training set (`dataset.placement`): 'device' reads it whole into numpy, to be
replicated on every device; 'host' leaves it in its array_record files (`train_source`, read per
batch by scaling/data/host.py) and reads only the first `head_size` train examples (the train_eval
and curvature subsets); 'auto' is 'host' when the train split exceeds `device_fraction` of one
device's memory. Text and 'digits' are small and have no array_record train examples: 'device'.
"""
import contextlib
import dataclasses
import fcntl
import os
import re
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from scaling.config import ConfigError
from scaling.data import host, text, tfds_builders

_BUILDERS = {
    "mnist": tfds_builders.ScalingMnist,
    "fashion_mnist": tfds_builders.ScalingFashionMnist,
    "mnist_tiny": tfds_builders.ScalingMnistTiny,
    "shakespeare": text.ScalingShakespeare,
    "shakespeare_tiny": text.ScalingShakespeareTiny,
}
_KNOWN = ("digits", *_BUILDERS)
_DIGITS_TEST_SIZE = 297  # 1,797 = 1,500 train + 297 test.
PLACEMENTS = ("auto", "device", "host")


@dataclasses.dataclass(frozen=True)
class Splits:
  train_images: np.ndarray  # uint8 [N, H, W, C]: official train split minus the validation part.
  train_labels: np.ndarray  # int32 [N]
  valid_images: np.ndarray  # uint8
  valid_labels: np.ndarray  # int32
  test_images: np.ndarray  # uint8
  test_labels: np.ndarray  # int32
  num_classes: int
  pixel_scale: float  # uint8 pixels * pixel_scale are floats in [0, 1].
  name: str
  context_length: int = 0               # text: bytes per input window (T); 0 for images
  train_text: np.ndarray | None = None  # text: uint8 [N], the whole train split; None for images
  # Placement 'host': the train examples' records; train_* then hold only the first head_size.
  train_source: host.RecordSource | None = None

  @property
  def num_train(self) -> int:
    return self.train_source.num_examples if self.train_source else len(self.train_labels)


def load(name: str, *, data_dir: str | None = None, validation_size: int = 5000,
         train_size: int | None = None, context_length: int = 0, placement: str = "device",
         device_fraction: float = 0.25, head_size: int = 0) -> Splits:
  """Loads `name`, holding out the LAST `validation_size` examples of the official train split.

  Shallue et al. hold out 5k of MNIST's 60k. `train_size` keeps only the first `train_size` of the
  remaining train examples (for quick runs). The data dir is `data_dir`, else $TFDS_DATA_DIR, else
  TFDS's default (~/tensorflow_datasets). Text needs `context_length` and takes its validation
  split from the builder (whole works), so `validation_size` and `train_size` must be 0 there.
  `placement`, `device_fraction` and `head_size`: see the module docstring.
  """
  check_name(name)
  if placement not in PLACEMENTS:
    raise ConfigError(f"dataset.placement={placement!r} is invalid: use 'auto' (host when the"
                      " train set is large), 'device' or 'host'")
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
  is_text = name in _BUILDERS and issubclass(_BUILDERS[name], text.TextBuilder)
  if placement == "host" and (is_text or name == "digits"):
    raise ConfigError(f"dataset.placement='host' reads image examples from array_record files,"
                      f" which {name!r} does not have (it is small): use 'device' or 'auto'")
  if is_text:
    return _load_text(name, data_dir, validation_size, train_size, context_length)
  if name == "digits":
    (images, labels), (test_images, test_labels) = _digits()
    num_classes, pixel_scale = 10, 1 / 16
    read_train = lambda index: (images[index], labels[index])
  else:
    builder = _prepared_builder(name, data_dir)
    read_train = _reader(builder, "train")
    test_images, test_labels = _read_split(builder, "test")
    num_classes, pixel_scale = builder.info.features["label"].num_classes, 1 / 255

  num_train = len(labels) if name == "digits" else builder.info.splits["train"].num_examples
  if not 0 <= validation_size < num_train:
    raise ValueError(f"dataset.validation_size={validation_size} must be >= 0 and less than the "
                     f"{num_train} train examples of {name!r}")
  cut = num_train - validation_size
  if train_size is not None and not 0 < train_size <= cut:
    raise ValueError(f"dataset.train_size={train_size} must be in [1, {cut}]: {name!r} has {cut} "
                     f"train examples left after holding out {validation_size}")
  keep = cut if train_size is None else train_size
  if placement == "auto":
    too_big = name != "digits" and (keep * _example_bytes(builder)
                                    > device_fraction * host.device_memory_bytes())
    placement = "host" if too_big else "device"
  source = None
  if placement == "host":
    source = host.RecordSource(read=read_train, num_examples=keep)
    images, labels = read_train(np.arange(min(head_size, keep)))
    valid_images, valid_labels = read_train(np.arange(cut, num_train))
  else:
    if name != "digits":   # one batched read of the whole split
      images, labels = read_train(np.arange(num_train))
    valid_images, valid_labels = images[cut:], labels[cut:]
    images, labels = images[:keep], labels[:keep]
  return Splits(
      train_images=images, train_labels=labels.astype(np.int32),
      valid_images=valid_images, valid_labels=valid_labels.astype(np.int32),
      test_images=test_images, test_labels=test_labels.astype(np.int32),
      num_classes=num_classes, pixel_scale=pixel_scale, name=name, train_source=source)


def _load_text(name, data_dir, validation_size, train_size, context_length) -> Splits:
  if validation_size or train_size:
    raise ValueError(f"dataset.validation_size={validation_size} and dataset.train_size="
                     f"{train_size} must be 0 for text: {name!r} is split by whole works")
  if context_length < 1:
    raise ValueError(f"model.context_length={context_length} must be >= 1 for text data {name!r}")
  builder = _prepared_builder(name, data_dir)
  texts = {split: builder.read_text(split) for split in text.SPLITS}
  T = context_length
  for split, at_least in (("train", 2), ("validation", 1), ("test", 1)):
    # Training needs a spare window for its random phase (text.train_windows_per_epoch).
    if text.num_windows(len(texts[split]), T) < at_least:
      raise ValueError(f"model.context_length={T} is longer than the {split} text of {name!r}"
                       f" allows ({len(texts[split])} bytes): use at most"
                       f" {(len(texts[split]) - 1) // at_least}")
  train_x, train_y = text.fixed_windows(texts["train"], T,
                                        text.train_windows_per_epoch(len(texts["train"]), T))
  (valid_x, valid_y), (test_x, test_y) = (text.fixed_windows(texts[s], T) for s in text.SPLITS[1:])
  return Splits(train_images=train_x, train_labels=train_y.astype(np.int32),
                valid_images=valid_x, valid_labels=valid_y.astype(np.int32),
                test_images=test_x, test_labels=test_y.astype(np.int32),
                num_classes=256, pixel_scale=1.0, name=name, context_length=T,
                train_text=texts["train"])


def check_name(name: str) -> None:
  """The errors a name shows without reading anything: empty, or a version of a project set."""
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(f"dataset.name={name!r} is empty: use one of {_KNOWN} or the name of a set"
                      " prepared in the TFDS data dir")
  base, _, version = name.partition(":")
  if version and base in _KNOWN:
    raise ConfigError(f"dataset.name={name!r}: the project's {base!r} has one version, not"
                      f" {version!r}: use dataset.name={base!r}")


def _digits():
  from sklearn.datasets import load_digits  # Imported here: only this data set needs scikit-learn.
  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # Pixel values 0..16, kept as they are.
  labels = digits.target
  cut = len(labels) - _DIGITS_TEST_SIZE
  return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if name in _BUILDERS:
    builder = _BUILDERS[name](data_dir=data_dir)
    if not builder.is_prepared():
      # Trials started together (a Slurm array) would all prepare, and all but one fail on TFDS's
      # final rename: one prepares while the others wait, then they reuse its result.
      os.makedirs(data_dir, exist_ok=True)
      with open(os.path.join(data_dir, f".{builder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = _BUILDERS[name](data_dir=data_dir)  # Sees data prepared while we waited.
        if not builder.is_prepared():
          _prepare(builder, name, data_dir)
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None   # not a name TFDS registers, but it may be prepared in the data dir
  except (ValueError, AssertionError) as error:  # a version TFDS does not have, a malformed name
    reason = re.sub(r'^Failed to construct dataset .*?builder_kwargs ".*?": ', "",
                    " ".join(str(error).split("\n")[0].split()))
    raise ConfigError(f"dataset.name={name!r} cannot be built ({reason}): use one of {_KNOWN},"
                      " or name[/config][:x.y.z] of a TFDS set prepared in the data dir") from None
  if builder is None or not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset.name={name!r} is not prepared in {data_dir} and this machine cannot download it:"
        f" use one of {_KNOWN}, or prepare it with TFDS elsewhere and copy it there")
  return builder


def _prepare(builder, name: str, data_dir: str) -> None:
  """Prepares a project data set, saying so on stderr: stdout carries only what scripts parse
  (--list_trials' table), and TFDS prints its banners there."""
  print(f"Preparing data set {name!r} in {data_dir} (first use only: later runs reuse it)...",
        file=sys.stderr, flush=True)
  start = time.monotonic()
  try:
    with contextlib.redirect_stdout(sys.stderr):
      builder.download_and_prepare(file_format="array_record")
  except Exception:
    # TFDS removes its incomplete files but leaves the data set's directory: a failed
    # prepare (a corrupted download) leaves nothing of the data set behind.
    _remove_if_empty(os.path.join(data_dir, builder.name))
    raise
  print(f"Prepared {name!r} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def _remove_if_empty(directory: str) -> None:
  for path in sorted((os.path.join(root, d) for root, dirs, _ in os.walk(directory) for d in dirs),
                     reverse=True) + [directory]:
    try:
      os.rmdir(path)   # Only ever removes empty directories.
    except OSError:
      pass


def _reader(builder, split: str):
  """A split's random access: indices [n] -> (images [n, ...], labels int32 [n]), one batched
  read per call (per-index reads are far slower; benchmarks/README.md: batched host reads)."""
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(f"dataset.name={builder.name!r} is prepared as"
                      f" {builder.info.file_format.value} in the data dir, and only array_record"
                      " files can be read by index: prepare it with file_format='array_record'")
  if isinstance(builder, tfds_builders.IdxBuilder):
    raw = builder.raw_source(split)
    return lambda index: tfds_builders.parse_records(raw.__getitems__(index.tolist()))
  source = builder.as_data_source(split)

  def read(index):
    examples = source.__getitems__(index.tolist())
    return (np.stack([example["image"] for example in examples]),
            np.array([example["label"] for example in examples], np.int32))
  return read


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  return _reader(builder, split)(np.arange(builder.info.splits[split].num_examples))


def _example_bytes(builder) -> float:
  """Bytes of one train example (image + int32 label); inf when the image shape varies."""
  image = builder.info.features["image"]
  if any(d is None for d in image.shape):
    return float("inf")
  return float(np.prod(image.shape) * np.dtype(image.np_dtype).itemsize + 4)
