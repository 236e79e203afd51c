"""PNG figures of trials over training (loss and error curves, curvature, edge of stability), and
the figure helpers scaling/analysis/sweep_plots.py shares. Object-oriented matplotlib on the Agg canvas: no
pyplot, so writing a report never changes a notebook's backend. Each plot function takes
(path, trials, best_rows, fits), writes `path` and returns None, or returns why it was skipped.
"""
import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scaling.analysis import findings

BATCH_LABEL = "batch size B (examples per step)"
SGD_FAMILY = ("sgd", "momentum", "nesterov", "heavy_ball")


# Figure helpers: used here and by scaling/analysis/sweep_plots.py (which imports this module, never
# the other way round).
def new_figure(w, h):
  fig = Figure(figsize=(w, h), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path):
  fig.savefig(path, dpi=110)


def thin(x, y, n=400):
  """At most ~n points, evenly spaced on a log axis: Agg draws 10k-point noisy lines slowly."""
  if len(x) <= n:
    return x, y
  idx = np.unique(np.geomspace(1, len(x), n).astype(int) - 1)
  return x[idx], y[idx]


class _PlainLogFormatter(ticker.LogFormatter):
  """'300', '0.02', '1e+05' rather than mathtext 3x10^2: shorter labels that do not collide."""

  def _num_to_string(self, x, vmin, vmax):
    return f"{x:g}"


def log_scales(ax, x=True, y=True):
  """Log scales where the axis holds positive data (else matplotlib raises); a note if empty.
  Over few decades, 2x and 5x ticks are labelled too; over many, only the decades."""
  lim = ax.dataLim
  for axis, set_scale, on, lo, hi in ((ax.xaxis, ax.set_xscale, x, lim.minposx, lim.x1),
                                      (ax.yaxis, ax.set_yscale, y, lim.minposy, lim.y1)):
    if not (on and np.isfinite(lo)):
      continue
    set_scale("log")
    axis.set_major_formatter(_PlainLogFormatter())
    if hi / lo < 10**2.5:
      axis.set_minor_locator(ticker.LogLocator(subs=(2.0, 3.0, 5.0) if hi / lo < 10 else (2.0, 5.0)))
      axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False,
                                                  minor_thresholds=(np.inf, np.inf)))
    else:
      axis.set_minor_formatter(ticker.NullFormatter())
  if not ax.lines:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="0.5")


def colour_by_batch(trials):
  bs = [t.batch_size for t in trials if t.batch_size > 0] or [1]
  norm = colors.LogNorm(vmin=min(bs), vmax=max(max(bs), min(bs) * 2))
  return cm.ScalarMappable(norm=norm, cmap="viridis")


