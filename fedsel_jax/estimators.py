"""Per-client gradient and Hessian-vector estimators at theta^t, and the curvature.

The diagnostics (``diagnostics.py``) estimate each client's gradient g_i and,
for the curvature constant L of the bound, Hessian-vector products, by one of
the :data:`ESTIMATORS` (their definitions: the ``diagnostics`` module docstring
and docs/diagnostics.md); L is the largest Hessian eigenvalue in magnitude by
power iteration over the trained leaves (:func:`hessian_norm`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedsel_jax import batches as batches_lib
from fedsel_jax import masks as masks_lib

PyTree = Any
ESTIMATORS = ("full", "sampled", "score")


def num_diag_batches(n_max: int, batch_size: int, estimator: str, batches: int) -> int:
  """Static number of batches a client's gradient is estimated on."""
  full = math.ceil(n_max / batch_size)
  if estimator == "full":
    return full
  if estimator in ("sampled", "score"):
    if batches < 1:
      raise ValueError(f"diagnostics.batches must be >= 1, got {batches}")
    return min(batches, full)
  raise ValueError(f"diagnostics.estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")


def estimator_rows(estimator: str, num_examples: jax.Array, n_max: int, batch_size: int,
                   num_batches: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rows and weights of a client's estimator batches.

  Args:
    estimator: ``full`` (rows in order) or ``sampled`` (real rows shuffled by
      ``key``; the first ``num_batches * B`` are used).
    num_examples: int32 scalar n_i; rows ``[0, n_i)`` are real.
    n_max: padded rows per client.
    batch_size: B.
    num_batches: static, from :func:`num_diag_batches`.
    key: the client's key for this round.

  Returns:
    ``rows int32[nb, B]`` (always in range) and ``weights f32[nb, B]``: 1 for
    a real example used once, 0 for padding or beyond the client's data.
  """
  pos = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  weights = (pos < num_examples).astype(jnp.float32)
  if estimator == "full":
    return pos % n_max, weights
  real = jnp.arange(n_max) < num_examples
  order = jnp.argsort(jnp.where(real, jax.random.uniform(key, (n_max,)), 2.0))
  return order[pos % n_max].astype(jnp.int32), weights


def stop_fixed(loss_fn: Callable, index: PyTree) -> Callable:
  diff = jax.tree_util.tree_map(lambda k: k != masks_lib.FIXED, index)
  return lambda p, *a: loss_fn(jax.tree_util.tree_map(
      lambda d, x: x if d else jax.lax.stop_gradient(x), diff, p), *a)


def make_client_grad_fn(loss_fn: Callable, index: PyTree, *, batch_size: int, n_max: int,
                        estimator: str, batches: int = 1, unroll: bool = False) -> Callable:
  """Builds ``client_grad(params, data, key) -> (loss f32, grad pytree)`` for ONE client.

  ``loss`` and ``grad`` are the example-weighted means over the estimator's
  examples (fixed leaves are not differentiated: zero gradient). ``data``
  has ``x [n_max, ...]``, ``y [n_max]``, ``num_examples int32``.
  """
  nb = num_diag_batches(n_max, batch_size, estimator, batches)
  value_and_grad = jax.value_and_grad(stop_fixed(loss_fn, index))

  def client_grad(params, data, key):
    rows, weights = estimator_rows(estimator, data["num_examples"], n_max, batch_size, nb,
                                   jax.random.fold_in(key, 0))
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, inputs):
      loss_sum, grad_sum = carry
      r, w, b = inputs
      loss, g = value_and_grad(params, data["x"][r], data["y"][r], w,
                               jax.random.fold_in(key, b + 1))
      wb = jnp.sum(w)        # the loss is a weighted mean: times W_b gives a sum
      grad_sum = jax.tree_util.tree_map(lambda a, x: a + wb * x.astype(jnp.float32), grad_sum, g)
      return (loss_sum + wb * loss, grad_sum), None

    loss_sum, grad_sum = batches_lib.scan_first(
        body, (jnp.zeros(()), zeros), (rows, weights, jnp.arange(nb)),
        batches_lib.nonempty_batches(data["num_examples"], batch_size), unroll)
    total = jnp.maximum(jnp.sum(weights), 1.)
    return loss_sum / total, jax.tree_util.tree_map(lambda x: x / total, grad_sum)

  return client_grad


def make_client_hvp_fn(loss_fn: Callable, index: PyTree, *, batch_size: int, n_max: int,
                       estimator: str, batches: int = 1, unroll: bool = False) -> Callable:
  """Builds ``client_hvp(params, data, key, v) -> H_i v`` for ONE client.

  H_i is the Hessian of the same example-weighted loss on the same examples
  as :func:`make_client_grad_fn` with the same key (forward-over-reverse,
  ``jax.jvp`` of ``jax.grad``, one batch at a time).
  """
  nb = num_diag_batches(n_max, batch_size, estimator, batches)
  grad = jax.grad(stop_fixed(loss_fn, index))

  def client_hvp(params, data, key, v):
    rows, weights = estimator_rows(estimator, data["num_examples"], n_max, batch_size, nb,
                                   jax.random.fold_in(key, 0))

    def body(acc, inputs):
      r, w, b = inputs
      fn = lambda p: grad(p, data["x"][r], data["y"][r], w, jax.random.fold_in(key, b + 1))
      _, hv = jax.jvp(fn, (params,), (v,))
      return jax.tree_util.tree_map(lambda a, x: a + jnp.sum(w) * x, acc, hv), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, v)
    acc = batches_lib.scan_first(body, zeros, (rows, weights, jnp.arange(nb)),
                                 batches_lib.nonempty_batches(data["num_examples"], batch_size),
                                 unroll)
    total = jnp.maximum(jnp.sum(weights), 1.)
    return jax.tree_util.tree_map(lambda x: x / total, acc)

  return client_hvp


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                            jax.tree_util.tree_leaves(b)))


def power_iteration(matvec: Callable, v0: PyTree, num_iters: int) -> jax.Array:
  """|largest-magnitude eigenvalue| of a symmetric linear map on pytrees.

  ``num_iters`` normalised products, then the Rayleigh quotient |v^T A v|
  with one more product (``num_iters + 1`` products in all).
  """
  def normalise(v):
    norm = jnp.sqrt(tree_vdot(v, v))
    return jax.tree_util.tree_map(lambda x: x / jnp.maximum(norm, 1e-30), v)

  v = jax.lax.fori_loop(0, num_iters, lambda _, v: normalise(matvec(v)), normalise(v0))
  return jnp.abs(tree_vdot(v, matvec(v)))


def random_direction(params: PyTree, index: PyTree, key: jax.Array) -> PyTree:
  """A standard normal pytree like ``params``, zero on fixed leaves."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  kinds = jax.tree_util.tree_leaves(index)
  out = [jnp.zeros(p.shape, jnp.float32) if kind == masks_lib.FIXED
         else jax.random.normal(kk, p.shape, jnp.float32)
         for p, kk, kind in zip(leaves, keys, kinds)]
  return jax.tree_util.tree_unflatten(treedef, out)


def hessian_norm(scan: Callable, hvp_fn: Callable, params: PyTree, data: dict,
                 w: jax.Array, keys: jax.Array, total: jax.Array, chunk: int, v0: PyTree,
                 iters: int) -> jax.Array:
  """L: the largest |eigenvalue| of the Hessian of f at ``params`` (the
  ``w``-weighted mean over the clients in ``data``, divided by ``total``), by
  ``iters`` power iterations from ``v0``; the Hessian-vector products stream
  over chunks of clients like the gradients do."""
  inputs = dict(data=data, w=w, keys=keys)

  def matvec(v):
    def combine(acc, hv, c):
      return jax.tree_util.tree_map(lambda a, h: a + jnp.tensordot(c["w"], h, axes=1),
                                    acc, hv), None
    acc, _ = scan(lambda pv, c: hvp_fn(pv[0], c["data"], c["keys"], pv[1]), (params, v),
                  inputs, chunk, init=jax.tree_util.tree_map(jnp.zeros_like, v),
                  combine=combine)
    return jax.tree_util.tree_map(lambda a: a / jnp.maximum(total, 1e-30), acc)

  return power_iteration(matvec, v0, iters)
