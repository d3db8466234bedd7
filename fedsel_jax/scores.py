"""Per-layer importance scores of one client at the global model.

A client reads ``sel_batches`` consecutive minibatches of its data (0 = all),
takes the gradient of each at ``theta^t`` and reduces them to K numbers; only
those go to the server (SPEC.md, "One round", step 1):

* ``gradnorm``: ``||mean_b g_{b,l}||^2`` (the paper's);
* ``gradnorm_batch``: ``mean_b ||g_{b,l}||^2``;
* ``rgn``: ``||mean_b g_{b,l}|| / ||theta_l||`` (Lee et al. 2023);
* ``snr``: per-parameter ``mean_b(g)^2 / var_b(g)``, averaged over the layer.

The same pass gives the client's mean gradient, which ``diagnostics`` needs
for the E1/E2 estimates.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedsel_jax import masks as masks_lib

PyTree = Any
SCORES = ("gradnorm", "gradnorm_batch", "rgn", "snr")
SNR_EPS = 1e-12


def num_score_batches(n_max: int, batch_size: int, sel_batches: int) -> int:
  """Static number of score minibatches (``sel_batches`` = 0 means all)."""
  full = math.ceil(n_max / batch_size)
  return full if sel_batches <= 0 else min(sel_batches, full)


def make_grad_stats_fn(loss_fn: Callable, index: PyTree, num_candidates: int, *,
                       batch_size: int, num_batches: int,
                       second_moment: bool = False, unroll: bool = False) -> Callable:
  """Builds ``grad_stats(params, data, key) -> dict`` for ONE client.

  Batch b holds rows ``[b*B, (b+1)*B)`` of the client's (unshuffled) padded
  data; padding rows weigh 0 and all-padding batches are left out.

  Returns a dict with:
    mean_grad: pytree like params, mean over non-empty batches of the
      batch-mean gradient (fixed leaves are not differentiated: zeros).
    batch_sq: f32[K], mean over batches of ``||g_{b,l}||^2``.
    second: pytree, mean of ``g_b**2`` per parameter (only if second_moment).
    num_batches: f32, non-empty batches used.
  """
  diff = jax.tree_util.tree_map(lambda k: k != masks_lib.FIXED, index)
  grad_fn = jax.grad(lambda p, *a: loss_fn(jax.tree_util.tree_map(
      lambda d, x: x if d else jax.lax.stop_gradient(x), diff, p), *a))
  k_layers = num_candidates

  def grad_stats(params, data, key):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    n_max = data["mask"].shape[0]
    rows = jnp.arange(num_batches * batch_size).reshape(num_batches, batch_size) % n_max
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, inputs):
      s1, s2, sq, nb = carry
      r, k = inputs
      w = data["mask"][r].astype(jnp.float32)
      w = jnp.where(jnp.arange(batch_size) + r[0] < n_max, w, 0.)  # no wrap-around rows
      used = (jnp.sum(w) > 0).astype(jnp.float32)
      g = grad_fn(params, data["x"][r], data["y"][r], w, k)
      g = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) * used, g)
      s1 = jax.tree_util.tree_map(jnp.add, s1, g)
      if second_moment:
        s2 = jax.tree_util.tree_map(lambda a, x: a + x * x, s2, g)
      sq = sq + masks_lib.group_sq_norms(g, index, k_layers)
      return (s1, s2, sq, nb + used), None

    init = (zeros, zeros if second_moment else (), jnp.zeros((k_layers,)), jnp.zeros(()))
    keys = jax.random.split(key, num_batches)
    (s1, s2, sq, nb), _ = jax.lax.scan(body, init, (rows, keys), unroll=unroll)
    nb_safe = jnp.maximum(nb, 1.)
    out = dict(mean_grad=jax.tree_util.tree_map(lambda x: x / nb_safe, s1),
               batch_sq=sq / nb_safe, num_batches=nb)
    if second_moment:
      out["second"] = jax.tree_util.tree_map(lambda x: x / nb_safe, s2)
    return out

  return grad_stats


def scores_from_stats(kind: str, stats: dict, params: PyTree, index: PyTree,
                      num_candidates: int) -> jax.Array:
  """f32[K] scores of one client from :func:`make_grad_stats_fn` output."""
  mean_sq = masks_lib.group_sq_norms(stats["mean_grad"], index, num_candidates)
  if kind == "gradnorm":
    return mean_sq
  if kind == "gradnorm_batch":
    return stats["batch_sq"]
  if kind == "rgn":
    theta = masks_lib.group_sq_norms(params, index, num_candidates)
    return jnp.sqrt(mean_sq) / jnp.maximum(jnp.sqrt(theta), 1e-12)
  if kind == "snr":
    # Per-batch variance; with a single batch it is 0 and SNR degenerates to
    # mean^2 / eps, so configs should use sel_batches >= 2 with snr.
    snr = jax.tree_util.tree_map(
        lambda m, s: jnp.sum(m * m / (jnp.maximum(s - m * m, 0.) + SNR_EPS)),
        stats["mean_grad"], stats["second"])
    sizes = masks_lib.group_reduce(
        jax.tree_util.tree_map(lambda p: jnp.float32(p.size), params), index, num_candidates)
    return masks_lib.group_reduce(snr, index, num_candidates) / sizes
  raise ValueError(f"selection.score must be one of {list(SCORES)}, got {kind!r}")
