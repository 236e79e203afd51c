"""The report's words, written from the numbers: the findings paragraph that opens the page and the
protocol each figure's caption states. No JAX, no plotting.

Every sentence is computed from the loaded trials, the best point per batch size and the
critical-batch fit (scaling/analysis/study.py); where the data cannot support a claim (too few batch sizes,
an unbracketed LR optimum, censored or pending batch sizes, no curvature measured) the sentence
says so instead of making it.
"""
import collections
import math

import numpy as np

from scaling.analysis import results, study


def _b_list(batch_sizes):
  """[16, 32, 64] -> 'B = 16, 32, 64'; a run of consecutive sweep values stays a list (short)."""
  return "B = " + ", ".join(str(b) for b in batch_sizes)


def _b_range(batch_sizes):
  return f"B = {batch_sizes[0]}" if len(batch_sizes) == 1 else \
      f"B = {batch_sizes[0]}-{batch_sizes[-1]}"


def power_law(x, y):
  """Least-squares exponent p of y ~ x^p on a log-log scale; None with fewer than 2 distinct x."""
  x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
  ok = (x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)
  if len(np.unique(x[ok])) < 2:
    return None
  return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def regimes(rows, tolerance=study.PERFECT_SCALING_TOLERANCE):
  """One group's best rows -> (perfect, diminishing, flat) batch sizes that reached the target.

  perfect: examples to target within `tolerance` of those at the smallest batch size, for it and
  every smaller one (study.best_per_batch's `perfect_scaling`); flat (maximal data parallelism,
  Shallue et al.: a larger batch no longer reduces the steps): the largest batch sizes B whose
  steps are within `tolerance` of the fewest at any batch size >= B (steps that rise past the
  minimum are in it too), when at least two are (one point shows no plateau); diminishing
  returns: the reached ones in between."""
  reached = sorted((r for r in rows if r["outcome"] == "reached"), key=lambda r: r["batch_size"])
  perfect = [r["batch_size"] for r in reached if r["perfect_scaling"]]
  flat, floor = [], math.inf   # floor: the fewest steps at this batch size or any larger one
  for r in reversed(reached):
    floor = min(floor, r["steps_to_target"])
    if r["steps_to_target"] > tolerance * floor or r["batch_size"] in perfect:
      break
    flat.insert(0, r["batch_size"])
  flat = flat if len(flat) >= 2 else []
  diminishing = [r["batch_size"] for r in reached
                 if r["batch_size"] not in perfect and r["batch_size"] not in flat]
  return perfect, diminishing, flat


def _regime_sentence(rows, tolerance):
  perfect, diminishing, flat = regimes(rows, tolerance)
  reached = [r for r in rows if r["outcome"] == "reached"]
  if not reached:
    return _censored_text(rows, "No batch size has reached the target, so no regime can be named.")
  smallest = min(r["batch_size"] for r in reached)
  if len(reached) == 1:
    return _censored_text(rows, f"Only B = {smallest} reached the target, so no regime can be "
                                "named.")
  parts = []
  if len(perfect) > 1:
    parts.append(f"perfect scaling (examples to target within {tolerance:g}x of those at "
                 f"B = {smallest}) held up to B = {perfect[-1]}")
  else:
    nxt = sorted((r for r in reached if r["batch_size"] > smallest), key=lambda r: r["batch_size"])
    if nxt[0]["examples_ratio"] is None:   # S = 0 at either: the target came during warmup
      during = [r["batch_size"] for r in reached if r["steps_to_target"] <= 0]
      parts.append(f"perfect scaling cannot be judged: {_b_list(during)} reached the target during"
                   " warmup (no steps after it to compare)")
    else:
      parts.append(f"perfect scaling was not seen: at B = {nxt[0]['batch_size']} the examples to "
                   f"target were already {nxt[0]['examples_ratio']:.2f}x those at B = {smallest}")
  if diminishing:
    steps = {r["batch_size"]: r["steps_to_target"] for r in reached}
    order = sorted(steps)
    fell = all(steps[b] < steps[order[order.index(b) - 1]] for b in diminishing)
    parts.append(f"{_b_list(diminishing)} gave diminishing returns (steps " +
                 ("still fell at each, by less than 1/B)" if fell else
                  "fell by less than 1/B, or rose, between neighbouring batch sizes)"))
  floor = min(r["steps_to_target"] for r in reached)
  if flat:
    flat_steps = [r["steps_to_target"] for r in reached if r["batch_size"] in flat]
    parts.append(f"from B = {flat[0]} to {flat[-1]} no larger batch size reduced the steps by more "
                 f"than {tolerance:g}x (steps {min(flat_steps):.0f}-{max(flat_steps):.0f}): "
                 "maximal data parallelism")
  elif len(reached) > 1:
    top = max(reached, key=lambda r: r["batch_size"])
    parts.append(f"no plateau of steps was reached (B = {top['batch_size']} "
                 + ("took the fewest steps" if top["steps_to_target"] == floor else
                    f"took {top['steps_to_target']:.0f} steps against the fewest {floor:.0f}")
                 + "), so maximal data parallelism is not shown")
  text = "; ".join(parts)
  return _censored_text(rows, text[0].upper() + text[1:] + ".")


