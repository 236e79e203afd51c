"""Damaged files of a finished sweep, met from the command line: `scaling.status`, `scaling.report`
and `scaling.measure_checkpoint` end in one line on stderr naming the file and the fix, never a
traceback. Status still lists every trial, the report is written from the trials left undamaged,
and the report writes only inside its workdir.

One tiny sweep (2 trials of configs/mnist_sweep_tiny.py, 12 steps each) trains once per module;
each case damages a copy of it. status and report import no JAX, so their subprocesses are cheap.
"""
import csv
import os
import shutil
import subprocess
import sys

import pytest

from scaling.analysis import report, results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST, SECOND = "bs=16,lr_multiplier=2,seed=0", "bs=32,lr_multiplier=2,seed=0"


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  from configs import mnist_sweep_tiny
  from scaling import sweep
  c = mnist_sweep_tiny.get_config()
  c.num_devices = 1
  c.sweep.batch_size, c.sweep.lr_multiplier, c.sweep.seed = (16, 32), (2.0,), (0,)
  c.budget.length, c.checkpoint.every_steps = 12.0, 12
  workdir = str(tmp_path_factory.mktemp("finished") / "sweep")
  assert [s["status"] for s in sweep.main(c, workdir)] == ["done", "done"]
  return workdir


@pytest.fixture
def workdir(finished_sweep, tmp_path):
  """A copy of the finished sweep, to damage."""
  copy = str(tmp_path / "sweep")
  shutil.copytree(finished_sweep, copy)
  return copy


