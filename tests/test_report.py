"""scaling.report on synthetic trial dirs with known S_min and B_crit. No JAX."""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from scaling.analysis import report, results, study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S_MIN, B_CRIT, TARGET, EVAL_EVERY = 1000.0, 512.0, 0.01, 10
ALL_PNGS = ["steps_to_target.png", "examples_to_target.png", "critical_batch_fit.png",
            "tuned_lr.png", "equal_loss.png", "resources.png", "noise_scale.png", "errors_vs_batch.png", "curvature_vs_batch.png",
            "edge_of_stability.png", "training_curves.png"]


def true_steps(bs):
  return S_MIN * (1 + B_CRIT / bs)


def write_trial(root, bs, seed=1, rule="sqrt", slowdown=1.0, status="done", reach=True,
                curvature=True, noise=True, diverge_at=None, stop_frac=1.3, summary=True, flat=False,
                mult=None, final_error=None):
  """A trial whose valid/error = TARGET * S / step crosses the target just after S steps.

  In <root>/trials/<id>/, or with flat=True directly in root (a single-trial workdir). `mult`
  adds an lr_multiplier sweep axis; `final_error` overrides the last validation error."""
  tid = f"bs={bs},lr_rule={rule},seed={seed}" + (f",lr_multiplier={mult:g}" if mult else "")
  path = root if flat else os.path.join(root, "trials", tid)
  os.makedirs(path, exist_ok=True)
  s = true_steps(bs) * slowdown
  lr = 0.1 * math.sqrt(bs / 128) * (mult or 1.0)
  config = {
      "trial_id": tid, "batch_size": bs, "lr_rule": rule, "lr_power": 0.5, "base_lr": 0.1,
      "reference_batch_size": 128, "seed": seed,
      "optimizer": {"name": "sgd", "momentum": 0.0}, "model": {"name": "mlp"},
      "dataset": {"name": "mnist"}, "target": {"metric": "valid/error", "value": TARGET},
      "derived": {"lr": lr, "warmup_steps": 0, "total_steps": int(s * stop_frac),
                  "steps_per_epoch": 50000 // bs},
      "lr_multiplier": mult or 1.0,
      "sweep_axes": {"batch_size": bs, "lr_rule": rule, "seed": seed,
                     **({"lr_multiplier": mult} if mult else {})}}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  last = int(s * stop_frac) if diverge_at is None else diverge_at
  records, reached_at = [], None
  for step in range(EVAL_EVERY, last + 1, EVAL_EVERY):
    base = {"step": step, "examples": step * bs, "wall_time": step * 0.01}
    loss = float("nan") if diverge_at is not None and step >= diverge_at else 2 * s / (s + step)
    train = {**base, "train/loss": loss, "train/accuracy": 0.9, "lr": lr, "grad_norm": 1.0,
             "param_norm": 10.0, "examples_per_sec": 1e4}
    if noise:
      train["noise/b_simple"] = 100.0 * (1 + 4 * step / s)
    err = TARGET * s / step if reach else 2 * TARGET
    if reached_at is None and err < TARGET:
      reached_at = step
    ev = {**base, "valid/loss": loss, "valid/error": err, "test/loss": loss,
          "test/error": err * 1.1, "train_eval/loss": loss, "train_eval/error": err * 0.5}
    records += [train, ev]
    if curvature and step % (EVAL_EVERY * 20) == 0:
      records.append({**base, "curvature/hessian_trace": 50.0 * bs ** -0.3,
                      "curvature/top_eigenvalue": 2 / lr * (1 - math.exp(-step / s)),
                      "curvature/eigenvalues": [1.0, 0.5], "curvature/sharpness": 5.0,
                      "curvature/sharpness_eps": 1e-3})
  if final_error is not None:
    [ev] = [r for r in records if "valid/error" in r][-1:]
    ev["valid/error"] = final_error
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")  # json writes NaN as the bare token NaN
  if summary:
    final = {k: v for r in records for k, v in r.items() if "/" in k and not isinstance(v, list)}
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump({"status": status, "step": last, "examples": last * bs, "wall_time": last * 0.01,
                 "examples_per_sec": 1e4 * bs / (bs + 64), "compile_seconds": 2.0,
                 "peak_memory_bytes": 1e6 + 3e3 * bs, "memory_source": "synthetic",
                 "diverged_at_step": diverge_at,
                 "target": {"metric": "valid/error", "value": TARGET, "reached": reached_at is not None,
                            "step": reached_at, "examples": reached_at and reached_at * bs},
                 "final": final, "best": {}, "curvature": {}}, f)
  return tid, reached_at


def read_png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n", path
  assert head[12:16] == b"IHDR", path
  return struct.unpack(">II", head[16:24])


def check_report(workdir):
  """Generic checks of a written report; usable on any sweep workdir. Returns index.html text."""
  out = report.write_report(str(workdir))
  assert out == os.path.join(str(workdir), "report")
  text = open(os.path.join(out, "index.html")).read()
  for csv_name in ("trials.csv", "best_per_batch.csv", "critical_batch_fit.csv"):
    assert os.path.getsize(os.path.join(out, csv_name)) > 0
  for name in os.listdir(out):
    if name.endswith(".png"):
      w, h = read_png_size(os.path.join(out, name))
      assert w > 0 and h > 0
      assert f"src='{name}'" in text
  assert "plot failed" not in text
  return text


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  steps = {}
  for bs in [2**k for k in range(4, 14)]:  # 16 .. 8192
    for seed, slowdown in ((0, 1.15), (1, 1.0)):  # seed 1 is the fastest
      tid, reached_at = write_trial(root, bs, seed=seed, slowdown=slowdown)
      steps[tid] = reached_at
  never, _ = write_trial(root, 16384, reach=False)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"base": {"lr_rule": "sqrt"}, "axes": {"batch_size": "16..16384", "seed": [0, 1]}}, f)
  return root, steps, never, results.load_trials(str(root))