def _censored_text(rows, text):
  censored = [r["batch_size"] for r in rows if r["outcome"] == "not reached"]
  pending = [r["batch_size"] for r in rows if r["outcome"] == "pending"]
  if censored:
    text += (f" {_b_list(censored)} never reached the target within the step cap: censored, "
             "left out of the fit, so the regimes there are unknown.")
  if pending:
    text += f" {_b_list(pending)} have not reached it yet (trials still pending)."
  return text


def _fmt_interval(lo, hi, what="95% seed-bootstrap interval"):
  if not math.isfinite(lo):
    return "no interval"
  return f"{what} [{lo:.3g}, {hi:.3g}]" if math.isfinite(hi) else \
      f"{what} [{lo:.3g}, unbounded]"


def _intervals(fit, name):
  """'95% seed-bootstrap interval [a, b]; batch sizes resampled too: [c, d]': the reported
  interval (seeds redrawn, batch sizes fixed), then the batch-size bootstrap's."""
  text = _fmt_interval(fit[f"{name}_lo"], fit[f"{name}_hi"])
  other = _fmt_interval(fit[f"{name}_batchboot_lo"], fit[f"{name}_batchboot_hi"], "")
  return text if other == "no interval" else f"{text}; batch sizes resampled too:{other}"


def _warmup_text(rows):
  """What S is, for the sentence that defines it: 'steps to target after warmup (less its 20
  steps)'."""
  w = {r["batch_size"]: r["warmup_steps"] for r in rows if r["outcome"] == "reached"}
  if not w or all(v is None for v in w.values()):
    return "steps to target counted from step 0 (the trials did not record their warmup)"
  if all(not v for v in w.values()):
    return "steps to target (no warmup)"
  if len(set(w.values())) == 1:
    return f"steps to target after warmup (less its {next(iter(w.values())):g} steps)"
  return f"steps to target after warmup (less its steps: {_span(w)})"


def _seed_text(fit):
  few = fit["few_seed_batch_sizes"].split()
  if not few:
    return ""
  fitted = fit["fitted_batch_sizes"].split()
  where = "every fitted batch size" if len(few) == len(fitted) else _b_list(few)
  return (f"; the seed intervals rest on fewer than {study.MIN_SEEDS} seeds at {where} (seeds per "
          f"batch size: {fit['seeds_per_batch']}), so they see little of the seed noise there "
          "(with one seed, none): they are too narrow, not a sign of precision")


def _fit_sentence(fit, rows):
  used = [r["batch_size"] for r in rows if r["outcome"] == "reached"]
  if not math.isfinite(fit["b_crit"]):
    return f"No critical batch size could be fitted: {fit['note'] or 'too few batch sizes'}."
  err = f" ± {fit['b_crit_err']:.2g}" if math.isfinite(fit["b_crit_err"]) else ""
  text = (f"The fit of S = S_min (1 + B_crit/B), S the best point's {_warmup_text(rows)}, at "
          f"{len(used)} batch sizes gives B_crit = {fit['b_crit']:.3g}{err} "
          f"({_intervals(fit, 'b_crit')}) and S_min = {fit['s_min']:.3g} steps "
          f"({_intervals(fit, 's_min')})" + _seed_text(fit))
  if fit["note"]:
    text += f"; {fit['note']}"
  if math.isfinite(fit["b_crit_lo"]) and not (0 < fit["b_crit_lo"] and
                                               math.isfinite(fit["b_crit_hi"])):
    text += (f"; B_crit's interval is unbounded{' below' if fit['b_crit_lo'] <= 0 else ''}"
             f"{' and' if fit['b_crit_lo'] <= 0 and not math.isfinite(fit['b_crit_hi']) else ''}"
             f"{' above' if not math.isfinite(fit['b_crit_hi']) else ''}: these {len(used)} batch"
             " sizes do not pin B_crit down")
  if fit["b_crit"] < min(used) or fit["b_crit"] > max(used):
    text += f"; B_crit lies outside the measured {_b_range(sorted(used))}: an extrapolation"
  return text + "."


