"""The selection-dependent error terms of the convergence bound (SPEC.md).

With p_i the sampled clients' normalised weights, g_il client i's gradient of
layer l at theta^t, gbar_l = sum_i p_i g_il (the estimate of grad_l f),
S_l the clients that selected l and P_l = sum_{i in S_l} p_i:

* E1 = sum_{l : S_l empty} ||gbar_l||^2 (importance of layers left out);
* E2 = sum_{l : S_l non-empty} ||sum_{i in S_l} (p_i/P_l) g_il - gbar_l||^2
  (bias of averaging a layer over only the clients that picked it);
* E2 <= sum_l (1/P_l - 1) kappa_l^2 with kappa_l^2 = sum_i p_i ||g_il - gbar_l||^2.

Everything streams over chunks of clients like the aggregation, so one round
never holds more than a chunk of gradients.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from fedsel_jax import masks as masks_lib

PyTree = Any


@flax.struct.dataclass
class GradSums:
  """Running sums over clients (weights p_i already normalised to sum 1).

  Attributes:
    full: pytree, ``sum_i p_i g_i``.
    selected: pytree, ``sum_i p_i m_il g_il`` (candidate leaves).
    sq: f32[K], ``sum_i p_i ||g_il||^2``.
    p_selected: f32[K], ``P_l``.
  """

  full: PyTree
  selected: PyTree
  sq: jax.Array
  p_selected: jax.Array


def init_grad_sums(params: PyTree, num_candidates: int) -> GradSums:
  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return GradSums(full=zeros, selected=zeros, sq=jnp.zeros((num_candidates,)),
                  p_selected=jnp.zeros((num_candidates,)))


def accumulate_grads(sums: GradSums, grads: PyTree, masks: jax.Array, p: jax.Array,
                     index: PyTree) -> GradSums:
  """Adds a chunk of C clients.

  Args:
    sums: running sums.
    grads: pytree with leading axis ``[C, ...]``, each client's mean gradient.
    masks: bool[C, K].
    p: f32[C] normalised client weights (0 for padding clients).
    index: static leaf -> group table.
  """
  k = masks.shape[-1]
  sel_w = masks.astype(jnp.float32) * p[:, None]                 # [C, K]

  def leaf_sel(kind, g):
    if kind < 0:
      return jnp.zeros(g.shape[1:], jnp.float32)
    return jnp.tensordot(sel_w[:, kind], g, axes=1)

  per_client_sq = jax.vmap(lambda g: masks_lib.group_sq_norms(g, index, k))(grads)  # [C, K]
  return GradSums(
      full=jax.tree_util.tree_map(lambda a, g: a + jnp.tensordot(p, g, axes=1), sums.full, grads),
      selected=jax.tree_util.tree_map(lambda a, kind, g: a + leaf_sel(kind, g),
                                      sums.selected, index, grads),
      sq=sums.sq + p @ per_client_sq,
      p_selected=sums.p_selected + jnp.sum(sel_w, axis=0))


def error_terms(sums: GradSums, index: PyTree) -> dict[str, jax.Array]:
  """E1, E2, the E2 bound and ||grad f||^2 (candidate layers) from the sums.

  Returns:
    dict of f32 scalars ``e1, e2, e2_bound, grad_sq`` and f32[K] per-layer
    ``grad_sq_layers, e2_layers, kappa_sq``.
  """
  k = sums.sq.shape[0]
  covered = sums.p_selected > 0
  p_l = jnp.maximum(sums.p_selected, 1e-30)
  gbar_sq = masks_lib.group_sq_norms(sums.full, index, k)
  scale = jax.tree_util.tree_map(lambda kind: p_l[kind] if kind >= 0 else 1., index)
  diff = jax.tree_util.tree_map(lambda s, f, c: s / c - f, sums.selected, sums.full, scale)
  e2_layers = jnp.where(covered, masks_lib.group_sq_norms(diff, index, k), 0.)
  kappa_sq = jnp.maximum(sums.sq - gbar_sq, 0.)
  bound = jnp.where(covered, jnp.maximum(1. / p_l - 1., 0.) * kappa_sq, 0.)
  return dict(e1=jnp.sum(jnp.where(covered, 0., gbar_sq)), e2=jnp.sum(e2_layers),
              e2_bound=jnp.sum(bound), grad_sq=jnp.sum(gbar_sq),
              grad_sq_layers=gbar_sq, e2_layers=e2_layers, kappa_sq=kappa_sq)
