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
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from scaling import curvature as cv

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


def test_hutchinson_trace_within_its_error_band(problem, f64):
  loss_fn, params, _ = f64
  exact = problem["eigs"].sum()
  chunk = jax.jit(lambda p, start: cv.hutchinson_probes(loss_fn, p, jax.random.key(0), start, 10))
  trace = lambda tol: cv.hutchinson_trace(lambda start: chunk(params, start), max_probes=400,
                                          tol=tol)
  stopped = trace(1e-3)  # PyHessian's rule
  assert 10 <= stopped.num_probes < 400 and stopped.num_probes % 10 == 0
  assert abs(stopped.trace - exact) < 3 * stopped.stderr
  full = trace(0.0)  # the rule never fires: all 400 probes
  assert full.num_probes == 400
  assert abs(full.trace - exact) < 3 * full.stderr
  assert abs(full.trace - exact) < 0.05 * exact


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
  # The mean is a Hutchinson estimate of tr(H)/n: close, not exact.
  np.testing.assert_allclose(nodes_mean, problem["eigs"].mean(), rtol=0.1)


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


def test_projected_sharpness_reaches_lbfgsb_on_mlp(f64):
  loss_fn, params, _ = f64
  projected_fn = jax.jit(lambda p, eps: cv.epsilon_sharpness(loss_fn, p, eps=eps, num_steps=10))
  for eps in (1e-3, 1e-2):
    projected = projected_fn(params, eps)
    lbfgsb = cv.epsilon_sharpness_lbfgsb(loss_fn, params, eps=eps, max_iter=10)
    np.testing.assert_allclose(projected.loss, lbfgsb.loss)
    assert lbfgsb.sharpness > 0
    assert projected.sharpness >= lbfgsb.sharpness


def test_noise_scale_matches_exact_on_population(problem, f64):
  loss_fn, params, ravel = f64
  x, y = jnp.asarray(problem["x"]), jnp.asarray(problem["y"])
  # Population: the 256 examples. Sampling with replacement makes per-example gradients i.i.d.
  # with covariance Sigma (ddof 0), so the estimators are unbiased. Late in training B_simple is
  # large (~630 here): batches that small would leave |G|^2 buried in noise, hence B_big = 512.
  per_example_grad = lambda xi, yi: ravel_pytree(jax.grad(_loss)(params, xi[None], yi[None]))[0]
  grads_NxP = np.asarray(jax.jit(jax.vmap(per_example_grad))(x, y))
  mean_P = grads_NxP.mean(0)
  exact = np.sum((grads_NxP - mean_P) ** 2) / NUM_EXAMPLES / np.sum(mean_P ** 2)

  num_draws, b_big, groups = 400, 512, 8
  b_small = b_big // groups

  def one_draw(key):
    idx_GxS = jax.random.randint(key, (groups, b_small), 0, NUM_EXAMPLES)
    grads_GxP = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x[idx_GxS], y[idx_GxS])
    mean_grad, g_small_sq, g_big_sq = cv.group_grad_stats(grads_GxP)
    full = jax.grad(_loss)(params, x[idx_GxS.reshape(-1)], y[idx_GxS.reshape(-1)])
    return jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), mean_grad, full), g_small_sq, g_big_sq

  @jax.jit
  def run(key):
    diffs, g_small_sq_D, g_big_sq_D = jax.lax.map(one_draw, jax.random.split(key, num_draws))
    g_sq_D, trace_D = cv.noise_scale_estimates(g_small_sq_D, g_big_sq_D, b_small, b_big)
    step = lambda s, gg: (cv.noise_scale_update(s, *gg, b_small, b_big, decay=0.99), None)
    ema = jax.lax.scan(step, cv.noise_scale_init(jnp.float64), (g_small_sq_D, g_big_sq_D))[0]
    return diffs, g_sq_D.mean(), trace_D.mean(), cv.noise_scale(ema)

  diffs, g_sq, trace_sigma, (_, _, b_simple_ema) = run(jax.random.key(4))
  # The mean of the group gradients is the big batch's gradient.
  assert max(float(np.max(d)) for d in jax.tree.leaves(diffs)) < 1e-12
  np.testing.assert_allclose(trace_sigma / g_sq, exact, rtol=0.2)
  np.testing.assert_allclose(b_simple_ema, exact, rtol=0.2)


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