def _noise_sentence(fit, rows, trials):
  frozen = fit.get("b_simple_at_target_source") == "frozen parameters"
  used = sorted((r for r in rows if r["outcome"] == "reached" and r["b_simple_at_target"]
                 and (not frozen or r["b_simple_at_target_source"] == "frozen parameters")),
                key=lambda r: r["batch_size"])
  if not used:
    return "The gradient noise scale B_simple was not recorded at the target, so it cannot be " \
           "compared with B_crit."
  med = fit["b_simple_at_target"]
  how = ("measured at the frozen parameters of each best trial's target checkpoint (McCandlish et"
         " al.'s unbiased two-batch-size estimators over many independent batches)" if frozen else
         "read from the training EMA when each best trial first reached it")
  text = (f"B_simple at the target (equal loss), {how}, has median "
          f"{med:.3g} over {len(used)} batch sizes (range {fit['b_simple_at_target_min']:.3g}-"
          f"{fit['b_simple_at_target_max']:.3g}; {used[0]['b_simple_at_target']:.3g} at "
          f"B = {used[0]['batch_size']}, {used[-1]['b_simple_at_target']:.3g} at "
          f"B = {used[-1]['batch_size']})")
  if math.isfinite(fit["b_crit"]):
    inside = fit["b_crit_lo"] <= med <= fit["b_crit_hi"]
    text += (f", {med / fit['b_crit']:.2g}x the fitted B_crit and "
             f"{'inside' if inside else 'outside'} its interval (McCandlish et al. predict "
             "B_crit ≈ B_noise, which B_simple approximates)")
  decay = {results.get(t.config, "noise_scale.ema_decay") for t in trials}
  decay = decay.pop() if len(decay) == 1 else None
  if not frozen and isinstance(decay, (int, float)) and 0 < decay < 1:
    window = 1 / (1 - decay)
    # The EMA runs from step 0: the steps since then are S plus the warmup.
    short = [r["batch_size"] for r in used
             if r["steps_to_target"] + (r["warmup_steps"] or 0) < window]
    if short:
      text += (f". At {_b_list(short)} the target came within the noise EMA's ~{window:.0f} "
               "steps, so B_simple there still averages earlier, higher-loss gradients")
  return text + "."


def _lr_sentence(rows, trials):
  used = sorted((r for r in rows if r["outcome"] == "reached" and r["lr"]),
                key=lambda r: r["batch_size"])
  if not used:
    return ""
  if all(r["n_settings"] <= 1 for r in rows):
    rule = trials[0].lr_rule
    return (f"The learning rate was not tuned (one setting per batch size, rule '{rule}'): "
            "steps at large B may reflect the rule rather than the batch size.")
  b, lr = [r["batch_size"] for r in used], [r["lr"] for r in used]
  edge = [r for r in used if r["lr_at_edge"]]
  verdict = "; INCONCLUSIVE, see the grid edges" if edge else ""
  text = (f"The tuned LR (best per batch size{verdict})"
          f" went from {lr[0]:.3g} at B = {b[0]} to {lr[-1]:.3g} at B = {b[-1]}")
  perfect, _, _ = regimes(rows)
  inside = [r for r in used if r["batch_size"] in perfect]
  beyond = [r for r in used if r["batch_size"] not in perfect]
  pieces = []
  split = len(inside) >= 2 and len(beyond) >= 2
  halves = ((inside, "within the perfect-scaling range"), (beyond, "beyond it")) if split else \
      ((used, "across the batch sizes that reached the target"),)
  for part, where in halves:
    p = power_law([r["batch_size"] for r in part], [r["lr"] for r in part])
    if p is not None:
      closest = min((("linear", 1.0), ("square-root", 0.5), ("constant", 0.0)),
                    key=lambda rule: abs(rule[1] - p))
      pieces.append(f"as B^{p:.2f} {where} ({_b_range([r['batch_size'] for r in part])}; "
                    f"nearest rule: {closest[0]}, B^{closest[1]:g})")
  if pieces:
    text += ": " + " and ".join(pieces)
  if edge:
    slopes = [where for part, where in halves if any(r["lr_at_edge"] for r in part)]
    flags = "; ".join(dict.fromkeys(r["lr_at_edge"] for r in edge))
    text += (f". INCONCLUSIVE: the best setting sat at the edge of its grid at {len(edge)} of "
             f"{len(used)} batch sizes ({_b_list([r['batch_size'] for r in edge])}: {flags}): "
             "the optimum was not bracketed there, so the tuned LR there"
             + (f", the exponent {' and the one '.join(slopes)}" if pieces else "")
             + " and the steps to target there are bounds rather than estimates, and no LR "
             "scaling rule can be read from them; extend the grid past that edge")
  return text + "."


