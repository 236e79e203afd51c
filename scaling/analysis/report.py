"""Sweep report: trial dirs -> CSV tables, PNG plots and an index.html. No JAX.

    python -m scaling.report --workdir=runs/mnist_sweep

Works on partial or still-running sweeps. Reading trials is scaling/analysis/results.py, the study protocol
(best tuned point per batch size, critical-batch fit and interval) scaling/analysis/study.py, figures
against batch size scaling/analysis/sweep_plots.py, a trial's curves over training scaling/analysis/trial_plots.py.

A trial with a damaged file (results.Damaged: not UTF-8, not JSON, not an object, a directory, no
batch size) is left out of the report, which the other trials still make: one warning line on
stderr per such trial naming the file and the fix, and the same as a note in the report; the exit
status stays 0. Only when no trial is left does the report refuse, exit status 1, and write
nothing. Bad input (a workdir that is not a directory, a report/ that is a link or a file) and a
full disk are one line on stderr, exit status 1. The report writes only inside <workdir>/report/,
each file to a temporary name renamed onto it: a link planted at report/ is refused, one planted
at a file's name is replaced, never followed, and a full disk leaves the earlier file in place.
"""
import collections
import contextlib
import csv
import errno
import html
import json
import logging
import math
import os
import sys
import time
import urllib.parse

import numpy as np

from scaling.analysis import findings, results, study
from scaling.config import ConfigError, parse_tool_flags

# A Lanczos eigenvalue whose Ritz residual |H y - lambda y| exceeds this fraction of |lambda| is
# flagged unconverged: an exact eigenvalue lies within the residual, so below it lambda is within
# 1% of one.
EIGEN_RESIDUAL_LIMIT = 0.01


def trial_table(trials):
  """One row per trial, for trials.csv."""
  rows = []
  for t in trials:
    f, b_simple = t.final, t.series("noise/b_simple")[2]
    b_simple = b_simple[np.isfinite(b_simple)]
    rows.append({
        "trial_id": t.trial_id, "group": t.group, "batch_size": t.batch_size,
        "lr_rule": t.lr_rule, "optimizer": t.optimizer, "base_lr": t.base_lr, "lr": t.lr,
        "lr_multiplier": t.lr_multiplier, "seed": t.seed, "status": t.status,
        "stop_reason": t.stop_reason, "step": t.last_step, "step_cap": t.step_cap,
        "diverged_at_step": t.diverged_at_step, "target": f"{t.target_metric}<{t.target_value:g}",
        "steps_to_target": t.steps_to_target, "steps_interpolated": t.steps_interpolated,
        "eval_interval": t.eval_interval, "examples_to_target": t.examples_to_target,
        "best_valid_error": t.best.get("valid/error"), "best_test_error": t.best.get("test/error"),
        "final_valid_error": f.get("valid/error"), "final_test_error": f.get("test/error"),
        "final_train_loss": f.get("train/loss"), "final_train_eval_error": f.get("train_eval/error"),
        "generalization_gap": t.gap, "hessian_trace": f.get("curvature/hessian_trace"),
        "top_eigenvalue": f.get("curvature/top_eigenvalue"), "sharpness": f.get("curvature/sharpness"),
        "b_simple_final": f.get("noise/b_simple"),
        "b_simple_median": float(np.median(b_simple)) if len(b_simple) else None,
        "b_simple_at_target": t.at_target.get("noise/b_simple"),
        "b_simple_frozen_at_target": t.at_target.get("noise/frozen_b_simple"),
        "b_simple_frozen_at_target_stderr": t.at_target.get("noise/frozen_b_simple_stderr"),
        "b_simple_window_examples": _ema_window_examples(t),
        "top_eigenvalue_at_target": t.at_target.get("curvature/top_eigenvalue"),
        "hessian_trace_at_target": t.at_target.get("curvature/hessian_trace"),
        "wall_time_s": t.wall_time, "wall_time_to_target_s": t.at_target.get("wall_time"),
        **{k: t.cost.get(k) for k in ("examples_per_sec", "compile_seconds", "peak_memory_bytes",
                                      "memory_source")}})
  return rows


def _ema_window_examples(t):
  """The noise-scale EMA averages over ~1/(1 - decay) steps: that many batches of examples."""
  decay = results.get(t.config, "noise_scale.ema_decay")
  return t.batch_size / (1 - decay) if isinstance(decay, (int, float)) and decay < 1 else None


