"""Sweep report: trial dirs -> CSV tables, PNG plots and an index.html. No JAX.

    python -m scaling.report --workdir=runs/mnist_sweep

Reads what scaling/train.py writes per trial (config.json, metrics.jsonl, summary.json) and works
on partial or still-running sweeps. Steps to target follow Shallue et al. 2018: the first eval
whose target metric is strictly below the target value; per (group, batch size) the best trial
over seeds and other metaparameters counts. The critical batch size comes from a fit of McCandlish
et al. 2018's S = S_min (1 + B_crit / B). Plotting lives in scaling/report_plots.py.
"""
import collections
import csv
import dataclasses
import html
import json
import logging
import math
import os
import sys

import numpy as np

from scaling.config import ConfigError

# Perfect scaling "holds" at batch size B while the examples to target are within this factor of
# those at the group's smallest batch size (on the perfect-scaling line E is constant).
PERFECT_SCALING_TOLERANCE = 1.2
REPORT_DIR = "report"
# A Lanczos eigenvalue whose Ritz residual |H y - lambda y| exceeds this fraction of |lambda| is
# flagged unconverged: an exact eigenvalue lies within the residual, so below it lambda is within
# 1% of one.
EIGEN_RESIDUAL_LIMIT = 0.01
PENDING = ("running", "preempted")


@dataclasses.dataclass
class Trial:
  """One trial's files plus the numbers the report needs; `records` are metrics.jsonl lines."""
  trial_id: str
  path: str
  config: dict
  summary: dict | None
  records: list
  batch_size: int
  lr_rule: str
  optimizer: str
  base_lr: float
  lr: float
  seed: int
  status: str               # done | diverged | running | preempted ('running' if no summary.json)
  target_metric: str
  target_value: float
  steps_to_target: int | None
  examples_to_target: int | None
  final: dict               # metric -> value at the end (summary.json, else last logged value)
  best: dict                # 'valid/error', 'test/error' -> minimum over training
  wall_time: float
  diverged_at_step: int | None
  notes: list
  group: str = ""           # set by load_trials: rule/optimizer (+ model/dataset where they vary)

  def series(self, key):
    """(steps, examples, values) float arrays over the records that hold `key`."""
    rows = [(r.get("step", np.nan), r.get("examples", np.nan), _num(r[key]))
            for r in self.records if key in r and not isinstance(r[key], (list, dict))]
    if not rows:
      return np.zeros(0), np.zeros(0), np.zeros(0)
    return tuple(np.asarray(c, dtype=float) for c in zip(*rows))

  @property
  def reached(self):
    return self.steps_to_target is not None

  @property
  def gap(self):
    """Generalization gap: final test error - final train error (eval mode, fixed subset)."""
    te, tr = self.final.get("test/error"), self.final.get("train_eval/error")
    return None if te is None or tr is None else te - tr

  @property
  def last_step(self):
    if self.summary and self.summary.get("step") is not None:
      return self.summary["step"]
    return max((r.get("step", 0) for r in self.records), default=0)


def _num(x):
  return np.nan if x is None else float(x)


def _get(d, dotted, default=None):
  for k in dotted.split("."):
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):   # absent, or being written right now
    return None


