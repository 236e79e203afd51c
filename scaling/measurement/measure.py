"""Curvature of a trial's training loss, on a schedule during training or offline from a checkpoint.

The loss is the mean cross-entropy over a fixed subset of the training data (the first
`curvature.subset_size` examples, so every measurement of every trial sees the same points), in
eval mode for BatchNorm, sharded over the training mesh like a batch. The measurements are the
pure functions of scaling.measurement.curvature, each jitted once; each is timed and logged as a cost in
training steps so that a schedule can be chosen knowingly.

Offline, from a trial's checkpoint: scaling/measure_checkpoint.py.
"""
import copy
import time

import jax
import jax.numpy as jnp
import numpy as np

from scaling import sharding, streams
from scaling.measurement import curvature
from scaling.models import cross_entropy_B, mask_like
from scaling.streams import Stream


def _subset(splits, size: int, mesh):
  """The first `size` training examples, padded to a multiple of the device count with
  zero-weight examples, so that every device count measures the same loss."""
  n = min(size, len(splits.train_labels))
  pad = -n % mesh.size
  images = splits.train_images[:n].astype(np.float32) * splits.pixel_scale
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
  labels = splits.train_labels[:n]   # [n], or [n, T] for a sequence model
  labels = np.concatenate([labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)])
  weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return sharding.put_batch((images, labels, weights), mesh)