def unconverged_eigenvalues(trial) -> list[str]:
  """One note per curvature measurement of `trial` with an eigenvalue above EIGEN_RESIDUAL_LIMIT."""
  notes = []
  for r in trial.records:
    bad = [f"λ_{i}={lam:.4g} (residual {r[f'curvature/eig_residual_{i}']:.2g})"
           for i, lam in enumerate(r.get("curvature/eigenvalues", []))
           if not r.get(f"curvature/eig_residual_{i}", 0) <= EIGEN_RESIDUAL_LIMIT * abs(lam)]
    if bad:
      notes.append(f"step {r['step']}: unconverged eigenvalue(s) {', '.join(bad)}: residual above"
                   f" {EIGEN_RESIDUAL_LIMIT:g} |λ|; raise curvature.lanczos_steps")
  return notes


def write_csv(path, rows):
  cols = list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows([{k: "" if r.get(k) is None else r[k] for k in cols} for r in rows])


def _fmt(v):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, float):
    return f"{v:.4g}"
  return html.escape(str(v))


def _cell(v):
  return v if isinstance(v, Raw) else _fmt(v)


def _html_table(rows, cols=None):
  if not rows:
    return "<p>(none)</p>"
  cols = cols or list(dict.fromkeys(k for r in rows for k in r if not k.startswith("_")))
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>"
                 for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _interval(fit, name):
  """'[lo, hi]' of fit_table's `{name}_lo`/`{name}_hi` (name: b_crit, or b_crit_batchboot...)."""
  lo, hi = fit[f"{name}_lo"], fit[f"{name}_hi"]
  return "–" if math.isnan(lo) else f"[{lo:.4g}, {hi:.4g}]"


def _b_simple_range(fit):
  if fit["b_simple_at_target"] is None:
    return "–"
  return (f"{fit['b_simple_at_target']:.4g} [{fit['b_simple_at_target_min']:.3g}, "
          f"{fit['b_simple_at_target_max']:.3g}]")


def _pm(v, err):
  return _fmt(v) if err is None or not math.isfinite(err) else f"{v:.4g} ± {err:.2g}"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:85%;margin-bottom:1em}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:4px 0}"
        "figure{margin:1.5em 0}figcaption{max-width:60em;font-size:90%}"
        ".findings{font-size:110%;max-width:60em;line-height:1.4}"
        ".note{color:#a40}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:85%}")


def last_updated(trial) -> float:
  """When the trial last wrote a file the report reads (seconds since the epoch)."""
  times = [os.path.getmtime(os.path.join(trial.path, n))
           for n in ("metrics.jsonl", "summary.json", "config.json")
           if os.path.exists(os.path.join(trial.path, n))]
  return max(times, default=0.0)


def _utc(seconds):
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _link_row(row, trial, workdir):
  """A trial row whose id links to its directory and metrics, with its TensorBoard run name
  (`tensorboard --logdir WORKDIR` names each run by its directory relative to WORKDIR)."""
  rel = os.path.relpath(trial.path, workdir)
  href = "../" + urllib.parse.quote(rel, safe="/=,.+-_()[]") + "/"
  return {"trial_id": Raw(f"<a href='{html.escape(href)}'>{html.escape(row['trial_id'])}</a>"),
          "metrics": Raw(f"<a href='{html.escape(href)}metrics.jsonl'>metrics.jsonl</a>"),
          "tensorboard_run": rel, **{k: v for k, v in row.items() if k != "trial_id"}}


class Raw(str):
  """Table cell HTML written as is (a link), not escaped."""


def _pending_rows(trials, trows, workdir):
  rows = []
  for t, r in zip(trials, trows):
    if t.status in ("done", "diverged"):
      continue
    reason = (t.summary or {}).get("failed_reason") or (t.summary or {}).get("stop_reason")
    rows.append(_link_row(dict(trial_id=t.trial_id, status=t.status,
                               step=f"{t.last_step} of {t.step_cap or '?'}",
                               last_updated=_utc(last_updated(t)), reason=reason,
                               batch_size=t.batch_size, lr=t.lr), t, workdir))
  return rows


