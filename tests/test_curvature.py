"""Curvature metrics against exact answers on real data.

Model: MLP 64 -> 24 -> 10 (tanh, 1,810 params) on 256 load_digits images, a few steps of gradient
descent in, small enough for jax.hessian. Exact checks run in float64 (scoped `jax.enable_x64`,
never global); the sharded-vs-single-device check runs in float32 as training does.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from scipy.stats import chi2
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from scaling.measurement import curvature as cv
from scaling.measurement import noise_scale as ns

NUM_EXAMPLES = 256


def _loss(params, x_BxD, y_B):
  h_BxH = jnp.tanh(x_BxD @ params["w1"] + params["b1"])
  logits_BxC = h_BxH @ params["w2"] + params["b2"]
  label_logit_B = jnp.take_along_axis(logits_BxC, y_B[:, None], 1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits_BxC, -1) - label_logit_B)


@pytest.fixture(scope="module")
def problem():
  """Trained params, data and the exact Hessian, all as float64 numpy."""
  digits = load_digits()
  x_BxD, y_B = digits.data[:NUM_EXAMPLES] / 16.0, digits.target[:NUM_EXAMPLES]
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(64, 24)) / 8, "b1": np.zeros(24),
            "w2": rng.normal(size=(24, 10)) / np.sqrt(24), "b2": np.zeros(10)}
  with jax.enable_x64(True):
    x, y = jnp.asarray(x_BxD), jnp.asarray(y_B)

    @jax.jit
    def train(p):  # 100 steps of gradient descent: away from init, some negative curvature
      step = lambda _, p: jax.tree.map(lambda w, g: w - 0.5 * g, p, jax.grad(_loss)(p, x, y))
      return jax.lax.fori_loop(0, 100, step, p)

    params = jax.tree.map(np.asarray, train(jax.tree.map(jnp.asarray, params)))
    flat_N, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    hessian_NxN = np.asarray(jax.jit(jax.hessian(lambda q: _loss(unravel(q), x, y)))(flat_N))
  with threadpool_limits(1):  # on a loaded 2-core CPU, threaded OpenBLAS measured 3-10x slower
    eigs_N = np.linalg.eigvalsh(hessian_NxN)
  return dict(params=params, x=x_BxD, y=y_B, hessian=hessian_NxN, eigs=eigs_N)


@pytest.fixture
def f64(problem):
  """(loss closure, params, ravel) in float64 inside an enable_x64 scope."""
  with jax.enable_x64(True):
    x, y = jnp.asarray(problem["x"]), jnp.asarray(problem["y"])
    params = jax.tree.map(jnp.asarray, problem["params"])
    yield (lambda p: _loss(p, x, y)), params, (lambda tree: np.asarray(ravel_pytree(tree)[0]))


def test_hvp_both_modes_equal_exact_hessian(problem, f64):
  loss_fn, params, ravel = f64
  rng = np.random.default_rng(1)
  v = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape)), params)
  expected_N = problem["hessian"] @ ravel(v)
  for mode in ("fwd_rev", "rev_rev"):
    np.testing.assert_allclose(ravel(jax.jit(lambda p, v: cv.hvp(loss_fn, p, v, mode))(params, v)),
                               expected_N, rtol=1e-9, atol=1e-12)


def test_top_eigenvalues_lanczos_and_power_iteration(problem, f64):
  loss_fn, params, ravel = f64
  top_5 = problem["eigs"][::-1][:5]
  assert abs(top_5[0]) > abs(problem["eigs"][0])  # so power iteration targets the same eigenvalue
  v0 = cv.rademacher_like(jax.random.key(0), params)
  lanczos = jax.jit(lambda p, v0: cv.top_eigenvalues(loss_fn, p, v0, num_steps=20, k=5))
  result = lanczos(params, v0)
  np.testing.assert_allclose(result.eigenvalues, top_5, rtol=1e-3)
  u_N = ravel(result.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(u_N), 1, rtol=1e-9)
  np.testing.assert_allclose(problem["hessian"] @ u_N, top_5[0] * u_N, atol=1e-3 * top_5[0])
  # Warm start from the converged eigenvector: the Krylov space breaks down at once (the restart
  # path) and the eigenvalues must still be right.
  np.testing.assert_allclose(lanczos(params, result.eigenvector).eigenvalues, top_5, rtol=1e-3)

  power = jax.jit(lambda p: cv.power_iteration(loss_fn, p, v0, max_steps=2000, tol=1e-8))(params)
  np.testing.assert_allclose(power.eigenvalues[0], top_5[0], rtol=1e-3)
  assert power.num_steps < 2000
  # H symmetric: an exact eigenvalue lies within the residual of the Rayleigh quotient.
  assert abs(power.eigenvalues[0] - top_5[0]) <= power.residuals[0] + 1e-12


@pytest.mark.parametrize("num_steps, converged", [(3, False), (5, False), (20, True)])
def test_lanczos_residuals_bound_the_error_and_flag_unconverged(problem, f64, num_steps,
                                                                converged):
  """residual_i = |beta_m s_i[m]| is |H y_i - theta_i y_i| (exact H), an exact eigenvalue lies
  within it of theta_i, and it is small (relative to theta) only when theta is converged: at 3
  and 5 steps the top Ritz value is 17% and 0.14% low, and its residual says so."""
  loss_fn, params, ravel = f64
  eigs_N, hessian = problem["eigs"], problem["hessian"]
  v0 = cv.rademacher_like(jax.random.key(0), params)
  result = jax.jit(lambda p: cv.top_eigenvalues(loss_fn, p, v0, num_steps=num_steps, k=3))(params)
  theta_K, residual_K = np.asarray(result.eigenvalues), np.asarray(result.residuals)
  u_N = ravel(result.eigenvector)
  np.testing.assert_allclose(residual_K[0], np.linalg.norm(hessian @ u_N - theta_K[0] * u_N),
                             rtol=1e-6, atol=1e-12 * eigs_N[-1])
  for theta, residual in zip(theta_K, residual_K):
    assert np.min(np.abs(eigs_N - theta)) <= residual + 1e-12 * eigs_N[-1]
  relative_K = residual_K / np.abs(theta_K)
  if converged:
    assert np.all(relative_K < 1e-6)
    np.testing.assert_allclose(theta_K, eigs_N[::-1][:3], rtol=1e-9)
  else:  # flagged (report.py's threshold: residual > 1% of the eigenvalue) and really off
    assert relative_K[0] > 1e-2
    assert abs(theta_K[0] - eigs_N[-1]) > 1e-3 * eigs_N[-1]


def test_hutchinson_stops_at_its_promised_standard_error(problem, f64):
  """Stop at stderr <= tol * |trace| after min_probes: checked against the exact trace and the
  exact per-probe variance, Var(z^T H z) = 2 sum_{i != j} H_ij^2 for Rademacher z, over R
  independent runs. PyHessian's rule (stop when the running mean moves < tol) stopped at 10
  probes here in all 30 runs, 10% RMS relative error for tol = 5%, and reported standard errors
  up to 15%; at its default tol = 1e-3, 10 to 60 probes and 5% RMS error (14% worst)."""
  loss_fn, params, _ = f64
  hessian = problem["hessian"]
  exact = problem["eigs"].sum()
  probe_sd = np.sqrt(2 * (np.sum(hessian ** 2) - np.sum(np.diag(hessian) ** 2)))  # CV 0.29
  chunk = jax.jit(lambda p, key, start: cv.hutchinson_probes(loss_fn, p, key, start, 10))
  tol, runs, min_probes, max_probes = 0.05, 30, 20, 1000
  errors, exact_se = [], []
  for r in range(runs):
    key = jax.random.key(100 + r)
    est = cv.hutchinson_trace(lambda start: chunk(params, key, start), max_probes=max_probes,
                              tol=tol, min_probes=min_probes)
    assert min_probes <= est.num_probes < max_probes and est.num_probes % 10 == 0
    assert est.stderr <= tol * abs(est.trace)                      # the rule, as reported
    errors.append((est.trace - exact) / exact)
    exact_se.append(probe_sd / np.sqrt(est.num_probes) / exact)
  # What it promises: a true standard error of tol, up to the error of the sample std it
  # stops on (~1/sqrt(2n): 16% at n = 20; stopping favours low draws, so one run may exceed it).
  print(f"relative SE: true {np.round(exact_se, 3)}, errors {np.round(errors, 3)}")
  assert np.sqrt(np.mean(np.square(exact_se))) <= 1.2 * tol, exact_se
  # ... and the errors it makes have that spread: sum (err / se)^2 ~ chi^2_R (0.1% false alarm).
  assert np.sum((np.array(errors) / np.array(exact_se)) ** 2) <= chi2.ppf(0.999, runs)
  assert np.sqrt(np.mean(np.square(errors))) <= 1.2 * tol * np.sqrt(chi2.ppf(0.999, runs) / runs)

  # tol = 0 runs every probe; a probe count below min_probes is never returned.
  key = jax.random.key(0)
  full = cv.hutchinson_trace(lambda start: chunk(params, key, start), max_probes=400, tol=0.0)
  assert full.num_probes == 400
  assert abs(full.trace - exact) < 4 * probe_sd / np.sqrt(400)
  few = cv.hutchinson_trace(lambda start: chunk(params, key, start), tol=1.0, min_probes=30)
  assert few.num_probes == 30


def test_unrolled_loops_give_the_same_numbers(f64):
  """unroll=True (straight-line code for XLA:CPU convolutions) changes the program, not the math."""
  loss_fn, params, _ = f64
  v0, key = cv.rademacher_like(jax.random.key(0), params), jax.random.key(1)

  def metrics(p, unroll):
    return (cv.top_eigenvalues(loss_fn, p, v0, num_steps=4, k=2, unroll=unroll).eigenvalues,
            cv.hutchinson_probes(loss_fn, p, key, 5, 2, unroll=unroll),
            cv.epsilon_sharpness(loss_fn, p, num_steps=2, unroll=unroll).sharpness)

  run = jax.jit(metrics, static_argnums=1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9),
               run(params, False), run(params, True))


def test_spectral_density_quadrature(problem, f64):
  loss_fn, params, ravel = f64
  key, num_starts, num_steps = jax.random.key(3), 8, 25
  slq = jax.jit(lambda p: cv.spectral_density(loss_fn, p, key, num_starts=num_starts,
                                              num_steps=num_steps))(params)
  dx = float(slq.grid[1] - slq.grid[0])
  np.testing.assert_allclose(np.sum(slq.density) * dx, 1, rtol=1e-9)
  nodes_mean = np.sum(slq.nodes * slq.weights) / num_starts
  np.testing.assert_allclose(np.sum(slq.grid * slq.density) * dx, nodes_mean, rtol=1e-5)
  # Gauss quadrature is exact for moments below 2m: per start, sum(w * nodes^p) = v^T H^p v / n.
  hessian, n = problem["hessian"], problem["hessian"].shape[0]
  for s in range(num_starts):
    v_N = ravel(cv.rademacher_like(jax.random.fold_in(key, s), params))
    hv_N = v_N
    for p in range(4):
      np.testing.assert_allclose(np.sum(slq.weights[s] * slq.nodes[s] ** p), v_N @ hv_N / n,
                                 rtol=1e-7)
      hv_N = hessian @ hv_N
  # The mean is a Hutchinson estimate of tr(H)/n from num_starts probes: within 4 of its exact
  # standard errors (per-probe sd^2 = 2 sum_{i != j} H_ij^2), which is 10% of it here.
  probe_sd = np.sqrt(2 * (np.sum(hessian ** 2) - np.sum(np.diag(hessian) ** 2)))
  np.testing.assert_allclose(nodes_mean, problem["eigs"].mean(), rtol=0,
                             atol=4 * probe_sd / np.sqrt(num_starts) / n)


def test_lanczos_on_diagonal_quadratic_is_exact_past_breakdown():
  """6 eigenvalues, 8 Lanczos steps: the Krylov space is used up after 6; the rest adds nothing."""
  a_N = jnp.array([-1.0, 0.5, 2.0, 3.0, 5.0, 8.0])
  f = lambda x: 0.5 * jnp.sum(a_N * x ** 2)
  x_N, v0 = jnp.zeros(6), cv.rademacher_like(jax.random.key(0), jnp.zeros(6))

  @jax.jit
  def both(x_N):
    return (cv.top_eigenvalues(f, x_N, v0, num_steps=8, k=3),
            cv.spectral_density(f, x_N, jax.random.key(1), num_starts=2, num_steps=8))

  top, slq = both(x_N)
  np.testing.assert_allclose(top.eigenvalues, [8, 5, 3], rtol=1e-5)
  assert np.all(np.isfinite(slq.density))
  for nodes_M, weights_M in zip(slq.nodes, slq.weights):  # a Rademacher start: 1/6 per eigenvalue
    used_M = weights_M > 1e-6
    np.testing.assert_allclose(np.sort(nodes_M[used_M]), a_N, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights_M[used_M], 1 / 6, rtol=1e-5)


def test_epsilon_sharpness_of_diagonal_quadratic_is_closed_form(f64):
  rng = np.random.default_rng(2)
  n, eps = 50, 0.05
  a_N = rng.uniform(-2, 3, n)  # mixed curvature: corners where a >= 0, interior optima where a < 0
  b_N, x_N, c = rng.normal(size=n), rng.normal(size=n), 3.0
  f = lambda x: 0.5 * jnp.sum(a_N * x ** 2) + b_N @ x + c
  # f(x + z) - f(x) = sum_i g_i z_i + a_i z_i^2 / 2 with g = a x + b: each coordinate alone.
  g_N, r_N = a_N * x_N + b_N, eps * (np.abs(x_N) + 1)
  corner_N = np.abs(g_N) * r_N + 0.5 * a_N * r_N ** 2
  z_N = np.clip(-g_N / np.where(a_N < 0, a_N, -1), -r_N, r_N)
  gain = np.sum(np.where(a_N >= 0, corner_N, g_N * z_N + 0.5 * a_N * z_N ** 2))
  expected = 100 * gain / (1 + float(f(x_N)))

  projected = jax.jit(lambda x: cv.epsilon_sharpness(f, x, eps=eps, num_steps=20))(jnp.asarray(x_N))
  np.testing.assert_allclose(projected.sharpness, expected, rtol=1e-4)
  assert projected.sharpness <= expected * (1 + 1e-12)  # a feasible point can't beat the max
  lbfgsb = cv.epsilon_sharpness_lbfgsb(f, jnp.asarray(x_N), eps=eps)
  np.testing.assert_allclose(lbfgsb.sharpness, expected, rtol=1e-4)


def test_sharpness_on_mlp_between_a_corner_and_the_taylor_bound(problem, f64):
  """The box maximum M lies between the loss at the linearisation's best corner z = r sign(g) (a
  feasible point, evaluated exactly) and the second-order bound f + sum |g| r + lambda_max |r|^2 / 2
  (the cubic remainder is O(eps^3), ~1e-9 here). Both ascent methods must land in that band:
  a wrong-signed step or the wrong box would not (eps = 1e-3: band 0.1538 to 0.308)."""
  loss_fn, params, ravel = f64
  eps = 1e-3
  x_N, g_N = ravel(params), ravel(jax.grad(loss_fn)(params))
  r_N = eps * (np.abs(x_N) + 1)
  unravel = ravel_pytree(params)[1]
  loss = float(loss_fn(params))
  to_sharpness = lambda gain: 100 * gain / (1 + loss)
  lower = to_sharpness(float(loss_fn(unravel(jnp.asarray(x_N + r_N * np.sign(g_N))))) - loss)
  upper = to_sharpness(np.abs(g_N) @ r_N + 0.5 * max(problem["eigs"][-1], 0) * r_N @ r_N)
  assert 0 < lower < upper
  projected = jax.jit(lambda p: cv.epsilon_sharpness(loss_fn, p, eps=eps, num_steps=10))(params)
  lbfgsb = cv.epsilon_sharpness_lbfgsb(loss_fn, params, eps=eps, max_iter=10)
  np.testing.assert_allclose(projected.loss, lbfgsb.loss)
  assert lower <= projected.sharpness <= upper
  # L-BFGS-B is a local method from z = 0: it must get most of the linear gain (measured 99.7%).
  assert lower / 2 <= lbfgsb.sharpness <= upper
  assert projected.sharpness >= lbfgsb.sharpness


def test_noise_scale_algebra_recovers_both_exactly():
  """E|G_b|^2 = |G|^2 + tr(Sigma)/b: feeding exactly those values must give back |G|^2 and
  tr(Sigma) to rounding, per step and through the bias-corrected EMA of a varying sequence."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    b_small, b_big, decay, steps = 4, 32, 0.9, 50
    g_sq_T = rng.uniform(0.1, 5, steps)
    trace_T = rng.uniform(10, 2000, steps)
    small_T, big_T = g_sq_T + trace_T / b_small, g_sq_T + trace_T / b_big
    # Condition number of the |G|^2 estimate: (B L + b S) / ((B - b) |G|^2) < 1e3 here.
    g_sq, trace = ns.noise_scale_estimates(jnp.asarray(small_T), jnp.asarray(big_T), b_small, b_big)
    np.testing.assert_allclose(g_sq, g_sq_T, rtol=1e-11)
    np.testing.assert_allclose(trace, trace_T, rtol=1e-13)

    state = ns.noise_scale_init(jnp.float64)
    for small, big in zip(small_T, big_T):
      state = ns.noise_scale_update(state, small, big, b_small, b_big, decay=decay)
    weights_T = (1 - decay) * decay ** np.arange(steps)[::-1]
    ema = lambda x_T: np.sum(weights_T * x_T) / np.sum(weights_T)
    ema_g_sq, ema_trace, b_simple = ns.noise_scale(state)
    np.testing.assert_allclose(ema_g_sq, ema(g_sq_T), rtol=1e-11)
    np.testing.assert_allclose(ema_trace, ema(trace_T), rtol=1e-13)
    np.testing.assert_allclose(b_simple, ema(trace_T) / ema(g_sq_T), rtol=1e-11)


