"""metrics.atomic_write, beneath write_json, truncate_after and sweep.csv: all or nothing."""
import errno
import os

import pytest

from scaling.training import metrics


def files(tmp_path):
  return sorted(os.listdir(tmp_path))


def test_a_finished_block_replaces_the_file(tmp_path):
  path = tmp_path / "sweep.csv"
  path.write_text("old\n")
  with metrics.atomic_write(str(path), "sweep.csv", newline="") as f:
    f.write("a,b\r\n")
  assert path.read_bytes() == b"a,b\r\n"     # newline="" writes line ends as given
  assert files(tmp_path) == ["sweep.csv"]


def test_an_error_keeps_the_previous_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text("old\n")
  with pytest.raises(ValueError, match="half way"):
    with metrics.atomic_write(str(path), "summary.json") as f:
      f.write("new, half")
      raise ValueError("half way")
  assert path.read_text() == "old\n"
  assert files(tmp_path) == ["summary.json"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("old\n")
  with pytest.raises(metrics.DiskFull, match="disk full while writing metrics.jsonl") as error:
    with metrics.atomic_write(str(path), "metrics.jsonl"):
      raise OSError(errno.ENOSPC, "No space left on device")
  assert error.value.__cause__ is None and error.value.__suppress_context__
  assert path.read_text() == "old\n"
  assert files(tmp_path) == ["metrics.jsonl"]