def _key_numbers(fits):
  return [dict(group=f["group"], b_crit=_pm(f["b_crit"], f["b_crit_err"]),
               b_crit_95_seeds=_interval(f, "b_crit"),
               b_crit_95_batchboot=_interval(f, "b_crit_batchboot"),
               b_simple_at_target=_b_simple_range(f),
               b_simple_at_target_source=f["b_simple_at_target_source"],
               s_min=_pm(f["s_min"], f["s_min_err"]), s_min_95_seeds=_interval(f, "s_min"),
               s_min_95_batchboot=_interval(f, "s_min_batchboot"),
               e_min=_pm(f["e_min"], f["e_min_err"]), e_min_95_seeds=_interval(f, "e_min"),
               seeds_per_batch=f["seeds_per_batch"],
               **{f"fewer_than_{study.MIN_SEEDS}_seeds_at": f["few_seed_batch_sizes"] or "none"},
               fitted_batch_sizes=f["fitted_batch_sizes"],
               censored_batch_sizes=f["censored_batch_sizes"] or "none",
               best_lr_at_grid_edge=f["lr_at_edge"] or "none",
               perfect_scaling_up_to=f["perfect_scaling_up_to"],
               largest_batch_reached=f["largest_batch_reached"], note=f["note"]) for f in fits]


def expected_trials(workdir):
  """The sweep's trial count from sweep.json (trials not started have no directory yet)."""
  sweep = results.read_json(os.path.join(workdir, "sweep.json"))
  listed = sweep.get("trials") if isinstance(sweep, dict) else None
  return len(listed) if isinstance(listed, list) else None


def _index_html(workdir, trials, trows, best_rows, fits, images, notes):
  h = html.escape
  sweep = results.read_json(os.path.join(workdir, "sweep.json"))
  varying = results.varying_fields(trials)
  common = {k: v for k, v in (results.flatten(trials[0].config) if trials else {}).items()
            if k not in varying and k != "trial_id"}
  updated = max((last_updated(t) for t in trials), default=0.0)
  tol = study.PERFECT_SCALING_TOLERANCE
  windows = sorted({(t.batch_size, _ema_window_examples(t)) for t in trials
                    if _ema_window_examples(t)})
  captions = findings.captions(trials)
  stops = collections.Counter(t.stop_reason or t.status for t in trials)
  parts = [
      f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {h(workdir)}</title>"
      f"<style>{_CSS}</style></head><body><h1>Scaling report: {h(os.path.abspath(workdir))}</h1>",
      f"<p>Written {h(_utc(time.time()))}; trials last updated {h(_utc(updated))}.</p>",
      "<h2>Findings</h2><p class='findings'>"
      + " ".join(h(s) for s in findings.findings(trials, best_rows, fits,
                                                 expected_trials(workdir))) + "</p>",
      f"<p><b>Protocol.</b> {h(findings.protocol(trials))} Why trials stopped: "
      f"{h(', '.join(f'{k}: {v}' for k, v in sorted(stops.items())) or '–')}.</p>"]
  pending = _pending_rows(trials, trows, workdir)
  if pending:
    parts += ["<h2>Trials not finished</h2>",
              _html_table(pending, ["trial_id", "status", "step", "last_updated", "reason",
                                    "batch_size", "lr", "metrics", "tensorboard_run"])]
  parts.append("<h2>Figures</h2>")
  for i, (name, title, note) in enumerate(images, 1):
    caption = f"<b>Figure {i}. {h(title)}.</b> {h(captions.get(name, ''))}"
    parts.append(f"<figure id='{h(name)}'>" + (
        f"<p class='note'>Skipped: {h(note)}</p>" if note else
        f"<img src='{h(name)}' alt='{h(title)}'>") + f"<figcaption>{caption}</figcaption></figure>")
  if notes:
    parts += ["<h2>Notes</h2><ul>", *(f"<li class='note'>{h(n)}</li>" for n in notes), "</ul>"]
  parts += [
      "<h2>Tables</h2>",
      "<h3>Key numbers</h3><p>B_crit, S_min, E_min: least-squares fit of S = S_min (1 + B_crit/B)"
      " (McCandlish et al. 2018) to the best S at the <i>fitted</i> batch sizes (the censored"
      " ones never reached the target and are left out), S being the steps to target after"
      " warmup (each trial's warmup steps subtracted); E_min = S_min B_crit; &plusmn; one"
      " standard error. <i>_95_seeds</i>: the reported 95% seed-bootstrap interval (batch sizes"
      " fixed; each replicate redraws every batch size's seeds, takes the median over them and"
      " chooses the best setting again); with fewer than"
      f" {study.MIN_SEEDS} seeds at a batch size it sees little of the seed noise (none with one"
      " seed). <i>_95_batchboot</i>: the 95% batch-size bootstrap interval (batch sizes"
      " resampled, then seeds within each), which also holds the points' scatter about the"
      " curve. B_crit = inf where a replicate still scales perfectly at the largest B."
      " <i>b_simple_at_target</i>: B_simple = tr(Σ)/|G|² when "
      "each best trial first reached the target, median [min, max] over batch sizes, at that"
      " checkpoint's frozen parameters where `measure_checkpoint --noise_draws` measured it"
      " (<i>b_simple_at_target_source</i>), else from the training EMA, which lags: it "
      "averages over ~1/(1-decay) steps = "
      f"{h(', '.join(f'B={b}: {w:.3g}' for b, w in windows[:1] + windows[-1:]) or '?')} examples."
      " <i>perfect_scaling_up_to</i>: the largest batch size up to which every batch size "
      f"reached the target with examples within {tol:g}x those at the smallest.</p>",
      _html_table(_key_numbers(fits))]
  linked = [_link_row(r, t, workdir) for r, t in zip(trows, trials)]
  for name, title, rows in (("critical_batch_fit", "Critical batch size fit", fits),
                            ("best_per_batch", "Best trial per batch size (steps_*: S, steps "
                             "to target after warmup)", best_rows),
                            ("trials", "All trials (id: its directory; steps_to_target, "
                             "steps_interpolated: from step 0, warmup included)", linked)):
    parts += [f"<h3>{title} (<a href='{name}.csv'>{name}.csv</a>)</h3>", _html_table(rows)]
  parts += ["<h2>Configuration</h2>",
            "<details><summary>Fields that vary between trials</summary>",
            _html_table([dict(field=k, values=", ".join(v)) for k, v in varying.items()]),
            "</details><details><summary>Fields shared by all trials</summary>"
            f"<pre>{h(json.dumps(common, indent=2, default=str))}</pre></details>"]
  if sweep is not None:
    parts.append("<details><summary>Sweep definition (sweep.json)</summary>"
                 f"<pre>{h(json.dumps(sweep, indent=2))}</pre></details>")
  return "\n".join(parts + ["</body></html>"])