def test_fit_recovers_known_critical_batch(sweep):
  fits = study.fit_table(study.best_per_batch(sweep[3]))
  assert len(fits) == 1
  fit = fits[0]
  assert fit["n_points"] == 10
  # Each point is the median of its seeds' slowdowns 1.15 and 1.0: S = 1.075 S_min (1 + B_crit/B).
  assert fit["s_min"] == pytest.approx(1.075 * S_MIN, rel=0.01)
  assert fit["b_crit"] == pytest.approx(B_CRIT, rel=0.05)
  assert fit["e_min"] == pytest.approx(1.075 * S_MIN * B_CRIT, rel=0.01)
  assert fit["b_crit_lo"] < B_CRIT < fit["b_crit_hi"]
  assert fit["censored_batch_sizes"] == "16384" and fit["fitted_batch_sizes"].split()[0] == "16"
  assert 0 < fit["b_crit_err"] < 0.05 * B_CRIT


def test_fit_function_directly():
  b = np.array([32, 64, 128, 256, 1024, 4096])
  fit = study.fit_critical_batch(b, true_steps(b))
  assert fit["s_min"] == pytest.approx(S_MIN) and fit["b_crit"] == pytest.approx(B_CRIT)
  two = study.fit_critical_batch([64, 128], true_steps(np.array([64, 128])))
  assert two["b_crit"] == pytest.approx(B_CRIT) and math.isnan(two["b_crit_err"])
  one = study.fit_critical_batch([64, 64], [900, 1000])
  assert math.isnan(one["b_crit"]) and "2 distinct" in one["note"]


def test_best_per_batch_takes_median_over_seeds_and_reports_not_reached(sweep):
  _, steps, never, trials = sweep
  rows = {r["batch_size"]: r for r in study.best_per_batch(trials)}
  for bs in (16, 512, 8192):
    fast, slow = (f"bs={bs},lr_rule=sqrt,seed={s}" for s in (1, 0))
    assert steps[fast] < steps[slow]
    # Interpolated crossings of valid/error = TARGET S / step: S itself, to 1e-3 of the 10-step
    # eval interval (log-linear interpolation of a 1/step curve over one interval).
    true = {fast: true_steps(bs), slow: 1.15 * true_steps(bs)}
    assert rows[bs]["steps_to_target"] == pytest.approx(np.median(list(true.values())), abs=0.01)
    assert rows[bs]["steps_min"] == pytest.approx(true[fast], abs=0.01)
    assert rows[bs]["steps_max"] == pytest.approx(true[slow], abs=0.01)
    assert rows[bs]["steps_first_eval"] == np.median([steps[fast], steps[slow]])
    assert rows[bs]["examples_to_target"] == pytest.approx(rows[bs]["steps_to_target"] * bs)
    assert rows[bs]["n_trials"] == 2 and rows[bs]["n_seeds"] == 2 and rows[bs]["eval_interval"] == 10
  assert rows[16384]["outcome"] == "not reached" and rows[16384]["steps_to_target"] is None
  (t,) = [t for t in trials if t.trial_id == never]
  assert not t.reached
  # Perfect scaling (examples within 1.2x of B=16's): E ~ B + B_crit, so up to B <= 121.
  assert [r["perfect_scaling"] for r in rows.values()][:5] == [True, True, True, False, False]
  assert study.fit_table(list(rows.values()))[0]["perfect_scaling_up_to"] == 64


