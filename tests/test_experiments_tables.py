"""experiments/tables.py: the READMEs' generated blocks against the committed result files (the
repository's own, through the command), a block that differs named and rewritten, and what
`--record` copies (tables, never checkpoints) and refuses (runs of uncommitted code, smoke runs)."""
import json
import os
import subprocess
import sys

import pytest

from experiments import tables

ROOT = tables.ROOT


def test_the_committed_blocks_match_the_committed_result_files():
  run = subprocess.run([sys.executable, "-m", "experiments.tables", "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr


def _provenance(**changes):
  return {"commit": "0123456789abcdef", "uncommitted_changes": False, "date": "2026-12-08",
          "scale": "here", "machine": "test", "wall_time_s": 60.0, "cpu_seconds": 120.0,
          **changes}


def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(content if isinstance(content, str) else json.dumps(content))


def _repo(root):
  """The three files with generated blocks, empty blocks, under root."""
  block = lambda name: f"<!-- BEGIN generated: {name} -->\n<!-- END generated: {name} -->\n"
  _write(os.path.join(root, "experiments/README.md"),
         "# papers\n" + block("summary") + "## Keskar\ntext\n" + block("keskar") + "after\n")
  _write(os.path.join(root, "README.md"), "# scaling\n" + block("default_study"))
  _write(os.path.join(root, "configs/mnist_sweep.py"),
         '"""Study.\n(BEGIN generated: default_study)\n(END generated: default_study)\n"""\n')


def test_a_block_that_differs_is_named_and_rewritten_from_the_result_file(tmp_path):
  root = str(tmp_path)
  _repo(root)
  assert tables.regenerate(root) == [f"{f}: {b}" for f, b in (
      ("experiments/README.md", "summary"), ("experiments/README.md", "keskar"),
      ("README.md", "default_study"), ("configs/mnist_sweep.py", "default_study"))]
  assert tables.regenerate(root, check=True) == []
  verdict = {"claim": "LB generalizes worse", "outcome": "CONFIRMED",
             "evidence": "SB mean 97.68% vs LB 97.37%", "rule": "SB mean >= LB's"}
  _write(os.path.join(root, tables.RESULTS, "keskar/verdicts.json"),
         {"provenance": _provenance(), "verdicts": [verdict]})
  assert tables.regenerate(root, check=True) == ["experiments/README.md: summary",
                                                 "experiments/README.md: keskar"]
  tables.regenerate(root)
  with open(os.path.join(root, "experiments/README.md")) as f:
    text = f.read()
  assert "- CONFIRMED: LB generalizes worse -- SB mean 97.68% vs LB 97.37%" in text
  assert "commit 0123456789" in text and "2.0 CPU-min" in text and text.endswith("after\n")
  # A changed number in the result file makes the README stale again.
  verdict["evidence"] = "SB mean 97.70% vs LB 97.37%"
  _write(os.path.join(root, tables.RESULTS, "keskar/verdicts.json"),
         {"provenance": _provenance(), "verdicts": [verdict]})
  assert tables.regenerate(root, check=True) == ["experiments/README.md: keskar"]


def _run_dir(workdir, provenance):
  _write(os.path.join(workdir, "verdicts.json"), {"provenance": provenance, "verdicts": []})
  _write(os.path.join(workdir, "findings.json"), {"findings": ["B_crit = 300."]})
  for sweep in ("momentum", "sgd"):
    _write(os.path.join(workdir, "mnist", sweep, "sweep.json"), {"trials": []})
    _write(os.path.join(workdir, "mnist", sweep, "report/trials.csv"), "trial_id\n")
    _write(os.path.join(workdir, "mnist", sweep, "report/index.html"), "<html>")
    _write(os.path.join(workdir, "mnist", sweep, "trials/bs=16/checkpoints/1/x"), "weights")


def test_record_copies_the_tables_and_never_a_checkpoint(tmp_path):
  root, workdir = str(tmp_path / "repo"), str(tmp_path / "run")
  _repo(root)
  tables.regenerate(root)
  _run_dir(workdir, _provenance())
  written = tables.record("default_study", workdir, root)
  assert sorted(written) == sorted(os.path.join(tables.RESULTS, "default_study", p) for p in (
      "verdicts.json", "findings.json", "mnist/momentum/sweep.json",
      "mnist/momentum/trials.csv", "mnist/sgd/sweep.json", "mnist/sgd/trials.csv"))
  assert tables.regenerate(root) == ["README.md: default_study",
                                     "configs/mnist_sweep.py: default_study"]
  with open(os.path.join(root, "README.md")) as f:
    assert "B_crit = 300." in f.read()


@pytest.mark.parametrize("provenance, says", [
    (_provenance(uncommitted_changes=True), "uncommitted code"),
    (_provenance(scale="smoke"), "tests nothing"),
    (None, "no provenance"),
])
def test_record_refuses_a_run_it_cannot_trace(tmp_path, provenance, says):
  root, workdir = str(tmp_path / "repo"), str(tmp_path / "run")
  _repo(root)
  _run_dir(workdir, provenance)
  with pytest.raises(tables.RecordError, match=says):
    tables.record("keskar", workdir, root)
  assert not os.path.exists(os.path.join(root, tables.RESULTS))


@pytest.mark.heavy   # CI's heavy pass: ~40 CPU-s
def test_the_default_study_records_its_provenance_findings_and_frozen_b_simple(tmp_path, capsys):
  from experiments import common, default_study, mccandlish
  args = common.parse_args([f"--workdir={tmp_path}", "--scale=smoke"])
  common.run_experiment(default_study.run, args)
  with open(tmp_path / "verdicts.json") as f:
    saved = json.load(f)
  assert saved["verdicts"] == [] and saved["provenance"]["scale"] == "smoke"
  assert saved["provenance"]["cpu_seconds"] > 0 and len(saved["provenance"]["commit"]) == 40
  with open(tmp_path / "findings.json") as f:
    findings = json.load(f)["findings"]
  assert any("measured at the frozen parameters" in s for s in findings), findings
  examples, draws = mccandlish.NOISE["smoke"]
  noise = [json.load(open(p)) for p in tmp_path.glob("trials/*/noise_*.json")]
  assert noise and all((n["noise/frozen_b_big"], n["noise/frozen_num_draws"]) == (examples, draws)
                       for n in noise)