def stability_factor(optimizer, momentum):
  """λ_max threshold x lr: 2 for SGD (Cohen et al. 2021), (2+2β) with heavy-ball momentum β,
  (2+2β)/(1+2β) with Nesterov."""
  name = optimizer.lower()
  beta = float(momentum) if isinstance(momentum, (int, float)) and name != "sgd" else 0.0
  return (2 + 2 * beta) / (1 + 2 * beta if "nesterov" in name else 1)


def _curvature_sentence(rows, trials):
  by_id = {t.trial_id: t for t in trials}
  best = [by_id[r["best_trial"]] for r in rows if r["best_trial"] in by_id]
  measured = [t for t in best if isinstance(t.at_target.get("curvature/top_eigenvalue")
                                            or t.final.get("curvature/top_eigenvalue"), float)]
  if not measured:
    off = all(not results.get(t.config, "curvature.enabled", False) for t in trials)
    return ("Curvature was not measured (curvature.enabled is off" if off else
            "No best trial has a curvature measurement (") + \
        "), so the data cannot say how sharpness changes with batch size."
  parts = []
  for key, name in (("curvature/top_eigenvalue", "λ_max"), ("curvature/hessian_trace",
                                                           "the Hessian trace"),
                    ("curvature/sharpness", "ε-sharpness")):
    pts = [(t.batch_size, t.at_target.get(key, t.final.get(key))) for t in measured]
    pts = [(b, v) for b, v in pts if isinstance(v, float) and v > 0]
    p = power_law(*zip(*pts)) if len(pts) >= 3 else None
    if p is not None:
      trend = "stayed flat" if abs(p) < 0.05 else "rose" if p > 0 else "fell"
      parts.append(f"{name} {trend} (~B^{p:.2f}: {pts[0][1]:.3g} at "
                   f"B = {pts[0][0]}, {pts[-1][1]:.3g} at B = {pts[-1][0]})")
  if not parts:
    return (f"Curvature was measured at only {len(measured)} batch size(s): too few to say how "
            "sharpness changes with batch size.")
  text = "At the target (equal loss), for the best trial per batch size, " + "; ".join(parts)
  ratios = []
  for t in measured:
    lam = t.at_target.get("curvature/top_eigenvalue", t.final.get("curvature/top_eigenvalue"))
    factor = stability_factor(t.optimizer, results.get(t.config, "optimizer.momentum"))
    if t.lr > 0:
      ratios.append(lam * t.lr / factor)
  if ratios:
    text += (f"; λ_max was {min(ratios):.2f}-{max(ratios):.2f} of the stability threshold "
             f"{factor:g}/lr" if len({stability_factor(t.optimizer, results.get(
                 t.config, "optimizer.momentum")) for t in measured}) == 1 else
             f"; λ_max was {min(ratios):.2f}-{max(ratios):.2f} of each optimizer's stability "
             "threshold")
  return text + "."


