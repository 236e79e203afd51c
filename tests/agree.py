"""Comparing the metrics of one trial run two ways (1 vs 8 devices, 8 -> 1 -> 8, 1 vs 2 processes).

Only the order of floating-point reductions differs between the runs, so plain quantities (losses,
error rates, norms, eigenvalues) agree to a relative tolerance `rtol`. Some logged quantities are
differences of nearly equal numbers and amplify those tiny differences by their condition number;
each gets the tolerance that `rtol` on its inputs implies, never a looser constant:

- noise scale (McCandlish et al. App. A.1), b small and B big batch, S = |G_b|^2, L = |G_B|^2:
    |G|^2 = (B L - b S) / (B - b),  tr(Sigma) = (S - L) / (1/b - 1/B).
  If S and L each carry relative error d (d = 2 rtol: a squared norm doubles a norm's error),
      d|G|^2 <= d (B L + b S) / (B - b),  dtr <= d (S + L) / (1/b - 1/B),
  and the same holds for their EMAs (positive weights, the same on both runs). S and L are
  recovered from the logged EMAs themselves: S = |G|^2 + tr/b, L = |G|^2 + tr/B. The ratio
  B_simple = tr/|G|^2 adds the two relative errors. Late in training with ghost BatchNorm over
  4-example groups, the trace's amplification reaches ~10^3.
- Keskar sharpness = 100 (f_max - f) / (1 + f): d = 100 rtol (f_max + f) / (1 + f).
- Ritz residuals are rounding-sized once converged: absolute tolerance rtol * |top eigenvalue|.
Timing fields (wall time, throughput, `cost/*`, `*seconds`) are not compared.
"""
import numpy as np


def is_timing(key: str) -> bool:
  return (key in ("wall_time", "examples_per_sec") or key.startswith("cost/")
          or key.endswith("seconds"))


def noise_tolerances(record: dict, b_small: int, b_big: int, rtol: float) -> dict:
  """Absolute tolerances of noise/grad_sq, noise/trace_sigma and noise/b_simple in `record`."""
  g_sq, trace = abs(record["noise/grad_sq"]), abs(record["noise/trace_sigma"])
  small_sq, big_sq = g_sq + trace / b_small, g_sq + trace / b_big
  d = 2 * rtol
  tol_g_sq = d * (b_big * big_sq + b_small * small_sq) / (b_big - b_small)
  tol_trace = d * (small_sq + big_sq) / (1 / b_small - 1 / b_big)
  return {"noise/grad_sq": tol_g_sq, "noise/trace_sigma": tol_trace,
          "noise/b_simple": trace / g_sq * (tol_g_sq / g_sq + tol_trace / trace)}


def tolerances(record: dict, b_small: int, b_big: int, rtol: float) -> dict:
  """key -> absolute tolerance for the conditioned quantities of `record` (others: rtol)."""
  tol = {}
  if "noise/grad_sq" in record:
    tol.update(noise_tolerances(record, b_small, b_big, rtol))
  if "curvature/sharpness" in record:
    loss = record["curvature/loss"]
    max_loss = loss + record["curvature/sharpness"] * (1 + loss) / 100
    tol["curvature/sharpness"] = 100 * rtol * (abs(max_loss) + abs(loss)) / (1 + loss)
  for key in record:
    if key.startswith("curvature/eig_residual_"):
      tol[key] = rtol * abs(record["curvature/top_eigenvalue"])
  return tol


def assert_records_agree(got: list, want: list, *, b_small: int, b_big: int, rtol: float,
                         atol: float = 1e-7):
  """Same steps, same keys, every non-timing value within its tolerance (see the module notes)."""
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(got, want):
    keys = {k for k in b if not is_timing(k)}
    assert keys == {k for k in a if not is_timing(k)}, b["step"]
    conditioned = tolerances(b, b_small, b_big, rtol)
    for key in sorted(keys):
      message = f"step {b['step']} {key}"
      if key in conditioned:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=conditioned[key] + atol,
                                   err_msg=message)
      else:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=message)