def test_steps_to_target_from_metrics_when_summary_lacks_it(tmp_path):
  _, reached_at = write_trial(tmp_path, 256, summary=False)
  (t,) = results.load_trials(str(tmp_path))
  assert t.status == "running" and t.steps_to_target == reached_at
  assert t.steps_to_target == math.ceil((true_steps(256) + 1e-9) / EVAL_EVERY) * EVAL_EVERY


def test_full_sweep_report(sweep):
  root, _, never, _ = sweep
  text = check_report(root)
  out = os.path.join(root, "report")
  assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == sorted(ALL_PNGS)
  assert "sweep.json" in text and never in text and "Skipped" not in text
  csv_text = open(os.path.join(out, "trials.csv")).read()
  assert csv_text.count("\n") == 22 and "not reached" in open(
      os.path.join(out, "best_per_batch.csv")).read()


def test_partial_sweep_report(tmp_path):
  for bs in (64, 256, 1024):
    write_trial(tmp_path, bs)
  running, _ = write_trial(tmp_path, 4096, summary=False, stop_frac=0.3)
  with open(os.path.join(tmp_path, "trials", running, "metrics.jsonl"), "a") as f:
    f.write('{"step": 9999, "examp')  # torn last line of a trial being written
  diverged, _ = write_trial(tmp_path, 8192, seed=2, status="diverged", diverge_at=300)
  preempted, _ = write_trial(tmp_path, 128, seed=3, status="preempted", stop_frac=0.2)
  just_started, _ = write_trial(tmp_path, 32, summary=False)
  open(os.path.join(tmp_path, "trials", just_started, "metrics.jsonl"), "w").close()
  # A crashed trial is retried by a rerun: not a result, so its batch size is pending.
  failed, _ = write_trial(tmp_path, 2048, seed=4, status="failed", stop_frac=0.2)

  trials = {t.trial_id: t for t in results.load_trials(str(tmp_path))}
  assert len(trials) == 8
  assert trials[running].status == "running" and trials[diverged].status == "diverged"
  assert math.isnan(trials[diverged].final["train/loss"])
  rows = {r["batch_size"]: r for r in study.best_per_batch(list(trials.values()))}
  assert rows[4096]["outcome"] == "pending" and rows[8192]["outcome"] == "not reached"
  assert rows[2048]["outcome"] == "pending"

  text = check_report(tmp_path)
  for tid in (running, diverged, preempted, failed):
    assert tid in text
  assert "diverged" in text and "running" in text
  pngs = {n for n in os.listdir(os.path.join(tmp_path, "report")) if n.endswith(".png")}
  assert pngs == set(ALL_PNGS)


