"""Per-layer importance scores of one client at the global model.

Each round a client draws ``sel_batches`` random minibatches of its data
(0 = all of it) from its score key, a pure function of (seed, round, client)
(:func:`draw_score_batches`), takes the gradient of each at ``theta^t`` and reduces
them to K numbers; only those go to the server (SPEC.md, "One round", 1):

* ``gradnorm``: ``||g_l||^2`` of the client's mean gradient (the paper's);
* ``gradnorm_batch``: the mean over batches of ``||g_{b,l}||^2``;
* ``rgn``: ``||g_l|| / ||theta_l||`` (Lee et al. 2023);
* ``snr``: per-parameter ``mean^2 / var`` of the per-batch gradients,
  averaged over the layer's parameters;
* ``snr_example``: the same over per-example gradients (``vmap`` over the
  batch: memory ``batch_size`` x the parameters per client, so meant for
  small models).

Means are example-weighted: batch b with ``n_b`` real examples weighs
``n_b`` (a short last batch counts by its size), so the mean gradient is the
gradient of the mean loss over every example drawn. Variances are streamed
over batches with Chan's pairwise update of (mean, sum of squared
deviations) — a two-pass variance inside each batch, Welford across them —
never as ``E[g^2] - E[g]^2``, which cancels catastrophically in float32 when
a gradient is large and nearly constant. Both variances are population
variances (divided by the total weight).

SNR floor: per parameter, ``snr = m^2 / (v + m^2 / SNR_MAX)`` (0 where
``m = 0``): at most ``SNR_MAX`` and within ``m^2 / (v SNR_MAX)`` of
``m^2 / v`` otherwise. With a single batch the per-batch variance is 0 and
every parameter with a nonzero gradient scores exactly ``SNR_MAX``: ``snr``
then only counts which parameters get gradient, so give it
``sel_batches >= 2`` or use ``snr_example``.

The same pass gives the client's mean gradient, which ``diagnostics`` needs
for the E1/E2 estimates.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedsel_jax import batches as batches_lib
from fedsel_jax import masks as masks_lib

PyTree = Any
SCORES = ("gradnorm", "gradnorm_batch", "rgn", "snr", "snr_example")
# The SNR cap (see the module docstring): std below 1% of the mean.
SNR_MAX = 1e4
# score kind -> what the variance is taken over (None: no variance needed).
VARIANCE = {"snr": "batch", "snr_example": "example"}


def num_score_batches(n_max: int, batch_size: int, sel_batches: int) -> int:
  """Static number of score minibatches (``sel_batches`` = 0 means all)."""
  full = math.ceil(n_max / batch_size)
  return full if sel_batches <= 0 else min(sel_batches, full)


def draw_score_batches(example_mask: jax.Array, key: jax.Array, num_batches: int,
                       batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This round's score batches: a uniform sample of the client's real examples.

  A uniformly random permutation of the real examples, padding rows after
  them; the first ``num_batches * batch_size`` positions are used. So every
  real example is drawn with probability ``min(1, num_rows / n_real)``, none
  twice, and when ``num_rows >= n_real`` every one is (``sel_batches = 0``:
  all the data, in random order). Real examples come first, so the batches
  are full, then at most one short batch, then empty ones.

  Args:
    example_mask: bool[n_max], the client's real rows.
    key: PRNG key of (seed, round, client).
    num_batches: static number of batches, nb.
    batch_size: static B.

  Returns:
    ``(rows i32[nb, B], weights f32[nb, B], keys [nb])``: weight 1 for a
    real example, 0 for padding (and for positions beyond ``n_max``); keys
    for the batches' dropout.
  """
  row_key, drop_key = jax.random.split(key)
  n_max = example_mask.shape[0]
  perm = jax.random.permutation(row_key, n_max)
  # Stable: real rows keep their random order, padding moves behind them.
  order = perm[jnp.argsort(~example_mask[perm], stable=True)]
  pos = jnp.arange(num_batches * batch_size)
  rows = order[pos % n_max]
  weights = jnp.where(pos < n_max, example_mask[rows], False).astype(jnp.float32)
  return (rows.reshape(num_batches, batch_size),
          weights.reshape(num_batches, batch_size),
          jax.random.split(drop_key, num_batches))


def combine_moments(acc: tuple, batch_mean: PyTree, batch_m2: PyTree, weight
                    ) -> tuple:
  """Chan's pairwise update of streamed (mean, M2, total weight).

  Args:
    acc: ``(mean pytree, m2 pytree, total f32)`` so far.
    batch_mean: pytree, the new part's weighted mean.
    batch_m2: pytree or None (0), its sum of weighted squared deviations.
    weight: f32, its total weight (0 leaves ``acc`` unchanged).

  Returns:
    The updated ``(mean, m2, total)``.
  """
  mean, m2, total = acc
  new_total = total + weight
  frac = weight / jnp.maximum(new_total, 1e-30)  # 0 when both are empty
  if batch_m2 is None:
    batch_m2 = jax.tree_util.tree_map(jnp.zeros_like, batch_mean)

  def update(m, s, bm, bs):
    delta = bm - m
    return m + delta * frac, s + bs + delta * delta * (total * frac)

  pairs = jax.tree_util.tree_map(update, mean, m2, batch_mean, batch_m2)
  outer = jax.tree_util.tree_structure(mean)
  inner = jax.tree_util.tree_structure((0, 0))
  mean, m2 = jax.tree_util.tree_transpose(outer, inner, pairs)
  return mean, m2, new_total


