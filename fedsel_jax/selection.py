"""Layer selection: problem P1, the baselines and the cost model.

Problem P1 (SPEC.md, "One round", step 2). Given scores ``s: f32[M, K]`` of M
sampled clients for K candidate layers, layer costs ``c: f32[K]`` and client
budgets ``b: f32[M]``, choose masks ``m: bool[M, K]`` that

    maximise   sum_il m_il s_il  -  lam * sum_l S_l (M - S_l),   S_l = sum_i m_il
    subject to sum_l c_l m_il <= b_i   for every client i.

The penalty equals ``lam * sum_l sum_{i<j} (m_il - m_jl)^2``: it pays for
disagreement between clients on a layer. ``lam`` has a portable scale only if
scores are normalised per client (:func:`normalize_scores`, each row sums to
1); the caller normalises, the solvers take scores as given.

Solvers live in :mod:`fedsel_jax.solver` and are re-exported here:

* :func:`solve_p1`: jittable, vmappable best-response ascent (used every
  round);
* :func:`solve_p1_exact`: host-side MILP (scipy / HiGHS), the ground truth;
* :func:`solve_p1_brute`: host-side exhaustive search for tests.

Baselines (all jittable, ``bool[M, K]``): :func:`select_full`,
:func:`select_top`, :func:`select_bottom`, :func:`select_both`,
:func:`select_random`, :func:`select_topk_scores`. With non-unit costs every
budgeted baseline walks its preference order and *skips* a layer that does not
fit the remaining budget, then continues with the next one; a budget is never
exceeded. With unit costs this is "the first ``floor(b_i)`` layers".

Costs are in units of the mean candidate layer (:func:`layer_costs`), so a
budget of 2 means "two average layers" for every cost kind.

Padding clients (``client_valid`` False) get all-False masks from the solvers
and do not count in M.

Depth-aware budgets: every budgeted baseline, :func:`select_topk_scores`,
the solvers and :func:`is_feasible` take ``backward`` (f32[K + 1]); a layer
set then costs ``sum_{l in S} costs[l] + backward[lowest(S)]``
(:class:`fedsel_jax.costs.DepthCosts`, selected with ``selection.cost =
'flops'``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedsel_jax import costs as costs_lib
from fedsel_jax import solver as solver_lib
# Re-exported: callers use them as selection.solve_p1, selection.draw_budgets etc.
# pylint: disable=unused-import
from fedsel_jax.accounting import communication_bytes
from fedsel_jax.accounting import cost_totals
from fedsel_jax.accounting import make_run_costs
from fedsel_jax.accounting import round_costs
from fedsel_jax.costs import budget_costs
from fedsel_jax.costs import BUDGET_KINDS
from fedsel_jax.costs import check_budgets
from fedsel_jax.costs import check_lam
from fedsel_jax.costs import COST_KINDS
from fedsel_jax.costs import draw_budgets
from fedsel_jax.costs import layer_costs
from fedsel_jax.costs import model_forward_flops
from fedsel_jax.costs import training_flops_per_sample
from fedsel_jax.exact import p1_objective_np
from fedsel_jax.exact import solve_p1_brute
from fedsel_jax.exact import solve_p1_exact
from fedsel_jax.knapsack import ENUMERATE_MAX_LAYERS
from fedsel_jax.solver import disagreement_pairs
from fedsel_jax.solver import JACOBI_MAX_CELLS
from fedsel_jax.solver import sanitize_scores
from fedsel_jax.solver import solve_p1
from fedsel_jax.solver import valid_or_all
# pylint: enable=unused-import

# Relative slack of :func:`is_feasible`: float32 sums of the same costs in a
# different order may differ in the last bits.
FEASIBILITY_RTOL = 1e-5



# ----------------------------------------------------------------------------
# Scores and the objective.


def count_nonfinite(scores: jax.Array) -> jax.Array:
  """i32[M]: number of NaN/inf scores per client (log it; see below).

  Args:
    scores: f32[M, K] raw scores.
  """
  return jnp.sum(~jnp.isfinite(jnp.asarray(scores, jnp.float32)), axis=-1,
                 dtype=jnp.int32)


def normalize_scores(scores: jax.Array) -> jax.Array:
  """Per-client normalisation to sum 1: the portable scale of ``lam``.

  Safe fallback, never a silent garbage mask: non-finite entries (NaN, +-inf,
  e.g. from a diverged local gradient) and negative entries are set to 0
  before normalising, and a row whose sum is then 0 (all zero, all NaN)
  becomes uniform ``1/K``, i.e. "no preference": that client follows the
  others under the penalty and picks the lowest-index layers at ``lam = 0``.
  Use :func:`count_nonfinite` on the raw scores to report how often it
  happened.

  Args:
    scores: f32[M, K] raw importance scores (>= 0 for every strategy).

  Returns:
    f32[M, K], each row non-negative and summing to 1.
  """
  s = jnp.maximum(sanitize_scores(scores), 0.0)
  total = jnp.sum(s, axis=-1, keepdims=True)
  uniform = jnp.full_like(s, 1.0 / s.shape[-1])
  return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), uniform)


def p1_penalty(masks: jax.Array, lam, client_valid: jax.Array | None = None
               ) -> jax.Array:
  """f32: ``lam * sum_l S_l (M - S_l)`` over the valid clients.

  Args:
    masks: bool[M, K].
    lam: finite scalar, either sign.
    client_valid: bool[M] or None (all valid).
  """
  valid = valid_or_all(client_valid, masks.shape[0])
  m = jnp.asarray(masks, bool) & valid[:, None]
  counts = jnp.sum(m, axis=0, dtype=jnp.int32)
  pairs = disagreement_pairs(counts, jnp.sum(valid, dtype=jnp.int32))
  return jnp.asarray(lam, jnp.float32) * pairs.astype(jnp.float32)


def p1_objective(masks: jax.Array, scores: jax.Array, lam,
                 client_valid: jax.Array | None = None) -> jax.Array:
  """f32: P1 objective ``sum m s - lam sum_l S_l (M - S_l)`` (valid clients).

  Non-finite scores count as 0 (:func:`sanitize_scores`).

  Args:
    masks: bool[M, K].
    scores: f32[M, K].
    lam: finite scalar, either sign.
    client_valid: bool[M] or None (all valid).
  """
  valid = valid_or_all(client_valid, masks.shape[0])
  m = jnp.asarray(masks, bool) & valid[:, None]
  gain = jnp.sum(jnp.where(m, sanitize_scores(scores), 0.0))
  return gain - p1_penalty(m, lam, valid)


def mask_costs(masks: jax.Array, costs: jax.Array, backward: jax.Array | None = None
               ) -> jax.Array:
  """f32[M]: cost of each client's selected layers (depth-aware if
  ``backward`` f32[K + 1] is given, :class:`fedsel_jax.costs.DepthCosts`)."""
  if backward is not None:
    return costs_lib.depth_set_cost(masks, costs, backward)
  return jnp.sum(jnp.where(masks, jnp.asarray(costs, jnp.float32), 0.0), axis=-1)


def is_feasible(masks: jax.Array, costs: jax.Array, budgets: jax.Array,
                client_valid: jax.Array | None = None,
                backward: jax.Array | None = None) -> jax.Array:
  """bool[M]: client within budget (relative slack ``FEASIBILITY_RTOL``).

  A padding client is feasible iff its mask is empty.

  Args:
    masks: bool[M, K].
    costs: f32[K].
    budgets: f32[M].
    client_valid: bool[M] or None (all valid).
    backward: f32[K + 1] or None (depth-aware budgets).
  """
  masks = jnp.asarray(masks, bool)
  valid = valid_or_all(client_valid, masks.shape[0])
  budgets = jnp.asarray(budgets, jnp.float32)
  within = mask_costs(masks, costs, backward) <= budgets + FEASIBILITY_RTOL * jnp.abs(budgets)
  return jnp.where(valid, within, ~jnp.any(masks, axis=-1))


# ----------------------------------------------------------------------------
# Baselines. Each returns bool[M, K]; padding clients get all-False rows.


def _fill_in_order(order: jax.Array, costs: jax.Array, budget: jax.Array,
                   eligible: jax.Array, backward: jax.Array | None = None) -> jax.Array:
  """Walks ``order`` and takes every eligible layer that still fits.

  Args:
    order: i32[..., K] a permutation of the layers, most preferred first.
    costs: f32[K].
    budget: f32[...].
    eligible: bool[..., K] layers that may be taken.
    backward: f32[K + 1] or None: depth-aware costs (a layer fits if the
      whole set with it does, its backward pass included).

  Returns:
    bool[..., K]; a layer that does not fit is skipped and the walk goes on.
  """
  k = costs.shape[0]
  cost_sorted = jnp.moveaxis(costs[order], -1, 0)
  elig_sorted = jnp.moveaxis(jnp.take_along_axis(eligible, order, axis=-1), -1, 0)
  back = jnp.zeros((k + 1,), jnp.float32) if backward is None else backward

  def step(carry, item):
    used, lowest = carry
    cost, elig, layer = item
    new_lowest = jnp.minimum(lowest, layer)
    take = elig & (used + cost + back[new_lowest] <= budget)
    return (used + jnp.where(take, cost, 0.0), jnp.where(take, new_lowest, lowest)), take

  init = (jnp.zeros(budget.shape, jnp.float32), jnp.full(budget.shape, k, jnp.int32))
  _, taken = jax.lax.scan(step, init, (cost_sorted, elig_sorted, jnp.moveaxis(order, -1, 0)))
  taken = jnp.moveaxis(taken, 0, -1)
  return jnp.take_along_axis(taken, jnp.argsort(order, axis=-1), axis=-1)

def _fill_clients(order: jax.Array, costs: jax.Array, budgets: jax.Array,
                  client_valid, backward=None) -> jax.Array:
  """Every client walks ``order`` ([K] shared or [M, K]) and skips misfits."""
  costs = jnp.asarray(costs, jnp.float32)
  budgets = jnp.asarray(budgets, jnp.float32)
  valid = valid_or_all(client_valid, budgets.shape[0])
  shape = budgets.shape + costs.shape
  order = jnp.broadcast_to(jnp.asarray(order, jnp.int32), shape)
  if backward is not None:
    backward = jnp.asarray(backward, jnp.float32)
  budgets = budgets + costs_lib.BUDGET_SLACK * jnp.abs(budgets)
  masks = _fill_in_order(order, costs, budgets, jnp.ones(shape, bool), backward)
  return masks & valid[:, None]


def both_ends_order(num_layers: int) -> np.ndarray:
  """i32[K]: top, bottom, next top, next bottom, ... (each layer once)."""
  order, low, high = [], 0, num_layers - 1
  while low <= high:
    order.append(high)
    if low != high:
      order.append(low)
    low, high = low + 1, high - 1
  return np.asarray(order, np.int32)


def select_full(costs: jax.Array, budgets: jax.Array, *,
                client_valid: jax.Array | None = None) -> jax.Array:
  """Every candidate layer for every valid client; budgets are ignored.

  Args:
    costs: f32[K] (only its length is used).
    budgets: f32[M] (only its length is used).
    client_valid: bool[M] or None.

  Returns:
    bool[M, K].
  """
  valid = valid_or_all(client_valid, jnp.shape(budgets)[0])
  return jnp.broadcast_to(valid[:, None], (valid.shape[0], jnp.shape(costs)[0]))


def select_top(costs: jax.Array, budgets: jax.Array, *,
               client_valid: jax.Array | None = None, backward=None) -> jax.Array:
  """Layers nearest the output first (K-1, K-2, ...), skipping misfits.

  With unit costs: the top ``floor(b_i)`` layers. With unequal costs a layer
  that does not fit the remaining budget is skipped and the walk continues
  downwards, so the budget is used as far as the order allows.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  order = np.arange(jnp.shape(costs)[0])[::-1]
  return _fill_clients(order, costs, budgets, client_valid, backward)


