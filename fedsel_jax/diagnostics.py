"""The convergence bound's error terms at theta^t (SPEC.md, "Theory"; docs/diagnostics.md).

Notation. A *reference set* R of clients with weights w_i = n_i (the round's
sampled clients, or in population mode every client of the federation);
g_i = grad f_i(theta^t), client i's gradient estimated by an estimator below;
gbar = sum_{i in R} w_i g_i / W with W = sum_R w_i, the estimate of grad f;
S_l = the sampled clients that train group l and P_l = sum_{S_l} w_i / W.
Groups are the K candidates plus one more, index K, for the common layers
(trained by every sampled client). Per group l:

* E1_l = ||gbar_l||^2 if S_l is empty, else 0 (importance of a layer left out);
* E2_l = ||sum_{i in S_l} w_i g_il / sum_{S_l} w_i - gbar_l||^2 if S_l is
  non-empty, else 0 (bias of averaging l over only the clients that picked it);
* kappa_l^2 = sum_R w_i ||g_il - gbar_l||^2 / W (layer-wise heterogeneity), and
  E2_l <= (1/P_l - 1) kappa_l^2 (exact inequality, docs/diagnostics.md).

Per-client gradient estimators (``ESTIMATORS``), both example-weighted (every
real example counts once, a short last batch weighs by its size):

* ``full``: every real example of the client, in batches of B rows;
* ``sampled``: a fresh uniform random subset of ``batches`` x B real examples
  (without replacement; all of them if the client has fewer), drawn from the
  per-(seed, round, client) key: an unbiased estimate of the full gradient.
* ``score``: the round's score batches (``selection.sel_batches`` x B real
  examples drawn uniformly per (seed, round, client), ``scores.draw_score_batches``):
  as unbiased as ``sampled``, and the score pass's gradients serve the
  diagnostics, so they cost no extra pass (score-based strategies only).

Everything streams over chunks of clients through the round's chunk scanner:
a round never holds more than a chunk's gradients (except when one gradient
pass serves the scores too: then the sampled clients' gradients are kept,
``federated.RoundSettings.shares_score_pass``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from fedsel_jax import batches as batches_lib
from fedsel_jax import chunks
from fedsel_jax import masks as masks_lib
# Re-exported: the per-client estimators and the curvature (callers use diagnostics.*).
from fedsel_jax.estimators import ESTIMATORS  # noqa: F401
from fedsel_jax.estimators import estimator_rows  # noqa: F401
from fedsel_jax.estimators import hessian_norm
from fedsel_jax.estimators import make_client_grad_fn
from fedsel_jax.estimators import make_client_hvp_fn
from fedsel_jax.estimators import num_diag_batches  # noqa: F401
from fedsel_jax.estimators import power_iteration  # noqa: F401
from fedsel_jax.estimators import random_direction

PyTree = Any
# Population mode also logs these sample-mode terms (suffix ``_sampled``).
_FIELDS = ("x", "y", "num_examples")   # what the gradient passes read of a client
SAMPLED_TERMS = ("e1", "e2", "e2_bound", "grad_sq", "e2_layers")


def diag_index(index: PyTree, num_candidates: int) -> PyTree:
  """The group table with the common leaves as one extra group, index K."""
  return jax.tree_util.tree_map(lambda k: num_candidates if k == masks_lib.COMMON else k, index)


@flax.struct.dataclass
class GradSums:
  """Running sums over the reference set's clients (raw weights w_i = n_i).

  Attributes:
    full: pytree, ``sum_R w_i g_i``.
    selected: pytree, ``sum_i w_sel_i m_il g_il`` (m = 1 on common leaves).
    weight: f32, ``W = sum_R w_i``.
    p_selected: f32[K+1], ``sum_{S_l} w_i`` (common group last).
    m2: f32[K+1], ``sum_R w_i ||g_il - gbar_l||^2`` (merged chunk by chunk).
    loss: f32, ``sum_R w_i f_i``.
  """

  full: PyTree
  selected: PyTree
  weight: jax.Array
  p_selected: jax.Array
  m2: jax.Array
  loss: jax.Array


def init_grad_sums(params: PyTree, num_candidates: int) -> GradSums:
  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  k1 = num_candidates + 1
  return GradSums(full=zeros, selected=zeros, weight=jnp.zeros(()),
                  p_selected=jnp.zeros((k1,)), m2=jnp.zeros((k1,)), loss=jnp.zeros(()))


def accumulate_grads(sums: GradSums, grads: PyTree, losses: jax.Array, masks: jax.Array,
                     w_ref: jax.Array, w_sel: jax.Array, index: PyTree) -> GradSums:
  """Adds a chunk of C clients.

  Args:
    sums: running sums.
    grads: pytree with leading axis ``[C, ...]``, each client's gradient.
    losses: f32[C] each client's loss at theta^t.
    masks: bool[C, K] candidate masks (ignored where ``w_sel`` is 0).
    w_ref: f32[C] weight in the reference set (0 = not in it, e.g. padding).
    w_sel: f32[C] weight in the aggregation (0 = not sampled).
    index: static leaf -> group table (``masks.group_index``).

  The heterogeneity sum uses the parallel-variance merge (Chan et al.):
  within a chunk about its own mean, then a correction for the shift between
  the chunk's mean and the running mean, so no E||g||^2 - ||E g||^2
  cancellation happens.
  """
  k = masks.shape[-1]
  didx = diag_index(index, k)
  sel = jnp.concatenate([masks.astype(jnp.float32), jnp.ones_like(masks[:, :1], jnp.float32)],
                        axis=1) * w_sel[:, None]                    # [C, K+1]

  def leaf_sel(kind, g):
    if kind < 0:
      return jnp.zeros(g.shape[1:], jnp.float32)
    return jnp.tensordot(sel[:, kind], g, axes=1)

  wc = jnp.sum(w_ref)
  chunk_sum = jax.tree_util.tree_map(lambda g: jnp.tensordot(w_ref, g, axes=1), grads)
  chunk_mean = jax.tree_util.tree_map(lambda s: s / jnp.maximum(wc, 1e-30), chunk_sum)
  centred = jax.tree_util.tree_map(lambda g, m: g - m[None], grads, chunk_mean)
  m2_chunk = w_ref @ jax.vmap(lambda g: masks_lib.group_sq_norms(g, didx, k + 1))(centred)
  old_mean = jax.tree_util.tree_map(lambda s: s / jnp.maximum(sums.weight, 1e-30), sums.full)
  shift = masks_lib.group_sq_norms(
      jax.tree_util.tree_map(jnp.subtract, chunk_mean, old_mean), didx, k + 1)
  both = sums.weight + wc
  m2 = sums.m2 + m2_chunk + shift * sums.weight * wc / jnp.maximum(both, 1e-30)
  return GradSums(
      full=jax.tree_util.tree_map(jnp.add, sums.full, chunk_sum),
      selected=jax.tree_util.tree_map(lambda a, kind, g: a + leaf_sel(kind, g),
                                      sums.selected, didx, grads),
      weight=both, p_selected=sums.p_selected + jnp.sum(sel, axis=0), m2=m2,
      loss=sums.loss + w_ref @ losses)


def error_terms(sums: GradSums, index: PyTree, num_candidates: int) -> dict[str, jax.Array]:
  """The logged terms from the sums (group K = the common layers).

  Returns:
    f32 scalars ``e1, e2, e2_bound`` (all trained groups), ``grad_sq`` (all
    trained groups), ``grad_sq_cand`` (candidates only), ``f_diag`` (the
    weighted loss at theta^t), and f32[K+1] per group ``e1_layers,
    e2_layers, kappa_sq, grad_sq_layers, p_layers`` (P_l).
  """
  k1 = num_candidates + 1
  didx = diag_index(index, num_candidates)
  total = jnp.maximum(sums.weight, 1e-30)
  covered = sums.p_selected > 0
  scale = jax.tree_util.tree_map(
      lambda kind: jnp.maximum(sums.p_selected[kind], 1e-30) if kind >= 0 else 1., didx)
  gbar = jax.tree_util.tree_map(lambda f: f / total, sums.full)
  gbar_sq = masks_lib.group_sq_norms(gbar, didx, k1)
  diff = jax.tree_util.tree_map(lambda s, c, f: s / c - f / total, sums.selected, scale,
                                sums.full)
  e2_layers = jnp.where(covered, masks_lib.group_sq_norms(diff, didx, k1), 0.)
  e1_layers = jnp.where(covered, 0., gbar_sq)
  kappa_sq = sums.m2 / total
  p_l = sums.p_selected / total
  bound = jnp.where(covered, jnp.maximum(1. / jnp.maximum(p_l, 1e-30) - 1., 0.) * kappa_sq, 0.)
  return dict(e1=jnp.sum(e1_layers), e2=jnp.sum(e2_layers), e2_bound=jnp.sum(bound),
              grad_sq=jnp.sum(gbar_sq), grad_sq_cand=jnp.sum(gbar_sq[:num_candidates]),
              f_diag=sums.loss / total, e1_layers=e1_layers, e2_layers=e2_layers,
              kappa_sq=kappa_sq, grad_sq_layers=gbar_sq, p_layers=p_l)


def make_diagnose_fn(loss_fn: Callable, index: PyTree, num_candidates: int, *,
                     scan: Callable, batch_size: int, n_max: int, estimator: str = "full",
                     batches: int = 1, power_iters: int = 0,
                     unroll: bool = False) -> tuple[Callable, Callable]:
  """The diagnostics step of a round, streamed over chunks of clients.

  Args:
    loss_fn: ``loss(params, x, y, weights, key)`` (a weighted mean).
    index: static leaf -> group table.
    num_candidates: K.
    scan: the round's chunk scanner, ``federated.scan_client_chunks`` with
      its sharding constraint bound (passed in: federated imports this module).
    batch_size, n_max, estimator, batches, unroll: see :func:`make_client_grad_fn`.
    power_iters: Hessian power iterations for L (0 = none).

  Returns ``(client_grads, diagnose)``:

  * ``client_grads(params, data, keys, chunk) -> (losses f32[C], grads [C, ...])``
    every client's estimator gradient (used when the score pass is shared);
  * ``diagnose(params, data, masks, w_ref, w_sel, keys, chunk, key, grads=None)
    -> dict`` the :func:`error_terms` plus ``lipschitz`` (the power-iteration
    estimate of the largest Hessian eigenvalue of f at theta^t in magnitude,
    over the trained leaves; NaN when ``power_iters`` is 0). ``data`` holds
    ``x [C, n_max, ...], y, num_examples`` for the C reference-set slots (a
    multiple of ``chunk``); ``masks bool[C, K]``; ``w_ref, w_sel f32[C]``
    (:func:`accumulate_grads`); ``keys [C]`` the clients' keys; ``key`` starts
    the power iteration; ``grads`` = ``client_grads`` of the same clients
    skips the gradient pass; ``sampled_too`` adds the :data:`SAMPLED_TERMS`
    with the sampled clients (``w_sel > 0``) as the reference set.
  """
  kw = dict(batch_size=batch_size, n_max=n_max, estimator=estimator, batches=batches,
            unroll=unroll)
  grad_fn = make_client_grad_fn(loss_fn, index, **kw)
  # Several batches per client: scan the clients by size (batches.py).
  by_size = functools.partial(scan, sizes_of=batches_lib.sizes_of(
      num_diag_batches(n_max, batch_size, estimator, batches), unroll))

  def client_grads(params, data, keys, chunk):
    _, out = by_size(lambda p, c: grad_fn(p, c["data"], c["keys"]), params,
                     dict(data={f: data[f] for f in _FIELDS}, keys=keys), chunk)
    return out

  return client_grads, functools.partial(
      _diagnose, grad_fn=grad_fn, hvp_fn=make_client_hvp_fn(loss_fn, index, **kw), scan=scan,
      by_size=by_size, index=index, num_candidates=num_candidates, power_iters=power_iters)


def _diagnose(params, data, masks, w_ref, w_sel, keys, chunk, key, grads=None,
              sampled_too=False, *, grad_fn, hvp_fn, scan, by_size, index, num_candidates,
              power_iters) -> dict:
  """``diagnose`` of :func:`make_diagnose_fn` (its docstring), the rest bound there."""
  inputs = dict(data={f: data[f] for f in _FIELDS}, masks=masks, w_ref=w_ref, w_sel=w_sel,
                keys=keys)
  if grads is None:
    client = lambda p, c: grad_fn(p, c["data"], c["keys"])  # noqa: E731
  else:                                   # the shared pass's gradients: no recompute
    inputs["grads"] = grads
    client = lambda p, c: c["grads"]  # noqa: E731

  def combine(carry, out, c):
    # The sample-mode sums (reference set = the sampled clients) ride along
    # in population mode: same gradients, no extra pass.
    losses, grads, ok = drop_nonfinite_grads(*out)
    w_sel = c["w_sel"] * ok
    refs = (c["w_ref"] * ok, w_sel)[:len(carry)]
    return tuple(accumulate_grads(s, grads, losses, c["masks"], w, w_sel, index)
                 for s, w in zip(carry, refs)), None

  init = (init_grad_sums(params, num_candidates),) * (2 if sampled_too else 1)
  # Given gradients have no batch loop to shorten: slot order.
  carry, _ = (scan if grads is not None else by_size)(client, params, inputs, chunk,
                                                       init=init, combine=combine)
  sums = carry[0]
  out = error_terms(sums, index, num_candidates)
  if sampled_too:
    terms = error_terms(carry[1], index, num_candidates)
    out.update({f"{name}_sampled": terms[name] for name in SAMPLED_TERMS})
  out["lipschitz"] = jnp.float32(jnp.nan)
  if power_iters > 0:
    out["lipschitz"] = hessian_norm(
        by_size, hvp_fn, params, inputs["data"], w_ref, keys, sums.weight, chunk,
        random_direction(params, index, key), power_iters)
  return out


def drop_nonfinite_grads(losses: jax.Array, grads: PyTree
                         ) -> tuple[jax.Array, PyTree, jax.Array]:
  """``(losses, grads, ok f32[C])`` with the clients whose loss or gradient at
  theta^t is not finite zeroed (``ok`` 0): they leave both sets, as
  non-finite updates leave the aggregate, and cannot turn the sums into NaN."""
  ok = jnp.isfinite(losses)
  for g in jax.tree_util.tree_leaves(grads):
    ok &= jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1)
  zero = lambda x: jnp.where(ok.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.)
  return zero(losses), jax.tree_util.tree_map(zero, grads), ok.astype(jnp.float32)


def tree_sq_norm(tree: PyTree) -> jax.Array:
  """f32: squared L2 norm of a whole pytree."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree))