def status_sentence(trials, expected=None):
  """'60 of 60 trials finished: 58 done, 2 diverged.' plus what is still missing."""
  counts = collections.Counter(t.status for t in trials)
  finished = counts["done"] + counts["diverged"]
  total = max(expected or 0, len(trials))
  text = (f"{finished} of {total} trials finished ({counts['done']} done, {counts['diverged']} "
          "diverged)")
  missing = {k: counts[k] for k in study.PENDING if counts[k]}
  if total > len(trials):
    missing["not started"] = total - len(trials)
  if missing:
    text += ("; " + ", ".join(f"{v} {k}" for k, v in missing.items())
             + ": every number below may still change")
  return text + "."


def single_trial_sentence(t):
  target = f"{t.target_metric} < {t.target_value:g}"
  text = f"One trial (B = {t.batch_size}, lr = {t.lr:.3g}, status {t.status}): "
  if t.reached:
    text += (f"it reached {target} at step {t.steps_to_target} (interpolated "
             f"{t.steps_interpolated:.1f})")
  else:
    text += f"it has not reached {target} by step {t.last_step}"
  lam = t.final.get("curvature/top_eigenvalue")
  if lam is not None:
    text += f"; λ_max at the end {lam:.3g}"
  return text + ". One batch size allows no critical-batch fit and no regime: run a sweep."


def findings(trials, best_rows, fits, expected=None):
  """The opening paragraph as a list of sentences (plain text)."""
  if not trials:
    return ["No trial has written results yet."]
  out = [status_sentence(trials, expected)]
  if len({t.batch_size for t in trials}) == 1 and len(trials) == 1:
    return out + [single_trial_sentence(trials[0])]
  tol = study.PERFECT_SCALING_TOLERANCE
  for fit in fits:
    rows = [r for r in best_rows if r["group"] == fit["group"]]
    ts = [t for t in trials if t.group == fit["group"]]
    prefix = f"[{fit['group']}] " if len(fits) > 1 else ""
    sentences = [_regime_sentence(rows, tol), _fit_sentence(fit, rows),
                 _noise_sentence(fit, rows, ts), _lr_sentence(rows, ts),
                 _curvature_sentence(rows, ts)]
    out += [prefix + s for s in sentences if s]
  return out


# --- Captions: what each figure plots, under which protocol, and how it departs from its paper.

def _span(pairs, unit=""):
  """{B: value} -> 'B=16: 5101 ... B=8192: 310' (all when few)."""
  items = sorted(pairs.items())
  shown = items if len(items) <= 4 else [items[0], items[-1]]
  sep = ", " if len(items) <= 4 else " ... "
  return sep.join(f"B={b}: {v:g}{unit}" for b, v in shown)


def protocol(trials):
  """One paragraph of plain text: target, budget, how steps are counted, what was tuned, seeds."""
  if not trials:
    return ""
  targets = ", ".join(sorted({f"{t.target_metric} < {t.target_value:g}" for t in trials}))
  caps = {t.batch_size: t.step_cap for t in trials if t.step_cap}
  evals = {t.batch_size: t.eval_interval for t in trials if t.eval_interval}
  stop = {bool(results.get(t.config, "target.stop_at_target")) for t in trials}
  tuned = collections.defaultdict(set)
  for t in trials:
    for k, v in t.setting.items():
      tuned[k].add(v)
  seeds = len({t.seed for t in trials})
  warmup = {t.batch_size: study.warmup_steps(t) for t in trials}
  if any(w is None for w in warmup.values()):
    s_text = ("S, the steps the fits and tables use, counts from step 0: not every trial recorded "
              "its warmup steps (config derived.warmup_steps)")
  elif not any(warmup.values()):
    s_text = "S, the steps the fits and tables use, is that step (no warmup)"
  else:
    s_text = (f"S, the steps the fits and tables use, is that step less the warmup steps "
              f"({_span(warmup)}): warmup steps are not steps the problem needed")
  show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
  tuned_text = "; ".join(f"{k} in {{{', '.join(show(v) for v in sorted(vals))}}}"
                         for k, vals in tuned.items()) or "nothing (one setting per batch size)"
  rules = ", ".join(sorted({t.group for t in trials}))
  return (f"Target: {targets}. Budget: a step cap per batch size ({_span(caps) or '?'} steps)"
          + ("; training stops at the target" if stop == {True} else "")
          + ". Steps to target: interpolated linearly in log(metric) between the last evaluation "
          f"above the target and the first below (evaluations every {_span(evals) or '?'} steps); "
          f"{s_text}. "
          f"Tuned per batch size: {tuned_text}, around the LR rule/optimizer {rules}; the best "
          f"setting is the one with the fewest median steps over its {seeds} seed(s).")


