"""scaling.report on synthetic trial dirs with known S_min and B_crit. No JAX."""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from scaling import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S_MIN, B_CRIT, TARGET, EVAL_EVERY = 1000.0, 512.0, 0.01, 10
ALL_PNGS = ["steps_to_target.png", "examples_to_target.png", "critical_batch_fit.png",
            "noise_scale.png", "errors_vs_batch.png", "curvature_vs_batch.png",
            "edge_of_stability.png", "training_curves.png"]


def true_steps(bs):
  return S_MIN * (1 + B_CRIT / bs)


def write_trial(root, bs, seed=1, rule="sqrt", slowdown=1.0, status="done", reach=True,
                curvature=True, noise=True, diverge_at=None, stop_frac=1.3, summary=True, flat=False):
  """A trial whose valid/error = TARGET * S / step crosses the target just after S steps.

  In <root>/trials/<id>/, or with flat=True directly in root (a single-trial workdir)."""
  tid = f"bs={bs},lr_rule={rule},seed={seed}"
  path = root if flat else os.path.join(root, "trials", tid)
  os.makedirs(path, exist_ok=True)
  s = true_steps(bs) * slowdown
  lr = 0.1 * math.sqrt(bs / 128)
  config = {
      "trial_id": tid, "batch_size": bs, "lr_rule": rule, "lr_power": 0.5, "base_lr": 0.1,
      "reference_batch_size": 128, "seed": seed,
      "optimizer": {"name": "sgd", "momentum": 0.0}, "model": {"name": "mlp"},
      "dataset": {"name": "mnist"}, "target": {"metric": "valid/error", "value": TARGET},
      "derived": {"lr": lr, "warmup_steps": 0, "total_steps": int(s * stop_frac),
                  "steps_per_epoch": 50000 // bs},
      "sweep_axes": {"batch_size": bs, "lr_rule": rule, "seed": seed}}
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
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")  # json writes NaN as the bare token NaN
  if summary:
    final = {k: v for r in records for k, v in r.items() if "/" in k and not isinstance(v, list)}
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump({"status": status, "step": last, "examples": last * bs, "wall_time": last * 0.01,
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
  return root, steps, never, report.load_trials(str(root))


def test_fit_recovers_known_critical_batch(sweep):
  fits = report.fit_table(report.best_per_batch(sweep[3]))
  assert len(fits) == 1
  fit = fits[0]
  assert fit["n_points"] == 10
  assert fit["s_min"] == pytest.approx(S_MIN, rel=0.05)
  assert fit["b_crit"] == pytest.approx(B_CRIT, rel=0.05)
  assert fit["e_min"] == pytest.approx(S_MIN * B_CRIT, rel=0.05)
  assert 0 < fit["b_crit_err"] < 0.05 * B_CRIT


def test_fit_function_directly():
  b = np.array([32, 64, 128, 256, 1024, 4096])
  fit = report.fit_critical_batch(b, true_steps(b))
  assert fit["s_min"] == pytest.approx(S_MIN) and fit["b_crit"] == pytest.approx(B_CRIT)
  two = report.fit_critical_batch([64, 128], true_steps(np.array([64, 128])))
  assert two["b_crit"] == pytest.approx(B_CRIT) and math.isnan(two["b_crit_err"])
  one = report.fit_critical_batch([64, 64], [900, 1000])
  assert math.isnan(one["b_crit"]) and "2 distinct" in one["note"]


def test_best_per_batch_takes_min_over_seeds_and_reports_not_reached(sweep):
  _, steps, never, trials = sweep
  rows = {r["batch_size"]: r for r in report.best_per_batch(trials)}
  for bs in (16, 512, 8192):
    fast, slow = (f"bs={bs},lr_rule=sqrt,seed={s}" for s in (1, 0))
    assert steps[fast] < steps[slow]
    assert rows[bs]["best_trial"] == fast
    assert rows[bs]["steps_to_target"] == steps[fast]
    assert rows[bs]["examples_to_target"] == steps[fast] * bs
    assert rows[bs]["n_trials"] == 2
  assert rows[16384]["outcome"] == "not reached" and rows[16384]["steps_to_target"] is None
  (t,) = [t for t in trials if t.trial_id == never]
  assert not t.reached
  # Perfect scaling (examples within 1.2x of B=16's): E ~ B + B_crit, so up to B <= 121.
  assert [r["perfect_scaling"] for r in rows.values()][:5] == [True, True, True, False, False]
  assert report.fit_table(list(rows.values()))[0]["perfect_scaling_up_to"] == 64


def test_steps_to_target_from_metrics_when_summary_lacks_it(tmp_path):
  _, reached_at = write_trial(tmp_path, 256, summary=False)
  (t,) = report.load_trials(str(tmp_path))
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

  trials = {t.trial_id: t for t in report.load_trials(str(tmp_path))}
  assert len(trials) == 7
  assert trials[running].status == "running" and trials[diverged].status == "diverged"
  assert math.isnan(trials[diverged].final["train/loss"])
  rows = {r["batch_size"]: r for r in report.best_per_batch(list(trials.values()))}
  assert rows[4096]["outcome"] == "pending" and rows[8192]["outcome"] == "not reached"

  text = check_report(tmp_path)
  for tid in (running, diverged, preempted):
    assert tid in text
  assert "diverged" in text and "running" in text
  pngs = {n for n in os.listdir(os.path.join(tmp_path, "report")) if n.endswith(".png")}
  assert pngs == set(ALL_PNGS)


def test_import_does_not_import_jax():
  subprocess.run([sys.executable, "-c",
                  "import scaling.report, sys; assert 'jax' not in sys.modules"],
                 check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_cli_on_single_trial_workdir_without_curvature(tmp_path):
  """Trial files directly in the workdir; absent noise/curvature data skip plots with a note."""
  write_trial(tmp_path, 128, curvature=False, noise=False, flat=True)
  (t,) = report.load_trials(str(tmp_path))
  assert t.batch_size == 128 and t.reached and t.path == str(tmp_path)
  subprocess.run([sys.executable, "-m", "scaling.report", f"--workdir={tmp_path}"], check=True,
                 cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True)
  out = os.path.join(tmp_path, "report")
  text = open(os.path.join(out, "index.html")).read()
  pngs = {n for n in os.listdir(out) if n.endswith(".png")}
  assert pngs == set(ALL_PNGS) - {"noise_scale.png", "curvature_vs_batch.png",
                                  "edge_of_stability.png", "critical_batch_fit.png"}
  assert all(min(read_png_size(os.path.join(out, n))) > 0 for n in pngs)
  assert text.count("Skipped:") == 4 and "2 distinct batch sizes" in text
  assert report.load_trials(str(tmp_path))[0].trial_id == t.trial_id  # report/ is not a trial


def test_empty_workdir(tmp_path):
  assert "no trial directories" in check_report(tmp_path)
