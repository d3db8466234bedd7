"""One client's 0/1 knapsack over its layers, the inner step of every solver.

Values may be negative (a layer the penalty makes unattractive); only values
>= 0 are taken. Three solvers, chosen on the host by :func:`knapsack`:

* :func:`knapsack_uniform`: exact when all costs are equal (the best
  ``floor(b/c)`` values);
* :func:`knapsack_enumerate`: exact for unequal costs and
  ``K <= ENUMERATE_MAX_LAYERS`` (all 2^K subsets);
* :func:`knapsack_general`: greedy + local improvement above that.

All take ``values f32[..., K]``, ``costs f32[K]``, ``budget f32[...]`` and
return ``bool[..., K]`` within budget.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

# Up to this many layers a best response with unequal costs enumerates all
# 2^K subsets (exact); above it, greedy + local improvement.
ENUMERATE_MAX_LAYERS = 10


def costs_uniform_host(costs) -> bool | None:
  """Whether all costs are equal, decided on the host; None if ``costs`` is
  traced (then :func:`knapsack` falls back to a traced switch)."""
  try:
    c = np.asarray(costs)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  return bool(np.all(c == c.reshape(-1)[0]))


def descending_order(keys: jax.Array) -> jax.Array:
  """i32[..., K]: indices by decreasing key, ties to the lower index."""
  return jnp.argsort(-keys, axis=-1, stable=True)


def rank_descending(keys: jax.Array) -> jax.Array:
  """i32[..., K]: how many layers come before each one (larger key first,
  ties to the lower index). A loop over K elementwise comparisons fuses into
  one pass; the [..., K, K] comparison tensor is 20x slower at M=10^4, K=48.
  """
  k = keys.shape[-1]
  layer = jnp.arange(k)
  rank = jnp.zeros(keys.shape, jnp.int32)
  for j in range(k):
    key_j = keys[..., j:j + 1]
    rank += ((key_j > keys) | ((key_j == keys) & (j < layer))).astype(jnp.int32)
  return rank


def knapsack_uniform(values: jax.Array, costs: jax.Array, budget: jax.Array
                      ) -> jax.Array:
  """Exact when all costs are equal: the best ``floor(b/c)`` values >= 0.

  Args:
    values: f32[..., K].
    costs: f32[K] (all equal).
    budget: f32[...].

  Returns:
    bool[..., K].
  """
  eligible = values >= 0
  rank = rank_descending(jnp.where(eligible, values, -jnp.inf))
  prefix_cost = (rank + 1).astype(jnp.float32) * costs
  return eligible & (prefix_cost <= budget[..., None])


def knapsack_general(values: jax.Array, costs: jax.Array, budget: jax.Array,
                      num_improve: int = 3) -> jax.Array:
  """Heuristic 0/1 knapsack for arbitrary positive costs (no loops over K).

  The better of (a) the longest prefix of the layers by value/cost that fits
  and (b) the best single layer (together a 1/2-approximation), then
  ``num_improve`` rounds of the best improving move "drop at most one layer,
  add at most one layer" that stays within budget (an added layer fills what
  a prefix left over).

  Args:
    values: f32[..., K].
    costs: f32[K] > 0.
    budget: f32[...].
    num_improve: static number of improvement rounds.

  Returns:
    bool[..., K] within budget.
  """
  k = values.shape[-1]
  eligible = values >= 0
  rank = rank_descending(jnp.where(eligible, values / costs, -jnp.inf))
  # Cost of each layer's prefix: the layers ranked at or before it.
  prefix_cost = jnp.zeros(values.shape, jnp.float32)
  for j in range(k):
    prefix_cost += jnp.where(rank[..., j:j + 1] <= rank, costs[j], 0.0)
  prefix = eligible & (prefix_cost <= budget[..., None])
  single_val = jnp.where(eligible & (costs <= budget[..., None]), values, -jnp.inf)
  best_single = jnp.argmax(single_val, axis=-1)
  single = (jnp.arange(k) == best_single[..., None]) & jnp.isfinite(
      jnp.max(single_val, axis=-1, keepdims=True))

  def total(mask):
    return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)

  mask = jnp.where((total(single) > total(prefix))[..., None], single, prefix)
  # Moves (out, in) over {layers} + {nothing}; index k means "nothing".
  vals_ext = jnp.concatenate([values, jnp.zeros(values.shape[:-1] + (1,))], -1)
  costs_ext = jnp.concatenate([costs, jnp.zeros((1,))])
  delta = vals_ext[..., None, :] - vals_ext[..., :, None]  # [..., out, in]
  layer = jnp.arange(k)
  for _ in range(num_improve):
    used = jnp.sum(jnp.where(mask, costs, 0.0), axis=-1)
    sel_ext = jnp.concatenate([mask, jnp.ones(mask.shape[:-1] + (1,), bool)], -1)
    add_ext = jnp.concatenate([~mask & eligible,
                               jnp.ones(mask.shape[:-1] + (1,), bool)], -1)
    new_used = used[..., None, None] - costs_ext[:, None] + costs_ext[None, :]
    ok = (sel_ext[..., :, None] & add_ext[..., None, :]
          & (new_used <= budget[..., None, None]) & (delta > 0))
    flat = jnp.where(ok, delta, -jnp.inf).reshape(delta.shape[:-2] + (-1,))
    best = jnp.argmax(flat, axis=-1)
    improve = jnp.isfinite(jnp.max(flat, axis=-1))
    out_idx, in_idx = best // (k + 1), best % (k + 1)
    moved = (mask & (layer != out_idx[..., None])) | (layer == in_idx[..., None])
    mask = jnp.where(improve[..., None], moved, mask)
  return mask


def knapsack_enumerate(values: jax.Array, costs: jax.Array, budget: jax.Array
                        ) -> jax.Array:
  """Exact 0/1 knapsack by enumerating all 2^K subsets (K small, static).

  Args:
    values: f32[..., K].
    costs: f32[K].
    budget: f32[...].

  Returns:
    bool[..., K]; ties go to the subset listed first (fewer, lower layers).
  """
  k = values.shape[-1]
  table = np.array(list(itertools.product([0, 1], repeat=k)), np.float32)
  table = jnp.asarray(table[np.argsort(table.sum(1), kind="stable")])
  subset_cost = table @ costs  # [2^K]
  # A negative item adds 0 here, so a subset holding one ties with the same
  # subset without it, which comes first (fewer layers) and wins the argmax.
  subset_value = jnp.einsum("...k,sk->...s", jnp.maximum(values, 0.0), table)
  fits = subset_cost <= budget[..., None]
  best = jnp.argmax(jnp.where(fits, subset_value, -jnp.inf), -1)
  return table[best] > 0.5


def knapsack_unequal(values, costs, budget):
  """Exact enumeration for small K, else :func:`knapsack_general`."""
  if costs.shape[-1] <= ENUMERATE_MAX_LAYERS:
    return knapsack_enumerate(values, costs, budget)
  return knapsack_general(values, costs, budget)


def knapsack(values: jax.Array, costs: jax.Array, budget: jax.Array,
             uniform: bool | None) -> jax.Array:
  """Best response of each client: the exact / enumerating / greedy knapsack.

  Args:
    values: f32[..., K].
    costs: f32[K] > 0.
    budget: f32[...].
    uniform: host flag from :func:`costs_uniform_host`; None traces both
      paths behind a ``lax.cond``.

  Returns:
    bool[..., K] within budget.
  """
  if uniform is None:
    return jax.lax.cond(jnp.all(costs == costs[0]), knapsack_uniform, knapsack_unequal,
                        values, costs, budget)
  return (knapsack_uniform if uniform else knapsack_unequal)(values, costs, budget)