def _example_moments(grad_fn: Callable, params, x, y, w, key):
  """Weighted mean and M2 of per-example gradients of one batch (two-pass)."""
  one = lambda xi, yi: grad_fn(params, xi[None], yi[None], jnp.ones((1,)), key)
  per_example = jax.vmap(one)(x, y)
  n_b = jnp.sum(w)
  wn = w / jnp.maximum(n_b, 1e-30)
  mean = jax.tree_util.tree_map(
      lambda g: jnp.tensordot(wn, g.astype(jnp.float32), axes=1), per_example)
  m2 = jax.tree_util.tree_map(
      lambda g, m: jnp.tensordot(w, jnp.square(g.astype(jnp.float32) - m), axes=1),
      per_example, mean)
  return mean, m2


def make_grad_stats_fn(loss_fn: Callable, index: PyTree, num_candidates: int, *,
                       batch_size: int, num_batches: int,
                       variance: str | None = None, unroll: bool = False) -> Callable:
  """Builds ``grad_stats(params, data, key) -> dict`` for ONE client.

  Draws ``num_batches`` batches of ``batch_size`` rows with
  :func:`draw_score_batches` (``key`` also seeds dropout), differentiates the
  weighted mean loss of each and streams example-weighted moments.

  Args:
    loss_fn: ``loss(params, x, y, weights, key) -> f32``, a weighted mean.
    index: leaf -> group table (:func:`fedsel_jax.masks.group_index`).
    num_candidates: K.
    batch_size: B.
    num_batches: static number of batches.
    variance: None, ``"batch"`` (over batch-mean gradients, weight ``n_b``)
      or ``"example"`` (over per-example gradients).
    unroll: unroll the scan over batches.

  Returns:
    ``grad_stats`` returning a dict with ``mean_grad`` (pytree like params,
    the example-weighted mean gradient; fixed leaves are not differentiated:
    zeros), ``batch_sq`` (f32[K], weighted mean of ``||g_{b,l}||^2``),
    ``num_examples`` (f32, real examples drawn), ``num_batches`` (f32,
    non-empty batches), ``loss`` (f32, the example-weighted mean loss over
    the drawn examples) and, with ``variance``, ``var`` (pytree, per-parameter
    population variance).
  """
  if variance not in (None, "batch", "example"):
    raise ValueError(f"variance must be None, 'batch' or 'example', got {variance!r}")
  diff = jax.tree_util.tree_map(lambda k: k != masks_lib.FIXED, index)
  stopped = lambda p, *a: loss_fn(jax.tree_util.tree_map(
      lambda d, x: x if d else jax.lax.stop_gradient(x), diff, p), *a)
  grad_fn, value_and_grad = jax.grad(stopped), jax.value_and_grad(stopped)

  def grad_stats(params, data, key):
    data = jax.tree_util.tree_map(jnp.asarray, data)
    rows, weights, keys = draw_score_batches(data["mask"], key, num_batches, batch_size)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, inputs):
      moments, sq, nb, loss_sum = carry
      r, w, k = inputs
      n_b = jnp.sum(w)
      x, y = data["x"][r], data["y"][r]
      if variance == "example":
        g, m2 = _example_moments(grad_fn, params, x, y, w, k)
        loss = loss_fn(params, x, y, w, k)
      else:
        loss, g = value_and_grad(params, x, y, w, k)
        g = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), g)
        m2 = None
      moments = combine_moments(moments, g, m2, n_b)
      sq = sq + n_b * masks_lib.group_sq_norms(g, index, num_candidates)
      return (moments, sq, nb + (n_b > 0).astype(jnp.float32), loss_sum + n_b * loss), None

    init = ((zeros, zeros, jnp.zeros(())), jnp.zeros((num_candidates,)), jnp.zeros(()),
            jnp.zeros(()))
    count = batches_lib.nonempty_batches(jnp.sum(data["mask"]), batch_size)
    (mean, m2, total), sq, nb, loss_sum = batches_lib.scan_first(
        body, init, (rows, weights, keys), count, unroll)
    total_safe = jnp.maximum(total, 1.0)
    out = dict(mean_grad=mean, batch_sq=sq / total_safe, num_examples=total,
               num_batches=nb, loss=loss_sum / total_safe)
    if variance is not None:
      out["var"] = jax.tree_util.tree_map(lambda s: s / total_safe, m2)
    return out

  return grad_stats


def snr_per_parameter(mean: jax.Array, var: jax.Array) -> jax.Array:
  """``m^2 / (v + m^2 / SNR_MAX)``, 0 where ``m = 0`` (module docstring)."""
  m2 = jnp.square(mean)
  denom = var + m2 / SNR_MAX
  return jnp.where(m2 > 0, m2 / jnp.where(m2 > 0, denom, 1.0), 0.0)


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
  if kind in VARIANCE:
    snr = jax.tree_util.tree_map(lambda m, v: jnp.sum(snr_per_parameter(m, v)),
                                 stats["mean_grad"], stats["var"])
    sizes = masks_lib.group_reduce(
        jax.tree_util.tree_map(lambda p: jnp.float32(p.size), params), index, num_candidates)
    return masks_lib.group_reduce(snr, index, num_candidates) / sizes
  raise ValueError(f"selection.score must be one of {list(SCORES)}, got {kind!r}")