def tool(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def assert_one_line(process, returncode: int, *words: str) -> str:
  """No traceback, `returncode`, and a last line on stderr that holds every one of `words`."""
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  assert process.returncode == returncode, process.stderr[-3000:]
  last = (process.stderr.strip().splitlines() or [""])[-1]
  for word in words:
    assert word in last, process.stderr[-3000:]
  return last


def damage(workdir: str, name: str, how: str) -> str:
  """Damages the first trial's file `name` (`how`: a key of DAMAGE); returns its path."""
  path = os.path.join(workdir, "trials", FIRST, name)
  if how == "a directory":
    os.remove(path)
    os.makedirs(path)
    return path
  with open(path, "rb") as f:
    content = f.read()
  content = {"[1, 2]": b"[1, 2]", "{}": b"{}", "truncated": content[:len(content) // 2],
             "not UTF-8": content[:20] + b"\xff\xfe" + content[22:],
             "lines 1 and \"a\"": content + b'1\n"a"\n'}[how]
  with open(path, "wb") as f:
    f.write(content)
  return path


# (file, damage, what the one line must say beyond the path)
DAMAGE = {
    "summary.json [1, 2]": ("summary.json", "[1, 2]", ["not a JSON object",
                                                       "delete it and rerun that trial"]),
    "summary.json not UTF-8": ("summary.json", "not UTF-8", ["not UTF-8",
                                                             "delete it and rerun that trial"]),
    "metrics.jsonl not UTF-8": ("metrics.jsonl", "not UTF-8", ["not UTF-8", "restore it from a"
                                                               " copy, or delete"]),
    "metrics.jsonl lines 1 and \"a\"": ("metrics.jsonl", "lines 1 and \"a\"",
                                        ["line 9 holds a number, not a JSON object",
                                         "restore it from a copy, or delete"]),
    "metrics.jsonl a directory": ("metrics.jsonl", "a directory", ["a directory, not a file",
                                                                   "restore it from a copy"]),
    "config.json {}": ("config.json", "{}", ["an empty object", "restore it from a copy"]),
}


# 7. Status: every trial listed, each damaged file named in one line, exit status 1.

@pytest.mark.parametrize("how", ["truncated", "[1, 2]"])
def test_status_lists_the_trials_of_a_sweep_whose_sweep_json_is_damaged(workdir, how):
  path = os.path.join(workdir, "sweep.json")
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[:len(content) // 2] if how == "truncated" else b"[1, 2]")
  process = tool("scaling.status", f"--workdir={workdir}")
  assert_one_line(process, 1, path, "is damaged", "rerun scaling.main")
  assert len(process.stderr.strip().splitlines()) == 1
  lines = process.stdout.splitlines()
  assert lines[-1] == "2 trials: 2 done"
  assert lines[1].split()[-1] == FIRST and lines[2].split()[-1] == SECOND
  assert lines[1].split()[:3] == ["-", "done", "12/12"]


@pytest.mark.parametrize("name,how,words", DAMAGE.values(), ids=DAMAGE.keys())
def test_status_names_a_damaged_trial_file_and_lists_every_trial(workdir, name, how, words):
  path = damage(workdir, name, how)
  process = tool("scaling.status", f"--workdir={workdir}")
  assert_one_line(process, 1, path, "is damaged", *words)
  assert len(process.stderr.strip().splitlines()) == 1
  rows = [line.split() for line in process.stdout.splitlines()[1:-1]]
  assert [row[-1] for row in rows] == [FIRST, SECOND]
  assert rows[0][1] == ("damaged" if name == "summary.json" else "done")
  assert rows[1][:3] == ["1", "done", "12/12"]


# 7. Report: a damaged trial is left out with a warning naming the file; the report refuses (one
# line, nothing written) only when no trial is left.

@pytest.mark.parametrize("case", ["metrics.jsonl not UTF-8", "config.json {}"])
def test_the_report_leaves_out_a_damaged_trial_naming_the_file(workdir, case):
  name, how, words = DAMAGE[case]
  path = damage(workdir, name, how)
  process = tool("scaling.report", f"--workdir={workdir}")
  assert process.returncode == 0, process.stderr[-3000:]
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  (warning,) = [line for line in process.stderr.splitlines() if path in line]
  assert f"left out trial trials/{FIRST}" in warning and all(w in warning for w in words)
  with open(os.path.join(workdir, "report", "trials.csv")) as f:
    assert [row["trial_id"] for row in csv.DictReader(f)] == [SECOND]
  with open(os.path.join(workdir, "report", "index.html")) as f:
    assert f"left out trial trials/{FIRST}" in f.read()


@pytest.mark.parametrize("case", [c for c in DAMAGE if c not in ("metrics.jsonl not UTF-8",
                                                                 "config.json {}")])
def test_every_damaged_file_leaves_its_trial_out(workdir, case):
  """The other cases of DAMAGE, through the report's loader (the CLI's path is the same)."""
  name, how, words = DAMAGE[case]
  path = damage(workdir, name, how)
  damaged = []
  assert [t.trial_id for t in results.load_trials(workdir, damaged)] == [SECOND]
  (error,) = damaged
  assert error.path == path and all(w in str(error) for w in words)


def test_a_report_with_every_trial_damaged_is_one_line_and_writes_nothing(workdir):
  path = damage(workdir, "metrics.jsonl", "not UTF-8")
  os.remove(os.path.join(workdir, "trials", SECOND, "summary.json"))
  with open(os.path.join(workdir, "trials", SECOND, "config.json"), "w") as f:
    f.write("[]")
  process = tool("scaling.report", f"--workdir={workdir}")
  assert_one_line(process, 1, "report error:", os.path.join(workdir, "trials", SECOND,
                                                            "config.json"),
                  "not a JSON object", "delete it and rerun that trial")
  assert path in process.stderr and len(process.stderr.strip().splitlines()) == 2
  assert not os.path.lexists(os.path.join(workdir, "report"))


def _unshare_works() -> bool:
  return shutil.which("unshare") is not None and subprocess.run(
      ["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -m` to mount a small tmpfs")
def test_the_report_on_a_full_disk_is_one_line(finished_sweep, tmp_path):
  """The sweep's small files on a 64 KiB tmpfs (a private mount namespace): the report's first
  plots fill it."""
  staged, disk = tmp_path / "staged", tmp_path / "disk"
  shutil.copytree(finished_sweep, staged, ignore=shutil.ignore_patterns("checkpoints", "events.*"))
  os.makedirs(disk)
  script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && cp -r {staged} {disk}/sweep &&"
            f" {sys.executable} -m scaling.report --workdir={disk}/sweep; rc=$?;"
            f" ls -a {disk}/sweep/report; exit $rc")
  process = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert_one_line(process, 1, "report error: disk full while writing",
                  f"{disk}/sweep/report/", "free space")
  assert not [n for n in process.stdout.split() if ".tmp" in n]   # no half-written file left


# 8. The report writes only inside its workdir.

def test_the_report_refuses_a_report_link_that_leads_outside_the_workdir(workdir, tmp_path):
  outside = tmp_path / "outside"
  os.makedirs(outside)
  os.symlink(outside, os.path.join(workdir, "report"))
  process = tool("scaling.report", f"--workdir={workdir}")
  assert_one_line(process, 1, "report error:", os.path.join(workdir, "report"), "is a link",
                  "writes only inside its workdir")
  assert os.listdir(outside) == []


def test_a_link_planted_inside_the_report_is_replaced_not_followed(workdir, tmp_path):
  outside = tmp_path / "outside.html"
  outside.write_text("not the report's\n")
  os.makedirs(os.path.join(workdir, "report"))
  for name in ("index.html", "trials.csv", "steps_to_target.png"):
    os.symlink(outside, os.path.join(workdir, "report", name))
  report.write_report(workdir)
  assert outside.read_text() == "not the report's\n"
  for name in ("index.html", "trials.csv", "steps_to_target.png"):
    assert not os.path.islink(os.path.join(workdir, "report", name))


# 7. measure_checkpoint on a damaged config.json; 11. the tools without --workdir.

def test_measure_checkpoint_on_an_empty_config_json_is_one_line(workdir):
  path = damage(workdir, "config.json", "{}")
  process = tool("scaling.measure_checkpoint", f"--workdir={os.path.dirname(path)}",
                 "--nodensity")
  assert_one_line(process, 1, path, "is damaged", "restore it from a copy")


@pytest.mark.parametrize("module", ["scaling.status", "scaling.measure_checkpoint",
                                    "scaling.report"])
def test_a_tool_without_workdir_is_one_line(module):
  process = tool(module)
  last = assert_one_line(process, 1, "--workdir is required:", f"python -m {module} --workdir=")
  assert process.stderr.strip() == last
