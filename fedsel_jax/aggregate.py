"""Per-layer masked aggregation (SPEC.md, "One round", step 4).

    theta_l^{t+1} = theta_l^t + sum_{i in S_l} p_i / (sum_{j in S_l} p_j) * delta_{i,l}

with S_l the sampled clients that trained layer l and p_i proportional to the
client's example count; a layer nobody trained stays unchanged; common layers
average over all sampled clients.

The sums stream: a round adds one chunk of clients at a time into an
:class:`AggState` (weighted delta sums and per-layer weight sums), so memory
does not grow with the number of clients.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fedsel_jax import masks as masks_lib

PyTree = Any


@flax.struct.dataclass
class AggState:
  """Running sums of one round's aggregation.

  Attributes:
    weighted_delta: pytree like params, ``sum_i w_i * delta_i`` (deltas are
      zero on leaves client i did not train).
    layer_weight: f32[K], ``sum_{i in S_l} w_i`` per candidate layer.
    common_weight: f32 scalar, ``sum_i w_i`` over all contributing clients.
    coverage: int32[K], ``|S_l|``.
  """

  weighted_delta: PyTree
  layer_weight: jax.Array
  common_weight: jax.Array
  coverage: jax.Array


def init_aggregation(params: PyTree, num_candidates: int) -> AggState:
  return AggState(
      weighted_delta=jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
      layer_weight=jnp.zeros((num_candidates,), jnp.float32),
      common_weight=jnp.zeros((), jnp.float32),
      coverage=jnp.zeros((num_candidates,), jnp.int32))


def accumulate(agg: AggState, deltas: PyTree, masks: jax.Array, weights: jax.Array,
               index: PyTree) -> AggState:
  """Adds a chunk of C clients.

  Args:
    agg: running sums.
    deltas: pytree with a leading client axis ``[C, ...]``; entries of leaves
      a client did not train get weight 0, and ``None`` leaves (outside the
      chunk's client-update variant) add nothing. Every entry must be finite
      (a weight of 0 does not cancel a NaN): in a round, ``client_update``
      makes untrained entries exactly 0 and ``drop_nonfinite`` removes
      non-finite clients before this.
    masks: bool[C, K] each client's trained candidate layers.
    weights: f32[C] aggregation weights (example counts; 0 = padding client).
    index: static leaf -> group table.
  """
  weights = weights.astype(jnp.float32)
  masks = masks.astype(bool)

  def leaf_sum(kind, total, d):
    if kind == masks_lib.FIXED or d is None:
      return total
    w = weights if kind == masks_lib.COMMON else jnp.where(masks[:, kind], weights, 0.)
    return total + jnp.tensordot(w, d.astype(jnp.float32), axes=1)

  return AggState(
      weighted_delta=jax.tree_util.tree_map(leaf_sum, index, agg.weighted_delta, deltas),
      layer_weight=agg.layer_weight + weights @ masks.astype(jnp.float32),
      common_weight=agg.common_weight + jnp.sum(weights),
      coverage=agg.coverage + jnp.sum(masks & (weights > 0)[:, None], axis=0).astype(jnp.int32))


def finalize(agg: AggState, index: PyTree) -> tuple[PyTree, jax.Array]:
  """Per-leaf weighted means from the running sums.

  Returns:
    ``(mean_delta, covered)``: mean_delta is 0 on leaves nobody trained;
    covered is a pytree of scalar bools (True where someone trained the leaf).
  """

  def weight_of(k):
    if k == masks_lib.COMMON:
      return agg.common_weight
    if k == masks_lib.FIXED:
      return jnp.zeros((), jnp.float32)
    return agg.layer_weight[k]

  w = jax.tree_util.tree_map(weight_of, index)
  mean = jax.tree_util.tree_map(lambda s, wl: jnp.where(wl > 0, s / jnp.maximum(wl, 1e-30), 0.),
                                agg.weighted_delta, w)
  return mean, jax.tree_util.tree_map(lambda wl: wl > 0, w)


def aggregate_masked(deltas: PyTree, masks: jax.Array, weights: jax.Array,
                     index: PyTree) -> tuple[PyTree, jax.Array]:
  """One-shot aggregation of M clients (the non-streaming form).

  Args:
    deltas: pytree with leading axis ``[M, ...]``.
    masks: bool[M, K].
    weights: f32[M].
    index: static leaf -> group table.

  Returns:
    ``(mean_delta, coverage int32[K])``.
  """
  agg = accumulate(init_aggregation(jax.tree_util.tree_map(lambda d: d[0], deltas),
                                    masks.shape[-1]), deltas, masks, weights, index)
  mean, _ = finalize(agg, index)
  return mean, agg.coverage


def server_step(params: PyTree, opt_state: Any, mean_delta: PyTree, covered: PyTree,
                server_opt: optax.GradientTransformation) -> tuple[PyTree, Any]:
  """Applies the aggregated delta with a server optimizer.

  The pseudo-gradient is ``-mean_delta`` so that ``optax.sgd(1.0)`` gives
  plain averaging. Leaves nobody trained stay bit-identical even under a
  stateful server optimizer (momentum would otherwise move them).
  """
  grads = jax.tree_util.tree_map(lambda d: -d, mean_delta)
  updates, opt_state = server_opt.update(grads, opt_state, params)
  params = jax.tree_util.tree_map(
      lambda c, p, u: jnp.where(c, p + u.astype(p.dtype), p), covered, params, updates)
  return params, opt_state


def finite_clients(deltas: PyTree, losses: jax.Array) -> jax.Array:
  """bool[C]: the clients whose loss and every delta entry are finite.

  Args:
    deltas: pytree with a leading client axis ``[C, ...]``.
    losses: f32[C] the clients' training losses.
  """
  ok = jnp.isfinite(losses)
  for d in jax.tree_util.tree_leaves(deltas):
    ok = ok & jnp.all(jnp.isfinite(d.reshape(d.shape[0], -1)), axis=1)
  return ok


def drop_nonfinite(deltas: PyTree, masks: jax.Array, weights: jax.Array, ok: jax.Array
                   ) -> tuple[PyTree, jax.Array, jax.Array]:
  """Leaves clients with ``ok`` False out of the aggregate.

  Their weight becomes 0, their mask empty and their delta 0 (a NaN times a
  zero weight is still NaN in the weighted sums, so the delta itself must go).

  Returns:
    ``(deltas, masks, weights)`` to pass to :func:`accumulate`.
  """
  def zero(d):
    return jnp.where(ok.reshape((-1,) + (1,) * (d.ndim - 1)), d, jnp.zeros((), d.dtype))
  return (jax.tree_util.tree_map(zero, deltas), masks & ok[:, None],
          jnp.where(ok, weights, 0.))


def keep_if_finite(new: PyTree, old: PyTree, accept: jax.Array) -> tuple[PyTree, jax.Array]:
  """``new`` where it is finite everywhere and ``accept`` holds, else ``old``.

  The server's guard: a round whose aggregate would make any parameter
  non-finite (or in which no client returned a finite update) changes
  nothing. Returns ``(tree, applied bool scalar)``.
  """
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(new)
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [jnp.array(True)]))
  applied = finite & accept
  return jax.tree_util.tree_map(lambda n, o: jnp.where(applied, n, o), new, old), applied