class Measure:
  """measure(state, step) -> {'curvature/...': value}; keeps the top eigenvector for warm starts.

  The warm start lives in this object only: after a resume the first Lanczos run starts cold.
  """

  def __init__(self, cc, model, splits, mesh, seed: int):
    self.cc = cc
    self.images, self.labels, self.weights = _subset(splits, cc.subset_size, mesh)
    self.key = streams.key(seed, Stream.PROBES)
    self.top_vector = None
    self._compiled = {}

    def loss(params, batch_stats, images, labels, weights):
      logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
      weights = mask_like(weights, labels)   # a sequence model's loss is the mean over tokens
      return (cross_entropy_B(logits, labels) * weights).sum() / weights.sum()

    self._loss = loss

    def bind(fn):  # f(loss_fn, params, *args) -> jitted g(params, batch_stats, data, *args)
      return jax.jit(lambda p, bs, data, *args: fn(lambda q: loss(q, bs, *data), p, *args))

    self._grad = bind(lambda f, p: jax.grad(f)(p))
    self._probes = bind(lambda f, p, key, start: curvature.hutchinson_probes(
        f, p, key, start, cc.probe_chunk, unroll=cc.unroll))
    self._eigen = bind(lambda f, p, v0: curvature.top_eigenvalues(
        f, p, v0, num_steps=cc.lanczos_steps, k=cc.top_k, unroll=cc.unroll))
    self._sharpness = bind(lambda f, p: curvature.epsilon_sharpness(
        f, p, eps=cc.sharpness_eps, num_steps=cc.sharpness_steps, unroll=cc.unroll))
    self._density = bind(lambda f, p, key: curvature.spectral_density(
        f, p, key, num_starts=cc.density_starts, num_steps=cc.density_steps, unroll=cc.unroll))

  def for_seed(self, seed: int) -> "Measure":
    """This measurement (its compiled functions shared) with its own probe key and warm start:
    one per member of a vectorised group, as a trial alone of that seed would have."""
    view = copy.copy(self)
    view.key, view.top_vector = streams.key(seed, Stream.PROBES), None
    return view

  def _top(self, state, v0, step_seconds) -> dict:
    eigen, eigen_s = self._timed(self._eigen, state, v0)
    self.top_vector = jax.tree.map(jnp.asarray, eigen.eigenvector)
    results = {"curvature/top_eigenvalue": float(eigen.eigenvalues[0]),
               "curvature/eigenvalues": [float(x) for x in eigen.eigenvalues],
               **{f"curvature/eig_residual_{i}": float(r) for i, r in enumerate(eigen.residuals)},
               "cost/lanczos_seconds": eigen_s}
    if step_seconds:
      results["cost/lanczos_in_steps"] = eigen_s / step_seconds
    return results

  def sharpness_lbfgsb(self, state, eps: float, max_iter: int = 10) -> curvature.Sharpness:
    """Keskar et al.'s epsilon-sharpness as they measured it (scipy's L-BFGS-B, max_iter
    iterations), on the same subset and eval-mode loss as the other measurements. A host loop:
    for the end of a trial, not for a schedule."""
    data = (self.images, self.labels, self.weights)
    return curvature.epsilon_sharpness_lbfgsb(
        lambda p: self._loss(p, state.batch_stats, *data), state.params, eps=eps,
        max_iter=max_iter)

  def _timed(self, fn, state, *args):
    """(result on the host, seconds of the compiled computation: compilation not counted)."""
    call_args = (state.params, state.batch_stats, (self.images, self.labels, self.weights), *args)
    if fn not in self._compiled:
      self._compiled[fn] = fn.lower(*call_args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(self._compiled[fn](*call_args))
    return sharding.to_host(out), time.perf_counter() - start

  def __call__(self, state, step: int, step_seconds: float | None = None,
               density: bool = False, top_only: bool = False) -> dict:
    """top_only: the warm-started Lanczos alone (curvature.scheduled='top_eigenvalue')."""
    key = jax.random.fold_in(self.key, step)
    v0 = self.top_vector
    if v0 is None:
      v0 = curvature.rademacher_like(jax.random.fold_in(key, 1), state.params)
    if top_only:
      return self._top(state, v0, step_seconds)
    grad_s = min(self._timed(self._grad, state)[1] for _ in range(3))   # cheap: best of 3
    trace_key = jax.random.fold_in(key, 0)
    self._timed(self._probes, state, trace_key, jnp.int32(0))   # compile (and warm) the chunk
    start = time.perf_counter()
    trace = curvature.hutchinson_trace(
        lambda first: self._timed(self._probes, state, trace_key, jnp.int32(first))[0],
        max_probes=self.cc.max_probes, tol=self.cc.trace_tol, min_probes=self.cc.min_probes)
    trace_s = time.perf_counter() - start
    eigen, eigen_s = self._timed(self._eigen, state, v0)
    self.top_vector = jax.tree.map(jnp.asarray, eigen.eigenvector)
    sharp, sharp_s = self._timed(self._sharpness, state)
    results = {
        "curvature/loss": float(sharp.loss),
        "curvature/hessian_trace": float(trace.trace),
        "curvature/hessian_trace_stderr": float(trace.stderr),
        "curvature/hessian_trace_probes": int(trace.num_probes),
        # Converged when <= curvature.trace_tol; above it the probe cap (max_probes) stopped it.
        "curvature/hessian_trace_rel_stderr": float(trace.stderr / abs(trace.trace)),
        "curvature/top_eigenvalue": float(eigen.eigenvalues[0]),
        "curvature/eigenvalues": [float(x) for x in eigen.eigenvalues],
        # Ritz residuals |H y - lambda y|: an exact eigenvalue lies within each of its lambda.
        **{f"curvature/eig_residual_{i}": float(r) for i, r in enumerate(eigen.residuals)},
        "curvature/sharpness": float(sharp.sharpness),
        "curvature/sharpness_eps": float(self.cc.sharpness_eps),
        "curvature/subset_size": int(np.sum(sharding.to_host(self.weights))),
        "cost/gradient_seconds": grad_s,
        "cost/trace_seconds": trace_s,
        "cost/lanczos_seconds": eigen_s,
        "cost/sharpness_seconds": sharp_s,
    }
    # Costs in gradients of the subset, and in training steps when the loop knows a step's time.
    for name, seconds in (("trace", trace_s), ("lanczos", eigen_s), ("sharpness", sharp_s)):
      results[f"cost/{name}_in_gradients"] = seconds / grad_s
      if step_seconds:
        results[f"cost/{name}_in_steps"] = seconds / step_seconds
    if density:
      spectrum, density_s = self._timed(self._density, state, jax.random.fold_in(key, 2))
      results["cost/density_seconds"] = density_s
      results["curvature/density"] = {name: np.asarray(getattr(spectrum, name)).tolist()
                                      for name in ("grid", "density")}
    return results