def test_noise_scale_estimators_match_per_example_ground_truth(problem, f64):
  """|G|^2 and tr(Sigma) of the 256-example population from its per-example gradients, against
  the mean of the estimators over D draws of B = 512 (8 groups of 64, with replacement: i.i.d.
  gradients of covariance Sigma, so both estimators are unbiased), within 4 standard errors of
  that mean (from the draws' own spread). The same draws put the two likely bugs -- |G|^2 over
  B instead of B - b, tr(Sigma) times b instead of 1 / (1/b - 1/B) -- more than 4 of their own
  standard errors away (|G|^2 is 12%, tr 12% off; the old rtol=0.2 on B_simple passed both)."""
  loss_fn, params, ravel = f64
  x, y = jnp.asarray(problem["x"]), jnp.asarray(problem["y"])
  per_example_grad = lambda xi, yi: ravel_pytree(jax.grad(_loss)(params, xi[None], yi[None]))[0]
  grads_NxP = jax.jit(jax.vmap(per_example_grad))(x, y)
  mean_P = grads_NxP.mean(0)
  true_g_sq = float(mean_P @ mean_P)                                     # 2.1e-3
  true_trace = float(jnp.sum((grads_NxP - mean_P) ** 2) / NUM_EXAMPLES)  # 1.35: B_simple 630

  num_draws, b_big, groups = 2000, 512, 8
  b_small = b_big // groups

  @jax.jit
  def draws(key):
    def one(key):
      idx_GxS = jax.random.randint(key, (groups, b_small), 0, NUM_EXAMPLES)
      # A group's gradient of the mean loss is the mean of its examples' gradients.
      _, g_small_sq, g_big_sq = ns.group_grad_stats(grads_NxP[idx_GxS].mean(1))
      return g_small_sq, g_big_sq
    return jax.lax.map(one, jax.random.split(key, num_draws), batch_size=100)

  small_D, big_D = draws(jax.random.key(4))
  g_sq_D, trace_D = ns.noise_scale_estimates(small_D, big_D, b_small, b_big)
  wrong_g_sq_D = (b_big * big_D - b_small * small_D) / b_big
  wrong_trace_D = (small_D - big_D) * b_small
  se = lambda x_D: float(np.std(x_D, ddof=1) / np.sqrt(num_draws))
  off = lambda x_D, truth: abs(float(np.mean(x_D)) - truth) / se(x_D)   # in standard errors
  assert off(g_sq_D, true_g_sq) < 4 and off(trace_D, true_trace) < 4
  assert off(wrong_g_sq_D, true_g_sq) > 4 and off(wrong_trace_D, true_trace) > 4

  # The groups' mean gradient is the big batch's gradient (group_grad_stats' first output).
  idx_GxS = jax.random.randint(jax.random.key(5), (groups, b_small), 0, NUM_EXAMPLES)
  grads_GxP = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x[idx_GxS], y[idx_GxS])
  mean_grad, _, _ = ns.group_grad_stats(grads_GxP)
  full = jax.grad(_loss)(params, x[idx_GxS.reshape(-1)], y[idx_GxS.reshape(-1)])
  np.testing.assert_allclose(ravel(mean_grad), ravel(full), rtol=1e-10, atol=1e-14)