def _tuned_axes(trials):
  return sorted({k for t in trials for k in t.setting}) or ["nothing"]


def captions(trials):
  """Plot file name -> caption (plain text), after the protocol sentence the page states once."""
  models = ", ".join(sorted({str(results.get(t.config, "model.name")) for t in trials}))
  data = ", ".join(sorted({str(results.get(t.config, "dataset.name")) for t in trials}))
  tuned = ", ".join(_tuned_axes(trials))
  n_settings = max((len({t.setting_key for t in trials if t.batch_size == b})
                    for b in {t.batch_size for t in trials}), default=0)
  shallue = (f"Deviation from Shallue et al. 2018: they tune learning rate, momentum and more by "
             f"quasi-random search (~100 trials per batch size) on their CNNs and Transformers; "
             f"here {n_settings} setting(s) of {tuned} per batch size, a {models} on {data}.")
  return {
      "steps_to_target.png":
          "S, the optimizer steps to reach the target after warmup, for the best setting at each "
          "batch size (dots: median over seeds, bars: min-max), the fitted S = S_min (1 + B_crit/B)"
          " with its 95% seed-bootstrap band (seeds redrawn at fixed batch sizes), the "
          "perfect-scaling line through the smallest batch size (dashed), "
          "and batch sizes that never reached it (marked above the line: censored). Imitates "
          "Shallue et al. 2018 Fig. 1. " + shallue,
      "examples_to_target.png":
          "The same points as training examples (S x B, warmup excluded): flat while scaling is "
          "perfect, rising once steps stop falling. " + shallue,
      "critical_batch_fit.png":
          "Least-squares fit of McCandlish et al. 2018's S = S_min (1 + B_crit/B) (left) and "
          "E = E_min (1 + B/B_crit) (right) to the best S (steps to target after warmup) at the "
          "batch sizes that reached the target, on relative residuals; censored batch sizes are "
          "left out. McCandlish et al. fit steps at a fixed loss along a tuned LR; here the "
          "target is the configured metric.",
      "tuned_lr.png":
          "Every trial's peak LR vs batch size (filled: reached the target; open: capped; red x: "
          "diverged), the best LR per batch size (stars) and linear and square-root lines through "
          "the smallest. Imitates Shallue et al. 2018 Fig. 8; a best LR at the edge of its grid "
          f"is circled: its optimum was not bracketed. Tuned: {tuned}.",
      "equal_loss.png":
          "Left: B_simple = tr(Σ)/|G|² when each trial first reached the target (equal loss) "
          "against the fitted B_crit; right: McCandlish et al. 2018 eq. 2.11 with the measured "
          "points. B_simple comes from two batch sizes' gradient norms with an EMA over steps "
          "(McCandlish et al. App. A), not from their per-example estimator.",
      "resources.png":
          "Steady-state training throughput, peak device memory, wall-clock time to target "
          "(including evaluation and compilation) and compile time per batch size, on the "
          "machine that ran the sweep (timings there are not comparable across machines).",
      "noise_scale.png":
          "B_simple over training per trial (left, colour: batch size) and its final and median "
          "value per trial against the fitted B_crit (right).",
      "errors_vs_batch.png":
          "Final validation and test error and the generalization gap (test - train error) per "
          "trial (dots) and their mean per batch size (lines); diverged trials are left out. "
          "Trials stopped at the target end near the target by construction.",
      "curvature_vs_batch.png":
          "Hessian trace, top eigenvalue λ_max and Keskar et al.'s ε-sharpness at the end of "
          "training per trial; with stop-at-target the end is (about) equal loss.",
      "edge_of_stability.png":
          "λ_max over training against the stability threshold of the optimizer (2/lr for SGD, "
          "(2+2β)/lr with momentum β), as in Cohen et al. 2021.",
      "training_curves.png":
          "Training loss and validation error against steps and against examples (colour: "
          "batch size; dotted: the target; red x: a diverged trial's last finite value).",
      "curvature_curves.png":
          "Curvature measured during training: Hessian trace (Hutchinson), λ_max (Lanczos) and "
          "ε-sharpness against the optimizer step.",
  }