def read_metrics(path):
  """metrics.jsonl -> list of dicts. NaN/Infinity tokens parse; a torn last line is skipped."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [_parse_line(line) for line in f]
  return [r for r in records if isinstance(r, dict)]


def _parse_line(line):
  try:
    return json.loads(line)
  except ValueError:
    return None


def first_below(records, metric, value, batch_size):
  """(step, examples) of the first record whose `metric` is strictly below `value`, else None."""
  for r in records:
    v = r.get(metric)
    if isinstance(v, (int, float)) and v < value:
      return int(r["step"]), int(r.get("examples") or r["step"] * batch_size)
  return None


def _load_trial(path):
  config = _read_json(os.path.join(path, "config.json"))
  if not isinstance(config, dict):
    return None
  summary = _read_json(os.path.join(path, "summary.json"))
  s = summary if isinstance(summary, dict) else {}
  records = read_metrics(os.path.join(path, "metrics.jsonl"))
  bs, notes = int(_get(config, "batch_size", 0)), []
  target = s.get("target") or {}
  metric = target.get("metric") or _get(config, "target.metric", "valid/error")
  value = _num(target.get("value", _get(config, "target.value")))
  measured = first_below(records, metric, value, bs)
  if target.get("reached") and target.get("step") is not None:
    steps, examples = int(target["step"]), target.get("examples") or int(target["step"]) * bs
    if measured and measured[0] != steps:
      notes.append(f"summary.json: target reached at step {steps}, metrics.jsonl: at step "
                   f"{measured[0]}; using summary.json")
  else:  # metrics.jsonl is the ground truth where summary.json lacks the answer
    steps, examples = measured or (None, None)

  if s:
    status = s.get("status", "running")
  else:  # no summary yet: running, unless the loss already blew up
    status = "diverged" if any(isinstance(r.get("train/loss"), float) and
                               not math.isfinite(r["train/loss"]) for r in records) else "running"
  final = {}
  for r in records:  # the last logged value of every metric
    final.update((k, float(v)) for k, v in r.items() if isinstance(v, (int, float)))
  wall_time = s.get("wall_time") or final.pop("wall_time", 0.0)
  final = {k: v for k, v in final.items() if k not in ("step", "examples", "wall_time")}
  for k, v in {**s.get("final", {}), **s.get("noise", {}), **s.get("curvature", {})}.items():
    if isinstance(v, (int, float)):
      final[k] = float(v)
  best = {}
  for k in ("valid/error", "test/error"):
    vals = np.asarray([_num(r[k]) for r in records if isinstance(r.get(k), (int, float))])
    best[k] = float(np.nanmin(vals)) if np.isfinite(vals).any() else None
    if isinstance((s.get("best") or {}).get(k), (int, float)):
      best[k] = float(s["best"][k])
  return Trial(
      trial_id=str(config.get("trial_id") or os.path.basename(os.path.abspath(path))),
      path=path, config=config, summary=summary if s else None, records=records, batch_size=bs,
      lr_rule=str(_get(config, "lr_rule", "none")),
      optimizer=str(_get(config, "optimizer.name", "?")),
      base_lr=_num(_get(config, "base_lr")), lr=_num(_get(config, "derived.lr")),
      seed=int(_get(config, "seed", 0)), status=status, target_metric=metric,
      target_value=value, steps_to_target=steps, examples_to_target=examples, final=final,
      best=best, wall_time=float(wall_time),
      diverged_at_step=s.get("diverged_at_step"), notes=notes)


def find_trial_dirs(workdir):
  """Every dir under workdir (itself included, report/ excluded) that holds a config.json."""
  found = []
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not (root == workdir and d == REPORT_DIR))
    if "config.json" in files:
      found.append(root)
  # A sweep-level config.json in the workdir itself is not a trial unless it has metrics.
  if len(found) > 1 and found[0] == workdir and not any(
      os.path.exists(os.path.join(workdir, f)) for f in ("metrics.jsonl", "summary.json")):
    found = found[1:]
  return found


def _group_label(trial, varying):
  rule = trial.lr_rule  # lr = base_lr (B / B_ref)^power: the power is part of a 'power' rule
  power = _get(trial.config, "derived.lr_power", _get(trial.config, "lr_power"))
  rule += f"({_num(power):g})" if rule == "power" else ""
  extra = [str(_get(trial.config, k)) for k in ("model.name", "dataset.name") if k in varying]
  return "/".join([rule, trial.optimizer, *extra])


def _numeric_first(text):
  x = json.loads(text)
  return (0, x, "") if type(x) in (int, float) else (1, 0, text)


def varying_fields(trials):
  """Flattened config keys whose value differs between trials -> sorted distinct values."""
  flat = [_flatten(t.config) for t in trials]
  values = {k: sorted({json.dumps(f.get(k), sort_keys=True) for f in flat}, key=_numeric_first)
            for k in sorted({k for f in flat for k in f} - {"trial_id"})}
  return {k: v for k, v in values.items() if len(v) > 1}


def load_trials(workdir):
  """All trials under `workdir`, sorted by (group, batch size, seed, id)."""
  trials = [t for t in map(_load_trial, find_trial_dirs(workdir)) if t is not None]
  varying = varying_fields(trials)
  ids = collections.Counter(t.trial_id for t in trials)
  for t in trials:
    t.group = _group_label(t, varying)
    if ids[t.trial_id] > 1:  # e.g. single-trial runs gathered under one dir all say 'trial'
      t.trial_id = os.path.relpath(t.path, workdir)
  return sorted(trials, key=lambda t: (t.group, t.batch_size, t.seed, t.trial_id))


def fit_critical_batch(batch_sizes, steps):
  """Fits S = S_min (1 + B_crit / B) to (B, steps-to-target) points (McCandlish et al. 2018).

  S = S_min + E_min / B is linear in (S_min, E_min = S_min B_crit); least squares on relative
  residuals (S - model) / S, since steps span decades. Errors: the fit covariance scaled by the
  residual variance (needs >= 3 points), propagated to B_crit = E_min / S_min.
  """
  b = np.asarray(batch_sizes, dtype=float)
  s = np.asarray(steps, dtype=float)
  ok = np.isfinite(b) & np.isfinite(s) & (b > 0) & (s > 0)
  b, s = b[ok], s[ok]
  nan = float("nan")
  out = dict(s_min=nan, s_min_err=nan, e_min=nan, e_min_err=nan, b_crit=nan, b_crit_err=nan,
             n_points=int(len(b)), note="")
  if len(np.unique(b)) < 2:
    out["note"] = "needs >= 2 distinct batch sizes that reached the target"
    return out
  x = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
  coef, *_ = np.linalg.lstsq(x, np.ones_like(s), rcond=None)
  s_min, e_min = coef  # np.float64: a zero S_min gives inf, not an exception
  dof = len(b) - 2
  resid = np.ones_like(s) - x @ coef
  cov = np.linalg.pinv(x.T @ x) * float(resid @ resid) / dof if dof > 0 else np.full((2, 2), nan)
  out["note"] = "" if dof > 0 else "2 points: exact fit, no uncertainty"
  with np.errstate(divide="ignore", invalid="ignore"):
    grad = np.array([-e_min / s_min**2, 1.0 / s_min])  # d B_crit / d (S_min, E_min)
    out.update(s_min=s_min, s_min_err=np.sqrt(abs(cov[0, 0])), e_min=e_min,
               e_min_err=np.sqrt(abs(cov[1, 1])), b_crit=e_min / s_min,
               b_crit_err=np.sqrt(abs(grad @ cov @ grad)))
  out.update({k: float(v) for k, v in out.items() if k not in ("n_points", "note")})
  if s_min <= 0 or e_min <= 0:
    out["b_crit"] = out["b_crit_err"] = nan
    out["note"] = ("S_min <= 0: steps still fall as 1/B at the largest batch size; B_crit is above "
                   "the measured range" if s_min <= 0 else
                   "E_min <= 0: steps do not fall with batch size; B_crit is below the measured range")
  return out


def best_per_batch(trials, tolerance=PERFECT_SCALING_TOLERANCE):
  """One row per (group, batch size): the trial with the fewest steps to target (Shallue's rule).

  outcome: 'reached'; 'pending' (none reached, some still running or preempted); 'not reached'.
  examples_ratio: examples to target / those at the group's smallest batch size that reached it.
  """
  rows = []
  for group in sorted({t.group for t in trials}):
    e_ref, holding = None, True
    for bs in sorted({t.batch_size for t in trials if t.group == group}):
      ts = [t for t in trials if t.group == group and t.batch_size == bs]
      reached = sorted((t for t in ts if t.reached), key=lambda t: t.steps_to_target)
      pending = sum(t.status in PENDING for t in ts)
      row = dict(group=group, lr_rule=ts[0].lr_rule, optimizer=ts[0].optimizer, batch_size=bs,
                 n_trials=len(ts), n_reached=len(reached),
                 n_diverged=sum(t.status == "diverged" for t in ts), n_pending=pending,
                 outcome="reached" if reached else "pending" if pending else "not reached",
                 best_trial=None, steps_to_target=None, examples_to_target=None,
                 examples_ratio=None, perfect_scaling=False)
      if reached:
        best = reached[0]
        e_ref = e_ref or best.examples_to_target
        holding = holding and best.examples_to_target / e_ref <= tolerance
        row.update(best_trial=best.trial_id, steps_to_target=best.steps_to_target,
                   examples_to_target=best.examples_to_target,
                   examples_ratio=best.examples_to_target / e_ref, perfect_scaling=holding)
      holding = holding and (e_ref is None or bool(reached))
      rows.append(row)
  return rows


def fit_table(best_rows):
  """One row per group: the critical-batch fit and the largest batch size where scaling held."""
  rows = []
  for group in sorted({r["group"] for r in best_rows}):
    g = [r for r in best_rows if r["group"] == group]
    pts = [(r["batch_size"], r["steps_to_target"]) for r in g if r["outcome"] == "reached"]
    fit = fit_critical_batch(*zip(*pts)) if pts else fit_critical_batch([], [])
    held = [r["batch_size"] for r in g if r["perfect_scaling"]]
    rows.append(dict(group=group, lr_rule=g[0]["lr_rule"], optimizer=g[0]["optimizer"], **fit,
                     perfect_scaling_up_to=max(held) if held else None,
                     largest_batch_reached=max((b for b, _ in pts), default=None)))
  return rows


def trial_table(trials):
  """One row per trial, for trials.csv."""
  rows = []
  for t in trials:
    f, b_simple = t.final, t.series("noise/b_simple")[2]
    b_simple = b_simple[np.isfinite(b_simple)]
    rows.append({
        "trial_id": t.trial_id, "group": t.group, "batch_size": t.batch_size,
        "lr_rule": t.lr_rule, "optimizer": t.optimizer, "base_lr": t.base_lr, "lr": t.lr,
        "seed": t.seed, "status": t.status, "step": t.last_step,
        "diverged_at_step": t.diverged_at_step, "target": f"{t.target_metric}<{t.target_value:g}",
        "steps_to_target": t.steps_to_target, "examples_to_target": t.examples_to_target,
        "best_valid_error": t.best.get("valid/error"), "best_test_error": t.best.get("test/error"),
        "final_valid_error": f.get("valid/error"), "final_test_error": f.get("test/error"),
        "final_train_loss": f.get("train/loss"), "final_train_eval_error": f.get("train_eval/error"),
        "generalization_gap": t.gap, "hessian_trace": f.get("curvature/hessian_trace"),
        "top_eigenvalue": f.get("curvature/top_eigenvalue"), "sharpness": f.get("curvature/sharpness"),
        "b_simple_final": f.get("noise/b_simple"),
        "b_simple_median": float(np.median(b_simple)) if len(b_simple) else None,
        "wall_time_s": t.wall_time})
  return rows


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
  cols = list(dict.fromkeys(k for r in rows for k in r))
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


def _html_table(rows, cols=None):
  if not rows:
    return "<p>(none)</p>"
  cols = cols or list(dict.fromkeys(k for r in rows for k in r))
  head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
  body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>"
                 for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _pm(v, err):
  return _fmt(v) if err is None or not math.isfinite(err) else f"{v:.4g} ± {err:.2g}"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:85%;margin-bottom:1em}td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}"
        "th{background:#eee}img{max-width:100%;border:1px solid #ddd;margin:4px 0}"
        ".note{color:#a40}pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:85%}")


def _index_html(workdir, trials, trows, best_rows, fits, images, notes):
  h = html.escape
  status = {**dict.fromkeys(("done", "diverged", "running", "preempted"), 0),
            **collections.Counter(t.status for t in trials)}
  tgt = ", ".join(sorted({f"{t.target_metric} < {t.target_value:g}" for t in trials})) or "?"
  key = [dict(group=f["group"], b_crit=_pm(f["b_crit"], f["b_crit_err"]),
              s_min=_pm(f["s_min"], f["s_min_err"]), e_min=_pm(f["e_min"], f["e_min_err"]),
              points=f["n_points"], perfect_scaling_up_to=f["perfect_scaling_up_to"],
              largest_batch_reached=f["largest_batch_reached"], note=f["note"]) for f in fits]
  sweep = _read_json(os.path.join(workdir, "sweep.json"))
  varying = varying_fields(trials)
  common = {k: v for k, v in (_flatten(trials[0].config) if trials else {}).items()
            if k not in varying and k != "trial_id"}
  tol = PERFECT_SCALING_TOLERANCE
  parts = [
      f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {h(workdir)}</title>"
      f"<style>{_CSS}</style></head><body><h1>Scaling report: {h(os.path.abspath(workdir))}</h1>",
      f"<p>{len(trials)} trials. Target: {h(tgt)}; steps to target = the first evaluation "
      "strictly below it (Shallue et al. 2018), best trial per batch size and group.</p>",
      "<h2>Key numbers</h2><p>B_crit, S_min, E_min: least-squares fit of S = S_min (1 + B_crit/B)"
      " (McCandlish et al. 2018) to the best steps to target per batch size; E_min = S_min B_crit;"
      " &plusmn; one standard error. <i>perfect_scaling_up_to</i>: the largest batch size up to "
      f"which every batch size reached the target with examples to target within {tol:g}x those "
      f"at the group's smallest batch size, i.e. steps within {100 * (tol - 1):.0f}% of the "
      "perfect-scaling line.</p>", _html_table(key),
      "<h2>Trial status</h2>", _html_table([status]), "<h3>Trials not done</h3>",
      _html_table([r for r in trows if r["status"] != "done"],
                  ["trial_id", "status", "step", "diverged_at_step", "batch_size", "lr"])]
  if notes:
    parts += ["<h2>Notes</h2><ul>", *(f"<li class='note'>{h(n)}</li>" for n in notes), "</ul>"]
  parts.append("<h2>Sweep config</h2>")
  if sweep is not None:
    parts.append(f"<h3>sweep.json</h3><pre>{h(json.dumps(sweep, indent=2))}</pre>")
  parts += ["<h3>Fields that vary between trials</h3>",
            _html_table([dict(field=k, values=", ".join(v)) for k, v in varying.items()]),
            "<h3>Fields shared by all trials</h3>",
            f"<pre>{h(json.dumps(common, indent=2, default=str))}</pre><h2>Tables</h2>"]
  for name, title, rows in (("critical_batch_fit", "Critical batch size fit", fits),
                            ("best_per_batch", "Best trial per batch size", best_rows),
                            ("trials", "All trials", trows)):
    parts += [f"<h3>{title} (<a href='{name}.csv'>{name}.csv</a>)</h3>", _html_table(rows)]
  parts.append("<h2>Plots</h2>")
  for name, title, note in images:
    parts.append(f"<h3>{h(title)}</h3>" + (f"<p class='note'>Skipped: {h(note)}</p>" if note
                                            else f"<img src='{h(name)}' alt='{h(title)}'>"))
  return "\n".join(parts + ["</body></html>"])


def write_report(workdir):
  """Writes <workdir>/report/ (PNGs, CSVs, index.html) and returns its path."""
  from scaling import report_plots  # matplotlib only when a report is written
  out = os.path.join(workdir, REPORT_DIR)
  os.makedirs(out, exist_ok=True)
  trials = load_trials(workdir)
  notes = [f"{t.trial_id}: {n}" for t in trials for n in t.notes + unconverged_eigenvalues(t)]
  if not trials:
    notes.append(f"no trial directories (with a config.json) under {workdir}")
  trows, best_rows = trial_table(trials), best_per_batch(trials)
  fits = fit_table(best_rows)
  notes += [f"{f['group']}: critical batch fit: {f['note']}" for f in fits if f["note"]]
  for name, rows in (("trials", trows), ("best_per_batch", best_rows), ("critical_batch_fit", fits)):
    write_csv(os.path.join(out, f"{name}.csv"), rows)
  images = []
  for name, title, fn in report_plots.PLOTS:
    path = os.path.join(out, name)
    try:
      note = fn(path, trials, best_rows, fits)
    except Exception as e:  # one broken plot must not cost the rest of the report
      logging.exception("plot %s failed", name)
      note = f"plot failed: {type(e).__name__}: {e}"
    if note and os.path.exists(path):
      os.remove(path)  # a stale image from an earlier report would contradict the note
    images.append((name, title, note))
  with open(os.path.join(out, "index.html"), "w") as f:
    f.write(_index_html(workdir, trials, trows, best_rows, fits, images, notes))
  return out


def check_workdir(workdir):
  """The report's bad input, as one ConfigError before anything is written: a workdir that is not
  a directory, or a trial's config.json / summary.json that is not a JSON object (both are written
  atomically, so a reader never sees half of one: such a file was damaged after the fact)."""
  if not os.path.isdir(workdir):
    what = "is not a directory" if os.path.exists(workdir) else "does not exist"
    raise ConfigError(f"--workdir={workdir} {what}: pass the --workdir given to scaling.main")
  for root, dirs, files in os.walk(workdir):
    dirs[:] = sorted(d for d in dirs if not (root == workdir and d == REPORT_DIR))
    for name in ("config.json", "summary.json") if "config.json" in files else ():
      path = os.path.join(root, name)
      if name not in files:
        continue
      try:
        with open(path) as f:
          content = json.load(f)
        problem = None if isinstance(content, dict) else "not a JSON object"
      except OSError as error:
        raise ConfigError(f"{path} cannot be read ({error.strerror}): fix its permissions"
                          ) from None
      except ValueError as error:
        problem = f"not JSON: {error}"
      if problem:
        raise ConfigError(f"{path} is corrupt ({problem}): delete it and rerun that trial with"
                          " scaling.main, which rewrites it (from the trial's checkpoint if it"
                          " has one), then rerun the report")


def main(argv):
  from absl import flags
  del argv
  try:
    check_workdir(flags.FLAGS.workdir)
  except ConfigError as error:  # bad input: one line naming the file and the fix
    sys.exit(f"report error: {error}")
  print(f"report written to {os.path.join(write_report(flags.FLAGS.workdir), 'index.html')}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Sweep (or single-trial) workdir to report on.")
  flags.mark_flag_as_required("workdir")

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as error:
      sys.exit(f"report error: {error} (usage: python -m scaling.report --workdir=DIR, the"
               " --workdir given to scaling.main)")

  app.run(main, flags_parser=parse_flags)