def test_sharded_batch_matches_one_device(problem):
  """params replicated, batch split over 8 devices vs all on one: same numbers (float32)."""
  params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), problem["params"])
  x, y = jnp.asarray(problem["x"], jnp.float32), jnp.asarray(problem["y"])
  v = cv.rademacher_like(jax.random.key(5), params)

  def metrics(p, x, y, v):
    loss_fn = lambda q: _loss(q, x, y)
    return (cv.hvp(loss_fn, p, v),
            cv.hutchinson_probes(loss_fn, p, jax.random.key(6), 0, 10),
            cv.top_eigenvalues(loss_fn, p, v, num_steps=10).eigenvalues)

  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    args = jax.device_put((params, x, y, v), (rep, batch, batch, rep))
    assert len(args[1].sharding.device_set) == len(devices)
    results.append(jax.jit(metrics)(*args))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)


def test_report_flags_unconverged_eigenvalues():
  """scaling/analysis/report.py notes each measurement with an eigenvalue whose residual exceeds 1% of it
  (and not those within it, nor older records without residuals)."""
  from types import SimpleNamespace
  from scaling.analysis import report
  record = lambda step, residuals: {
      "step": step, "curvature/eigenvalues": [2.0, -1.0],
      **{f"curvature/eig_residual_{i}": r for i, r in enumerate(residuals)}}
  trial = SimpleNamespace(records=[record(10, [1e-6, 1e-3]), record(20, [0.5, 1e-3]),
                                   record(30, [1e-6, 0.02]), record(40, []), {"step": 50}])
  notes = report.unconverged_eigenvalues(trial)
  assert len(notes) == 2, notes
  assert notes[0].startswith("step 20: ") and "λ_0=2" in notes[0] and "λ_1" not in notes[0]
  assert notes[1].startswith("step 30: ") and "λ_1=-1" in notes[1] and "lanczos_steps" in notes[1]