def test_import_does_not_import_jax():
  subprocess.run([sys.executable, "-c",
                  "import scaling.analysis.report, sys; assert 'jax' not in sys.modules"],
                 check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_cli_on_single_trial_workdir_without_curvature(tmp_path):
  """Trial files directly in the workdir; absent noise/curvature data skip plots with a note."""
  write_trial(tmp_path, 128, curvature=False, noise=False, flat=True)
  (t,) = results.load_trials(str(tmp_path))
  assert t.batch_size == 128 and t.reached and t.path == str(tmp_path)
  subprocess.run([sys.executable, "-m", "scaling.report", f"--workdir={tmp_path}"], check=True,
                 cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
  out = os.path.join(tmp_path, "report")
  text = open(os.path.join(out, "index.html")).read()
  pngs = {n for n in os.listdir(out) if n.endswith(".png")}
  # One trial: its curves and curvature (none here), no fit.
  assert pngs == {"training_curves.png"}
  assert all(min(read_png_size(os.path.join(out, n))) > 0 for n in pngs)
  assert text.count("Skipped:") == 2 and "allows no critical-batch fit" in text
  assert results.load_trials(str(tmp_path))[0].trial_id == t.trial_id  # report/ is not a trial


def test_empty_workdir(tmp_path):
  assert "no trial directories" in check_report(tmp_path)


def test_interpolated_crossing_is_linear_in_log_metric():
  records = [{"step": 100, "valid/error": 0.04}, {"step": 150, "train/loss": 1.0},
             {"step": 200, "valid/error": 0.01}, {"step": 300, "valid/error": 0.005}]
  # log(0.04/0.02) / log(0.04/0.01) = 1/2 of the way from 100 to 200 (linear would give 166.7).
  assert results.interpolated_crossing(records, "valid/error", 0.02) == pytest.approx(150.0)
  assert results.interpolated_crossing(records, "valid/error", 0.05) == 100  # first eval: no bracket
  assert results.interpolated_crossing(records, "valid/error", 0.001) is None
  # Strictly below: 0.01 at step 200 is not, 0.005 at 300 is; the bracket starts at the target.
  assert results.interpolated_crossing(records, "valid/error", 0.01) == pytest.approx(200.0)
  assert results.first_below(records, "valid/error", 0.01, 1) == (300, 300)
  nan = [{"step": 10, "valid/error": float("nan")}, {"step": 20, "valid/error": 0.001}]
  assert results.interpolated_crossing(nan, "valid/error", 0.02) == 20
  assert results.eval_interval(records, "valid/error") == 100


def _grid_sweep(root, slowdowns, batch_sizes, seeds=(0, 1)):
  """Trials with an lr_multiplier axis; slowdowns(bs, mult) -> factor on S (None: never reaches)."""
  for bs in batch_sizes:
    for mult in (0.5, 1.0, 2.0):
      for seed in seeds:
        factor = slowdowns(bs, mult)
        write_trial(root, bs, seed=seed, mult=mult, slowdown=factor or 1.0, reach=bool(factor),
                    curvature=False, stop_frac=1.1)
  return results.load_trials(str(root))


def test_best_setting_per_batch_edge_flag_and_censoring(tmp_path):
  # The best multiplier moves from 2 (B=64, top of the grid) to 1 (B=256) to 0.5 (B=1024,
  # bottom); B=4096 never reaches at any multiplier: censored, shown, not fitted.
  best = {64: 2.0, 256: 1.0, 1024: 0.5}
  slow = lambda bs, m: None if bs == 4096 else 1.0 if m == best[bs] else 1.3
  trials = _grid_sweep(tmp_path, slow, (64, 256, 1024, 4096))
  assert {t.setting_key for t in trials} == {json.dumps({"lr_multiplier": m}) for m in (0.5, 1.0, 2.0)}
  rows = {r["batch_size"]: r for r in study.best_per_batch(trials)}
  for bs, m in best.items():
    assert json.loads(rows[bs]["best_setting"]) == {"lr_multiplier": m}
    assert rows[bs]["lr"] == pytest.approx(0.1 * math.sqrt(bs / 128) * m)
    assert rows[bs]["steps_to_target"] == pytest.approx(true_steps(bs), abs=0.01)
  assert rows[64]["lr_at_edge"] == "lr_multiplier=2 (top of 0.5..2)"
  assert rows[256]["lr_at_edge"] == ""
  assert rows[1024]["lr_at_edge"] == "lr_multiplier=0.5 (bottom of 0.5..2)"
  assert rows[4096]["outcome"] == "not reached" and rows[4096]["steps_to_target"] is None
  (fit,) = study.fit_table(list(rows.values()), replicates=50)
  assert fit["fitted_batch_sizes"] == "64 256 1024" and fit["censored_batch_sizes"] == "4096"
  assert fit["n_points"] == 3 and fit["lr_at_edge"] == "64 1024"
  assert fit["b_crit"] == pytest.approx(B_CRIT, rel=1e-4)


def test_ties_go_to_the_lower_final_validation_error(tmp_path):
  for mult, final in ((1.0, 0.004), (2.0, 0.002)):   # same steps to target, 2x lower final error
    for seed in (0, 1):
      write_trial(tmp_path, 256, seed=seed, mult=mult, curvature=False, final_error=final)
  (row,) = study.best_per_batch(results.load_trials(str(tmp_path)))
  assert json.loads(row["best_setting"]) == {"lr_multiplier": 2.0}


def test_a_point_needs_half_its_seeds(tmp_path):
  # Multiplier 1: one of two seeds never reaches, so the point's median is infinite and the
  # slower multiplier 2 (both seeds reach) is the best.
  for seed in (0, 1):
    write_trial(tmp_path, 256, seed=seed, mult=1.0, reach=seed == 0, curvature=False)
    write_trial(tmp_path, 256, seed=seed, mult=2.0, slowdown=1.5, curvature=False)
  (row,) = study.best_per_batch(results.load_trials(str(tmp_path)))
  assert json.loads(row["best_setting"]) == {"lr_multiplier": 2.0}
  assert row["steps_to_target"] == pytest.approx(1.5 * true_steps(256), abs=0.01)


def test_bootstrap_interval_covers_the_true_critical_batch():
  """Synthetic sweeps with known lognormal seed noise (sigma 0.1, 3 seeds, 3 LR settings of which
  one is best): the 95% bootstrap interval should cover B_crit in about 95% of sweeps; 30 sweeps
  cover it >= 24 times unless coverage is far below nominal (binomial sd at 0.95: 1.2 sweeps).
  Its width should match the least-squares standard error's to within a factor 2.5."""
  rng = np.random.default_rng(1)
  batch_sizes = 2 ** np.arange(4, 14)
  covered, width_ratio = 0, []
  for _ in range(30):
    data, points = [], []
    for bs in batch_sizes:
      settings = {k: true_steps(bs) * factor * np.exp(0.1 * rng.standard_normal(3))
                  for k, factor in (("a", 1.0), ("b", 1.4), ("c", 1.8))}
      data.append((int(bs), settings))
      points.append(min(study.point_steps(v) for v in settings.values()))
    boot = study.bootstrap_fit(data, replicates=200, seed=int(rng.integers(1 << 30)))
    lo, hi = np.percentile(boot[:, 2], study.INTERVAL, method="nearest")
    covered += lo <= B_CRIT <= hi
    fit = study.fit_critical_batch(batch_sizes, points)
    width_ratio.append((hi - lo) / (2 * 1.96 * fit["b_crit_err"]))
  assert covered >= 24
  assert 1 / 2.5 < np.median(width_ratio) < 2.5


def test_bootstrap_least_squares_is_exact_on_noiseless_points():
  """Any resample of points on S = S_min (1 + B_crit/B) fits them exactly: every replicate's
  normal-equation solution equals the true parameters (to rounding)."""
  data = [(int(bs), {"a": np.full(2, true_steps(bs)), "b": np.full(2, 2 * true_steps(bs))})
          for bs in (32, 128, 512, 2048)]
  boot = study.bootstrap_fit(data, replicates=100)
  assert 80 < len(boot) <= 100   # replicates with one distinct batch size are dropped
  np.testing.assert_allclose(boot, np.tile([S_MIN, S_MIN * B_CRIT, B_CRIT], (len(boot), 1)),
                             rtol=1e-9)


def test_tiny_real_sweep_records_the_protocol_and_plots_it(tmp_path):
  """configs/mnist_sweep_tiny.py cut to 4 trials: stop reasons, caps, costs and B_simple at the
  target land in summary.json and sweep.csv, and the report draws every protocol plot."""
  from configs import mnist_sweep_tiny
  from scaling import sweep
  c = mnist_sweep_tiny.get_config()
  c.num_devices = 2
  c.sweep.batch_size, c.sweep.seed = (16, 64), (0,)
  summaries = sweep.main(c, str(tmp_path))
  assert len(summaries) == 4
  for s in summaries:
    assert s["step_cap"] == 150 and s["stop_reason"] in ("target", "budget")
    assert (s["stop_reason"] == "target") == s["target"]["reached"]
    if s["target"]["reached"]:   # stopped at the evaluation that first reached the target
      assert s["step"] == s["target"]["step"] <= 150
      assert 0 < s["target"]["at"]["wall_time"] <= s["wall_time"]
      assert math.isfinite(s["target"]["at"]["noise/b_simple"])
    else:
      assert s["step"] == 150
    assert s["examples_per_sec"] > 0 and s["compile_seconds"] > 0
    assert s["peak_memory_bytes"] > 0 and s["memory_source"]
  rows = open(os.path.join(tmp_path, "sweep.csv")).read()
  assert "stop_reason" in rows.splitlines()[0] and (",target," in rows or ",budget," in rows)
  text = check_report(tmp_path)
  pngs = set(os.listdir(os.path.join(tmp_path, "report")))
  assert {"steps_to_target.png", "tuned_lr.png", "equal_loss.png", "resources.png"} <= pngs
  assert "Why trials stopped" in text and "a step cap per batch size (B=16: 150, B=64: 150" in text


@pytest.mark.slow
def test_curvature_is_measured_when_the_target_is_first_reached(tmp_path):
  from scaling.training import train
  from tests.tiny import tiny_config
  c = tiny_config(**{"curvature.enabled": True, "curvature.density": False, "num_devices": 1,
                     "target.value": 0.85, "budget.length": 24.0})
  s = train.run(c, str(tmp_path))
  assert s["target"]["reached"] and s["target"]["step"] < 24 and s["stop_reason"] == "budget"
  at = s["target"]["at"]
  curv = [r for r in results.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
          if "curvature/top_eigenvalue" in r]
  # One measurement at the target's step, one at the end; the summary keeps both apart.
  assert [r["step"] for r in curv] == [s["target"]["step"], 24]
  assert at["curvature/top_eigenvalue"] == curv[0]["curvature/top_eigenvalue"]
  assert s["curvature"]["curvature/top_eigenvalue"] == curv[1]["curvature/top_eigenvalue"]