class WriteError(Exception):
  """The report could not be written (a full disk): one line naming the file."""


def _disk_full(error):
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _disk_full_as_one_line(path):
  try:
    yield
  except OSError as error:
    if _disk_full(error):
      raise WriteError(f"disk full while writing {path}: free space on its disk and rerun the"
                       " report, which writes every file again") from None
    if isinstance(error, (IsADirectoryError, NotADirectoryError, PermissionError)):
      raise WriteError(f"cannot write {path} ({error.strerror}): move what is there out of the"
                       " way (the report writes every file again) and rerun") from None
    raise


@contextlib.contextmanager
def _writing(path):
  """A temporary name beside `path`, renamed onto it when the block ends: a page open in a browser
  never shows half a file, and a link planted at `path` is replaced, not followed. On a full disk
  the previous file stays and the temporary one goes (WriteError)."""
  directory, name = os.path.split(path)
  tmp = os.path.join(directory, f".tmp{os.getpid()}.{name}")   # savefig's format from the extension
  try:
    with _disk_full_as_one_line(path):
      yield tmp
      if os.path.lexists(tmp):
        os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def report_dir(workdir):
  """<workdir>/report, or ConfigError when it is a link (it could lead anywhere: the report writes
  only inside its workdir) or not a directory."""
  out = os.path.join(workdir, results.REPORT_DIR)
  if os.path.islink(out):
    raise ConfigError(f"{out} is a link (to {os.readlink(out)}): the report writes only inside its"
                      f" workdir: remove the link (rm {out}) and rerun the report")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise ConfigError(f"{out} is not a directory: move it out of the way and rerun the report")
  return out