def batch_colorbar(fig, sm, axes, trials):
  cb = fig.colorbar(sm, ax=axes, label=BATCH_LABEL, shrink=0.9)
  bs = sorted({t.batch_size for t in trials})
  cb.set_ticks(bs[:: max(1, len(bs) // 10)])
  cb.set_ticklabels([str(b) for b in bs[:: max(1, len(bs) // 10)]])
  cb.minorticks_off()


def _stability_threshold(t, lr):
  """2/lr for plain SGD (Cohen et al. 2021); (2+2β)/lr with heavy-ball momentum β and
  (2+2β)/((1+2β) lr) with Nesterov momentum."""
  factor = findings.stability_factor(t.optimizer, t.config.get("optimizer", {}).get("momentum"))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(lr > 0, factor / lr, np.nan), factor


def edge_of_stability(path, trials, best_rows, fits):
  """Top eigenvalue over training with the stability threshold, one panel per SGD-family group."""
  data = [t for t in trials if np.isfinite(t.series("curvature/top_eigenvalue")[2]).any()]
  if not data:
    return "no curvature/top_eigenvalue in any metrics.jsonl"
  data = [t for t in data if any(s in t.optimizer.lower() for s in SGD_FAMILY)]
  if not data:
    return "top eigenvalues only for non-SGD optimizers (no 2/lr threshold applies)"
  groups = sorted({t.group for t in data})
  sm = colour_by_batch(trials)
  fig = new_figure(6 * len(groups) + 1, 5)
  axes = np.atleast_1d(fig.subplots(1, len(groups)))
  for ax, group in zip(axes, groups):
    factors = set()
    for t in (t for t in data if t.group == group):
      c = sm.to_rgba(t.batch_size)
      st, _, lam = t.series("curvature/top_eigenvalue")
      ax.plot(*thin(st, lam), "o-", color=c, ms=3, lw=1.2)
      lst, _, lr = t.series("lr")
      if not len(lr):
        lst, lr = np.array([max(st.min(), 1), max(st.max(), 1)]), np.full(2, t.lr)
      thr, factor = _stability_threshold(t, lr)
      factors.add(f"{factor:g}")
      ax.plot(*thin(lst, thr), "--", color=c, lw=1)
    log_scales(ax)
    ax.set(xlabel="optimizer step", ylabel="λ_max of the loss Hessian",
           title=f"{group}: λ_max (solid) vs {'/'.join(sorted(factors))}/lr (dashed)")
    ax.grid(True, alpha=0.3)
  batch_colorbar(fig, sm, axes, trials)
  fig.suptitle("Edge of stability: top Hessian eigenvalue against the SGD stability threshold")
  save_figure(fig, path)


def training_curves(path, trials, best_rows, fits):
  """Train loss and validation error vs steps and vs examples; a row per group."""
  cols = [("train/loss", "step", "train loss"), ("train/loss", "examples", "train loss"),
          ("valid/error", "step", "validation error"), ("valid/error", "examples", "validation error")]
  if not any(len(t.series(k)[2]) for t in trials for k in ("train/loss", "valid/error")):
    return "no train/loss or valid/error records yet"
  groups = sorted({t.group for t in trials if t.records})
  sm = colour_by_batch(trials)
  fig = new_figure(18, 3.6 * len(groups) + 0.6)
  axes = np.array(fig.subplots(len(groups), 4, squeeze=False))
  targets = {t.target_value for t in trials if t.target_metric == "valid/error"}
  for row, group in zip(axes, groups):
    for ax, (key, xkey, ylabel) in zip(row, cols):
      for t in (t for t in trials if t.group == group):
        st, ex, v = t.series(key)
        x = st if xkey == "step" else ex
        c = sm.to_rgba(t.batch_size)
        ax.plot(*thin(x, v), color=c, lw=1, alpha=0.85)
        if t.status == "diverged":
          fin = np.isfinite(v)
          xd = x[fin][-1] if fin.any() else (x[-1] if len(x) else None)
          yd = v[fin][-1] if fin.any() else np.nan
          if xd is not None and np.isfinite(yd):
            ax.plot(xd, yd, "x", color="red", ms=9, mew=2)
      if key == "valid/error":
        for tv in targets:
          ax.axhline(tv, color="k", ls=":", lw=1)
      log_scales(ax)
      ax.set(ylabel=ylabel,
             xlabel="optimizer steps" if xkey == "step" else "training examples seen",
             title=f"{group}: {ylabel} vs {'steps' if xkey == 'step' else 'examples'}")
      ax.grid(True, alpha=0.3)
  batch_colorbar(fig, sm, axes, trials)
  fig.suptitle("Training curves (colour: batch size; red x: diverged, last finite value; "
               "dotted: target)")
  save_figure(fig, path)


def curvature_curves(path, trials, best_rows, fits):
  """Hessian trace, top eigenvalue and sharpness against the step, one line per trial."""
  panels = [("curvature/hessian_trace", "Hessian trace"), ("curvature/top_eigenvalue", "λ_max"),
            ("curvature/sharpness", "ε-sharpness (%)")]
  panels = [p for p in panels if any(np.isfinite(t.series(p[0])[2]).any() for t in trials)]
  if not panels:
    return "no curvature in any metrics.jsonl (curvature.enabled is off)"
  sm = colour_by_batch(trials)
  fig = new_figure(5.2 * len(panels) + 1, 4.4)
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  for ax, (key, label) in zip(axes, panels):
    for t in trials:
      st, _, v = t.series(key)
      ax.plot(st, v, "o-", color=sm.to_rgba(t.batch_size), ms=3, lw=1.2)
    log_scales(ax, x=False)
    ax.set(xlabel="optimizer step", ylabel=label, title=f"{label} over training")
    ax.grid(True, alpha=0.3)
  batch_colorbar(fig, sm, axes, trials)
  save_figure(fig, path)


# A single trial: its curves and curvature, no fit.
SINGLE_TRIAL_PLOTS = [
    ("training_curves.png", "Training curves", training_curves),
    ("curvature_curves.png", "Curvature over training", curvature_curves),
    ("edge_of_stability.png", "Top eigenvalue over training vs 2/lr", edge_of_stability),
]