def client_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """The clients' diagnostics keys this round: the same client, the same key in both modes."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def diagnose_round(diagnose: Callable, params: PyTree, rd: dict, masks: jax.Array,
                   weights: jax.Array, key: jax.Array, chunk: int, *, population: bool,
                   grads: tuple | None = None, aggregated: jax.Array | None = None
                   ) -> dict[str, jax.Array]:
  """The round's diagnostics, or NaN everywhere when ``rd['diagnose']`` is False.

  Args:
    diagnose: from :func:`make_diagnose_fn`.
    params: theta^t.
    rd: the round data; in population mode ``rd['population']`` holds every
      client's ``x, y, num_examples, client_ids`` (padding slots: id N,
      ``num_examples`` 0) for Np slots, a multiple of ``chunk``.
    masks: bool[Mp, K] the sampled clients' masks.
    weights: f32[Mp] the sampled clients' n_i (0 for padding slots).
    key: this round's diagnostics key.
    chunk: clients per chunk.
    population: reference set = every client (True) or the sampled ones.
    grads: the shared score pass's ``(losses, grads)`` of the sampled clients.
    aggregated: bool[Mp], the sampled clients whose update entered the
      aggregate (finite); the others stay in the reference set (their
      gradient at theta^t is the theorem's) but leave the aggregation set.
      None = all.
  """
  ids = rd["client_ids"]
  w_sel = weights if aggregated is None else jnp.where(aggregated, weights, 0.)

  def run(_):
    if not population:
      return diagnose(params, rd, masks, weights, w_sel, client_keys(key, ids), chunk,
                      jax.random.fold_in(key, 0x7FFFFFFF), grads)
    pop = rd["population"]
    slots = pop["client_ids"].shape[0]
    pop_masks = jnp.zeros((slots, masks.shape[1]), bool).at[ids].set(masks, mode="drop")
    sampled = jnp.zeros((slots,), jnp.float32).at[ids].set((w_sel > 0).astype(jnp.float32),
                                                           mode="drop")
    n = pop["num_examples"].astype(jnp.float32)
    return diagnose(params, pop, pop_masks, n, n * sampled, client_keys(key, pop["client_ids"]),
                    chunk, jax.random.fold_in(key, 0x7FFFFFFF), sampled_too=True)

  run, shapes = chunks.trace_once(run, None)
  skipped = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), shapes)
  return jax.lax.cond(rd.get("diagnose", True), run, lambda _: skipped, None)
