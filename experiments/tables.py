"""The numbers the READMEs quote, regenerated from committed result files.

    python -m experiments.tables --record=<experiment> --workdir=DIR   # DIR's results -> results/
    python -m experiments.tables            # rewrites every generated block from results/
    python -m experiments.tables --check    # exit 1, naming the blocks, where a file differs

A finished run (`python -m experiments.<paper>` or `experiments.default_study`) leaves
verdicts.json (its verdicts and provenance: commit, date, machine, scale, CPU-seconds) and, per
sweep, a report with CSV tables. `--record` copies those small files (never checkpoints) to
experiments/results/<experiment>/: verdicts.json, findings.json where there is one, and for each
sweep under DIR its sweep.json (the resolved trial configs) and report CSVs, at the sweep's path
relative to DIR. It refuses a run made from uncommitted code (its commit would not name the code).

The READMEs hold the numbers only inside generated blocks, lines between `BEGIN generated: NAME`
and `END generated: NAME` (in HTML comments in Markdown), which this module writes: NAME is
`summary` (experiments/README.md's table), an experiment's name (its recorded verdicts) or
`default_study` (README.md and configs/mnist_sweep.py). A block with no result file behind it
says so, and names the commands that make one.
"""
import json
import os
import re
import shutil
import sys
import textwrap

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "experiments/results"
PAPERS = ("keskar", "goyal", "hoffer", "shallue", "mccandlish", "cohen", "malladi")
REPORT_TABLES = ("trials.csv", "best_per_batch.csv", "critical_batch_fit.csv")
MAX_FILE_BYTES = 2_000_000      # result files are small: a larger one is not a table
# The files whose generated blocks this module writes, and how each renders a block.
TARGETS = {"experiments/README.md": "markdown", "README.md": "markdown",
           "configs/mnist_sweep.py": "text"}
BLOCK = re.compile(r"^(?P<head>[^\n]*BEGIN generated: (?P<name>\w+)[^\n]*\n)(?P<body>.*?)"
                   r"(?P<tail>^[^\n]*END generated: (?P=name)[^\n]*$)", re.M | re.S)


class RecordError(Exception):
  """A run that cannot be recorded; its message is the one line the command prints."""


