"""PNG figures of a sweep against batch size (steps and examples to target, the critical-batch fit,
tuned LR, noise scale, cost, final errors and curvature) and PLOTS, the sweep report's list. Shares
the figure helpers of scaling/analysis/trial_plots.py; same conventions (Agg canvas, no pyplot; each plot
function takes (path, trials, best_rows, fits), writes `path`, returns None or why it was skipped).
"""
import numpy as np
from matplotlib import cm
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from scaling.analysis.trial_plots import (BATCH_LABEL, batch_colorbar, colour_by_batch, edge_of_stability,
                                 log_scales, new_figure, save_figure, thin, training_curves)


def _group_colours(groups):
  return {g: cm.tab10(i % 10) for i, g in enumerate(sorted(set(groups)))}


def _batch_axis(ax, batch_sizes):
  """Log2 x axis with a tick at every batch size in the sweep."""
  ax.set_xscale("log", base=2)
  bs = sorted(set(int(b) for b in batch_sizes if b > 0))
  if bs:
    step = max(1, len(bs) // 12)
    ax.xaxis.set_major_locator(FixedLocator(bs[::step]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in bs[::step]], rotation=45 if len(bs) > 8 else 0)
  ax.set_xlabel(BATCH_LABEL)
  ax.grid(True, which="major", alpha=0.3)


def _target_text(trials):
  return ", ".join(sorted({f"{t.target_metric} < {t.target_value:g}" for t in trials}))


def _to_target(path, trials, best_rows, fits, quantity):
  """Shallue et al. 2018 Fig. 1: best steps (or examples) to target vs batch size per group."""
  key = f"{quantity}_to_target"
  reached = [r for r in best_rows if r["outcome"] == "reached"]
  if not reached:
    return "no batch size has reached the target yet"
  colours = _group_colours(r["group"] for r in best_rows)
  top = 2.0 * max(r[key] for r in reached)
  bottom = 0.7 * min(r[key] for r in reached)
  fig = new_figure(8, 5.5)
  ax = fig.add_subplot()
  for i, (group, c) in enumerate(colours.items()):
    rows = [r for r in best_rows if r["group"] == group]
    pts = [(r["batch_size"], r[key], r["steps_min"], r["steps_max"]) for r in rows
           if r["outcome"] == "reached"]
    if pts:
      b, y, lo, hi = np.array(pts, dtype=float).T
      scale = 1.0 if quantity == "steps" else b
      hi = np.where(np.isfinite(hi), hi, top / scale)   # a seed that never reached: to the top
      ax.errorbar(b, y, yerr=[y - lo * scale, hi * scale - y], fmt="o-", color=c, capsize=3,
                  label=f"{group} (median over seeds; bars: min-max)")
      _fit_band(ax, fits, group, c, b, quantity)
      bmax = max(r["batch_size"] for r in rows)
      line_b = np.array([b[0], bmax])
      line_y = y[0] * b[0] / line_b if quantity == "steps" else np.full(2, y[0])
      ax.plot(line_b, line_y, "--", color=c, alpha=0.6, lw=1)
      bottom = min(bottom, 0.7 * line_y[-1])
    for kind, marker in (("not reached", "^"), ("diverged", "x"), ("pending", "s")):
      b = [r["batch_size"] for r in rows if _top_marker(r) == kind]
      ax.plot(b, [top * 1.12**i] * len(b), marker, ls="none", mfc="none", mew=1.5, ms=9, color=c)
  ax.axhline(top / 1.12, color="0.6", lw=0.8)
  ax.set_xlim(min(r["batch_size"] for r in best_rows) / 1.6, max(r["batch_size"] for r in best_rows) * 1.6)
  log_scales(ax, x=False)
  ax.set_ylim(bottom, top * 1.12 ** (len(colours) + 1))
  _batch_axis(ax, [r["batch_size"] for r in best_rows])
  what = "optimizer steps" if quantity == "steps" else "training examples"
  ax.set_ylabel(f"{what} to target after warmup (best setting per B)")
  ax.set_title(f"{what.capitalize()} to reach {_target_text(trials)}")
  handles, _ = ax.get_legend_handles_labels()
  handles += [Line2D([], [], ls="--", color="k", lw=1, label="perfect scaling (from smallest B)"),
              Line2D([], [], ls=":", color="k", lw=1,
                     label="B_crit (shaded: 95% seed-bootstrap interval)"),
              Line2D([], [], marker="^", ls="none", mfc="none", color="k",
                     label="never reached (above line)"),
              Line2D([], [], marker="x", ls="none", color="k", label="all trials diverged"),
              Line2D([], [], marker="s", ls="none", mfc="none", color="k",
                     label="not yet reached, still running")]
  ax.legend(handles=handles, fontsize=8, loc="best")
  save_figure(fig, path)


def _fit_band(ax, fits, group, c, b, quantity):
  """The fitted S(B) (or E(B)) with the pointwise 95% band of its seed-bootstrap replicates,
  B_crit with its interval, and the three regimes named."""
  (f,) = [f for f in fits if f["group"] == group]
  if not np.isfinite(f["b_crit"]):
    return
  grid = np.geomspace(b.min() / 1.5, b.max() * 1.5, 200)
  curve = lambda s_min, e_min: (s_min + e_min / grid) * (1 if quantity == "steps" else grid)
  ax.plot(grid, curve(f["s_min"], f["e_min"]), "-", color=c, lw=1.5, alpha=0.8,
          label=f"fit: B_crit={f['b_crit']:.3g} [95% seeds: {f['b_crit_lo']:.3g}, "
                f"{f['b_crit_hi']:.3g}]")
  boot = f.get("_boot")
  boot = boot[np.isfinite(boot).all(axis=1)] if boot is not None else None
  if boot is not None and len(boot) > 10:
    curves = np.array([curve(s, e) for s, e, _ in boot])
    lo, hi = np.percentile(curves, (2.5, 97.5), axis=0)
    ax.fill_between(grid, np.maximum(lo, 1e-9), hi, color=c, alpha=0.15, lw=0)
  ax.axvline(f["b_crit"], color=c, ls=":", lw=1)
  if np.isfinite(f["b_crit_lo"]):
    ax.axvspan(max(f["b_crit_lo"], grid[0]), min(f["b_crit_hi"], grid[-1]), color=c, alpha=0.07)
  # The regimes, named where the measured range shows them (B well below / around / above B_crit).
  labels = [(grid[0] * 1.1, "left", "perfect scaling", f["b_crit"] / grid[0] > 4),
            (f["b_crit"], "center", "diminishing returns", grid[0] < f["b_crit"] < grid[-1]),
            (grid[-1] / 1.1, "right", "max. data parallelism", grid[-1] / f["b_crit"] > 4)]
  for x, ha, text, shown in labels:
    if shown:
      ax.text(x, 0.02, text, transform=ax.get_xaxis_transform(), fontsize=8, color="0.3", ha=ha)


def _top_marker(row):
  if row["outcome"] == "not reached" and row["n_diverged"] == row["n_trials"]:
    return "diverged"
  return row["outcome"]


def steps_to_target(path, trials, best_rows, fits):
  return _to_target(path, trials, best_rows, fits, "steps")


def examples_to_target(path, trials, best_rows, fits):
  return _to_target(path, trials, best_rows, fits, "examples")


def critical_batch_fit(path, trials, best_rows, fits):
  """Measured points with the fitted S = S_min (1 + B_crit/B) and E = E_min (1 + B/B_crit)."""
  if not any(np.isfinite(f["b_crit"]) for f in fits):
    return "no group has a critical-batch fit (" + "; ".join(
        f"{f['group']}: {f['note']}" for f in fits) + ")"
  colours = _group_colours(r["group"] for r in best_rows)
  fig = new_figure(13, 5)
  axes = fig.subplots(1, 2)
  for f in fits:
    c = colours[f["group"]]
    pts = [(r["batch_size"], r["steps_to_target"]) for r in best_rows
           if r["group"] == f["group"] and r["outcome"] == "reached"]
    if not pts:
      continue
    b, s = np.array(pts, dtype=float).T
    axes[0].plot(b, s, "o", color=c)
    axes[1].plot(b, s * b, "o", color=c)
    if not np.isfinite(f["b_crit"]):
      axes[0].plot([], [], "o", color=c, label=f"{f['group']}: no fit ({f['note']})")
      continue
    grid = np.geomspace(b.min() / 2, b.max() * 2, 200)
    err = f"±{f['b_crit_err']:.2g}" if np.isfinite(f["b_crit_err"]) else ""
    label = f"{f['group']}: B_crit={f['b_crit']:.3g}{err}, S_min={f['s_min']:.3g}"
    axes[0].plot(grid, f["s_min"] * (1 + f["b_crit"] / grid), "-", color=c, label=label)
    axes[1].plot(grid, f["e_min"] * (1 + grid / f["b_crit"]), "-", color=c,
                 label=f"{f['group']}: E_min={f['e_min']:.3g}")
    for ax in axes:
      ax.axvline(f["b_crit"], color=c, ls=":", lw=1)
  for ax, what in zip(axes, ("optimizer steps S", "training examples E = S·B")):
    log_scales(ax, x=False)
    _batch_axis(ax, [r["batch_size"] for r in best_rows])
    ax.set_ylabel(f"{what} to target after warmup")
    ax.legend(fontsize=8)
  axes[0].set_title("Fit S = S_min (1 + B_crit / B)  (dotted: B_crit)")
  axes[1].set_title("Same fit as E = E_min (1 + B / B_crit)")
  save_figure(fig, path)


def noise_scale(path, trials, best_rows, fits):
  """B_simple over training per trial, and its final/median per trial vs batch size vs B_crit."""
  data = [(t, t.series("noise/b_simple")) for t in trials]
  data = [(t, s) for t, s in data if np.isfinite(s[2]).any()]
  if not data:
    return "no noise/b_simple in any metrics.jsonl"
  colours = _group_colours(t.group for t in trials)
  sm = colour_by_batch(trials)
  fig = new_figure(14, 5.5)
  ax0, ax1 = fig.subplots(1, 2)
  for t, (_, ex, v) in data:
    ax0.plot(*thin(ex, v), color=sm.to_rgba(t.batch_size), lw=1, alpha=0.8)
  log_scales(ax0)
  ax0.set(xlabel="training examples seen",
          ylabel="B_simple = tr Σ / |G|² (examples)", title="Gradient noise scale over training")
  ax0.grid(True, alpha=0.3)
  batch_colorbar(fig, sm, ax0, trials)
  for t, (_, _, v) in data:
    v = v[np.isfinite(v)]
    c = colours[t.group]
    ax1.plot(t.batch_size, v[-1], "o", color=c)
    ax1.plot(t.batch_size, np.median(v), "o", mfc="none", color=c)
  for f in fits:
    if np.isfinite(f["b_crit"]):
      ax1.axhline(f["b_crit"], color=colours[f["group"]], ls="--", lw=1)
  bs = [t.batch_size for t in trials]
  ax1.plot([min(bs), max(bs)], [min(bs), max(bs)], ":", color="0.5")
  log_scales(ax1, x=False)
  _batch_axis(ax1, bs)
  ax1.set_ylabel("B_simple (examples)")
  ax1.set_title("B_simple per trial vs fitted B_crit")
  handles = [Line2D([], [], marker="o", ls="none", color=c, label=g) for g, c in colours.items()]
  handles += [Line2D([], [], marker="o", ls="none", color="k", label="final B_simple"),
              Line2D([], [], marker="o", ls="none", mfc="none", color="k", label="median over training"),
              Line2D([], [], ls="--", color="k", label="fitted B_crit (per group)"),
              Line2D([], [], ls=":", color="0.5", label="B_simple = B")]
  ax1.legend(handles=handles, fontsize=8)
  save_figure(fig, path)


def _final_vs_batch(path, trials, panels, title):
  """Panels of final values vs batch size: dots per trial, line through the mean per B."""
  ok = [t for t in trials if t.status != "diverged"]
  panels = [(k, label, log) for k, label, log in panels
            if any(_final(t, k) is not None for t in ok)]
  if not panels:
    return "no trial (that did not diverge) has these metrics"
  colours = _group_colours(t.group for t in trials)
  fig = new_figure(5.2 * len(panels), 4.8)
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  for ax, (key, label, log) in zip(axes, panels):
    for group, c in colours.items():
      pts = [(t.batch_size, _final(t, key)) for t in ok if t.group == group]
      pts = np.array([p for p in pts if p[1] is not None and np.isfinite(p[1])], dtype=float)
      if not len(pts):
        continue
      ax.plot(pts[:, 0], pts[:, 1], ".", color=c, alpha=0.5)
      bs = np.unique(pts[:, 0])
      ax.plot(bs, [pts[pts[:, 0] == b, 1].mean() for b in bs], "-", color=c, label=group)
    if log and all((_final(t, key) or 1) > 0 for t in ok):
      log_scales(ax, x=False)
    _batch_axis(ax, [t.batch_size for t in trials])
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
  n_div = len(trials) - len(ok)
  fig.suptitle(title + (f" ({n_div} diverged trials not shown)" if n_div else "")
               + "; dots: trials, lines: mean per batch size")
  save_figure(fig, path)


def _final(t, key):
  return t.gap if key == "gap" else t.final.get(key)


def errors_vs_batch(path, trials, best_rows, fits):
  return _final_vs_batch(path, trials, [
      ("valid/error", "final validation error (fraction)", True),
      ("test/error", "final test error (fraction)", True),
      ("gap", "generalization gap: test − train error", False)],
      "Final error and generalization gap vs batch size")


def curvature_vs_batch(path, trials, best_rows, fits):
  return _final_vs_batch(path, trials, [
      ("curvature/hessian_trace", "Hessian trace (final)", True),
      ("curvature/top_eigenvalue", "top Hessian eigenvalue λ_max (final)", True),
      ("curvature/sharpness", "ε-sharpness (Keskar et al., %)", True)],
      "Curvature at the end of training vs batch size")


def tuned_lr(path, trials, best_rows, fits):
  """Shallue et al. Fig. 8: every trial's LR vs batch size (reached / not / diverged, i.e.
  infeasible), the best LR per batch size, and linear and sqrt lines through the smallest."""
  pts = [t for t in trials if np.isfinite(t.lr) and t.lr > 0]
  if not pts:
    return "no trial has a learning rate"
  colours = _group_colours(r["group"] for r in best_rows)
  fig = new_figure(8, 5.5)
  ax = fig.add_subplot()
  kinds = (("reached target", "o", dict(color="0.55"), lambda t: t.reached),
           ("did not reach (cap)", "o", dict(color="0.55", mfc="none"),
            lambda t: not t.reached and t.status == "done"),
           ("diverged (infeasible)", "x", dict(color="red", mew=1.5), lambda t: t.status == "diverged"),
           ("running / preempted", "s", dict(color="0.55", mfc="none"),
            lambda t: t.status not in ("done", "diverged")))
  for label, marker, style, keep in kinds:
    sel = [t for t in pts if keep(t)]
    ax.plot([t.batch_size for t in sel], [t.lr for t in sel], marker, ls="none", ms=6,
            label=label, **style)
  for group, c in colours.items():
    rows = [r for r in best_rows if r["group"] == group and r["lr"]]
    if not rows:
      continue
    b, lr = np.array([(r["batch_size"], r["lr"]) for r in rows], dtype=float).T
    ax.plot(b, lr, "*-", color=c, ms=13, label=f"{group}: best LR per B (median steps to target)")
    edge = [r for r in rows if r["lr_at_edge"]]
    ax.plot([r["batch_size"] for r in edge], [r["lr"] for r in edge], "o", ms=18, mfc="none",
            color="orange", mew=2, label="best at the grid edge (widen the grid)" if edge else None)
    grid = np.array([b[0], b[-1]])
    ax.plot(grid, lr[0] * grid / b[0], "--", color="0.3", lw=1, label="linear from smallest B")
    ax.plot(grid, lr[0] * np.sqrt(grid / b[0]), ":", color="0.3", lw=1.2,
            label="sqrt from smallest B")
  log_scales(ax, x=False)
  _batch_axis(ax, [t.batch_size for t in pts])
  ax.set_ylabel("peak learning rate")
  ax.set_title("Tuned learning rate vs batch size (grid moves with B)")
  ax.legend(fontsize=8)
  save_figure(fig, path)


def equal_loss(path, trials, best_rows, fits):
  """McCandlish et al. 2018 at equal loss: B_simple when each trial first reached the target vs
  the fitted B_crit; and (S/S_min - 1)(E/E_min - 1) = 1 with the measured points."""
  fitted = [f for f in fits if np.isfinite(f["b_crit"]) and f["s_min"] > 0 and f["e_min"] > 0]
  at = [(t, t.at_target.get("noise/b_simple")) for t in trials if t.reached]
  at = [(t, v) for t, v in at if v is not None and np.isfinite(v)]
  if not fitted and not at:
    return "no critical-batch fit and no B_simple at the target"
  colours = _group_colours(r["group"] for r in best_rows)
  fig = new_figure(14, 5.5)
  ax0, ax1 = fig.subplots(1, 2)
  for t, v in at:
    ax0.plot(t.batch_size, v, "o", color=colours[t.group], alpha=0.35, ms=5)
  for r in best_rows:
    if r["b_simple_at_target"] is not None:
      ax0.plot(r["batch_size"], r["b_simple_at_target"], "D", color=colours[r["group"]], ms=7)
  for f in fitted:
    c = colours[f["group"]]
    ax0.axhline(f["b_crit"], color=c, ls="--", lw=1.2)
    if np.isfinite(f["b_crit_lo"]):
      ax0.axhspan(f["b_crit_lo"], min(f["b_crit_hi"], 1e12), color=c, alpha=0.1)
  ax0.set_yscale("symlog", linthresh=10)
  _batch_axis(ax0, [t.batch_size for t in trials])
  ax0.set_ylabel("B_simple at the target (examples)")
  ax0.set_title("Noise scale at equal loss vs fitted B_crit")
  ax0.legend(handles=[
      Line2D([], [], marker="o", ls="none", color="0.5", alpha=0.5, label="each trial that reached"),
      Line2D([], [], marker="D", ls="none", color="k", label="best point per B (median)"),
      Line2D([], [], ls="--", color="k", label="fitted B_crit (band: 95% seed bootstrap)")],
      fontsize=8)
  span = [1e-2, 1e2]
  for f in fitted:
    rows = [r for r in best_rows if r["group"] == f["group"] and r["outcome"] == "reached"]
    s = np.array([r["steps_to_target"] for r in rows], dtype=float)
    e = np.array([r["examples_to_target"] for r in rows], dtype=float)
    b = np.array([r["batch_size"] for r in rows])
    xs, ys = s / f["s_min"] - 1, e / f["e_min"] - 1
    ok = (xs > 0) & (ys > 0)
    ax1.plot(xs[ok], ys[ok], "o", color=colours[f["group"]], label=f["group"])
    if ok.any():
      span = [min(span[0], xs[ok].min(), 1 / ys[ok].max()), max(span[1], xs[ok].max(), 1 / ys[ok].min())]
    for xi, yi, bi in zip(xs[ok], ys[ok], b[ok]):
      ax1.annotate(str(bi), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
  x = np.geomspace(span[0] / 3, span[1] * 3, 200)
  ax1.plot(x, 1 / x, "-", color="k", lw=1, label="(S/S_min − 1)(E/E_min − 1) = 1")
  ax1.set_xscale("log")
  ax1.set_yscale("log")
  ax1.set(xlabel="S / S_min − 1", ylabel="E / E_min − 1",
          title="McCandlish et al. eq. 2.11 with the measured points (labels: B)")
  ax1.grid(True, alpha=0.3)
  ax1.legend(fontsize=8)
  save_figure(fig, path)


def resources(path, trials, best_rows, fits):
  """Throughput, peak memory, wall-clock time to target and compile time per batch size."""
  panels = [("examples_per_sec", "training throughput (examples/s, steady state)", "cost"),
            ("peak_memory_bytes", "peak device memory (MB)", "cost"),
            ("wall_time", "wall-clock time to target (s)", "at_target"),
            ("compile_seconds", "compile time (s)", "cost")]
  have = lambda t, key, where: isinstance(getattr(t, where).get(key), (int, float))
  panels = [p for p in panels if any(have(t, p[0], p[2]) for t in trials)]
  if not panels:
    return "no throughput, memory or timing in any summary.json"
  colours = _group_colours(t.group for t in trials)
  fig = new_figure(5 * len(panels), 4.6)
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  sources = {t.cost.get("memory_source") for t in trials} - {None}
  for ax, (key, label, where) in zip(axes, panels):
    scale = 1e-6 if key == "peak_memory_bytes" else 1.0
    for group, c in colours.items():
      pts = np.array([(t.batch_size, getattr(t, where)[key] * scale) for t in trials
                      if t.group == group and have(t, key, where)], dtype=float).reshape(-1, 2)
      if not len(pts):
        continue
      ax.plot(pts[:, 0], pts[:, 1], ".", color=c, alpha=0.5)
      bs = np.unique(pts[:, 0])
      ax.plot(bs, [np.median(pts[pts[:, 0] == b, 1]) for b in bs], "-", color=c, label=group)
    log_scales(ax, x=False)
    _batch_axis(ax, [t.batch_size for t in trials])
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    if key == "peak_memory_bytes" and sources:
      ax.set_title("source: " + ", ".join(sorted(sources)), fontsize=9)
    if key == "wall_time":
      ax.set_title("trials that reached the target (incl. eval, compile)", fontsize=9)
  fig.suptitle("Cost per batch size (dots: trials, line: median)")
  save_figure(fig, path)


# (file name, title, function): the order of the images in index.html.
PLOTS = [
    ("steps_to_target.png", "Steps to target after warmup (S) vs batch size", steps_to_target),
    ("examples_to_target.png", "Examples to target after warmup (S x B) vs batch size",
     examples_to_target),
    ("critical_batch_fit.png", "Critical batch size: fit of S = S_min (1 + B_crit/B)",
     critical_batch_fit),
    ("tuned_lr.png", "Tuned learning rate per batch size (infeasible: diverged)", tuned_lr),
    ("equal_loss.png", "At equal loss: B_simple at the target vs B_crit; eq. 2.11", equal_loss),
    ("resources.png", "Throughput, memory, time to target, compile time vs batch size", resources),
    ("noise_scale.png", "Gradient noise scale B_simple vs fitted B_crit", noise_scale),
    ("errors_vs_batch.png", "Final error and generalization gap vs batch size", errors_vs_batch),
    ("curvature_vs_batch.png", "Hessian trace, top eigenvalue, sharpness vs batch size",
     curvature_vs_batch),
    ("edge_of_stability.png", "Top eigenvalue over training vs 2/lr", edge_of_stability),
    ("training_curves.png", "Training curves", training_curves),
]