def _damaged_sweep_json(workdir):
  """A note when sweep.json (what a sweep plans) is damaged: the report is made without it."""
  try:
    results.read_object(os.path.join(workdir, "sweep.json"))
  except results.Damaged as error:
    return [f"{error}; the report leaves out how many trials the sweep plans"]
  return []


def write_report(workdir):
  """Writes <workdir>/report/ (PNGs, CSVs, index.html) and returns its path; the module docstring
  says what becomes of damaged files. Nothing is written before the trials are read."""
  from scaling.analysis import sweep_plots, trial_plots  # matplotlib only when a report is written
  out = report_dir(workdir)
  damaged = []
  trials = results.load_trials(workdir, damaged)
  if damaged and not trials:   # each damaged trial named; the last one is the error itself
    for error in damaged[:-1]:
      print(f"report error: {error}", file=sys.stderr)
    raise damaged[-1]
  notes = [f"left out trial {os.path.relpath(os.path.dirname(e.path), workdir)}: {e}"
           for e in damaged] + _damaged_sweep_json(workdir)
  for note in notes:
    print(f"report: warning: {note}", file=sys.stderr)
  notes += [f"{t.trial_id}: {n}" for t in trials for n in t.notes + unconverged_eigenvalues(t)]
  if not trials:
    notes.append(f"no trial directories (with a config.json) under {workdir}")
  trows, best_rows = trial_table(trials), study.best_per_batch(trials)
  for row, t in zip(trows, trials):
    row["directory"] = os.path.relpath(t.path, workdir)
    row["last_updated"] = _utc(last_updated(t))
  fits = study.fit_table(best_rows)
  notes += [f"{f['group']}: critical batch fit: {f['note']}" for f in fits if f["note"]]
  with _disk_full_as_one_line(out):
    os.makedirs(out, exist_ok=True)
  for name, rows in (("trials", trows), ("best_per_batch", best_rows), ("critical_batch_fit", fits)):
    with _writing(os.path.join(out, f"{name}.csv")) as tmp:
      write_csv(tmp, rows)
  images = []
  plots = trial_plots.SINGLE_TRIAL_PLOTS if len(trials) == 1 else sweep_plots.PLOTS
  for name, title, fn in plots:
    path = os.path.join(out, name)
    with _writing(path) as tmp:
      try:
        note = fn(tmp, trials, best_rows, fits)
      except Exception as e:  # one broken plot must not cost the rest of the report
        if _disk_full(e):   # ... but a full disk costs every later file
          raise
        logging.exception("plot %s failed", name)
        note = f"plot failed: {type(e).__name__}: {e}"
      if note:  # no image: a stale one from an earlier report would contradict the note
        for stale in (tmp, path):
          if os.path.lexists(stale):
            os.remove(stale)
    images.append((name, title, note))
  with _writing(os.path.join(out, "index.html")) as tmp, open(tmp, "w") as f:
    f.write(_index_html(workdir, trials, trows, best_rows, fits, images, notes))
  return out


def check_workdir(workdir):
  """The report's bad input, as one ConfigError before anything is written: a workdir that is not
  a directory, or a report/ in it that is a link or not a directory (`report_dir`)."""
  if not os.path.isdir(workdir):
    what = "is not a directory" if os.path.exists(workdir) else "does not exist"
    raise ConfigError(f"--workdir={workdir} {what}: pass the --workdir given to scaling.main")
  if not (os.path.exists(os.path.join(workdir, "sweep.json")) or results.find_trial_dirs(workdir)):
    raise ConfigError(f"--workdir={workdir} holds no sweep or trial (no sweep.json, no directory"
                      " with a config.json): pass the --workdir given to scaling.main")
  report_dir(workdir)


USAGE = "python -m scaling.report --workdir=DIR"


def main(argv):
  from absl import flags
  del argv
  try:
    check_workdir(flags.FLAGS.workdir)
    out = write_report(flags.FLAGS.workdir)
  except (ConfigError, results.Damaged, WriteError) as error:  # one line: the file and the fix
    sys.exit(f"report error: {error}")
  print(f"report written to {os.path.join(out, 'index.html')}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Sweep (or single-trial) workdir to report on.")
  app.run(main, flags_parser=lambda argv: parse_tool_flags(
      argv, "report error", USAGE, "pass the --workdir given to scaling.main"))