def load(root: str, name: str) -> dict | None:
  """experiments/results/<name>/verdicts.json, with findings.json (a study's findings and trial
  times) as its 'study' where there is one; None if absent."""
  path = os.path.join(root, RESULTS, name, "verdicts.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    out = json.load(f)
  findings = os.path.join(root, RESULTS, name, "findings.json")
  if os.path.exists(findings):
    with open(findings) as f:
      out["study"] = json.load(f)
  return out


def origin(result: dict) -> str:
  p = result["provenance"]
  load = f", load average {p['load_average']}" if p.get("load_average") else ""
  return (f"`--scale={p['scale']}` at commit {p['commit'][:10]}, {p['date']}, {p['machine']};"
          f" {p['cpu_seconds'] / 60:.1f} CPU-min, {p['wall_time_s'] / 60:.1f} min wall{load}")


def command(name: str) -> str:
  return (f"`python -m experiments.{name} --workdir=runs/{name}` then `python -m experiments.tables"
          f" --record={name} --workdir=runs/{name}`")


def missing(name: str) -> str:
  return f"No result of this code is recorded for `{name}` yet: {command(name)} makes one."


def summary_block(root: str) -> str:
  rows = ["| experiment | verdicts (recorded run) | run |", "|---|---|---|"]
  for name in PAPERS:
    result = load(root, name)
    if result is None:
      rows.append(f"| {name} | not recorded on this code | {command(name)} |")
      continue
    outcomes = "; ".join(f"{v['outcome']}: {v['claim']}" for v in result["verdicts"])
    rows.append(f"| {name} | {outcomes} | {origin(result)} |")
  return "\n".join(rows)


def paper_block(root: str, name: str) -> str:
  result = load(root, name)
  if result is None:
    return missing(name)
  lines = [f"**Recorded verdicts** (`{RESULTS}/{name}/verdicts.json`: {origin(result)}):", ""]
  lines += [f"- {v['outcome']}: {v['claim']} -- {v['evidence']} [rule: {v['rule']}]"
            for v in result["verdicts"]]
  return "\n".join(lines)


def default_study_block(root: str, style: str) -> str:
  result = load(root, "default_study")
  if result is None:
    text = [missing("default_study")]
  else:
    study = result["study"]
    trained = (f"; the {study['trials']} trials' own wall times sum to"
               f" {study['trials_wall_time_s'] / 60:.1f} min (a resumed sweep's trials may have"
               " trained in an earlier process)" if "trials_wall_time_s" in study else "")
    text = [f"Measured ({RESULTS}/default_study: {origin(result)}{trained}):", *study["findings"]]
  if style == "markdown":
    return "\n".join([text[0], ""] + [f"- {t}" for t in text[1:]])
  return "\n".join(textwrap.fill(t.replace("`", ""), 100) for t in text)


def render_block(root: str, name: str, style: str) -> str:
  if name == "summary":
    return summary_block(root)
  if name == "default_study":
    return default_study_block(root, style)
  if name in PAPERS:
    return paper_block(root, name)
  raise RecordError(f"unknown generated block {name!r}: expected summary, default_study or one"
                    f" of {', '.join(PAPERS)}")


def render(root: str, relpath: str) -> tuple[str, list[str]]:
  """(the file with every generated block rewritten, the names of the blocks that changed)."""
  with open(os.path.join(root, relpath)) as f:
    text = f.read()
  changed = []

  def rewrite(match):
    body = render_block(root, match["name"], TARGETS[relpath]) + "\n"
    if body != match["body"]:
      changed.append(match["name"])
    return match["head"] + body + match["tail"]

  return BLOCK.sub(rewrite, text), changed


def regenerate(root: str = ROOT, check: bool = False) -> list[str]:
  """Rewrites (or, with check, only compares) every target's blocks; returns 'file: block' for
  each block that differed from its result files."""
  stale = []
  for relpath in TARGETS:
    text, changed = render(root, relpath)
    stale += [f"{relpath}: {name}" for name in changed]
    if changed and not check:
      with open(os.path.join(root, relpath), "w") as f:
        f.write(text)
  return stale


def _copy(src: str, dst: str) -> None:
  if os.path.getsize(src) > MAX_FILE_BYTES:
    raise RecordError(f"{src} is {os.path.getsize(src)} bytes: result files are tables, not"
                      f" checkpoints (at most {MAX_FILE_BYTES})")
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  shutil.copyfile(src, dst)


def record(name: str, workdir: str, root: str = ROOT) -> list[str]:
  """Copies workdir's result files to results/<name>/ (replacing what was there); returns the
  paths written, relative to root."""
  if name not in PAPERS + ("default_study",):
    raise RecordError(f"--record={name}: expected default_study or one of {', '.join(PAPERS)}")
  verdicts = os.path.join(workdir, "verdicts.json")
  if not os.path.exists(verdicts):
    raise RecordError(f"--workdir={workdir} has no verdicts.json: run {command(name)} first")
  with open(verdicts) as f:
    origin_ = json.load(f).get("provenance")
  if not origin_ or not origin_.get("commit"):
    raise RecordError(f"{verdicts} has no provenance (a run of older code): rerun it")
  if origin_.get("scale") == "smoke":
    raise RecordError(f"{verdicts} is a --scale=smoke run: it tests nothing; record a here (or"
                      " paper) run")
  if origin_["uncommitted_changes"]:
    raise RecordError(f"{verdicts} came from uncommitted code at {origin_['commit'][:10]}: commit,"
                      " then rerun, so that the commit names the code")
  out = os.path.join(root, RESULTS, name)
  shutil.rmtree(out, ignore_errors=True)
  files = [(verdicts, "verdicts.json")]
  if os.path.exists(os.path.join(workdir, "findings.json")):
    files.append((os.path.join(workdir, "findings.json"), "findings.json"))
  for here, dirs, names in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if d != "trials")   # trial directories hold checkpoints
    if "sweep.json" in names:
      rel = os.path.relpath(here, workdir)
      files.append((os.path.join(here, "sweep.json"), os.path.join(rel, "sweep.json")))
      files += [(os.path.join(here, "report", t), os.path.join(rel, t)) for t in REPORT_TABLES
                if os.path.exists(os.path.join(here, "report", t))]
  for src, rel in files:
    _copy(src, os.path.normpath(os.path.join(out, rel)))
  return [os.path.relpath(os.path.normpath(os.path.join(out, rel)), root) for _, rel in files]


flags.DEFINE_string("record", None, "copy the results of --workdir's run of this experiment"
                    f" to {RESULTS}/<experiment>/, then regenerate the blocks")
flags.DEFINE_string("workdir", None, "the run to record (with --record)")
flags.DEFINE_bool("check", False, "compare only: exit 1 naming every block that differs from"
                  " the result files")


def main(argv):
  if argv[1:]:
    sys.exit(f"config error: unexpected argument {argv[1]!r}: every option is a flag")
  f = flags.FLAGS
  try:
    if f.record or f.workdir:
      if not (f.record and f.workdir):
        raise RecordError("--record and --workdir go together: --record=<experiment>"
                          " --workdir=<its run>")
      for path in record(f.record, f.workdir):
        print(f"recorded {path}")
    stale = regenerate(check=f.check)
  except RecordError as error:
    sys.exit(f"config error: {error}")
  for block in stale:
    print(f"{'differs' if f.check else 'rewrote'}: {block}")
  if f.check and stale:
    sys.exit(f"{len(stale)} generated block(s) differ from {RESULTS}: run python -m"
             " experiments.tables")


if __name__ == "__main__":
  app.run(main)