def select_bottom(costs: jax.Array, budgets: jax.Array, *,
                  client_valid: jax.Array | None = None, backward=None) -> jax.Array:
  """Layers nearest the input first (0, 1, ...), skipping misfits.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  order = np.arange(jnp.shape(costs)[0])
  return _fill_clients(order, costs, budgets, client_valid, backward)


def select_both(costs: jax.Array, budgets: jax.Array, *,
                client_valid: jax.Array | None = None, backward=None) -> jax.Array:
  """Alternates from both ends (:func:`both_ends_order`), skipping misfits.

  With unit costs and budget b: the top ``ceil(b/2)`` and bottom
  ``floor(b/2)`` layers, each layer at most once.

  Args:
    costs: f32[K], layers ordered input -> output.
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  return _fill_clients(both_ends_order(jnp.shape(costs)[0]), costs, budgets,
                       client_valid, backward)


def select_random(costs: jax.Array, budgets: jax.Array, key: jax.Array, *,
                  client_ids: jax.Array | None = None,
                  client_valid: jax.Array | None = None, backward=None) -> jax.Array:
  """Each client walks its own uniformly random layer order, skipping misfits.

  With unit costs: a uniformly random ``floor(b_i)``-subset per client. The
  order of client i depends only on ``fold_in(key, client_ids[i])``, so a
  client's mask does not depend on who else was sampled.

  Args:
    costs: f32[K].
    budgets: f32[M].
    key: PRNG key (e.g. the round key).
    client_ids: i32[M] global client ids; default ``arange(M)``.
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  num_clients, num_layers = jnp.shape(budgets)[0], jnp.shape(costs)[0]
  if client_ids is None:
    client_ids = jnp.arange(num_clients)
  order = jax.vmap(lambda i: jax.random.permutation(
      jax.random.fold_in(key, i), num_layers))(jnp.asarray(client_ids))
  return _fill_clients(order, costs, budgets, client_valid, backward)


def select_topk_scores(scores: jax.Array, costs: jax.Array, budgets: jax.Array,
                       *, client_valid: jax.Array | None = None,
                       backward: jax.Array | None = None) -> jax.Array:
  """Per-client best layers by score alone (P1 with lam = 0).

  Equal costs: the ``floor(b_i)`` highest scores (ties to the lower layer).
  Unequal costs: the best-response knapsack of :func:`solve_p1` (exact for
  K <= ``ENUMERATE_MAX_LAYERS``). Layers with negative scores are never
  taken; non-finite scores count as 0.

  Args:
    scores: f32[M, K] (grad-norm, RGN, SNR, ...).
    costs: f32[K].
    budgets: f32[M].
    client_valid: bool[M] or None.

  Returns:
    bool[M, K] within budget.
  """
  prob = solver_lib.make_problem(scores, costs, budgets, 0.0, client_valid,
                                 backward=backward)
  return prob.respond(prob.scores, prob.budgets) & prob.valid[:, None]
